#!/usr/bin/env bash
# `make demo`: export the built-in Fashion-MNIST data (once), then run a small real sweep on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data/fashion-mnist-1k
# train / val (carved from the official train split) / test (the official test split); a finished
# export is kept ("already complete"), an older one whose val was the test split is redone.
"$BIN/cmx" data builtin fashion-mnist "$DATA" --limit-per-class 1000
exec "$BIN/cmx" sweep --space examples/search.yaml "$@"
