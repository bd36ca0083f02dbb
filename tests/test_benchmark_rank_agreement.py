"""The sweep benchmark's rank-agreement table: ranks with ties, Spearman's rho and the final best's rank
per early-stopping metric."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from sweep_efficiency import average_ranks, early_rank_agreement, epochs_to_reach  # noqa: E402


def test_average_ranks_share_ties() -> None:
    assert average_ranks([0.3, 0.1, 0.2, 0.2]).tolist() == [3.0, 0.0, 1.5, 1.5]


def trial(top1: list[float], loss: list[float]) -> dict[str, list[float]]:
    return {"val/top1": top1, "train/loss": loss}


def test_rank_agreement_per_epoch_and_metric() -> None:
    curves = [
        trial([10.0, 50.0, 60.0], [1.0, 0.6, 0.5]),  # last at epoch 1 on val top-1, best at the end
        trial([20.0, 40.0, 50.0], [1.1, 0.7, 0.6]),
        trial([30.0, 30.0, 40.0], [1.2, 0.8, 0.7]),
        trial([40.0, 20.0], [0.9, 0.9]),  # stopped early: left out
    ]
    agreement = early_rank_agreement(curves)
    top1, loss = agreement["val/top1"], agreement["train/loss"]
    assert [r["epoch"] for r in top1] == [1, 2, 3]
    assert [r["spearman_rho"] for r in top1] == pytest.approx([-1.0, 1.0, 1.0])
    assert [r["final_best_rank"] for r in top1] == [3, 1, 1]
    # lower loss is better: train loss ranks them right from epoch 1 to the end
    assert [r["spearman_rho"] for r in loss] == pytest.approx([1.0, 1.0, 1.0])
    assert [r["final_best_rank"] for r in loss] == [1, 1, 1]
    rho = np.corrcoef(average_ranks([1.0, 2.0, 2.0]), average_ranks([1.0, 2.0, 3.0]))[0, 1]
    assert 0.8 < rho < 1.0


def test_rank_agreement_needs_trial_folders(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sweep_efficiency.py"), "--rank-agreement", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"{tmp_path}: needs the trial folders" in out.stderr


def test_epochs_to_reach_counts_epochs_in_the_order_they_finished() -> None:
    """The warm-start comparison: epochs a sweep spent until one reached the cold sweep's best."""
    assert epochs_to_reach([10.0, 30.0, 20.0, 50.0], 30.0) == 2
    assert epochs_to_reach([10.0, 29.9], 30.0) is None
    assert epochs_to_reach([], 30.0) is None
