"""`ray up cluster/local.yaml` for real: Ray's own launcher on two SSH machines, a sweep across them,
MLflow with authentication, `cluster/down.sh`, and nothing left behind.

The machines are namespaces on this one (tests/support/ssh_nodes.py): each node has its own network
(a veth on a private 10.x bridge), mounts (its own home, /tmp with /tmp/ray, /var/tmp, /dev/shm,
the shared directory at /mnt/cmx-shared), PID namespace and hostname, and runs sshd. The test is the
laptop: its own $HOME (SSH key, `ray get-auth-token --generate`'s token) and temp dir. The cluster
file is a copy of cluster/local.yaml with only the placeholders filled (addresses, user root, one
worker); `ray up` runs its setup and start commands unchanged: the token and the repo (with .git)
travel by rsync, the venv gets `pip install -e ~/cmx`, the head starts MLflow (basic auth, bound to
its private address) and Ray (token auth), the head's autoscaler SSHes into the worker and starts
it. A two-trial sweep is submitted from the laptop as a Ray job (`cmx cluster submit`, the cluster's token through `ray dashboard`'s tunnel); its trials run
one per node (2 CPUs each). MLflow is queried from the laptop with and without credentials; the
runs carry the commit `ray up` shipped. `bash cluster/down.sh` stops MLflow, Ray on the worker
(from the head) and `ray down`; then no process but sshd is left on either node, and after the
fixture kills the nodes no process, interface or directory of theirs is left on this machine.
Measured 2026-12-02: 5.7 min at load average 4-5, 8 min at 6-9 (docs/scaling.md §3).

What differs from a lab, and is not covered:
- the nodes share this machine's filesystem outside the mounts above and its kernel; "NFS" is a
  bind mount of one directory;
- no network beyond the bridge: the setup's `apt-get` is skipped because the packages are present
  (the command installs only missing ones), and pip cannot download: before `ray up` the test makes
  each node's ~/cmx-venv itself (`python -m venv`, then a .pth to the test's own site-packages and a
  pip.conf with no-index), so `pip install -e ~/cmx` installs cmx from the shipped repo but takes
  its dependencies from the test's venv. The setup's `test -d ~/cmx-venv` keeps that venv;
- SSH user root (sudo is a no-op); GPUs absent (trials ask for CPUs only).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.ray_processes import pids_with_env
from support.ssh_nodes import SHARED_MOUNT, Node, SshNodes, missing_tools
from support.sweeps import base_config, trial_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITE = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
LAPTOP_TAG = "CMX_TEST_RAY_UP"
MLFLOW_PORT = 5000  # cluster/local.yaml's
SWEEP = "rayup"

# A node's venv as `ray up`'s setup commands expect to find it (see the module docstring): the
# interpreter of the test's venv; pip, setuptools and cmx's dependencies from the test's
# site-packages (the console scripts `ray`, `pip`, `mlflow`... re-pointed at the node's python);
# pip offline.
NODE_VENV = f"""
set -e
{Path(sys.base_prefix).resolve()}/bin/python3 -m venv --without-pip ~/cmx-venv
echo {SITE} > ~/cmx-venv/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/zz-cmx-test-deps.pth
printf '[global]\\nno-index = true\\n[install]\\n# pip reads "false" here as: build without isolation\\nno-build-isolation = false\\n' > ~/cmx-venv/pip.conf
for f in {BIN}/*; do
  if [ -f "$f" ] && head -c 200 "$f" | head -1 | grep -qx '#!{BIN}/python[0-9.]*'; then
    n=$(basename "$f"); [ -e ~/cmx-venv/bin/$n ] || sed '1s|.*|#!'"$HOME"'/cmx-venv/bin/python|' "$f" > ~/cmx-venv/bin/$n
    chmod +x ~/cmx-venv/bin/$n
  fi
done
"""


class Laptop:
    """The test as the user's laptop: its own home and temp dir, the repo as working directory."""

    def __init__(self, nodes: SshNodes, cluster_file: Path) -> None:
        self.nodes = nodes
        self.cluster_file = cluster_file
        self.tmp = nodes.root / "laptop-tmp"
        self.tmp.mkdir()
        self.log = nodes.root / "laptop.log"
        self.timings: dict[str, float] = {}

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.nodes.laptop_home),
            "USER": "root",
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
            LAPTOP_TAG: str(self.nodes.root),  # finds leftover processes (ssh control masters)
        }

    def run(
        self, *cmd: str, timeout: float, check: bool = True, step: str = "", log_output: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the user would, from the repo root; output goes to laptop.log."""
        t0 = time.monotonic()
        out = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout)
        took = time.monotonic() - t0
        if step:
            self.timings[step] = round(took, 1)
        with open(self.log, "a") as log:
            shown = out.stdout + out.stderr if log_output else "(output not logged)"
            log.write(f"$ {' '.join(cmd)}   # rc {out.returncode}, {took:.1f} s\n{shown}\n")
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
        return out

    def ray_exec(self, command: str, *, timeout: float, check: bool = True, step: str = "") -> str:
        out = self.run(str(BIN / "ray"), "exec", str(self.cluster_file), command, timeout=timeout, check=check,
                       step=step)  # fmt: skip
        return out.stdout + out.stderr


def fill_local_yaml(head: Node, worker: Node, key: Path, dest: Path) -> Path:
    """cluster/local.yaml with its placeholders filled (head, one worker, user root) and the key's
    path made absolute: ssh expands `~` itself, to the passwd home, not the test laptop's $HOME."""
    text = (REPO / "cluster" / "local.yaml").read_text()
    text = text.replace("ssh_private_key: ~/.ssh/id_ed25519", f"ssh_private_key: {key}")
    text = re.sub(r"\n\s*- <WORKER_IP_2>[^\n]*", "", text)
    for placeholder, value in {"<HEAD_IP>": head.ip, "<WORKER_IP_1>": worker.ip, "<YOUR_SSH_USER>": "root"}.items():
        text = text.replace(placeholder, value)
    assert "<" not in re.sub(r"#.*", "", text), "a placeholder is left"
    dest.write_text(text)
    return dest


def write_sweep(shared: Path, data: dict[str, str]) -> str:
    """A 2-trial, 1-epoch sweep on the shared mount; each trial takes 2 CPUs, one whole node."""
    paths = {}
    for key in ("train_dir", "val_dir"):
        shutil.copytree(data[key], shared / "data" / key)
        paths[key] = str(SHARED_MOUNT / "data" / key)
    spec = {
        "name": SWEEP,
        "base": base_config(paths, epochs=1, backend="torchvision"),
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}},
        "search": {"algorithm": "random", "seed": 3, "num_samples": 2},
        "scheduler": {"name": "none"},
        "resources": {"cpus": 2},
        "tracking": {"keep_best_checkpoints": 1},
    }
    (shared / "spec.yaml").write_text(yaml.safe_dump(spec))
    return str(SHARED_MOUNT / "spec.yaml")


def alive_nodes(status: str) -> int:
    """Nodes `ray status` lists as active or idle."""
    section = re.search(r"Active:\n(.*?)Pending:", status, re.S)
    return sum(int(n) for n in re.findall(r"^\s+(\d+) \S+", section.group(1), re.M)) if section else 0


def mlflow_get(url: str, auth: tuple[str, str] | None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def git_head(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def ray_ssh_dirs() -> set[Path]:
    return set(Path("/tmp").glob("ray_ssh_*"))


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[SshNodes]:
    """Two SSH nodes; afterwards every process, interface and directory of theirs is gone."""
    missing = missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI lacks {missing}: .ci/bootstrap installs openssh-server rsync sudo iproute2 as root")
        pytest.skip(f"needs {missing} (root, and .ci/bootstrap's Debian packages)")
    shared = tmp_path / "shared"
    shared.mkdir()
    nodes = SshNodes(tmp_path, shared)
    ssh_dirs = ray_ssh_dirs()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.close()
        for pid in pids_with_env(LAPTOP_TAG, str(tmp_path)):  # ssh ControlMaster processes of the launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for d in ray_ssh_dirs() - ssh_dirs:
            shutil.rmtree(d, ignore_errors=True)
        left = nodes.leftovers() + [f"laptop process {p}" for p in pids_with_env(LAPTOP_TAG, str(tmp_path))]
        assert not left, f"left behind: {left}"


def test_ray_up_two_nodes_sweep_mlflow_down(machines: SshNodes, fmnist_tiny_paths: dict[str, str]) -> None:
    head, worker = machines.nodes
    laptop = Laptop(machines, fill_local_yaml(head, worker, machines.key, machines.root / "local.yaml"))
    t_start = time.monotonic()

    # Each node's venv (what a lab machine's pip would download; see the module docstring).
    preps = [subprocess.Popen(machines.ssh_command(n, NODE_VENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (head, worker)]  # fmt: skip
    spec = write_sweep(machines.shared, fmnist_tiny_paths)
    for p in preps:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out

    # The commands a lab user types (docs/scaling.md), in order.
    check = laptop.run(str(BIN / "cmx"), "cluster", "check", str(laptop.cluster_file), "--strict", timeout=120)
    assert "passes Ray's cluster schema" in check.stdout

    shipped = git_head(REPO)
    up = laptop.run(str(BIN / "cmx"), "cluster", "up", str(laptop.cluster_file), "--no-config-cache", timeout=600,
                    step="ray up")  # fmt: skip
    token = (machines.laptop_home / ".cmx" / "clusters" / "cmx-onprem" / "ray_auth_token").read_text().strip()
    assert token and token not in up.stdout + up.stderr  # this cluster's own, made on the laptop, never printed
    assert (head.home / ".cmx-cluster" / "ray_auth_token").read_text().strip() == token
    assert git_head(head.home / "cmx") == shipped  # .git travelled with the checkout

    # The head's autoscaler starts the worker on its own (setup over SSH from the head).
    t0 = time.monotonic()
    status = ""
    while time.monotonic() - t0 < 420:
        status = laptop.ray_exec("ray status", timeout=120, check=False)
        if alive_nodes(status) == 2:
            break
        time.sleep(5)
    laptop.timings["worker joins after ray up"] = round(time.monotonic() - t0, 1)
    assert alive_nodes(status) == 2, f"not two nodes:\n{status}"
    assert "AuthenticationError" not in status and "InvalidAuthToken" not in status

    node_ids = {n.ip: n.ray_node_id() for n in (head, worker)}
    assert all(node_ids.values()), node_ids

    # The sweep, submitted from the laptop as a Ray job: through `ray dashboard`'s SSH tunnel, with the
    # cluster's token (the dashboard refuses requests without it, checked on the head itself).
    job = laptop.run(str(BIN / "cmx"), "cluster", "submit", str(laptop.cluster_file), "--",
                     "cmx", "sweep", "--space", spec, "--address", "auto", "--storage", "/mnt/cmx-shared/sweeps",
                     timeout=600, step="cmx sweep (2 trials, a job from the laptop)")  # fmt: skip
    assert "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-3000:]
    refused = laptop.ray_exec(
        "python3 -c \"import urllib.request as u, urllib.error as e\n"
        "try: u.urlopen('http://127.0.0.1:8265/api/jobs/', timeout=10); print('HTTP 200')\n"
        "except e.HTTPError as x: print('HTTP', x.code)\"", timeout=120)  # fmt: skip
    assert "HTTP 401" in refused, refused
    trial_dirs = sorted((machines.shared / "sweeps" / SWEEP).glob("trial_*"))
    ran_on = {trial_rows(d)[-1]["trial/node_id"] for d in trial_dirs}
    assert len(trial_dirs) == 2 and node_ids[worker.ip] in ran_on, (ran_on, node_ids)

    # MLflow: on the head's private address only, refusing requests without credentials.
    listening = {n.name: n.listening() for n in (head, worker)}
    assert (head.ip, MLFLOW_PORT) in {(a, p) for a, p, _ in listening["head"]}, listening["head"]
    assert not [x for x in listening["head"] if x[1] in (MLFLOW_PORT, 8265) and x[0] in ("0.0.0.0", "*", "::")]
    assert ("127.0.0.1", 8265) in {(a, p) for a, p, _ in listening["head"]}, listening["head"]
    creds_file = head.home / "mlflow" / "credentials.env"
    assert creds_file.stat().st_mode & 0o777 == 0o600
    creds = dict(line.split("=", 1) for line in creds_file.read_text().split())
    auth = (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])
    assert auth[1] not in (machines.root / "laptop.log").read_text()  # never printed by ray up/exec
    base = f"http://{head.ip}:{MLFLOW_PORT}/api/2.0/mlflow"
    code, _ = mlflow_get(f"{base}/experiments/get-by-name?experiment_name={SWEEP}", None)
    assert code == 401
    code, exp = mlflow_get(f"{base}/experiments/get-by-name?experiment_name={SWEEP}", auth)
    assert code == 200, code
    req = urllib.request.Request(f"{base}/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]]}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Basic " +
                                          base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()})  # fmt: skip
    with urllib.request.urlopen(req, timeout=20) as r:
        runs = json.loads(r.read())["runs"]
    assert len(runs) == 3, [r["info"]["run_name"] for r in runs]  # the sweep's parent run and one per trial
    for run in runs:
        assert run["info"]["status"] == "FINISHED", run["info"]
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        assert tags.get("cmx.git.commit") == shipped, tags  # provenance of the shipped checkout

    # One command stops everything the cluster started.
    laptop.run("bash", "cluster/down.sh", str(laptop.cluster_file), timeout=300, step="cluster/down.sh")
    t0 = time.monotonic()
    while (head.processes() or worker.processes()) and time.monotonic() - t0 < 120:
        time.sleep(1)
    laptop.timings["nodes empty after down.sh"] = round(time.monotonic() - t0, 1)
    assert not head.processes() and not worker.processes(), (head.processes(), worker.processes())
    assert not [x for x in head.listening() + worker.listening() if x[2] != "sshd"]
    laptop.timings["total"] = round(time.monotonic() - t_start, 1)
    print(f"\nray up test timings: {laptop.timings}\nports while up: {listening}")
