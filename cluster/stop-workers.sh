#!/usr/bin/env bash
# On the head of a provider-`local` cluster: `ray stop` on every worker machine. `ray down` runs
# `ray stop` on the head only and merely marks the workers terminated; their raylets exit once the
# GCS is gone, but other Ray processes (log_monitor.py) stay. cluster/down.sh runs this first.
# Uses what `ray up` left on the head: ~/ray_bootstrap_config.yaml (worker IPs, SSH user) and the
# SSH key it copied. A cloud cluster has no worker_ips: nothing to do, `ray down` ends its nodes.
set -euo pipefail
CONFIG="${1:-$HOME/ray_bootstrap_config.yaml}"
read -r user key ips < <(python - "$CONFIG" <<'PY'
import os, sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
auth = c.get("auth", {})
print(auth.get("ssh_user", os.environ.get("USER", "")),
      os.path.expanduser(auth.get("ssh_private_key", "~/ray_bootstrap_key.pem")),
      " ".join(c.get("provider", {}).get("worker_ips") or []))
PY
)
for ip in ${ips:-}; do
  if ssh -i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
       -o ConnectTimeout=10 -o LogLevel=ERROR "$user@$ip" 'bash --login -c -i "ray stop"' >/dev/null 2>&1; then
    echo "ray stopped on worker $ip"
  else
    echo "could not stop Ray on worker $ip (unreachable?)" >&2
  fi
done
