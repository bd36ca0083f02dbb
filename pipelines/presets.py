"""Published training recipes as partial TrainConfig dicts (layered: defaults -> preset -> YAML
-> `--set`). Each value cites where it comes from."""

from __future__ import annotations

import copy
from typing import Any

from cmx.core.errors import ConfigError

# The paper's ImageNet-1k recipe (Trockman & Kolter, "Patches Are All You Need?", timm command in
# the official repo): `train.py --model convmixer_1536_20 -b 64 (x10 GPUs) --opt adamw --epochs 150
# --sched onecycle --amp --lr .01 --aa rand-m9-mstd0.5-inc1 --cutmix 0.5 --mixup 0.5 --reprob 0.25
# --warmup-epochs 0 --opt-eps=1e-3 --clip-grad 1.0`; timm's defaults add smoothing 0.1, wd 2e-5.
IMAGENET: dict[str, Any] = {
    "name": "convmixer-imagenet",
    "model": {"name": "convmixer_1536_20"},
    "data": {
        # RandAugment exists only in the torchvision pipeline (FFCV has none; DataConfig rejects
        # the combination). Drop augment.randaugment to train this recipe from .beton files.
        "backend": "torchvision",
        "batch_size": 64,  # per worker: the paper ran 10 GPUs x 64 = 640
        "resolution": 224,
        "val_resolution": 224,
        "center_crop_ratio": 0.96,  # timm's ConvMixer default_cfg crop_pct
        "augment": {
            "hflip": True,
            "scale": [0.08, 1.0],
            "randaugment": True,
            "randaugment_magnitude": 9,
            "randaugment_ops": 2,
            "random_erasing": 0.25,
        },
    },
    "optim": {"name": "adamw", "lr": 0.01, "eps": 1e-3, "weight_decay": 2e-5, "grad_clip": 1.0},
    "schedule": {"name": "onecycle", "warmup_epochs": 0.0},
    "loop": {
        "epochs": 150,
        "label_smoothing": 0.1,
        "mixup": 0.5,
        "cutmix": 0.5,
        "precision": "fp16",  # --amp; use bf16 on CPU
    },
}

# The official CIFAR-10 recipe (locuslab/convmixer-cifar10 train.py, 92.5% in 25 epochs):
# `--lr-max=0.05 --ra-n=2 --ra-m=12 --wd=0.005 --scale=1.0 --jitter=0 --reprob=0`, batch 512,
# AdamW, lr = interp(t, [0, 2/5, 4/5, 1] * epochs, [0, lr, lr/20, 0]) per step, AMP,
# RandomResizedCrop(32, scale=(1, 1), ratio=(1, 1)) + flip + RandAugment, ConvMixer-256/8 k5 p2.
CIFAR10: dict[str, Any] = {
    "name": "convmixer-cifar10",
    "model": {"name": "convmixer_256_8_ks5_p2"},
    "data": {
        "backend": "torchvision",  # RandAugment, as above
        "batch_size": 512,
        "resolution": 32,
        "val_resolution": 32,
        "center_crop_ratio": 1.0,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2471, 0.2435, 0.2616],
        "augment": {
            "hflip": True,
            "scale": [1.0, 1.0],
            "ratio": [1.0, 1.0],
            "randaugment": True,
            "randaugment_magnitude": 12,
            "randaugment_ops": 2,
            "color_jitter": 0.0,
            "random_erasing": 0.0,
        },
    },
    "optim": {"name": "adamw", "lr": 0.05, "weight_decay": 0.005},
    "schedule": {
        "name": "piecewise",
        "warmup_epochs": 0.0,
        "milestones": [0.0, 0.4, 0.8, 1.0],
        "values": [0.0, 1.0, 0.05, 0.0],
    },
    "loop": {"epochs": 25, "precision": "fp16"},
}

# The recipe this project started from: Adam, lr 1e-3, x0.1 every 20,000 steps, batch 128.
STEP_ADAM: dict[str, Any] = {
    "name": "convmixer-step-adam",
    "data": {"batch_size": 128},
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "schedule": {"name": "step", "step_size": 20_000, "gamma": 0.1, "warmup_epochs": 0.0},
}

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": IMAGENET,
    "cifar10": CIFAR10,
    "step-adam": STEP_ADAM,
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of a named preset (ConfigError naming the known ones otherwise)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}", f"known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base` (mappings merge, everything else wins)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
