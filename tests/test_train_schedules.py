"""LR schedules: every shape checked numerically against torch's schedulers or the official
recipe's formula (no data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmx.core.config import ScheduleConfig
from cmx.core.errors import ConfigError
from cmx.pipelines.schedules import build_scheduler, lr_curve, lr_multiplier


def _torch_curve(make, steps: int, lr: float = 1.0) -> list[float]:
    """The lr torch's scheduler applies at each step (read before stepping it)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_onecycle_matches_torch_onecycle() -> None:
    total = 1000
    cfg = ScheduleConfig(name="onecycle", pct_start=0.3, div_factor=25.0, min_lr_ratio=1 / 25e4)
    ours = lr_curve(cfg, total, 100)
    ref = _torch_curve(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=1.0, total_steps=total, pct_start=0.3, cycle_momentum=False
        ),
        total,
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert ours[0] == pytest.approx(1 / 25)
    assert max(ours) == pytest.approx(1.0)
    assert int(np.argmax(ours)) == pytest.approx(0.3 * total, abs=1)


def test_cosine_matches_cosine_annealing() -> None:
    total = 500
    cfg = ScheduleConfig(name="cosine", min_lr_ratio=0.01)
    ref = _torch_curve(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.01), total)
    np.testing.assert_allclose(lr_curve(cfg, total, 50), ref, rtol=1e-9, atol=1e-12)


def test_step_decay_is_the_project_start_recipe() -> None:
    """Adam lr 1e-3, x0.1 every 20,000 steps: StepLR(step_size=20000, gamma=0.1)."""
    cfg = ScheduleConfig(name="step", step_size=20_000, gamma=0.1)
    f = lr_multiplier(cfg, 70_000, 391)
    assert [f(s) for s in (0, 19_999, 20_000, 39_999, 40_000, 69_999)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.001]
    )
    small = ScheduleConfig(name="step", step_size=7, gamma=0.5)
    ref = _torch_curve(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5), 40)
    np.testing.assert_allclose(lr_curve(small, 40, 10), ref, rtol=1e-12)


def test_piecewise_is_the_official_cifar_recipe() -> None:
    """lr_schedule(epoch + (i + 1) / len(loader)) with knots [0, 2/5, 4/5, 1] x epochs."""
    epochs, per_epoch = 25, 98
    cfg = ScheduleConfig(name="piecewise")
    ours = lr_curve(cfg, epochs * per_epoch, per_epoch)
    ref = [
        np.interp([e + (i + 1) / per_epoch], [0, epochs * 2 // 5, epochs * 4 // 5, epochs], [0, 1, 1 / 20, 0])[0]
        for e in range(epochs)
        for i in range(per_epoch)
    ]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[-1] == pytest.approx(0.0)


def test_constant_and_linear_warmup() -> None:
    cfg = ScheduleConfig(name="constant", warmup_epochs=2)
    curve = lr_curve(cfg, 100, 10)  # 20 warm-up steps
    np.testing.assert_allclose(curve[:20], [(s + 1) / 20 for s in range(20)])
    assert curve[19] == 1.0 and all(v == 1.0 for v in curve[20:])
    assert np.all(np.diff(curve[:20]) > 0)


def test_warmup_then_cosine_stretches_over_the_rest() -> None:
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.0)
    curve = lr_curve(cfg, 110, 10)
    assert curve[9] == pytest.approx(1.0)
    assert curve[10] == pytest.approx(1.0)  # cosine starts at its peak right after warm-up
    assert curve[10 + 50] == pytest.approx(0.5)  # halfway through the remaining 100 steps
    assert np.all(np.diff(curve[10:]) <= 1e-12)


@pytest.mark.parametrize("name", ["onecycle", "cosine", "step", "piecewise", "constant"])
def test_every_schedule_is_finite_and_bounded(name: str) -> None:
    curve = lr_curve(ScheduleConfig(name=name, warmup_epochs=0.5, step_size=30), 300, 40)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 + 1e-12 for v in curve)


def test_lambda_lr_applies_the_multiplier_per_step() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    cfg = ScheduleConfig(name="onecycle")
    sched = build_scheduler(opt, cfg, 200, 20)
    f = lr_multiplier(cfg, 200, 20)
    for s in range(200):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * f(s))
        opt.step()
        sched.step()


def test_warmup_longer_than_the_run_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="warmup"):
        lr_multiplier(ScheduleConfig(name="cosine", warmup_epochs=5), 40, 10)
