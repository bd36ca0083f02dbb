#!/usr/bin/env bash
# Start the cmx MLflow tracking server in the background on this node (the Ray head), once.
#
#   CMX_MLFLOW_BACKEND_URI   database for runs/metrics (required), e.g.
#                            postgresql://<DB_USER>:<DB_PASSWORD>@<DB_HOST>:5432/mlflow
#                            (sqlite:////home/ubuntu/mlflow/mlflow.db also works, but the run index
#                            then dies with the head node on `ray down`)
#   CMX_MLFLOW_ARTIFACTS     artifact store (required), e.g. s3://<YOUR_S3_BUCKET>/cmx/mlflow
#   CMX_MLFLOW_HOST          bind address (default 0.0.0.0: workers reach it over the private
#                            network; the security group keeps the port closed to the internet)
#   CMX_MLFLOW_PORT          default 5000
#   CMX_MLFLOW_WORKERS       uvicorn workers (default 2)
#   CMX_MLFLOW_ALLOWED_HOSTS Host headers accepted (MLflow's default: localhost and private IPs,
#                            which covers nodes in a VPC/LAN; set it for a DNS name)
#   CMX_MLFLOW_DIR           pid and log files (default ~/mlflow)
#
# Artifacts are proxied by the server (--serve-artifacts): workers need no S3 credentials for
# MLflow, only the head's instance profile does. Idempotent: a healthy server is left alone.
set -euo pipefail

: "${CMX_MLFLOW_BACKEND_URI:?set CMX_MLFLOW_BACKEND_URI (database URI for the tracking server)}"
: "${CMX_MLFLOW_ARTIFACTS:?set CMX_MLFLOW_ARTIFACTS (e.g. s3://bucket/cmx/mlflow)}"
HOST="${CMX_MLFLOW_HOST:-0.0.0.0}"
PORT="${CMX_MLFLOW_PORT:-5000}"
WORKERS="${CMX_MLFLOW_WORKERS:-2}"
DIR="${CMX_MLFLOW_DIR:-$HOME/mlflow}"
PROBE_HOST="$HOST"
[ "$PROBE_HOST" = "0.0.0.0" ] && PROBE_HOST=127.0.0.1

healthy() { curl -fsS -m 2 "http://$PROBE_HOST:$PORT/health" >/dev/null 2>&1; }

mkdir -p "$DIR"
if healthy; then
  echo "mlflow server already healthy on $HOST:$PORT"
  exit 0
fi

# The job runner is off: it doubles start time and memory (2-core measurement: 9 s / 560 MB vs
# 18 s / 1.4 GB), and cmx does not use MLflow jobs.
# A session of its own (setsid), so stop-mlflow.sh can end the server and its uvicorn workers
# as one process group.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
  setsid nohup mlflow server \
    --backend-store-uri "$CMX_MLFLOW_BACKEND_URI" \
    --artifacts-destination "$CMX_MLFLOW_ARTIFACTS" \
    --serve-artifacts \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    ${CMX_MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$CMX_MLFLOW_ALLOWED_HOSTS"} \
    >>"$DIR/server.log" 2>&1 &
echo $! >"$DIR/server.pid"

for _ in $(seq 1 120); do
  if healthy; then
    echo "mlflow server healthy on $HOST:$PORT (pid $(cat "$DIR/server.pid"), log $DIR/server.log)"
    exit 0
  fi
  if ! kill -0 "$(cat "$DIR/server.pid")" 2>/dev/null; then
    echo "mlflow server exited; last log lines:" >&2
    tail -n 30 "$DIR/server.log" >&2
    exit 1
  fi
  sleep 1
done
echo "mlflow server not healthy after 120 s; see $DIR/server.log" >&2
exit 1
