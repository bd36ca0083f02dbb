"""The built-in Fashion-MNIST, exported once and cached, and tiny training configs on it.

The fixtures built on `export_cached` live in tests/conftest.py (`fmnist_tiny_export`,
`fmnist_10k`, `fmnist_tiny_paths`); the exports live under the repo's `.cmx-home/test-cache/`
(git-ignored) so re-runs skip the ~20 s export of the 10k-image set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from cmx.core.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TrainConfig

CACHE = Path(__file__).resolve().parents[2] / ".cmx-home" / "test-cache"
# Fashion-MNIST's per-channel statistics (grayscale replicated to RGB by the export).
FMNIST_MEAN, FMNIST_STD = FASHION_MNIST_MEAN, FASHION_MNIST_STD


def export_cached(limit_per_class: int) -> Any:
    """Export into a private temp folder, then rename into the cache: concurrent test runs never
    see a half-written export (the rename is atomic; the loser uses the winner's copy)."""
    from cmx.pipelines.fashion_mnist import EXPORT_VERSION, export_fashion_mnist

    # The version in the name: an older export (val = the official test split) is never reused.
    final = CACHE / f"fmnist-v{EXPORT_VERSION}-{limit_per_class}"
    if not (final / "train.beton").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # In a fresh process: FFCV's writer forks, and this one may hold an in-process Ray's
        # threads (a fork of a threaded process can leave a child stuck on a copied lock).
        code = "import sys; from cmx.pipelines.fashion_mnist import export_fashion_mnist as e; "
        code += "e(sys.argv[1], limit_per_class=int(sys.argv[2]), progress=False)"
        subprocess.run([sys.executable, "-c", code, str(tmp), str(limit_per_class)], check=True)
        try:
            tmp.rename(final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    # A second call finds the export marker and returns at once.
    return export_fashion_mnist(final, limit_per_class=limit_per_class, progress=False)


def train_config(export: Any, *, backend: str = "torchvision", **sections: dict[str, Any]) -> TrainConfig:
    """A tiny, fast ConvMixer run on an export; `sections` update the config's sections."""
    ffcv = backend == "ffcv"
    base: dict[str, Any] = {
        "name": "test",
        "data": {
            "backend": backend,
            "train_path": str(export.train_beton if ffcv else export.train_dir),
            "val_path": str(export.val_beton if ffcv else export.val_dir),
            "resolution": 28,
            "val_resolution": 28,
            "center_crop_ratio": 1.0,
            "batch_size": 50,
            "num_workers": 2 if ffcv else 0,
            "mean": FMNIST_MEAN,
            "std": FMNIST_STD,
            "augment": {"scale": [0.5, 1.0]},
        },
        "model": {"name": "convmixer_tiny", "dim": 16, "depth": 2, "kernel_size": 3, "patch_size": 4},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
        "schedule": {"name": "onecycle"},
        "loop": {"epochs": 2, "threads": 2, "seed": 0},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **values}
        else:
            base[name] = values
    return TrainConfig.model_validate(base)
