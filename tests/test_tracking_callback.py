"""The sweep's MLflow callback across a driver restart, on a real MLflow store (sqlite).

The trial is the few attributes Tune's Trial gives the callback (id, config); everything it
records goes through the real tracking store and is read back with MLflow's client.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from support.sweeps import write_spec

from cmx.core import metrics as M
from cmx.core.net import free_port
from cmx.core.sweep_spec import load_sweep_spec
from cmx.sweep.mlflow_callback import MLflowTrackingCallback, trial_key
from cmx.tracking.tracker import STATE_FILE, Tracker


def _result(epoch: int) -> dict[str, float]:
    return {
        M.EPOCH: epoch,
        "training_iteration": epoch,
        M.TRAIN_LOSS: 2.0 / epoch,
        M.VAL_TOP1: 10.0 * epoch,
        M.EPOCH_SECONDS: 1.0,
    }


def test_epoch_sent_just_before_a_kill_is_not_logged_twice(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="dup", tracking={"enabled": True, "uri": uri}))
    exp = tmp_path / "exp"
    trial = SimpleNamespace(trial_id="t1", config={"model.dim": 8, "optim.lr": 0.001, "model.kernel_size": 3})

    first = MLflowTrackingCallback(spec=spec, experiment_dir=str(exp), source_text="")
    first.setup()
    first.on_trial_start(0, [trial], trial)
    for epoch in (1, 2):
        first.on_trial_result(0, [trial], trial, _result(epoch))
    saved = tmp_path / "state-after-epoch-2.json"
    shutil.copy(exp / STATE_FILE, saved)
    first.on_trial_result(0, [trial], trial, _result(3))
    # The driver dies after MLflow took epoch 3 but before its state file recorded it.
    shutil.copy(saved, exp / STATE_FILE)

    second = MLflowTrackingCallback(spec=spec, experiment_dir=str(exp), source_text="")
    second.setup()
    second.on_trial_start(0, [trial], trial)
    for epoch in (3, 4):  # the trial resumes from its epoch-2 checkpoint
        second.on_trial_result(0, [trial], trial, _result(epoch))

    tracker = second.tracker
    run_id = tracker.run_id(trial_key("t1"))
    for key in (M.VAL_TOP1, M.TRAIN_LOSS):
        steps = sorted(m.step for m in tracker.client.get_metric_history(run_id, key))
        assert steps == [1, 2, 3, 4], (key, steps)


def test_last_logged_step_counts_calls_waiting_in_the_journal(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, f"http://127.0.0.1:{free_port()}", experiment="offline")  # nothing listens
    tracker.start_run("trial:a", name="a")
    for step in (1, 2, 5):
        tracker.log("trial:a", metrics={M.EPOCH_SECONDS: 1.0}, step=step)
    assert tracker.pending() == 4  # the start and three logs wait for the store
    assert tracker.last_logged_step("trial:a", M.EPOCH_SECONDS) == 5
    assert tracker.last_logged_step("trial:a", M.VAL_TOP1) is None
    assert tracker.last_logged_step("trial:b", M.EPOCH_SECONDS) is None
