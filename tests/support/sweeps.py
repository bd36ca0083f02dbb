"""Sweep files for the Ray Tune tests, and reading back what their trials reported.

`data` is the `fmnist_tiny_paths` fixture (tests/conftest.py): path strings of the 40-per-class
Fashion-MNIST export, as JPEG folders (`train_dir`, `val_dir`) and `.beton` files.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def base_config(data: dict[str, str], *, epochs: int, backend: str = "ffcv") -> dict:
    """A tiny, fast trial: nano ConvMixer on 28 px Fashion-MNIST."""
    train, val = (data["train_beton"], data["val_beton"]) if backend == "ffcv" else (data["train_dir"], data["val_dir"])
    return {
        "data": {
            "backend": backend,
            "train_path": train,
            "val_path": val,
            "resolution": 28,
            "val_resolution": 28,
            "center_crop_ratio": 1.0,
            "batch_size": 64,
            "num_workers": 1,
            "augment": {"scale": [0.7, 1.0]},
        },
        "model": {"name": "convmixer_nano"},
        "optim": {"lr": 0.005},
        "schedule": {"name": "constant"},
        "loop": {"epochs": epochs, "threads": 1},
    }


def write_spec(
    tmp_path: Path,
    data: dict[str, str],
    *,
    name: str,
    epochs: int = 3,
    samples: int = 6,
    backend: str = "ffcv",
    **sections: dict,
) -> Path:
    """`tmp_path/<name>.yaml`: TPE over dim, lr and kernel size, ASHA, storage in `tmp_path/sweeps`,
    tracking off; `sections` update the spec's top-level sections."""
    spec = {
        "name": name,
        "base": base_config(data, epochs=epochs, backend=backend),
        "space": {
            "model.dim": {"type": "choice", "values": [8, 16]},
            "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2},
            "model.kernel_size": {"type": "choice", "values": [3, 5]},
        },
        "search": {"algorithm": "optuna-tpe", "seed": 3, "num_samples": samples},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus": 1},
        "storage": {"path": str(tmp_path / "sweeps")},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trial_rows(trial_dir: Path) -> list[dict]:
    """The rows of a trial's `result.json` (one per reported epoch); [] before its first."""
    result = trial_dir / "result.json"
    return [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []
