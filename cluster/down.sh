#!/usr/bin/env bash
# Stop everything a cluster file started: the MLflow server on the head (cluster/stop-mlflow.sh),
# then Ray on every node (`ray down`, whose `ray stop` runs on the head; the workers' raylets exit
# once the head's GCS is gone). Run from the repo root, like `ray up`:
#
#   bash cluster/down.sh cluster/local.yaml
#
# Machines of provider `local` stay up; their disks keep ~/cmx, ~/cmx-venv and ~/mlflow (the run
# index), so the next `ray up` finds the same runs.
set -euo pipefail
FILE="${1:?usage: bash cluster/down.sh CLUSTER_FILE}"
if ! ray exec "$FILE" 'bash ~/cmx/cluster/stop-mlflow.sh'; then
  echo "cluster/down.sh: could not stop MLflow on the head (is it reachable?); stopping Ray anyway" >&2
fi
ray down "$FILE" -y
