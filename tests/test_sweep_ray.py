"""Real Ray Tune sweeps on tiny models and tiny real data: ASHA, resume, node loss, data-parallel."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support.cli import run_cmx, start_cmx
from support.ray_processes import kill_ray_started_with
from support.sweeps import trial_rows, write_spec

from cmx.cluster.runtime import RAY_TMP_ENV
from cmx.core import metrics as M
from cmx.core.metrics import SETUP_PHASES
from cmx.core.search_space import preview
from cmx.core.sweep_spec import load_sweep_spec
from cmx.sweep.results import sweep_status
from cmx.sweep.storage import STUDY_FILE
from cmx.sweep.study import TRIAL_ID_ATTR, journal_storage
from cmx.sweep.tuner import run_sweep

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[1]
# Tests that watch trials through the storage directory: Tune copies result files there with each
# experiment-state save, every >= 10 s by default; every second here.
WATCHABLE = ("TUNE_GLOBAL_CHECKPOINT_S", "1")


@pytest.mark.slow
def test_asha_sweep_stops_weak_trials_and_finds_best(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], ray_local
) -> None:
    path = write_spec(tmp_path, fmnist_tiny_paths, name="asha6", epochs=3, samples=6)
    spec = load_sweep_spec(path)
    outcome = run_sweep(spec, source_text=path.read_text())
    assert len(outcome.trials) == 6 and not outcome.interrupted
    statuses = [t.status for t in outcome.trials]
    assert "stopped early" in statuses, statuses  # ASHA cut some trials at its first rung
    assert "completed" in statuses, statuses
    assert all(s in ("completed", "stopped early") for s in statuses), outcome.trials
    # The sweep's Optuna study agrees: ASHA's stops are PRUNED, full runs COMPLETE, one per trial.
    study = optuna.load_study(study_name="asha6", storage=journal_storage(Path(outcome.path) / STUDY_FILE))
    assert {t.user_attrs[TRIAL_ID_ATTR]: t.state for t in study.trials} == {
        t.trial_id: TrialState.COMPLETE if t.status == "completed" else TrialState.PRUNED for t in outcome.trials
    }
    best = outcome.best
    assert best is not None and best.best == max(t.best for t in outcome.trials)
    assert best.best > 15  # percent; learned something: 10 classes, chance is 10%
    assert outcome.best_checkpoint and Path(outcome.best_checkpoint).is_dir()
    assert any(Path(outcome.best_checkpoint).iterdir())
    # The best config is a ready-to-run training config.
    from cmx.core.config import load_train_config

    cfg = load_train_config(outcome.best_config_path)
    assert cfg.model.dim == best.params["model.dim"]
    # The seed makes the sampled configs reproducible: TPE's random start-up configs match the preview.
    sampled = [t.params for t in sorted(outcome.trials, key=lambda t: t.path)]
    first = preview(spec, 2)
    for p in first:
        assert any(all(_close(p[k], s[k]) for k in p) for s in sampled), (p, sampled)
    # On-disk status agrees, without Ray.
    status = sweep_status(outcome.path)
    assert status.complete and len(status.trials) == 6
    # Each trial says where its setup went, once, with its first epoch (FFCV: a first batch to wait for).
    for t in outcome.trials:
        starts = [r for r in trial_rows(Path(t.path)) if M.SETUP_SECONDS in r]
        assert [r["epoch"] for r in starts] == [1], t.path
        phases = {k: v for k, v in starts[0].items() if k.startswith(M.SETUP_PREFIX)}
        assert set(phases) == {f"{M.SETUP_PREFIX}{p}_s" for p in SETUP_PHASES}
        assert phases[f"{M.SETUP_PREFIX}first_batch_s"] > 0 and phases[f"{M.SETUP_PREFIX}loaders_s"] > 0
        assert starts[0][M.SETUP_SECONDS] == pytest.approx(sum(phases.values()))
    # Bounded storage: a finished trial keeps its best and its last epoch's checkpoints, no more.
    for t in outcome.trials:
        kept = sorted(p.name for p in Path(t.path).glob("checkpoint_*"))
        assert 1 <= len(kept) <= 2 and kept[-1] == f"checkpoint_{t.epochs - 1:06d}", (t.path, kept)


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a))
    return a == b


@pytest.mark.slow
def test_killed_driver_resumes_without_redoing_finished_trials(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], own_ray_tmp: str
) -> None:
    path = write_spec(
        tmp_path,
        fmnist_tiny_paths,
        name="resume",
        epochs=3,
        samples=4,
        backend="torchvision",
        scheduler={"name": "none"},
        search={"max_concurrent": 1},
    )
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "1", RAY_TMP_ENV: own_ray_tmp}
    exp = tmp_path / "sweeps" / "resume"
    proc = start_cmx("sweep", "--space", str(path), env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = [d for d in exp.glob("trial_*") if len(trial_rows(d)) >= 3]
            if len(done) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
        time.sleep(2)  # let Tune persist its experiment state
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # kill the driver and the local Ray it started
        proc.wait()
    kill_ray_started_with(own_ray_tmp)  # the driver's local Ray outlives a SIGKILLed driver
    finished = {d.name: len(trial_rows(d)) for d in exp.glob("trial_*") if len(trial_rows(d)) >= 3}
    assert len(finished) >= 2
    out = run_cmx("sweep", "--space", str(path), env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep resume" in out.stderr
    status = sweep_status(exp)
    assert status.complete and len(status.trials) == 4, status
    for name, rows in finished.items():
        assert len(trial_rows(exp / name)) == rows, f"{name} was re-run after resume"
    # One study across the kill and the resume: each trial once, COMPLETE; nothing left RUNNING
    # (a trial Optuna handed out after Tune's last save, which the resumed sweep never ran, is FAIL).
    study = optuna.load_study(study_name="resume", storage=journal_storage(exp / STUDY_FILE))
    ran = [t for t in study.trials if t.state != TrialState.FAIL]
    assert sorted(t.user_attrs[TRIAL_ID_ATTR] for t in ran) == sorted(t.trial_id for t in status.trials)
    assert all(t.state == TrialState.COMPLETE and len(t.intermediate_values) == 3 for t in ran), ran
    assert len(study.trials) - len(ran) <= 1, study.trials


@pytest.mark.slow
def test_lost_node_trial_resumes_from_checkpoint_on_another(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.setenv(*WATCHABLE)
    from ray.cluster_utils import Cluster

    from cmx.cluster.runtime import OBJECT_STORE_BYTES

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False},
    )
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        path = write_spec(
            tmp_path,
            fmnist_tiny_paths,
            name="nodeloss",
            epochs=6,
            samples=2,
            backend="torchvision",
            scheduler={"name": "none"},
            resources={"cpus": 1, "max_failures": 3},
        )
        spec = load_sweep_spec(path)
        exp = tmp_path / "sweeps" / "nodeloss"
        killed: dict[str, str] = {}

        def kill_a_node_mid_trial() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not killed:
                for d in exp.glob("trial_*"):
                    rows = trial_rows(d)
                    if len(rows) >= 2 and not rows[-1].get("done"):
                        victim = next(n for n in nodes if n.node_id == rows[-1]["trial/node_id"])
                        killed.update(trial=d.name, node=victim.node_id, epoch=str(rows[-1]["epoch"]))
                        cluster.remove_node(victim)
                        return
                time.sleep(0.3)

        killer = threading.Thread(target=kill_a_node_mid_trial, daemon=True)
        killer.start()
        outcome = run_sweep(spec, source_text=path.read_text(), address=cluster.address)
        killer.join(timeout=5)
        assert killed, "no trial was caught mid-run"
        assert len(outcome.trials) == 2
        assert all(t.status == "completed" for t in outcome.trials), outcome.trials
        rows = trial_rows(exp / killed["trial"])
        epochs = [r["epoch"] for r in rows]
        # Resumed from the last epoch checkpoint, not from scratch: the trainer's epoch counter
        # never went back to 1 and ended at the full budget.
        assert epochs.count(1) == 1 and epochs[-1] == 6, epochs
        # The resume reported its own setup, with the checkpoint it read.
        resumed = [r for r in rows if M.SETUP_SECONDS in r]
        assert len(resumed) == 2 and resumed[1]["epoch"] > 1, [r["epoch"] for r in resumed]
        assert resumed[1][f"{M.SETUP_PREFIX}restore_s"] > 0
        node_ids = {r["trial/node_id"] for r in rows}
        assert len(node_ids) == 2, "the trial should have moved to the surviving node"
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_data_parallel_trials_and_asha_release_cpus(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    import ray

    # 2 workers x 1 CPU plus the trial driver's 0.01 CPU: three logical CPUs on this 2-core box.
    # No dashboard: Ray's own cleaner of a dead controller's worker group asks the dashboard, so
    # only cmx's WorkerGroupRelease gives the stopped trials' CPUs back to the next trial.
    from cmx.cluster.runtime import init_ray

    init_ray(num_cpus=3, dashboard=False)
    try:
        path = write_spec(
            tmp_path,
            fmnist_tiny_paths,
            name="dp",
            epochs=3,
            samples=3,
            backend="torchvision",
            resources={"workers": 2, "cpus_per_worker": 1},
            # ASHA ranks on train loss here (scheduler.metric), the search still on val top-1.
            scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 3, "metric": "train/loss"},
        )
        spec = load_sweep_spec(path)
        outcome = run_sweep(spec, source_text=path.read_text())
        statuses = [t.status for t in outcome.trials]
        assert len(statuses) == 3 and "failed" not in statuses, outcome.trials
        assert "stopped early" in statuses, statuses
        first_loss = {t.path: trial_rows(Path(t.path))[0]["train/loss"] for t in outcome.trials}
        stopped = [first_loss[t.path] for t in outcome.trials if t.status == "stopped early"]
        assert min(stopped) > min(first_loss.values()), first_loss  # the lowest train loss is never cut
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"] - 1e-6:
                break
            time.sleep(1)
        assert ray.available_resources().get("CPU", 0) >= 3 - 1e-6, "CPUs leaked by stopped trials"
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_says_how_to_resume_and_resume_finishes(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    path = write_spec(
        tmp_path,
        fmnist_tiny_paths,
        name="ctrlc",
        epochs=2,
        samples=3,
        backend="torchvision",
        scheduler={"name": "none"},
        search={"max_concurrent": 1},
    )
    exp = tmp_path / "sweeps" / "ctrlc"
    proc = start_cmx("sweep", "--space", str(path), env=dict([WATCHABLE]), stderr=subprocess.PIPE, new_session=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(trial_rows(d) for d in exp.glob("trial_*")):
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "cmx sweep --resume ctrlc" in err
    listed = run_cmx("sweep", "list", "--storage", str(tmp_path / "sweeps"), timeout=60)
    assert listed.returncode == 0 and "ctrlc" in listed.stdout and "incomplete" in listed.stdout
    resumed = run_cmx("sweep", "--resume", "ctrlc", "--storage", str(tmp_path / "sweeps"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status = run_cmx("sweep", "status", "ctrlc", "--storage", str(tmp_path / "sweeps"), timeout=60)
    assert status.returncode == 0 and "complete" in status.stdout and "completed 3" in status.stdout, status.stdout
