#!/usr/bin/env bash
# `make demo`: export the built-in Fashion-MNIST data (once), then run a small real sweep on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data/fashion-mnist-1k
if [[ ! -f $DATA/train.beton || ! -f $DATA/val.beton ]]; then
  "$BIN/cmx" data builtin fashion-mnist "$DATA" --limit-per-class 1000
fi
exec "$BIN/cmx" sweep --space examples/search.yaml "$@"
