#!/usr/bin/env bash
# Stop everything a cluster file started: the MLflow server on the head (cluster/stop-mlflow.sh),
# Ray on every worker machine of a `local` cluster (cluster/stop-workers.sh, run on the head), then
# `ray down` (`ray stop` on the head; on a cloud, the nodes end). Run from the repo root, like `ray up`:
#
#   bash cluster/down.sh cluster/local.yaml
#
# Machines of provider `local` stay up; their disks keep ~/cmx, ~/cmx-venv and ~/mlflow (the run
# index), so the next `ray up` finds the same runs.
set -euo pipefail
FILE="${1:?usage: bash cluster/down.sh CLUSTER_FILE}"
if ! ray exec "$FILE" 'bash ~/cmx/cluster/stop-mlflow.sh; bash ~/cmx/cluster/stop-workers.sh'; then
  echo "cluster/down.sh: could not stop MLflow or the workers from the head (is it reachable?); stopping Ray anyway" >&2
fi
ray down "$FILE" -y
