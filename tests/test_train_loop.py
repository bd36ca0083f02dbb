"""The training loop on real (tiny) Fashion-MNIST data: reports, run directory, exact resume,
divergence, early stopping, evaluation, precision and regularisers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.training import train_config

from cmx.core import metrics as M
from cmx.core.errors import ConfigError
from cmx.pipelines import trainer as T
from cmx.pipelines.checkpoint import load_checkpoint

# One thread: the tiny model's ops are too small to split, and other test processes share the
# 2 cores (OpenMP barriers spin when a core is taken).
ONE_THREAD = {"threads": 1}


class Crash(Exception):
    """Raised by a reporter to simulate a process dying right after an epoch's checkpoint."""


def test_trainer_does_not_import_ray_or_mlflow() -> None:
    code = (
        "import sys, cmx.pipelines.trainer, cmx.pipelines.loaders;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reports_run_dir_and_result(fmnist_tiny_export, tmp_path: Path) -> None:
    reports: list[T.EpochReport] = []
    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 2})
    result = T.train(cfg, tmp_path / "run", reporter=reports.append, progress=False)

    assert result.status == "completed" and result.epochs_completed == 2
    assert [r.epoch for r in reports] == [1, 2]
    for r in reports:
        assert set(r.metrics) == set(M.ALL)
        assert all(isinstance(v, float) for v in r.metrics.values())
        assert 0.0 <= r.metrics[M.VAL_TOP1] <= r.metrics[M.VAL_TOP5] <= 100.0
        assert r.metrics[M.IMAGES_PER_SEC] > 0 and r.metrics[M.PEAK_MEMORY_MB] > 0
        assert [p.name for p in r.checkpoint_dir.iterdir()] == ["checkpoint.pt"]
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    rows = T.read_metrics(run)
    assert [row[M.EPOCH] for row in rows] == [1, 2]
    assert rows[-1][M.VAL_TOP1] == reports[-1].metrics[M.VAL_TOP1]
    saved = json.loads((run / "result.json").read_text())
    assert saved["status"] == "completed"
    ck = load_checkpoint(run / "checkpoints" / "last")
    assert ck["epoch"] == 2 and ck["step"] == 2 * 4  # 200 images / batch 50
    assert ck["class_names"] == fmnist_tiny_export.class_names and ck["num_classes"] == 10
    assert ck["config"]["model"]["dim"] == 16 and len(ck["history"]) == 2
    best = load_checkpoint(result.best_checkpoint)
    assert best["epoch"] == result.history.index(max(result.history, key=lambda h: h[M.VAL_TOP1])) + 1


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(path)
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    out.update({f"ema.{k}": v for k, v in (ck["ema"] or {}).items()})
    for i, s in ck["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_resume_continues_exactly(fmnist_tiny_export, tmp_path: Path, backend: str) -> None:
    """4 epochs straight == 2 epochs, a crash, then resume for 2 more (deterministic mode), with
    every source of randomness on: random crops and flips, random erasing, mixup/cutmix, drop
    path, EMA. FFCV decodes with 2 threads (its crops used to follow per-thread random state)."""
    workers = {"num_workers": 2, "augment": {"scale": [0.5, 1.0], "random_erasing": 0.25}}
    cfg = train_config(
        fmnist_tiny_export,
        backend=backend,
        data=workers,
        model={"drop_path_rate": 0.1},
        loop={**ONE_THREAD, "epochs": 4, "deterministic": True, "mixup": 0.2, "cutmix": 0.2,
              "label_smoothing": 0.1, "ema_decay": 0.9},
        optim={"grad_clip": 1.0},
    )  # fmt: skip
    straight = T.train(cfg, tmp_path / "straight", progress=False)

    def crash_after_two(report: T.EpochReport) -> None:
        if report.epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        T.train(cfg, tmp_path / "resumed", reporter=crash_after_two, progress=False)
    assert load_checkpoint(tmp_path / "resumed")["epoch"] == 2
    resumed = T.train(cfg, tmp_path / "resumed", resume_from=tmp_path / "resumed", progress=False)

    assert resumed.status == "completed" and resumed.epochs_completed == 4
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    strip = [{k: v for k, v in h.items() if k not in (M.IMAGES_PER_SEC, M.EPOCH_SECONDS, M.PEAK_MEMORY_MB)}
             for h in straight.history]  # fmt: skip
    again = [{k: v for k, v in h.items() if k not in (M.IMAGES_PER_SEC, M.EPOCH_SECONDS, M.PEAK_MEMORY_MB)}
             for h in resumed.history]  # fmt: skip
    assert strip == again
    assert [r[M.EPOCH] for r in T.read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]


def test_divergence_stops_with_the_last_good_checkpoint(fmnist_tiny_export, tmp_path: Path) -> None:
    """Epoch 1 trains normally; then a step decay with gamma 1e30 turns lr 0.01 into 1e28 and
    the real loss overflows. The run returns "diverged" and epoch 1's checkpoint still loads."""
    reports: list[T.EpochReport] = []
    cfg = train_config(
        fmnist_tiny_export,
        optim={"name": "sgd", "lr": 0.01, "momentum": 0.0},
        schedule={"name": "step", "step_size": 4, "gamma": 1e30},  # 4 steps per epoch
        loop={**ONE_THREAD, "epochs": 3},
    )
    result = T.train(cfg, tmp_path / "run", reporter=reports.append, progress=False)

    assert result.status == "diverged", result.message
    assert result.epochs_completed == 1 and [r.epoch for r in reports] == [1]
    assert "diverged" in result.message and "epoch 2" in result.message
    assert "checkpoints/last/checkpoint.pt (epoch 1)" in result.message
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last" / "checkpoint.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert len(T.read_metrics(tmp_path / "run")) == 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"


def test_divergence_in_the_first_epoch(fmnist_tiny_export, tmp_path: Path) -> None:
    cfg = train_config(
        fmnist_tiny_export,
        optim={"name": "sgd", "lr": 1e28, "momentum": 0.0},
        schedule={"name": "constant"},
        loop={**ONE_THREAD, "epochs": 2},
    )
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.status == "diverged" and result.epochs_completed == 0
    assert "no checkpoint was written" in result.message


def test_early_stopping_with_patience(
    fmnist_tiny_export,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """val/top1 goes 50, 60, 55, 58: with patience 2 the run stops after epoch 4, best = 2."""
    values = iter([50.0, 60.0, 55.0, 58.0, 99.0])

    def fake_val(model, loader, rt, channels_last=True):
        return {M.VAL_LOSS: 1.0, M.VAL_TOP1: next(values), M.VAL_TOP5: 100.0}

    monkeypatch.setattr(T, "val_loop", fake_val)
    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 10, "early_stop_patience": 2})
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.status == "early_stopped" and result.epochs_completed == 4
    assert result.best_metrics[M.VAL_TOP1] == 60.0
    assert load_checkpoint(result.best_checkpoint)["epoch"] == 2
    assert load_checkpoint(tmp_path / "run")["epoch"] == 4
    assert "did not improve for 2 epochs" in result.message


