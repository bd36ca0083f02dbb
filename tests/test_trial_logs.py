"""A trial's result.json / progress.csv hold the run as it went on: one row per epoch, even when the
trial started over (a real Tune run that fails once without a checkpoint and is retried)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from cmx.sweep.trial_logs import KeepTrialLogs, cut_csv_rows, cut_json_rows


def _epochs_json(path: Path) -> list[int]:
    return [int(json.loads(line)["epoch"]) for line in path.read_text().splitlines()]


def _epochs_csv(path: Path) -> list[int]:
    return [int(float(row["epoch"])) for row in csv.DictReader(path.open(newline=""))]


def test_cut_keeps_earlier_epochs_and_an_open_append_handle_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    handle = path.open("at")  # as Tune's JSON logger holds it
    for epoch in (1, 2, 3):
        handle.write(json.dumps({"epoch": epoch, "val/top1": 10.0 * epoch}) + "\n")
    handle.write('{"epoch": 4, "val/to')  # a torn line: the driver was killed mid-write
    handle.flush()
    assert cut_json_rows(path, 2) == 3
    handle.write(json.dumps({"epoch": 2, "val/top1": 21.0}) + "\n")
    handle.close()
    assert _epochs_json(path) == [1, 2]
    assert json.loads(path.read_text().splitlines()[1])["val/top1"] == 21.0
    assert cut_json_rows(path, 3) == 0  # nothing to cut: the file is left as it is
    assert cut_json_rows(tmp_path / "missing.json", 1) == 0


def test_cut_csv_keeps_the_header(tmp_path: Path) -> None:
    path = tmp_path / "progress.csv"
    path.write_text("val/top1,epoch\n10.0,1\n20.0,2\n30.0,3\n")
    assert cut_csv_rows(path, 1) == 3
    assert path.read_text().splitlines() == ["val/top1,epoch"]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert cut_csv_rows(other, 1) == 0 and other.read_text() == "a,b\n1,2\n"  # no epoch column


def _fails_once_after_two_epochs(config: dict[str, Any]) -> None:
    marker = Path(config["marker"])
    for epoch in (1, 2, 3):
        tune.report({"epoch": epoch, "val/top1": float(epoch)})
        if epoch == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("the node went away")  # no checkpoint: Tune starts the trial over


@pytest.mark.parametrize("keep", [True, False], ids=["with-callback", "tune-alone"])
def test_trial_started_over_logs_each_epoch_once(tmp_path: Path, ray_local: None, keep: bool) -> None:
    import ray

    here = {"PYTHONPATH": str(Path(__file__).parent)}  # the workers import this module's trainable
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, runtime_env={"env_vars": here})
    tuner = tune.Tuner(
        _fails_once_after_two_epochs,
        param_space={"marker": str(tmp_path / "failed-once")},
        run_config=tune.RunConfig(
            name="logs",
            storage_path=str(tmp_path / "sweeps"),
            callbacks=[KeepTrialLogs()] if keep else [],
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    assert not grid.errors and grid[0].metrics["epoch"] == 3
    trial_dir = Path(grid[0].path)
    if keep:
        assert _epochs_json(trial_dir / "result.json") == [1, 2, 3]
        assert _epochs_csv(trial_dir / "progress.csv") == [1, 2, 3]
    else:  # what the callback is for: Tune appends the second attempt to the first
        assert _epochs_json(trial_dir / "result.json") == [1, 2, 1, 2, 3]
