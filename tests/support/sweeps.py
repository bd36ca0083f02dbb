"""Sweep files for the Ray Tune tests, and reading back what their trials reported.

`data` is the `fmnist_tiny_paths` fixture (tests/conftest.py): path strings of the 40-per-class
Fashion-MNIST export, as JPEG folders (`train_dir`, `val_dir`) and `.beton` files.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def base_config(data: dict[str, str], *, epochs: int, backend: str = "ffcv", test: bool = False) -> dict:
    """A tiny, fast trial: nano ConvMixer on 28 px Fashion-MNIST (`test`: with the held-out test split)."""
    kind = "beton" if backend == "ffcv" else "dir"
    train, val = data[f"train_{kind}"], data[f"val_{kind}"]
    return {
        "data": {
            "backend": backend,
            "train_path": train,
            "val_path": val,
            **({"test_path": data[f"test_{kind}"]} if test else {}),
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
    test: bool = False,
    **sections: dict,
) -> Path:
    """`tmp_path/<name>.yaml`: TPE over dim, lr and kernel size, ASHA, storage in `tmp_path/sweeps`,
    tracking off; `sections` update the spec's top-level sections; `test`: base.data.test_path set."""
    spec = {
        "name": name,
        "base": base_config(data, epochs=epochs, backend=backend, test=test),
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


SEARCHED = ("optim.lr", "model.dim")  # the searched parameters of `record_sweep`


def record_sweep(state_dir: Path, uri: str, name: str) -> None:
    """A finished sweep as the MLflow callback records it (parent + 3 trials, objective `min val/loss`,
    trial_1 best), written through the Tracker into `uri`: no Ray, no training."""
    from cmx.core import metrics as M
    from cmx.tracking.tracker import Tracker

    t = Tracker(state_dir, uri, experiment=name)
    t.start_run("sweep", name=name, tags={"cmx.role": "sweep", "cmx.sweep": name, "cmx.objective": "min val/loss"})
    for i, loss in enumerate((0.9, 0.4, 0.7)):
        key = f"trial:{i}"
        t.start_run(key, name=f"trial_{i}", parent="sweep", tags={"cmx.role": "trial", "cmx.trial_id": f"t{i}"})
        t.log(key, params={"optim.lr": str(0.01 * (i + 1)), "model.dim": str(32 * (i + 1))},
              tags={"cmx.searched": ", ".join(SEARCHED)})  # fmt: skip
        t.log(key, metrics={M.VAL_LOSS: loss, f"best/{M.VAL_LOSS}": loss}, step=1)
        t.end_run(key, M.TrialStatus.COMPLETED)
    t.end_run("sweep", M.TrialStatus.COMPLETED)
