"""`cmx train` / `cmx eval` end to end, config layering, presets and the example config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from support.cli import run_cmx
from support.training import train_config

from cmx.cli.train import build_config
from cmx.core.errors import ConfigError
from cmx.pipelines.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def _write_run_yaml(export, tmp_path: Path, **sections) -> Path:
    """A run config with data paths relative to the YAML file (as a user writes them)."""
    cfg = train_config(export, **sections).model_dump(mode="json")
    cfg["data"]["train_path"] = os.path.relpath(export.train_dir, tmp_path)
    cfg["data"]["val_path"] = os.path.relpath(export.val_dir, tmp_path)
    cfg["loop"]["threads"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_example_config_is_valid() -> None:
    from cmx.models import is_model

    cfg = build_config(REPO / "examples" / "fashion-mnist.yaml", None, ())
    assert cfg.data.train_path == str(REPO / "data" / "fashion-mnist" / "train.beton")
    assert is_model(cfg.model.name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_name_registered_models(name: str) -> None:
    from cmx.models import is_model

    cfg = build_config(None, name, ())
    assert is_model(cfg.model.name)


def test_paper_presets() -> None:
    imagenet = build_config(None, "imagenet", ())
    assert (imagenet.optim.name, imagenet.optim.lr, imagenet.optim.eps) == ("adamw", 0.01, 1e-3)
    assert (imagenet.schedule.name, imagenet.loop.epochs, imagenet.optim.grad_clip) == ("onecycle", 150, 1.0)
    assert (imagenet.loop.mixup, imagenet.loop.cutmix, imagenet.loop.label_smoothing) == (0.5, 0.5, 0.1)
    cifar = build_config(None, "cifar10", ())
    assert (cifar.schedule.name, cifar.schedule.milestones, cifar.schedule.values) == (
        "piecewise", [0.0, 0.4, 0.8, 1.0], [0.0, 1.0, 0.05, 0.0],
    )  # fmt: skip
    step = build_config(None, "step-adam", ())
    assert (step.optim.name, step.optim.lr, step.schedule.step_size, step.schedule.gamma, step.data.batch_size) == (
        "adam", 1e-3, 20_000, 0.1, 128,
    )  # fmt: skip


def test_layering_defaults_preset_yaml_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.02}\ndata: {train_path: sub/t.beton}\n")
    cfg = build_config(path, "cifar10", ["loop.epochs=3", "data.augment.scale=[0.5, 1.0]"])
    assert cfg.optim.lr == 0.02  # YAML over preset
    assert cfg.optim.weight_decay == 0.005  # preset over defaults
    assert cfg.loop.epochs == 3 and cfg.data.augment.scale == (0.5, 1.0)  # --set over all
    assert cfg.data.train_path == str(tmp_path / "sub" / "t.beton")  # relative to the file


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        build_config(path, None, ())
    assert "bad.yaml" in e.value.message and "optim.lrr" in e.value.message
    assert "lr" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="preset"):
        build_config(None, "nope", ())


def test_cli_train_resume_and_eval(fmnist_tiny_export, tmp_path: Path) -> None:
    config = _write_run_yaml(fmnist_tiny_export, tmp_path, loop={"epochs": 1})
    run_dir = tmp_path / "run"
    out = run_cmx("train", "--config", str(config), "--run-dir", str(run_dir), report_ray=True)
    assert out.returncode == 0, out.stderr
    assert "epoch   1/1" in out.stdout and "top-1" in out.stdout
    assert f"run dir: {run_dir}" in out.stdout and "completed 1 epochs" in out.stdout
    assert out.stdout.strip().endswith("NO_RAY")  # single-process training never imports Ray
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "result.json"} <= {p.name for p in run_dir.iterdir()}

    again = run_cmx("train", "--config", str(config), "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already holds a run" in again.stderr

    resumed = run_cmx("train", "--resume", str(run_dir), "--set", "loop.epochs=2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "completed 2 epochs" in resumed.stdout
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    ev = run_cmx("eval", str(run_dir / "checkpoints" / "best"), "--data", str(fmnist_tiny_export.val_dir))
    assert ev.returncode == 0, ev.stderr
    assert "top-1" in ev.stdout and "(200 images)" in ev.stdout


def test_cli_diverged_exits_3_with_one_line(fmnist_tiny_export, tmp_path: Path) -> None:
    config = _write_run_yaml(
        fmnist_tiny_export, tmp_path, optim={"name": "sgd", "lr": 1e28, "momentum": 0.0},
        schedule={"name": "constant"}, loop={"epochs": 1},
    )  # fmt: skip
    out = run_cmx("train", "--config", str(config), "--no-progress", home=tmp_path / "home")
    assert out.returncode == 3
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged"), out.stderr
    runs = list((tmp_path / "home" / "runs").iterdir())  # the default run dir: $CMX_HOME/runs/<name>-<time>
    assert len(runs) == 1 and runs[0].name.startswith("test-")


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: {epochz: 3}\n")
    out = run_cmx("train", "--config", str(bad))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "loop.epochz" in out.stderr and "epochs" in out.stderr
    missing = run_cmx("eval", str(tmp_path / "nothing"), "--data", str(tmp_path))
    assert missing.returncode == 1 and "no checkpoint" in missing.stderr
