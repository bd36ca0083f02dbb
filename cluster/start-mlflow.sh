#!/usr/bin/env bash
# Start the cmx MLflow tracking server in the background on this node (the Ray head), once.
#
#   CMX_MLFLOW_BACKEND_URI   database for runs/metrics (required), e.g.
#                            postgresql://<DB_USER>:<DB_PASSWORD>@<DB_HOST>:5432/mlflow
#                            (sqlite:////home/ubuntu/mlflow/mlflow.db also works, but the run index
#                            then dies with the head node on `ray down`)
#   CMX_MLFLOW_ARTIFACTS     artifact store (required), e.g. s3://<YOUR_S3_BUCKET>/cmx/mlflow
#   CMX_MLFLOW_HOST          bind address (required): the head's private address, which every node
#                            reaches; 0.0.0.0 / :: (all interfaces) are refused
#   CMX_MLFLOW_AUTH          basic (default): MLflow's basic-auth app. On first start an admin password
#                            is generated into $CMX_MLFLOW_DIR/credentials.env (mode 600, never printed),
#                            which clients load as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#                            none: no authentication (only for a server on 127.0.0.1 in tests)
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
: "${CMX_MLFLOW_HOST:?set CMX_MLFLOW_HOST to the private address of the head (never 0.0.0.0)}"
HOST="$CMX_MLFLOW_HOST"
PORT="${CMX_MLFLOW_PORT:-5000}"
WORKERS="${CMX_MLFLOW_WORKERS:-2}"
DIR="${CMX_MLFLOW_DIR:-$HOME/mlflow}"
AUTH="${CMX_MLFLOW_AUTH:-basic}"
case "$HOST" in
  0.0.0.0 | :: | "[::]" | "*")
    echo "CMX_MLFLOW_HOST=$HOST would open MLflow on every interface; use the head's private address" >&2
    exit 2 ;;
esac
case "$AUTH" in basic | none) ;; *) echo "CMX_MLFLOW_AUTH must be basic or none, not $AUTH" >&2; exit 2 ;; esac
PROBE_HOST="$HOST"

healthy() { curl -fsS -m 2 "http://$PROBE_HOST:$PORT/health" >/dev/null 2>&1; }

umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"
if healthy; then
  echo "mlflow server already healthy on $HOST:$PORT"
  exit 0
fi

# Basic auth: the admin password and Flask's CSRF key are generated once per cluster (the head's
# $DIR) and live only in files of mode 600; MLflow reads the password from its auth config file,
# so it never appears on a command line, in the environment of other users' `ps`, or in a log.
AUTH_ARGS=()
if [ "$AUTH" = basic ]; then
  if [ ! -s "$DIR/credentials.env" ]; then
    password="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$password" >"$DIR/credentials.env"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/flask_secret"
    unset password
  fi
  chmod 600 "$DIR/credentials.env" "$DIR/flask_secret"
  {
    echo "[mlflow]"
    echo "default_permission = NO_PERMISSIONS"
    echo "database_uri = sqlite:///$DIR/basic_auth.db"
    echo "admin_username = admin"
    echo "admin_password = $(sed -n 's/^MLFLOW_TRACKING_PASSWORD=//p' "$DIR/credentials.env")"
    echo "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
  } >"$DIR/basic_auth.ini"
  chmod 600 "$DIR/basic_auth.ini"
  AUTH_ARGS=(--app-name basic-auth)
  export MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini"
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$DIR/flask_secret")"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
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
    ${AUTH_ARGS[@]+"${AUTH_ARGS[@]}"} \
    ${CMX_MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$CMX_MLFLOW_ALLOWED_HOSTS"} \
    >>"$DIR/server.log" 2>&1 &
echo $! >"$DIR/server.pid"

for _ in $(seq 1 120); do
  if healthy; then
    echo "mlflow server healthy on $HOST:$PORT, auth $AUTH (pid $(cat "$DIR/server.pid"), log $DIR/server.log)"
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
