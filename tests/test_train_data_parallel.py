"""`cmx train --workers 2`: the same loop under Ray Train's TorchTrainer (gloo on CPU, a sharded
loader, DDP), and a worker killed mid-run that the restarted group resumes exactly, on both loader
backends (FFCV's sharding alone is tested on real gloo processes in test_data_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from support.cli import run_cmx
from support.training import train_config

from cmx.cluster.data_parallel import KILL_ENV
from cmx.core import metrics as M
from cmx.pipelines.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def _run_yaml(export, tmp_path: Path, epochs: int, backend: str) -> Path:  # noqa: ANN001
    # batch 10: each rank takes 10 steps per epoch on its half of the 200 training images
    cfg = train_config(
        export,
        backend=backend,
        data={"batch_size": 10, "augment": {"scale": [0.5, 1.0], "random_erasing": 0.25}},
        loop={"epochs": epochs, "seed": 0, "deterministic": True, "mixup": 0.2},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMING = (M.IMAGES_PER_SEC, M.EPOCH_SECONDS, M.PEAK_MEMORY_MB)


@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_two_cpu_workers_train_and_survive_a_killed_worker(fmnist_tiny_export, tmp_path: Path, backend: str) -> None:
    """One Ray Train run: rank 1 dies after epoch 1; the group restarts and resumes at epoch 2, and
    (deterministic mode) ends with the weights and metrics of the same run left uninterrupted."""
    marker = tmp_path / "killed"
    run_dir = tmp_path / "run"
    config = str(_run_yaml(fmnist_tiny_export, tmp_path, epochs=3, backend=backend))
    out = run_cmx("train", "--config", config, "--run-dir", str(run_dir),
               "--workers", "2", "--cpus-per-worker", "1", "--max-failures", "2", "--no-progress",
               env={KILL_ENV: f"1:1:{marker}"}, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert marker.read_text().startswith("rank 1 killed after epoch 1")  # the failure really happened
    rows = _rows(run_dir)
    # One row per epoch, written by rank 0 only; the epoch after the restart continues (no repeat of 1).
    assert [r[M.EPOCH] for r in rows] == [1, 2, 3]
    assert all(r[M.TRAIN_LOSS] == r[M.TRAIN_LOSS] for r in rows)  # finite, not NaN
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_completed"] == 3
    assert rows[-1][M.TRAIN_LOSS] < rows[0][M.TRAIN_LOSS]  # the restarted group kept learning
    assert "completed 3 epochs" in out.stdout

    straight_dir = tmp_path / "straight"
    out = run_cmx("train", "--config", config, "--run-dir", str(straight_dir), "--workers", "2",
                  "--cpus-per-worker", "1", "--no-progress", timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    straight = _rows(straight_dir)
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in straight
    ]
    a, b = (load_checkpoint(d / "checkpoints" / "last")["model"] for d in (run_dir, straight_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
