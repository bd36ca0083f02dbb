"""Promotion-based ASHA: the rung table, and real sweeps in which trials pause and the best resume."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support.cli import run_cmx, start_cmx
from support.ray_processes import kill_ray_started_with
from support.sweeps import trial_rows, write_spec

from cmx.core.sweep_spec import load_sweep_spec
from cmx.sweep.promotion_asha import RungBook, rung_milestones
from cmx.sweep.storage import STUDY_FILE
from cmx.sweep.study import TRIAL_ID_ATTR, journal_storage
from cmx.sweep.tuner import run_sweep

pytestmark = pytest.mark.timeout(900)
PROMOTION = {"name": "asha-promotion", "grace_period": 1, "reduction_factor": 2, "metric": "train/loss"}


def promotion_spec(tmp_path: Path, data: dict[str, str], name: str, **sections: dict) -> Path:
    """8 trials × ≤ 4 epochs, η = 2: rungs at epochs 1 and 2 (torchvision data: each resume is a fresh
    actor, and FFCV's JIT would add seconds to every one; test_sweep_ray covers FFCV in a sweep)."""
    return write_spec(
        tmp_path, data, name=name, epochs=4, samples=8, backend="torchvision", scheduler=PROMOTION, **sections
    )


def test_milestones_are_grace_times_powers_below_the_budget() -> None:
    assert rung_milestones(1, 2, 16) == [1, 2, 4, 8]
    assert rung_milestones(1, 3, 16) == [1, 3, 9]
    assert rung_milestones(2, 3, 16) == [2, 6]
    assert rung_milestones(1, 1.5, 5) == [1, 2, 3]  # rounded, no repeats
    assert rung_milestones(4, 2, 4) == []  # the grace period is the whole budget: nothing to compare


def test_only_the_top_fraction_of_a_rung_is_promotable_once() -> None:
    book = RungBook([1, 3])
    book.scores[0].update({"a": 0.5, "b": 0.9})
    assert book.promotable(0, 3) == []  # floor(2/3) = 0: too few trials reached the rung yet
    book.scores[0]["c"] = 0.7
    assert book.promotable(0, 3) == ["b"]
    book.promote(0, "b")
    assert book.promotable(0, 3) == []
    book.scores[0].update({"d": 0.1, "e": 0.95, "f": 0.2})
    assert book.promotable(0, 3) == ["e"]  # top 2 of 6 are e and b; b moved on already
    assert book.highest_rung("b") == 0 and book.highest_rung("zz") is None


def test_malformed_combination_is_one_clear_error(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    from cmx.core.errors import ConfigError

    path = promotion_spec(tmp_path, fmnist_tiny_paths, "bad", search={"algorithm": "grid", "max_concurrent": 1})
    with pytest.raises(ConfigError, match=r"asha-promotion cannot cap the trials at once for search.algorithm: grid"):
        load_sweep_spec(path)
    load_sweep_spec(promotion_spec(tmp_path, fmnist_tiny_paths, "good", search={"max_concurrent": 1}))


@pytest.mark.slow
def test_trials_pause_at_rungs_and_only_the_best_resume(
    tmp_path: Path,
    fmnist_tiny_paths: dict[str, str],
    ray_local,
) -> None:
    """Ideally 8 + 4·1 + 2·2 = 16 epochs; a few more when a trial moves on while few reached its rung."""
    tracking = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = promotion_spec(tmp_path, fmnist_tiny_paths, "promo8", tracking=tracking)
    spec = load_sweep_spec(path)
    outcome = run_sweep(spec, source_text=path.read_text())
    assert len(outcome.trials) == 8 and not outcome.interrupted and not outcome.all_failed
    # Each trial's epochs ran once, in order, across its pauses (resumed from its checkpoint).
    rows = {t.path: trial_rows(Path(t.path)) for t in outcome.trials}
    for trial_path, r in rows.items():
        assert [x["training_iteration"] for x in r] == list(range(1, len(r) + 1)), trial_path
        assert [x["epoch"] for x in r] == list(range(1, len(r) + 1)), trial_path
    epochs = {p: len(r) for p, r in rows.items()}
    # The best half at the first rung (lowest train loss after epoch 1) all moved on; at least three
    # of the rest never did (a trial may move on early while few have reached the rung: ASHA's rule).
    loss1 = sorted(rows, key=lambda p: rows[p][0]["train/loss"])
    assert all(epochs[p] >= 2 for p in loss1[:4]), epochs
    assert sum(epochs[p] == 1 for p in loss1[4:]) >= 3, epochs
    assert max(epochs.values()) == 4  # someone trained the full budget
    assert sum(epochs.values()) <= 20, epochs  # 8 x 4 = 32 without early stopping
    statuses = [t.status for t in outcome.trials]
    assert statuses.count("completed") >= 1 and statuses.count("stopped early") >= 5, statuses
    assert outcome.best is not None and outcome.best_checkpoint and Path(outcome.best_checkpoint).is_dir()
    # TPE heard of every trial: each waiting trial when it first paused (PRUNED there, with its
    # epochs so far), the others when they ended; the sweep's study holds all eight, none RUNNING.
    study = optuna.load_study(study_name="promo8", storage=journal_storage(Path(outcome.path) / STUDY_FILE))
    states = {t.user_attrs[TRIAL_ID_ATTR]: t for t in study.trials}
    assert sorted(states) == sorted(t.trial_id for t in outcome.trials)
    for row in outcome.trials:
        told = states[row.trial_id]
        assert told.state in (TrialState.COMPLETE, TrialState.PRUNED), told
        assert told.intermediate_values and told.values == [told.intermediate_values[max(told.intermediate_values)]]
        if row.epochs == 1:  # paused at the first rung and never resumed
            assert told.state == TrialState.PRUNED and list(told.intermediate_values) == [1], told
    # Tune's saved state says every trial ended, so re-running the finished sweep trains nothing more.
    (state_file,) = Path(outcome.path).glob("experiment_state-*.json")
    saved = json.loads(state_file.read_text())["trial_data"]
    assert [json.loads(t[0])["status"] for t in saved] == ["TERMINATED"] * 8
    again = run_sweep(spec, source_text=path.read_text())
    assert again.resumed and {t.path: t.epochs for t in again.trials} == epochs
    # MLflow: one run per trial, every epoch once across the pauses, ended as Tune ended the trial.
    from cmx.core import metrics as M
    from cmx.tracking.store import TAG_ROLE, TAG_TRIAL, make_client

    client = make_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("promo8")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_ROLE) == "trial"]
    assert len(runs) == 8
    for run in runs:
        n = {Path(p).name: c for p, c in epochs.items()}[f"trial_{run.data.tags[TAG_TRIAL]}"]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, M.TRAIN_LOSS))
        assert steps == list(range(1, n + 1)), (run.info.run_name, steps)
        assert run.info.status in ("FINISHED", "KILLED"), run.info.status


