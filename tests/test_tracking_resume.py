"""Tracking under failure, against a real `mlflow server`: a killed and resumed sweep keeps one run
per trial, and a server that goes away mid-sweep loses no metric."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cli import run_cmx, start_cmx
from support.mlflow_server import MlflowServer
from support.ray_processes import kill_ray_started_with, private_ray_tmp
from support.sweeps import trial_rows, write_spec

from cmx.cluster.runtime import RAY_TMP_ENV
from cmx.core import metrics as M

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sweep_runs(uri: str, name: str) -> tuple[Any, list[Any], list[Any]]:
    """(client, parent runs, trial runs) of a sweep's experiment."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return (
        client,
        [r for r in runs if r.data.tags.get("cmx.role") == "sweep"],
        [r for r in runs if r.data.tags.get("cmx.role") == "trial"],
    )


def _logged_epochs(exp_dir: Path) -> dict[str, int]:
    """Epochs per trial the driver has sent to MLflow so far (its history file has no lag; Tune's
    result files reach the sweep directory only with each state save)."""
    from cmx.sweep.mlflow_callback import HISTORY_FILE

    path = exp_dir / HISTORY_FILE
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            tid = json.loads(line)["trial_id"]
            counts[tid] = counts.get(tid, 0) + 1
    return counts


def _assert_full_histories(client: Any, trials: list[Any], exp_dir: Path) -> None:
    """Every epoch each trial reported to Tune is in MLflow, at step=epoch, once."""
    for run in trials:
        rows = trial_rows(exp_dir / f"trial_{run.data.tags['cmx.trial_id']}")
        want = sorted({int(r[M.EPOCH]) for r in rows})
        for key in (M.VAL_TOP1, M.TRAIN_LOSS):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == want, (run.info.run_name, key, steps, want)


def test_killed_sweep_resumed_keeps_one_run_per_trial(
    mlflow_server: MlflowServer,
    fmnist_tiny_paths: dict[str, str],
    tmp_path: Path,
) -> None:
    name = "trk-resume"
    # 6 epochs: the second trial cannot finish in the second between spotting it mid-way and the
    # kill, even at ~0.3 s epochs (with 4 it sometimes did, and nothing was left to resume).
    epochs = 6
    path = write_spec(tmp_path, fmnist_tiny_paths, name=name, epochs=epochs, samples=2, backend="torchvision",
                      scheduler={"name": "none"}, search={"max_concurrent": 1}, tracking={"enabled": True})  # fmt: skip
    spec = yaml.safe_load(path.read_text())
    spec["base"]["data"]["batch_size"] = 8  # ~1 s epochs, so the kill reliably lands mid-trial
    path.write_text(yaml.safe_dump(spec))
    exp = tmp_path / "sweeps" / name
    ray_tmp = private_ray_tmp()
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "1", RAY_TMP_ENV: ray_tmp}
    args = ["sweep", "--space", str(path), "--tracking-uri", mlflow_server.uri]
    proc = start_cmx(*args, env=env)
    try:  # kill the driver once one trial finished and the next one is mid-way
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = list(_logged_epochs(exp).values())
            if rows.count(epochs) >= 1 and any(0 < r < 3 for r in rows):
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        else:
            pytest.fail("the sweep made no progress")
        time.sleep(1)  # let Tune persist its state (TUNE_GLOBAL_CHECKPOINT_S=1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_started_with(ray_tmp)
    _, _, before = _sweep_runs(mlflow_server.uri, name)
    assert any(r.info.status == "RUNNING" for r in before)  # the kill left the running trial's run open
    out = run_cmx(*args, env=env, timeout=400)
    kill_ray_started_with(ray_tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep" in out.stderr
    client, parents, trials = _sweep_runs(mlflow_server.uri, name)
    assert len(parents) == 1 and parents[0].data.tags.get("cmx.resumes") == "1"
    # The summary links to the sweep's trials in MLflow's UI (opened in Chromium: test_tracking_sweep.py).
    view = f"viewStateShareKey=cmx-sweep-{parents[0].info.run_id}"
    trials_link = (
        f"{mlflow_server.uri}/#/experiments/{parents[0].info.experiment_id}/runs?workflowType=machine_learning&{view}"
    )
    assert f"trials (objective, searched params): {trials_link}\n" in out.stdout, out.stdout[-2000:]
    ids = [r.data.tags["cmx.trial_id"] for r in trials]
    assert len(ids) == len(set(ids)) == 2, ids  # exactly one run per trial
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in trials}  # the same runs continued
    assert all(r.info.status != "RUNNING" for r in [*parents, *trials])
    statuses = {r.data.tags["cmx.trial_id"]: r.data.tags.get("cmx.status") for r in trials}
    assert set(statuses.values()) == {"completed"}, (statuses, out.stdout[-2000:], out.stderr[-2000:])
    _assert_full_histories(client, trials, exp)


