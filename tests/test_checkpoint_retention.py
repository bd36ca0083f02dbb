"""CheckpointRetention: a trial's latest and best checkpoints stay; others go only after the grace."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Checkpoint

from cmx.checkpoint_retention import MIN_GRACE_S, CheckpointRetention, default_grace_s


@dataclass
class TrialResult:
    """What the callback reads of a Tune trial: its id and last reported metrics."""

    trial_id: str
    last_result: dict = field(default_factory=dict)


def register(cb: CheckpointRetention, trial: TrialResult, root: Path, i: int, top1: float) -> Path:
    path = root / f"checkpoint_{i:06d}"
    path.mkdir()
    (path / "state.pt").write_bytes(b"x")
    trial.last_result = {"val/top1": top1}
    cb.on_checkpoint(0, [], trial, Checkpoint.from_directory(str(path)))
    return path


def test_keeps_latest_and_best_deletes_the_rest_after_grace(tmp_path: Path) -> None:
    cb = CheckpointRetention("val/top1", "max", keep_best=2, grace_s=0.0)
    trial = TrialResult("t1")
    paths = [register(cb, trial, tmp_path, i, top1) for i, top1 in enumerate([50.0, 10.0, 40.0, 20.0, 30.0])]
    # best two: 50 (0) and 40 (2); latest: 4; 1 and 3 are gone
    assert [p.exists() for p in paths] == [True, False, True, False, True]


def test_superseded_checkpoint_survives_the_grace(tmp_path: Path) -> None:
    cb = CheckpointRetention("val/top1", "min", keep_best=1, grace_s=3600.0)
    trial = TrialResult("t2")
    first = register(cb, trial, tmp_path, 0, 1.0)  # best for mode min
    second = register(cb, trial, tmp_path, 1, 5.0)
    third = register(cb, trial, tmp_path, 2, 6.0)
    assert first.exists() and second.exists() and third.exists()  # within the grace nothing goes
    assert cb.prune("t2", now=1e12) == [str(second)]  # long after: only the superseded non-best one
    assert first.exists() and third.exists()


def test_grace_follows_tunes_state_period(monkeypatch) -> None:  # noqa: ANN001 - pytest fixture
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "auto")
    assert default_grace_s() == MIN_GRACE_S
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "600")
    assert default_grace_s() == 1800
