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
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from support.mlflow_server import MlflowServer  # noqa: E402
from support.ray_processes import kill_ray_started_with, private_ray_tmp  # noqa: E402
from support.training import export_cached  # noqa: E402

# ---------------------------------------------------------------- data: the built-in Fashion-MNIST


@pytest.fixture(scope="session")
def fmnist_tiny_paths() -> dict[str, str]:
    """40 images per class (400 train / 400 val carved from the official train split / 400 test,
    the official test split), as path strings: JPEG folders `train_dir`, `val_dir`, `test_dir` and
    `.beton` files `train_beton`, `val_beton`, `test_beton` (what `support.sweeps` takes)."""
    ex = export_cached(40)
    return {
        "train_dir": str(ex.train_dir),
        "val_dir": str(ex.val_dir),
        "test_dir": str(ex.test_dir),
        "train_beton": str(ex.train_beton),
        "val_beton": str(ex.val_beton),
        "test_beton": str(ex.test_beton),
    }


@pytest.fixture(scope="session")
def fmnist_tiny_export() -> Any:
    """20 images per class (200 train / 200 val / 200 test), as the export object (`.train_dir`,
    `.train_beton`, ...) that `support.training.train_config` takes."""
    return export_cached(20)


@pytest.fixture(scope="session")
def fmnist_10k() -> Any:
    """1000 images per class (10,000 train / 10,000 val / 10,000 test), as the export object."""
    return export_cached(1000)


# ---------------------------------------------------------------- processes: Ray and MLflow


@pytest.fixture
def ray_local() -> Iterator[None]:
    """An embedded local Ray that the test starts in this process, shut down afterwards."""
    import ray

    yield
    ray.shutdown()


@pytest.fixture
def own_ray_tmp() -> Iterator[str]:
    """A private CMX_RAY_TMP for the Ray a test's subprocesses start; that Ray is killed afterwards."""
    tmp = private_ray_tmp()
    yield tmp
    kill_ray_started_with(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running `mlflow server` for a test module; stopped by pid at teardown."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
