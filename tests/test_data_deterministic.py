"""`deterministic=True` loaders on the built-in Fashion-MNIST: the same batches for any worker or
thread count, across loader instances and after a resume at an epoch boundary (issue 14)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from support.training import train_config

from cmx.core.config import DataConfig, TrainConfig
from cmx.core.errors import ConfigError
from cmx.pipelines.ffcv_deterministic import kernels
from cmx.pipelines.loaders import build_loader

pytestmark = pytest.mark.timeout(600)


def _data(export: Any, backend: str, workers: int, **augment: Any) -> DataConfig:
    cfg = train_config(export, backend=backend).data
    aug = {"scale": (0.3, 1.0), "random_erasing": 0.5, **augment}
    return cfg.model_copy(update={"num_workers": workers, "augment": cfg.augment.model_copy(update=aug)})


def _epochs(cfg: DataConfig, epochs: list[int], seed: int = 3) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    loader = build_loader(cfg, "train", seed=seed, clone=True, deterministic=True)
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def _assert_same(
    a: list[list[tuple[torch.Tensor, torch.Tensor]]], b: list[list[tuple[torch.Tensor, torch.Tensor]]]
) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        assert len(ea) == len(eb) > 0
        for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb)


def test_keyed_draws_are_uniform_and_crops_within_the_image() -> None:
    uniform01, keyed_crop = kernels().uniform01, kernels().keyed_crop
    u = np.array([uniform01(np.uint64(7), np.uint64(1), np.uint64(i), np.uint64(0)) for i in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.25).mean() - 0.25) < 0.015
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    flips = 0
    for i in range(500):
        top, left, h, w, flip = keyed_crop(30, 40, scale, ratio, np.uint64(7), np.uint64(2), np.uint64(i), 0.5)
        assert top >= 0 and top + h <= 30 and left >= 0 and left + w <= 40 and h > 0 and w > 0
        flips += bool(flip)
        assert keyed_crop(30, 40, scale, ratio, np.uint64(7), np.uint64(2), np.uint64(i), 0.5)[:4] == (top, left, h, w)
    assert 200 < flips < 300


def test_ffcv_batches_do_not_depend_on_workers_instances_or_resume(
    fmnist_tiny_export, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 vs 2 FFCV threads, two loader instances (no reuse), and a loader that starts at epoch 1
    (a resume) give bit-identical images and labels; epochs differ from each other."""
    monkeypatch.setenv("CMX_LOADER_REUSE", "0")
    one = _epochs(_data(fmnist_tiny_export, "ffcv", 1), [0, 1])
    two = _epochs(_data(fmnist_tiny_export, "ffcv", 2), [0, 1])
    _assert_same(one, two)
    resumed = _epochs(_data(fmnist_tiny_export, "ffcv", 2), [1])
    _assert_same(one[1:], resumed)
    # Augmentation is on: epoch 0 and 1 see other orders and crops; another seed, other batches.
    assert not torch.equal(one[0][0][0], one[1][0][0])
    other_seed = _epochs(_data(fmnist_tiny_export, "ffcv", 2), [0], seed=4)
    assert not torch.equal(other_seed[0][0][0], one[0][0][0])


def test_torchvision_batches_do_not_depend_on_workers(fmnist_tiny_export) -> None:
    none = _epochs(_data(fmnist_tiny_export, "torchvision", 0, color_jitter=0.3), [0, 1])
    two = _epochs(_data(fmnist_tiny_export, "torchvision", 2, color_jitter=0.3), [0, 1])
    _assert_same(none, two)
    _assert_same(none[1:], _epochs(_data(fmnist_tiny_export, "torchvision", 1, color_jitter=0.3), [1]))


def test_ffcv_color_jitter_is_refused_in_deterministic_mode(fmnist_tiny_export) -> None:
    cfg = _data(fmnist_tiny_export, "ffcv", 1, color_jitter=0.4)
    with pytest.raises(ConfigError, match="color_jitter"):
        build_loader(cfg, "train", deterministic=True)
    base = train_config(fmnist_tiny_export, backend="ffcv").model_dump()
    base["data"]["augment"]["color_jitter"] = 0.4
    base["loop"]["deterministic"] = True
    with pytest.raises(ValueError, match="color_jitter=0"):
        TrainConfig.model_validate(base)
    base["data"]["backend"] = "torchvision"
    assert TrainConfig.model_validate(base).loop.deterministic  # torchvision's jitter is keyed per sample


def test_keyed_kernels_load_from_numbas_disk_cache(tmp_path) -> None:  # noqa: ANN001
    """A second process loads the keyed crop from numba's disk cache instead of compiling it."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np; from cmx.pipelines.ffcv_deterministic import kernels; k = kernels();"
        "k.keyed_crop(9, 9, np.array([0.5, 1.0]), np.array([0.75, 1.25]), np.uint64(1), np.uint64(2), np.uint64(3), 0.5);"
        "print(sum(k.keyed_crop.stats.cache_hits.values()))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    hits = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           timeout=120).stdout.split()[-1] for _ in range(2)]  # fmt: skip
    assert hits == ["0", "1"]
