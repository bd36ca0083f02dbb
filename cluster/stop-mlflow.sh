#!/usr/bin/env bash
# Stop the MLflow server that start-mlflow.sh started on this node (by its pid file only).
set -euo pipefail
DIR="${CMX_MLFLOW_DIR:-$HOME/mlflow}"
if [ ! -f "$DIR/server.pid" ]; then
  echo "no $DIR/server.pid: nothing to stop"
  exit 0
fi
PID="$(cat "$DIR/server.pid")"
# start-mlflow.sh runs the server as a session (and process group) leader: stop the whole group,
# so uvicorn's workers go too.
if kill -0 "$PID" 2>/dev/null; then
  kill -TERM -- "-$PID" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$PID" 2>/dev/null || true
fi
rm -f "$DIR/server.pid"
echo "mlflow server stopped"
