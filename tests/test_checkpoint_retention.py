"""Checkpoint retention: superseded checkpoints go only once no saved experiment state needs them.

Uses Tune's real per-trial checkpoint manager and real checkpoint directories; the trial is the
one attribute path the callback reads (`run_metadata.checkpoint_manager`, `status`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.train import Checkpoint, CheckpointConfig
from ray.train._internal.checkpoint_manager import _CheckpointManager
from ray.train._internal.session import _TrainingResult

from cmx.sweep.checkpoint_retention import SAVES_BEFORE_DELETE, CheckpointRetention, superseded

METRIC = "val/top1"


def _trial(tmp_path: Path, status: str = "RUNNING") -> SimpleNamespace:
    manager = _CheckpointManager(
        CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=METRIC, checkpoint_score_order="max")
    )
    return SimpleNamespace(run_metadata=SimpleNamespace(checkpoint_manager=manager), status=status, dir=tmp_path)


def _report(trial: SimpleNamespace, epoch: int, score: float) -> Path:
    path = trial.dir / f"checkpoint_{epoch:06d}"
    path.mkdir()
    (path / "checkpoint.pt").write_bytes(b"x" * 16)
    trial.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=Checkpoint.from_directory(str(path)), metrics={METRIC: score, "epoch": epoch})
    )
    return path


def _saves(callback: CheckpointRetention, trials: list, n: int) -> None:
    callback.on_step_begin(0, trials)
    for _ in range(n):
        callback.get_state()


def test_superseded_spares_latest_and_best(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    paths = [_report(trial, e, s) for e, s in enumerate([50.0, 90.0, 30.0, 40.0, 60.0], start=1)]
    manager = trial.run_metadata.checkpoint_manager
    names = {Path(r.checkpoint.path).name for r in superseded(manager, keep_best=1)}
    assert names == {p.name for p in (paths[0], paths[2], paths[3])}  # not the best (2) nor the latest (5)
    names2 = {Path(r.checkpoint.path).name for r in superseded(manager, keep_best=2)}
    assert names2 == names  # the two best are 90.0 and 60.0, the latest
    names0 = {Path(r.checkpoint.path).name for r in superseded(manager, keep_best=0)}
    assert names0 == {p.name for p in paths[:4]}  # only the latest is kept


def test_deleted_only_after_two_earlier_state_saves(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    first = _report(trial, 1, 50.0)
    second = _report(trial, 2, 40.0)  # worse: epoch 1 stays as the best
    third = _report(trial, 3, 45.0)  # epoch 2 is now superseded
    callback = CheckpointRetention(keep_best=1)
    _saves(callback, [trial], SAVES_BEFORE_DELETE)
    assert second.is_dir(), "deleted while a saved state could still point at it"
    _saves(callback, [trial], 1)
    assert not second.exists() and first.is_dir() and third.is_dir()
    manager = trial.run_metadata.checkpoint_manager
    listed = {Path(r.checkpoint.path).name for r in manager.best_checkpoint_results}
    assert listed == {first.name, third.name}  # Tune's view matches the disk
    assert manager.latest_checkpoint_result.checkpoint.path == str(third)
    # A checkpoint superseded later waits its own saves.
    fourth = _report(trial, 4, 10.0)
    _saves(callback, [trial], SAVES_BEFORE_DELETE)
    assert third.is_dir()
    _saves(callback, [trial], 1)
    assert not third.exists() and fourth.is_dir() and first.is_dir()
    assert callback.deleted == 2


def test_experiment_end_prunes_finished_trials_only(tmp_path: Path) -> None:
    done, running = _trial(tmp_path / "a", "TERMINATED"), _trial(tmp_path / "b", "PAUSED")
    for t in (done, running):
        t.dir.mkdir()
        for e, s in enumerate([70.0, 20.0, 30.0], start=1):
            _report(t, e, s)
    CheckpointRetention(keep_best=1).on_experiment_end([done, running])
    assert sorted(p.name for p in done.dir.iterdir()) == ["checkpoint_000001", "checkpoint_000003"]
    assert len(list(running.dir.iterdir())) == 3  # may be resumed from any saved state: untouched


def test_pickled_with_the_experiment_state_without_trials(tmp_path: Path) -> None:
    import pickle

    callback = CheckpointRetention(keep_best=2)
    trial = _trial(tmp_path)
    _report(trial, 1, 1.0)
    _saves(callback, [trial], 1)
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.keep_best == 2 and clone._trials == [] and clone._seen == {}


@pytest.mark.parametrize("keep_best", [1, 3])
def test_never_deletes_the_latest_or_the_best(tmp_path: Path, keep_best: int) -> None:
    trial = _trial(tmp_path)
    callback = CheckpointRetention(keep_best=keep_best)
    scores = [10.0, 80.0, 20.0, 85.0, 5.0, 50.0, 84.0, 1.0]
    for epoch, score in enumerate(scores, start=1):
        _report(trial, epoch, score)
        _saves(callback, [trial], 1)
        assert (tmp_path / f"checkpoint_{epoch:06d}").is_dir()  # the latest
        best = sorted(range(epoch), key=lambda i: scores[i])[-keep_best:]
        for i in best:
            assert (tmp_path / f"checkpoint_{i + 1:06d}").is_dir()
    _saves(callback, [trial], SAVES_BEFORE_DELETE + 1)
    kept = sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir())
    want = sorted({len(scores), *(i + 1 for i in sorted(range(len(scores)), key=lambda i: scores[i])[-keep_best:])})
    assert kept == want