def test_server_down_mid_sweep_loses_no_metric(
    mlflow_server: MlflowServer,
    fmnist_tiny_paths: dict[str, str],
    tmp_path: Path,
) -> None:
    import ray

    from cmx.core.sweep_spec import load_sweep_spec
    from cmx.sweep.tuner import run_sweep
    from cmx.tracking.tracker import JOURNAL_FILE

    name = "trk-outage"
    path = write_spec(tmp_path, fmnist_tiny_paths, name=name, epochs=3, samples=2, backend="torchvision",
                      scheduler={"name": "none"}, search={"max_concurrent": 1},
                      tracking={"enabled": True, "uri": mlflow_server.uri})  # fmt: skip
    spec = yaml.safe_load(path.read_text())
    spec["base"]["data"]["batch_size"] = 8  # ~1 s epochs: the server goes down well before the end
    path.write_text(yaml.safe_dump(spec))
    total_rows = 2 * 3  # samples x epochs
    exp = tmp_path / "sweeps" / name
    seen: dict[str, int] = {}

    def outage() -> None:
        """Stop the server after the first epoch; start it again once the sweep journaled while it was down."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(trial_rows(d) for d in exp.glob("trial_*")):
            time.sleep(0.2)
        mlflow_server.stop()
        seen["down_at"] = sum(len(trial_rows(d)) for d in exp.glob("trial_*"))
        while time.monotonic() < deadline and not (exp / JOURNAL_FILE).is_file():
            time.sleep(0.2)
        while time.monotonic() < deadline and sum(len(trial_rows(d)) for d in exp.glob("trial_*")) < min(
            seen["down_at"] + 2, total_rows
        ):  # two more epochs logged while down, or the sweep's last one when stopping took long
            time.sleep(0.2)
        seen["journaled"] = int((exp / JOURNAL_FILE).is_file())
        mlflow_server.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        outcome = run_sweep(load_sweep_spec(path), source_text=path.read_text())
    finally:
        ray.shutdown()
        thread.join(timeout=200)
    assert seen.get("journaled") == 1, seen  # calls were kept while the server was down
    assert all(t.status == "completed" for t in outcome.trials), outcome.trials
    if (exp / JOURNAL_FILE).is_file():  # the sweep ended before the server was back: replay by hand
        from click.testing import CliRunner

        from cmx.cli.main import cli

        out = CliRunner().invoke(cli, ["runs", "replay", str(exp), "--tracking-uri", mlflow_server.uri])
        assert out.exit_code == 0 and "nothing pending" in out.output, out.output
    assert not (exp / JOURNAL_FILE).is_file()
    client, parents, trials = _sweep_runs(mlflow_server.uri, name)
    assert len(parents) == 1 and len(trials) == 2
    assert all(r.info.status == "FINISHED" for r in [*parents, *trials])
    _assert_full_histories(client, trials, exp)
    for run in trials:  # every value, not only every step
        rows = {int(r[M.EPOCH]): r for r in trial_rows(exp / f"trial_{run.data.tags['cmx.trial_id']}")}
        for m in client.get_metric_history(run.info.run_id, M.VAL_LOSS):
            assert m.value == pytest.approx(rows[m.step][M.VAL_LOSS])
    assert "plots" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