def test_early_stopping_on_a_min_metric(
    fmnist_tiny_export,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    losses = iter([1.0, 0.9, 0.95, 0.91])
    monkeypatch.setattr(T, "val_loop", lambda *a, **k: {M.VAL_LOSS: next(losses), M.VAL_TOP1: 1.0, M.VAL_TOP5: 1.0})
    cfg = train_config(
        fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 9, "early_stop_patience": 2, "early_stop_metric": "val/loss"}
    )
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.status == "early_stopped" and result.epochs_completed == 4
    assert result.best_metrics[M.VAL_LOSS] == 0.9


def test_evaluate_matches_the_runs_validation(fmnist_tiny_export, tmp_path: Path) -> None:
    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 1, "ema_decay": 0.5})
    result = T.train(cfg, tmp_path / "run", progress=False)
    out = T.evaluate(result.best_checkpoint, fmnist_tiny_export.val_dir, threads=1)
    assert out[M.VAL_TOP1] == pytest.approx(result.best_metrics[M.VAL_TOP1])
    assert out[M.VAL_LOSS] == pytest.approx(result.best_metrics[M.VAL_LOSS], rel=1e-5)
    assert out["num_samples"] == 200
    raw = T.evaluate(result.best_checkpoint, fmnist_tiny_export.val_dir, threads=1, use_ema=False)
    assert raw[M.VAL_LOSS] != out[M.VAL_LOSS]  # the EMA weights are not the raw weights


def test_bf16_autocast_on_cpu(fmnist_tiny_export, tmp_path: Path) -> None:
    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 1, "precision": "bf16"})
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.status == "completed"
    assert torch.isfinite(torch.tensor(result.final_metrics[M.TRAIN_LOSS]))


def test_fp16_needs_a_gpu(fmnist_tiny_export, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16"):
        T.train(cfg, tmp_path / "run", progress=False)


def test_sgd_nesterov_warmup_and_no_channels_last(fmnist_tiny_export, tmp_path: Path) -> None:
    cfg = train_config(
        fmnist_tiny_export,
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        schedule={"name": "cosine", "warmup_epochs": 0.5},
        loop={**ONE_THREAD, "epochs": 1, "channels_last": False},
        checkpoint={"keep_best": False},
    )
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.status == "completed" and result.best_checkpoint is None
    assert not (tmp_path / "run" / "checkpoints" / "best").exists()


def test_a_fresh_run_clears_an_old_run_dir(fmnist_tiny_export, tmp_path: Path) -> None:
    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 1})
    T.train(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoints" / "best" / "stale.txt").write_text("x")
    T.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "best" / "stale.txt").exists()
    assert len(T.read_metrics(tmp_path / "run")) == 1


def test_resume_refuses_a_different_model(fmnist_tiny_export, tmp_path: Path) -> None:
    from cmx.core.errors import CheckpointError

    cfg = train_config(fmnist_tiny_export, loop={**ONE_THREAD, "epochs": 1})
    T.train(cfg, tmp_path / "run", progress=False)
    other = train_config(fmnist_tiny_export, model={"dim": 24}, loop={**ONE_THREAD, "epochs": 2})
    with pytest.raises(CheckpointError, match="model"):
        T.train(other, tmp_path / "run", resume_from=tmp_path / "run", progress=False)


def test_missing_data_path_is_a_config_error(fmnist_tiny_export, tmp_path: Path) -> None:
    cfg = train_config(fmnist_tiny_export, data={"val_path": None})
    with pytest.raises(ConfigError, match="data.val_path"):
        T.train(cfg, tmp_path / "run", progress=False)
