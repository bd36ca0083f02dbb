"""The sweep benchmark's rank-agreement table: ranks with ties, Spearman's rho, the final best's rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from sweep_efficiency import average_ranks, early_rank_agreement  # noqa: E402


def test_average_ranks_share_ties() -> None:
    assert average_ranks([0.3, 0.1, 0.2, 0.2]).tolist() == [3.0, 0.0, 1.5, 1.5]


def test_rank_agreement_per_epoch() -> None:
    curves = [
        [10.0, 50.0, 60.0],  # last at epoch 1, best at the end
        [20.0, 40.0, 50.0],
        [30.0, 30.0, 40.0],
        [40.0, 20.0],  # stopped early: left out
    ]
    rows = early_rank_agreement(curves)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["spearman_rho"] == pytest.approx(-1.0)
    assert rows[1]["spearman_rho"] == pytest.approx(1.0)
    assert [r["final_best_rank"] for r in rows] == [3, 1]
    rho = np.corrcoef(average_ranks([1.0, 2.0, 2.0]), average_ranks([1.0, 2.0, 3.0]))[0, 1]
    assert 0.8 < rho < 1.0


def test_rank_agreement_needs_trial_folders(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sweep_efficiency.py"), "--rank-agreement", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"{tmp_path}: needs the trial folders" in out.stderr