def assert_resumed_from_a_checkpoint(epochs: list[int], rows_at_kill: int, name: str) -> None:
    """No epoch lost; only epochs reported after Tune's last state save before the kill run again.

    A trial running at the kill goes on from the checkpoint that state recorded, so it may redo the
    epoch(s) it finished in the last second (`TUNE_GLOBAL_CHECKPOINT_S=1`); nothing earlier is redone.
    """
    done, after = epochs[:rows_at_kill], epochs[rows_at_kill:]
    assert done == list(range(1, len(done) + 1)), f"{name}: epochs before the kill {done}"
    if after:
        first = after[0]
        assert after == list(range(first, first + len(after))), f"{name}: epochs after the resume {after}"
        assert len(done) - 2 < first <= len(done) + 1, f"{name}: {done} then {after}: lost or redid more than 2"


@pytest.mark.slow
def test_killed_promotion_sweep_resumes_with_its_waiting_trials_still_waiting(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str], own_ray_tmp: str
) -> None:
    """The rung table survives the driver: after a resume, trials that waited wait on (not all run on)."""
    import contextlib
    import os
    import signal
    import time

    from cmx.cluster.runtime import RAY_TMP_ENV
    from cmx.sweep.results import sweep_status

    path = promotion_spec(tmp_path, fmnist_tiny_paths, "promokill")
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "1", RAY_TMP_ENV: own_ray_tmp}
    exp = tmp_path / "sweeps" / "promokill"
    proc = start_cmx("sweep", "--space", str(path), env=env)
    try:
        deadline = time.monotonic() + 300
        while sum(bool(trial_rows(d)) for d in exp.glob("trial_*")) < 5:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "five trials did not report in time"
            time.sleep(0.3)
        time.sleep(2)  # let Tune save its state with these trials waiting at the first rung
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kill_ray_started_with(own_ray_tmp)
    before = {d.name: len(trial_rows(d)) for d in exp.glob("trial_*")}
    out = run_cmx("sweep", "--space", str(path), env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep promokill" in out.stderr
    status = sweep_status(exp)
    assert status.complete and len(status.trials) == 8, status
    epochs = {d.name: [r["epoch"] for r in trial_rows(d)] for d in exp.glob("trial_*")}
    assert len(epochs) == 8
    for name, its in epochs.items():
        assert_resumed_from_a_checkpoint(its, before.get(name, 0), name)
    n = {name: max(its) for name, its in epochs.items()}
    assert sum(c == 1 for c in n.values()) >= 3, n  # the weak ones still waited after the resume
    assert max(n.values()) == 4 and sum(n.values()) <= 20, n


def test_progress_line_counts_waiting_trials() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from cmx.sweep.progress import RichSweepProgress

    cb = RichSweepProgress(total=4, metric="val/top1", mode="max", max_epochs=4, console=Console(file=io.StringIO()))
    trials = [
        SimpleNamespace(trial_id=str(i), status=s) for i, s in enumerate(["RUNNING", "PAUSED", "PAUSED", "PENDING"])
    ]
    cb.on_step_end(iteration=1, trials=trials)
    line = cb.progress.tasks[0].description
    assert "running 1 · waiting 2 · done 0" in line, line
    for t in trials:  # the end: every trial ended, the waiting ones stopped where they waited
        t.status = "TERMINATED"
    cb.on_experiment_end(trials=trials)
    line = cb.progress.tasks[0].description
    assert "running 0 · done 0" in line and "waiting" not in line, line


@pytest.mark.slow
def test_data_parallel_trials_pause_and_resume_and_release_cpus(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    """A paused trial's TorchTrainer workers go away with it; the resumed one continues its epochs."""
    import time

    import ray

    from cmx.cluster.runtime import init_ray

    # 2 workers x 1 CPU plus the trial driver's 0.01 CPU: one trial at a time. No dashboard, so
    # only cmx's WorkerGroupRelease (not Ray's own cleaner) can give a paused trial's CPUs back.
    init_ray(num_cpus=3, dashboard=False)
    try:
        path = write_spec(
            tmp_path,
            fmnist_tiny_paths,
            name="dp-promo",
            epochs=2,
            samples=2,
            backend="torchvision",
            resources={"workers": 2, "cpus_per_worker": 1},
            scheduler=PROMOTION,
        )
        outcome = run_sweep(load_sweep_spec(path), source_text=path.read_text())
        rows = {t.path: trial_rows(Path(t.path)) for t in outcome.trials}
        assert len(rows) == 2 and not outcome.all_failed, outcome.trials
        for trial_path, r in rows.items():
            assert [x["epoch"] for x in r] == list(range(1, len(r) + 1)), trial_path
        # The first trial waits at the rung (epoch 1) while the second runs (one at a time: 3 CPUs);
        # then the lower train loss of the two trains on to epoch 2 and the other ends where it waited.
        by_loss = sorted(rows, key=lambda p: rows[p][0]["train/loss"])
        assert [len(rows[p]) for p in by_loss] == [2, 1], rows
        # Counted in the trainer's epochs: Tune's training_iteration restarts when a TorchTrainer resumes.
        summary = {t.path: (t.epochs, t.status) for t in outcome.trials}
        assert [summary[p] for p in by_loss] == [(2, "completed"), (1, "stopped early")], summary
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 3 - 1e-6:
            time.sleep(1)
        assert ray.available_resources().get("CPU", 0) >= 3 - 1e-6, "CPUs leaked by paused trials"
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_paused_and_resumed_trial_equals_the_same_run_straight(
    tmp_path: Path, fmnist_tiny_paths: dict[str, str]
) -> None:
    """Deterministic mode: a trial that waits at the rung and is resumed later (a fresh process,
    from its checkpoint) reports exactly the metrics of the same config trained without a pause."""
    import ray
    import yaml

    from cmx.cluster.runtime import init_ray
    from cmx.core import metrics as M
    from cmx.core.config import TrainConfig
    from cmx.pipelines.trainer import train

    # One CPU, grid order: the good lr runs first and waits alone at the rung; the bad one reaches
    # the rung next, and the first (lower train loss) is promoted, i.e. resumed from its checkpoint.
    path = write_spec(tmp_path, fmnist_tiny_paths, name="det-promo", epochs=2, backend="torchvision",
                      scheduler=PROMOTION, search={"algorithm": "grid", "num_samples": 1})  # fmt: skip
    spec = yaml.safe_load(path.read_text())
    spec["space"] = {"optim.lr": {"type": "grid", "values": [0.01, 1e-7]}}
    spec["base"]["loop"]["deterministic"] = True
    spec["base"]["data"]["augment"]["random_erasing"] = 0.25
    path.write_text(yaml.safe_dump(spec))
    init_ray(num_cpus=1)
    try:
        outcome = run_sweep(load_sweep_spec(path), source_text=path.read_text())
    finally:
        ray.shutdown()
    rows = {Path(t.path): trial_rows(Path(t.path)) for t in outcome.trials}
    resumed = [p for p, r in rows.items() if len(r) == 2 and M.SETUP_SECONDS in r[1]]
    assert len(resumed) == 1, {
        p.name: [sorted(k for k in x if k.startswith("time/")) for x in r] for p, r in rows.items()
    }
    trial_dir = resumed[0]
    cfg = TrainConfig.model_validate(yaml.safe_load((trial_dir / "run" / "config.yaml").read_text()))
    assert cfg.loop.deterministic and cfg.optim.lr == 0.01 and cfg.loop.epochs == 2
    straight = train(cfg, tmp_path / "straight", progress=False)
    compared = [k for k in M.ALL if k not in (M.IMAGES_PER_SEC, M.EPOCH_SECONDS, M.PEAK_MEMORY_MB)]
    got = [{k: r[k] for k in compared} for r in rows[trial_dir]]
    assert got == [{k: h[k] for k in compared} for h in straight.history]
