"""A real multi-node Ray cluster on one machine: `ray start` head + two worker nodes (separate
processes, own resources), the head's MLflow server started by cluster/start-mlflow.sh, shared
sweep storage, `cmx sweep --address HEAD` and `ray job submit` driving sweeps across the nodes,
and a worker node killed mid-sweep whose trial resumes from its checkpoint on the other node.

Every address used is loopback (head 127.0.0.2, nodes 127.0.0.1; Ray's own gRPC servers still
listen on all interfaces, which Ray 2.60 does not let us change) and everything is stopped by
process id (never `ray stop`). Run with `-s` to see the measured timings (docs/scaling.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import CMX, run_cmx
from support.ray_processes import RAY, LocalRayCluster
from support.sweeps import trial_rows, write_spec

from cmx.core.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Cluster:
    """The module's cluster: Ray nodes, the MLflow server, shared storage, measured timings."""

    def __init__(self, ray: LocalRayCluster, mlflow_uri: str, mlflow_dir: Path, shared: Path) -> None:
        self.ray = ray
        self.mlflow_uri = mlflow_uri
        self.mlflow_dir = mlflow_dir
        self.shared = shared
        self.timings: dict[str, float] = {}

    def env(self) -> dict[str, str]:
        """A client's environment: Ray token, our tag (so cleanup finds it), quiet MLflow, and Tune
        saving its state (result files included) to storage every second, where the tests watch it."""
        return {**self.ray.env(), "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}:{os.environ['PATH']}",
                "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Head (0 CPUs) + nodes a and b (1 CPU each, custom resources), MLflow on the head."""
    root = tmp_path_factory.mktemp("cluster")
    ray = LocalRayCluster()
    mlflow_dir = root / "mlflow"
    port = free_port()
    mlflow_env = {
        **ray.env(),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "CMX_MLFLOW_BACKEND_URI": f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "CMX_MLFLOW_ARTIFACTS": str(root / "artifacts"),
        "CMX_MLFLOW_HOST": "127.0.0.1",
        # Loopback only; the authenticated server is tested by tests/test_cluster_ray_up.py.
        "CMX_MLFLOW_AUTH": "none",
        "CMX_MLFLOW_PORT": str(port),
        "CMX_MLFLOW_WORKERS": "1",
        "CMX_MLFLOW_DIR": str(mlflow_dir),
    }
    # The server starts while the Ray nodes do (~10-20 s each on 2 busy cores).
    mlflow = subprocess.Popen(["bash", str(REPO / "cluster" / "start-mlflow.sh")], env=mlflow_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    c = Cluster(ray, f"http://127.0.0.1:{port}", mlflow_dir, root / "shared")
    try:
        t0 = time.monotonic()
        ray.start_head()
        c.timings["head_start_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        # One after the other: two nodes starting at once overloaded the head's GCS on 2 busy cores
        # ("node timed out during startup").
        ray.add_worker("a", {"CPU": 1, "node_a": 1})
        ray.add_worker("b", {"CPU": 1, "node_b": 1})
        assert sorted(n.name for n in ray.nodes) == ["a", "b", "head"], ray.log.read_text()[-3000:]
        c.timings["two_workers_join_s"] = time.monotonic() - t1
        out, _ = mlflow.communicate(timeout=180)
        assert mlflow.returncode == 0, out
        assert "healthy on 127.0.0.1" in out
        c.timings["cluster_ready_s"] = time.monotonic() - t0
        yield c
    finally:
        if mlflow.poll() is None:
            mlflow.kill()
        subprocess.run(["bash", str(REPO / "cluster" / "stop-mlflow.sh")], env=mlflow_env, timeout=60,
                       capture_output=True)  # fmt: skip
        ray.shutdown()
        print(f"\ncluster timings: {json.dumps({k: round(v, 2) for k, v in c.timings.items()})}")
    assert not ray.own_pids(), "Ray processes survived the cleanup"


def _nodes_by_id(cluster: Cluster) -> dict[str, str]:
    return {n.node_id: n.name for n in cluster.ray.nodes if n.node_id}


def test_connect_and_ray_job_submit_from_a_laptop(cluster: Cluster, fmnist_tiny_paths: dict[str, str],
                                                  tmp_path: Path) -> None:  # fmt: skip
    """`ray job submit` to the head's dashboard (what a laptop does through `ray dashboard`) runs
    `cmx sweep --address auto` on the head; its trials spread over both worker nodes."""
    probe = (
        "import time, ray; t = time.monotonic(); "
        f"ray.init(address={cluster.ray.address!r}, log_to_driver=False); "
        "print('connect_s', time.monotonic() - t); print('nodes', len([n for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cluster.timings["driver_connect_s"] = float(re.search(r"connect_s ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert "nodes 3" in out.stdout

    spec = write_spec(tmp_path, fmnist_tiny_paths, name="jobsweep", epochs=1, samples=2, backend="torchvision",
                      scheduler={"name": "none"}, resources={"cpus": 1},
                      storage={"path": str(cluster.shared)})  # fmt: skip
    t0 = time.monotonic()
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.ray.dashboard_url, "--submission-id", "cmx-jobsweep",
         "--", CMX, "sweep", "--space", str(spec), "--address", "auto"],
        env=cluster.env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    cluster.timings["job_submit_sweep_s"] = time.monotonic() - t0
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "Job 'cmx-jobsweep' succeeded" in submit.stdout + submit.stderr, submit.stdout[-3000:]
    assert "best checkpoint" in submit.stdout
    exp = cluster.shared / "jobsweep"
    ran_on = {trial_rows(d)[-1]["trial/node_id"] for d in exp.glob("trial_*")}
    assert {_nodes_by_id(cluster).get(n) for n in ran_on} == {"a", "b"}, ran_on


def test_sweep_across_nodes_survives_a_killed_node(cluster: Cluster, fmnist_tiny_paths: dict[str, str],
                                                   tmp_path: Path) -> None:  # fmt: skip
    """`cmx sweep --address HEAD`: two trials run at once, one per node; node a is SIGKILLed mid-trial;
    its trial resumes from its last epoch checkpoint on node b and the sweep completes."""
    spec = write_spec(tmp_path, fmnist_tiny_paths, name="nodeloss", epochs=5, samples=2, backend="torchvision",
                      scheduler={"name": "none"}, resources={"cpus": 1, "max_failures": 3},
                      storage={"path": str(cluster.shared)},
                      tracking={"enabled": True, "uri": cluster.mlflow_uri})  # fmt: skip
    exp = cluster.shared / "nodeloss"
    names = _nodes_by_id(cluster)
    killed: dict[str, Any] = {}

    def kill_node_a_mid_trial() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for d in exp.glob("trial_*"):
                rows = trial_rows(d)
                if len(rows) >= 2 and not rows[-1].get("done") and names.get(rows[-1]["trial/node_id"]) == "a":
                    node = next(n for n in cluster.ray.nodes if n.name == "a")
                    killed.update(trial=d.name, epoch=rows[-1]["epoch"], at=time.monotonic(),
                                  pids=cluster.ray.kill_node(node))  # fmt: skip
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_node_a_mid_trial, daemon=True)
    killer.start()
    t0 = time.monotonic()
    proc = run_cmx("sweep", "--space", str(spec), "--address", cluster.ray.address, env=cluster.env(), timeout=420)
    cluster.timings["killed_node_sweep_s"] = time.monotonic() - t0
    killer.join(timeout=5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert killed, "no trial on node a was caught mid-run"
    assert killed["pids"], "node a had no processes to kill"

    rows_by_trial = {d.name: trial_rows(d) for d in exp.glob("trial_*")}
    assert len(rows_by_trial) == 2
    # Both nodes ran trials at the same time before the kill.
    first_nodes = {names.get(rows[0]["trial/node_id"]) for rows in rows_by_trial.values()}
    assert first_nodes == {"a", "b"}, first_nodes
    # The lost trial resumed from its checkpoint on node b: its epochs continue, never restart at 1.
    lost = rows_by_trial[killed["trial"]]
    epochs = [r["epoch"] for r in lost]
    assert epochs.count(1) == 1 and epochs[-1] == 5, epochs
    assert epochs == sorted(epochs), epochs
    assert [names.get(r["trial/node_id"]) for r in lost][-1] == "b"
    assert all(rows[-1]["epoch"] == 5 for rows in rows_by_trial.values())
    resumed = next(r for r in lost if r["epoch"] > killed["epoch"])
    cluster.timings["kill_to_resumed_epoch_s"] = resumed["timestamp"] - (
        time.time() - (time.monotonic() - killed["at"])
    )
    # Tracked on the head's MLflow server: one run per trial, the retried one included, all finished.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster.mlflow_uri)
    experiment = client.get_experiment_by_name("nodeloss")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("cmx.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials), [r.info for r in trials]
    starts = sorted(rows[0]["timestamp"] - rows[0]["time_this_iter_s"] for rows in rows_by_trial.values())
    cluster.timings["sweep_start_to_first_trial_start_s"] = starts[0] - (time.time() - (time.monotonic() - t0))
