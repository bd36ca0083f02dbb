"""Proof that training learns: a tiny ConvMixer passes 80% val top-1 on real Fashion-MNIST
(10,000 training images) in two epochs on a 2-core CPU, through the same code path `cmx train` uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.training import train_config

from cmx.core import metrics as M
from cmx.pipelines import trainer as T

pytestmark = pytest.mark.slow


def test_tiny_convmixer_passes_80_percent_on_fashion_mnist(fmnist_10k, tmp_path: Path) -> None:
    cfg = train_config(
        fmnist_10k,
        backend="ffcv",
        data={"batch_size": 128, "val_batch_size": 500, "augment": {"scale": [1.0, 1.0]}},
        model={"name": "convmixer_tiny", "dim": 64, "depth": 4, "kernel_size": 5, "patch_size": 2},
        optim={"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
        loop={"epochs": 2, "threads": 2, "seed": 0},
    )
    reports: list[T.EpochReport] = []
    result = T.train(cfg, tmp_path / "run", reporter=reports.append, progress=False)
    assert result.status == "completed" and result.epochs_completed == 2
    top1 = [r.metrics[M.VAL_TOP1] for r in reports]
    assert top1[-1] > 80.0, top1
    assert reports[-1].metrics[M.VAL_LOSS] < reports[0].metrics[M.VAL_LOSS] or top1[-1] >= top1[0]
