"""The held-out protocol: a stratified seeded val carve, a test split that can never be the val
data, and test scores measured after the search and logged to a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from support.cli import run_cmx
from support.sweeps import base_config, record_sweep
from support.training import train_config

from cmx.core import metrics as M
from cmx.core.config import DataConfig, TrainConfig, validate_config
from cmx.core.errors import ConfigError, DataError
from cmx.core.sweep_spec import SweepSpec
from cmx.pipelines.images import stratified_split

pytestmark = pytest.mark.timeout(300)


def test_stratified_split_keeps_class_shares_is_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(4), [60, 30, 12, 2])
    s = stratified_split(labels, 1 / 6, seed=7)
    assert np.bincount(labels[s.val]).tolist() == [10, 5, 2, 1]  # round(n/6), at least one each
    assert np.bincount(labels[s.train]).tolist() == [50, 25, 10, 1]
    assert not set(s.train) & set(s.val) and len(s.train) + len(s.val) == len(labels)
    assert np.array_equal(stratified_split(labels, 1 / 6, seed=7).val, s.val)
    assert not np.array_equal(stratified_split(labels, 1 / 6, seed=8).val, s.val)
    with pytest.raises(DataError, match="class 1 has 1 image"):
        stratified_split([0, 0, 1], 0.5)
    with pytest.raises(DataError, match="between 0 and 1"):
        stratified_split(labels, 1.0)


def test_val_as_test_is_refused(fmnist_tiny_paths: dict[str, str], tmp_path: Path) -> None:
    from cmx.core.config import check_test_apart

    val = fmnist_tiny_paths["val_dir"]
    # The same path (also through a symlink): refused by the schema, naming the file and the key.
    link = tmp_path / "val-link"
    link.symlink_to(val)
    for test in (val, str(link)):
        with pytest.raises(ConfigError, match=r"s\.yaml: data: test_path is the val data"):
            validate_config(TrainConfig, {"data": {"val_path": val, "test_path": test}}, "s.yaml")
    # A copy of the val data: refused by its fingerprint.
    copy = shutil.copytree(val, tmp_path / "copy")
    data = DataConfig(val_path=val, test_path=str(copy))
    with pytest.raises(ConfigError, match="holds the same data as data.val_path"):
        check_test_apart(data, "s.yaml")
    check_test_apart(DataConfig(val_path=val, test_path=fmnist_tiny_paths["test_dir"]), "s.yaml")
    # A sweep cannot optimise a test metric, nor search over the data paths.
    base = base_config(fmnist_tiny_paths, epochs=1, backend="torchvision", test=True)
    spec = {"base": base, "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    for search in ({"metric": M.TEST_TOP1}, {"objectives": [{"metric": M.TEST_TOP1}, {"metric": M.GFLOPS}]}):
        with pytest.raises(ConfigError, match="held-out test split after the sweep"):
            validate_config(SweepSpec, {**spec, "search": search}, "s.yaml")
    space = {"data.test_path": {"type": "choice", "values": ["a", "b"]}}
    with pytest.raises(ConfigError, match="data.test_path cannot be searched"):
        validate_config(SweepSpec, {**spec, "space": space}, "s.yaml")
    # `cmx sweep` refuses a test split that is a copy of val before Ray starts, in one line.
    base["data"]["test_path"] = str(copy)
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": "leak", "storage": {"path": str(tmp_path / "sw")}}))
    out = run_cmx("sweep", "--space", str(path), "--dry-run", home=tmp_path / "home")
    assert out.returncode != 0
    assert f"{path}: base: data.test_path {copy} holds the same data as data.val_path" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    # A sweep reads its test split at the end: a missing one stops it before Ray starts.
    from cmx.core.sweep_spec import load_sweep_spec
    from cmx.sweep.tuner import run_sweep

    base["data"]["test_path"] = str(tmp_path / "no-test")
    path.write_text(yaml.safe_dump({**spec, "name": "leak", "storage": {"path": str(tmp_path / "sw")}}))
    with pytest.raises(DataError, match="data.test_path .*no-test does not exist"):
        run_sweep(load_sweep_spec(path), source_text=path.read_text())


def test_evaluate_trials_on_test_logs_to_the_trial_run(fmnist_tiny_export: Any, tmp_path: Path) -> None:
    """A real checkpoint evaluated on the real test split; the scores land in the trial's MLflow run
    (sqlite store) and `cmx runs best` shows them apart from the val score."""
    from mlflow import MlflowClient

    from cmx.cli.main import cli
    from cmx.pipelines import trainer as T
    from cmx.tracking.heldout import evaluate_trials_on_test

    cfg = train_config(fmnist_tiny_export, loop={"epochs": 1, "threads": 1})
    # Training never opens the test split: a test_path that no loader could read does not matter.
    unreadable = tmp_path / "test.beton"
    unreadable.write_bytes(b"not a beton file")
    cfg.data.test_path = str(unreadable)
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.status == M.TrialStatus.COMPLETED and M.VAL_TOP1 in result.best_metrics
    assert not any(k.startswith("test/") for row in result.history for k in row)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_sweep(tmp_path / "state", uri, "ho")  # trials t0, t1 (the best), t2; no test scores yet
    scores = evaluate_trials_on_test(
        {"t1": result.best_checkpoint}, str(fmnist_tiny_export.test_dir), tracking_uri=uri, sweep="ho", threads=1
    )
    score = scores["t1"]
    direct = T.evaluate(result.best_checkpoint, fmnist_tiny_export.test_dir, threads=1)
    assert (score.top1, score.top5, score.num_samples) == (direct[M.VAL_TOP1], direct[M.VAL_TOP5], 200)
    assert 0.0 <= score.top1 <= score.top5 <= 100.0
    run = MlflowClient(tracking_uri=uri).get_run(score.run_id)
    assert run.data.tags["cmx.trial_id"] == "t1"
    assert run.data.metrics[M.TEST_TOP1] == pytest.approx(score.top1)
    assert run.data.metrics[M.TEST_TOP5] == pytest.approx(score.top5)
    assert run.data.tags["cmx.data.test_path"] == str(fmnist_tiny_export.test_dir)
    assert run.data.tags["cmx.data.test_fingerprint"].startswith("folder files=200 ")
    out = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["runs", "best", "--sweep", "ho", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert "best trial t1 with val/loss = 0.4000" in out.output
    assert f"held-out test: test/top1 = {score.top1:.4f}, test/top5 = {score.top5:.4f} (200 images" in out.output
    # No sweep name: evaluated, nothing logged.
    quiet = evaluate_trials_on_test({"t0": result.best_checkpoint}, str(fmnist_tiny_export.test_dir), threads=1)
    assert quiet["t0"].run_id is None and quiet["t0"].top1 == score.top1


def test_a_kept_test_score_is_not_measured_or_logged_again(fmnist_tiny_export: Any, tmp_path: Path) -> None:
    """A finished sweep run again touches the test split no more: the score kept in the trial's folder
    is reused while the checkpoint and the test data are the same, and measured again when either changes."""
    from mlflow import MlflowClient

    from cmx.pipelines import trainer as T
    from cmx.tracking.heldout import evaluate_trials_on_test

    result = T.train(
        train_config(fmnist_tiny_export, loop={"epochs": 1, "threads": 1}), tmp_path / "run", progress=False
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_sweep(tmp_path / "state", uri, "ho")
    folder = tmp_path / "trial_t1"
    folder.mkdir()
    test_dir = tmp_path / "test"
    shutil.copytree(fmnist_tiny_export.test_dir, test_dir)

    def measure(checkpoint: Any) -> Any:
        return evaluate_trials_on_test(
            {"t1": checkpoint}, str(test_dir), tracking_uri=uri, sweep="ho", threads=1, keep_in={"t1": folder}
        )["t1"]

    first = measure(result.best_checkpoint)
    kept = folder / M.TEST_SCORE_FILE
    written = kept.stat().st_mtime_ns
    assert json.loads(kept.read_text())[M.TEST_TOP1] == first.top1 and first.run_id is not None
    again = measure(result.best_checkpoint)
    assert again == first and kept.stat().st_mtime_ns == written  # reused, not written again
    history = MlflowClient(tracking_uri=uri).get_metric_history(first.run_id, M.TEST_TOP1)
    assert len(history) == 1  # logged once
    # Another checkpoint (the trial's best moved): measured again.
    other = tmp_path / "other-checkpoint.pt"
    shutil.copyfile(result.best_checkpoint, other)
    assert measure(other).checkpoint == str(other) and kept.stat().st_mtime_ns != written
    # Other test data (an image less): measured again, on 199 images.
    written = kept.stat().st_mtime_ns
    next(p for p in sorted(test_dir.rglob("*")) if p.is_file()).unlink()
    assert measure(other).num_samples == 199 and kept.stat().st_mtime_ns != written
