#!/usr/bin/env bash
# Start a cluster file: make sure this laptop has its Ray token, then `ray up`. Run from the repo
# root (the file mounts it):
#
#   bash cluster/up.sh cluster/local.yaml        # extra arguments go to `ray up`
#
# The token is Ray's own client default, ~/.ray/auth_token: created here once (`ray
# get-auth-token --generate` keeps an existing one), shipped to every node by the file's
# file_mounts, and read from there by `ray status`, `ray job submit` and `cmx sweep --address` on
# this laptop without further steps. It is never printed.
set -euo pipefail
FILE="${1:?usage: bash cluster/up.sh CLUSTER_FILE [ray up options]}"
shift
ray get-auth-token --generate >/dev/null
test -s "$HOME/.ray/auth_token" || { echo "cluster/up.sh: no Ray token at ~/.ray/auth_token" >&2; exit 1; }
exec ray up "$FILE" -y "$@"
