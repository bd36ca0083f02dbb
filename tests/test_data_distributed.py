"""Sharding on 2 real gloo processes: every sample is seen exactly once per epoch, both backends."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.data import make_square_folder

from cmx.pipelines.beton import convert_image_folder, evenly_spaced
from cmx.pipelines.images import load_rgb_array, scan_image_folder

WORKER = r"""
import hashlib, json, sys
import numpy as np, torch, torch.distributed as dist
from cmx.core.config import AugmentConfig, DataConfig
from cmx.pipelines.loaders import build_loader

rank, store, beton, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.set_num_threads(1)
# scale=ratio=1 and no flip: a "random" crop of a square image is the whole image, so pixels
# identify the sample.
aug = AugmentConfig(hflip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
common = dict(batch_size=4, val_batch_size=4, resolution=16, val_resolution=16, center_crop_ratio=1.0,
              drop_last=False, num_workers=1, augment=aug, mean=(0, 0, 0), std=(1, 1, 1))
result = {}
for backend, path in (("ffcv", beton), ("torchvision", folder)):
    for split, limit in (("train", None), ("val", 11)):
        cfg = DataConfig(backend=backend, train_path=path, val_path=path, limit=limit, **common)
        loader = build_loader(cfg, split, seed=5)
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen = []
            for x, y in loader:
                px = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
                seen += [hashlib.sha1(p.tobytes()).hexdigest() for p in px]
            epochs.append(seen)
        result[f"{backend}/{split}"] = {"epochs": epochs, "len": len(loader), "num_samples": loader.num_samples}
json.dump(result, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_gloo_processes_cover_every_sample_exactly_once(tmp_path: Path) -> None:
    folder = make_square_folder(tmp_path / "sq", size=16, per_class=4)  # 12 samples
    beton = tmp_path / "sq.beton"
    convert_image_folder(folder, beton, write_mode="raw", max_resolution=None, workers=1, progress=False)
    files = [p for p, _ in scan_image_folder(folder).samples]
    ids = [hashlib.sha1(load_rgb_array(p).tobytes()).hexdigest() for p in files]
    assert len(set(ids)) == 12
    val_ids = [ids[i] for i in evenly_spaced(12, 11)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(r),
                str(tmp_path / "store"),
                str(beton),
                str(folder),
                str(tmp_path / f"rank{r}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=360)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key, expected in (
        ("ffcv/train", ids),
        ("ffcv/val", val_ids),
        ("torchvision/train", ids),
        ("torchvision/val", val_ids),
    ):
        for epoch in (0, 1):
            shards = [r[key]["epochs"][epoch] for r in ranks]
            assert all(shards), key
            assert sorted(shards[0] + shards[1]) == sorted(expected), (key, epoch)  # exactly once
            assert not set(shards[0]) & set(shards[1])
        assert ranks[0][key]["num_samples"] == len(expected)
    # Shuffling depends on the epoch: rank 0's training order differs between epochs 0 and 1.
    assert ranks[0]["ffcv/train"]["epochs"][0] != ranks[0]["ffcv/train"]["epochs"][1]
    assert np.mean([len(r["ffcv/val"]["epochs"][0]) for r in ranks]) == 5.5


DETERMINISTIC_WORKER = r"""
import hashlib, json, sys
import torch, torch.distributed as dist
from cmx.core.config import AugmentConfig, DataConfig
from cmx.pipelines.loaders import build_loader

rank, store, beton, workers, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.set_num_threads(1)
aug = AugmentConfig(scale=(0.3, 1.0), random_erasing=0.5)  # random crops, flips and erasing
cfg = DataConfig(backend="ffcv", train_path=beton, batch_size=2, resolution=12, drop_last=False,
                 num_workers=workers, augment=aug, mean=(0, 0, 0), std=(1, 1, 1))
loader = build_loader(cfg, "train", seed=5, deterministic=True)
epochs = []
for epoch in (0, 1):
    loader.set_epoch(epoch)
    epochs.append([hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest() for x, _ in loader])
json.dump(epochs, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deterministic_ffcv_shards_do_not_depend_on_loader_threads(tmp_path: Path) -> None:
    """Deterministic mode on 2 gloo ranks: each rank's batches (order, crops, flips, erasing) are
    the same with 1 or 2 FFCV threads; the two ranks' batches differ."""
    folder = make_square_folder(tmp_path / "sq", size=16, per_class=4)
    beton = tmp_path / "sq.beton"
    convert_image_folder(folder, beton, write_mode="raw", max_resolution=None, workers=1, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for workers in (1, 2):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    DETERMINISTIC_WORKER,
                    str(r),
                    str(tmp_path / f"store{workers}"),
                    str(beton),
                    str(workers),
                    str(tmp_path / f"w{workers}-rank{r}.json"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for r in (0, 1)
        ]
        outputs = [p.communicate(timeout=360)[0] for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            assert p.returncode == 0, out[-3000:]
        runs[workers] = [json.loads((tmp_path / f"w{workers}-rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[1] == runs[2]
    rank0, rank1 = runs[1]
    assert all(rank0) and all(rank1) and rank0 != rank1 and rank0[0] != rank0[1]
