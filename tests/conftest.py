"""Shared test settings: keep Ray, MLflow and torch quiet, local and small."""

from __future__ import annotations

import os

# Set before any test imports ray/mlflow: no usage stats, no telemetry, no stray dashboards.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Exports are cached across test sessions here (gitignored): writing JPEGs and betons is cheap,
# but not free on 2 cores.
CACHE = REPO / ".cmx-home" / "test-data"


@pytest.fixture(scope="session")
def fmnist_tiny() -> dict[str, str]:
    """Real Fashion-MNIST (Debian package), 40 images per class, as JPEG folders and .beton files."""
    from cmx.pipelines.fashion_mnist import export_fashion_mnist

    ex = export_fashion_mnist(CACHE / "fmnist-40", limit_per_class=40, progress=False)
    return {
        "train_dir": str(ex.train_dir),
        "val_dir": str(ex.val_dir),
        "train_beton": str(ex.train_beton),
        "val_beton": str(ex.val_beton),
    }


@pytest.fixture
def own_ray_tmp() -> Iterator[str]:
    """A private CMX_RAY_TMP for the Ray a test's subprocesses start; that Ray is killed afterwards."""
    from ray_procs import kill_ray_started_with, private_ray_tmp

    tmp = private_ray_tmp()
    yield tmp
    kill_ray_started_with(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
