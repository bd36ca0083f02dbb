"""Checkpoint files: atomic writes, weights_only loads, RNG state round trips."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cmx.core.errors import CheckpointError
from cmx.pipelines import checkpoint as ck


def _state(**extra) -> dict:
    return {"model": {"w": torch.arange(4.0)}, "config": {"a": 1}, "epoch": 1, "step": 10, **extra}


def test_save_load_round_trip_with_rng(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.randn(3), np.random.rand(), random.random(), np.random.randn()  # noqa: B018
    saved = ck.rng_state()
    expected = (torch.randn(5), np.random.rand(5), random.random(), np.random.randn())
    path = ck.save_checkpoint(_state(rng=saved, history=[{"val/top1": 50.0}]), tmp_path / "c" / "checkpoint.pt")
    torch.randn(7), np.random.rand(9), random.random()  # noqa: B018
    state = ck.load_checkpoint(path)
    ck.set_rng_state(state["rng"])
    got = (torch.randn(5), np.random.rand(5), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
    assert state["format_version"] == ck.FORMAT_VERSION
    assert state["history"] == [{"val/top1": 50.0}]


def test_failed_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ck.save_checkpoint(_state(), tmp_path / "checkpoint.pt")
    before = path.read_bytes()

    def boom(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(_state(epoch=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_load_refuses_pickled_code(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint carrying an arbitrary object does not load."""
    path = tmp_path / "checkpoint.pt"
    torch.save({**_state(), "format_version": 1, "evil": Path("/etc/passwd")}, path)
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_corrupt_or_foreign_files(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"just": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(path)


def test_resolve_file_dir_or_run_dir(tmp_path: Path) -> None:
    path = ck.save_checkpoint(_state(), tmp_path / "run" / "checkpoints" / "last" / "checkpoint.pt")
    assert ck.resolve_checkpoint(path) == path
    assert ck.resolve_checkpoint(path.parent) == path
    assert ck.resolve_checkpoint(tmp_path / "run") == path
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ck.resolve_checkpoint(tmp_path / "missing")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({**_state(), "format_version": ck.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="newer"):
        ck.load_checkpoint(path)


def test_optimizer_and_scheduler_states_are_weights_only_safe(tmp_path: Path) -> None:
    from cmx.core.config import OptimConfig, ScheduleConfig
    from cmx.pipelines.optim import create_optimizer
    from cmx.pipelines.schedules import build_scheduler

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = create_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, ScheduleConfig(name="onecycle"), 100, 10)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = ck.save_checkpoint(
        _state(
            optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(), rng=ck.rng_state()
        ),
        tmp_path / "checkpoint.pt",
    )
    state = ck.load_checkpoint(path)
    assert state["scheduler"]["last_epoch"] == 1
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
