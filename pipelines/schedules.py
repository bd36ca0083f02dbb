"""Per-step learning-rate schedules: multipliers of the peak lr, with a linear warm-up.

`lr_multiplier(cfg, total_steps)` returns `f(step) -> float`; the lr used for optimiser step `s`
(0-based) is `peak_lr * f(s)`, which is exactly what `torch.optim.lr_scheduler.LambdaLR` applies
when it is stepped once after every optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cmx.core.config import ScheduleConfig
from cmx.core.errors import ConfigError

Multiplier = Callable[[int], float]


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length in steps (fractional epochs allowed), never the whole run."""
    steps = round(cfg.warmup_epochs * steps_per_epoch)
    if steps >= total_steps and steps > 0:
        raise ConfigError(
            f"schedule.warmup_epochs={cfg.warmup_epochs} covers the whole run ({total_steps} steps)",
            "shorten the warm-up or train for more epochs",
        )
    return steps


def _cosine(start: float, end: float, pct: float) -> float:
    """Cosine interpolation from start (pct 0) to end (pct 1), as in torch's OneCycleLR."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def _onecycle(cfg: ScheduleConfig, total: int) -> Multiplier:
    """torch.optim.lr_scheduler.OneCycleLR (anneal_strategy="cos") as a multiplier of max_lr."""
    start = 1.0 / cfg.div_factor
    end = cfg.min_lr_ratio
    up_end = float(cfg.pct_start * total) - 1.0
    down_end = float(total) - 1.0

    def f(s: int) -> float:
        if s <= up_end:
            return _cosine(start, 1.0, s / up_end if up_end > 0 else 1.0)
        span = down_end - up_end
        return _cosine(1.0, end, min(1.0, (s - up_end) / span) if span > 0 else 1.0)

    return f


def _cosine_decay(cfg: ScheduleConfig, total: int) -> Multiplier:
    """CosineAnnealingLR(T_max=total, eta_min=min_lr_ratio * peak)."""
    return lambda s: _cosine(1.0, cfg.min_lr_ratio, min(1.0, s / total))


def _step_decay(cfg: ScheduleConfig, total: int) -> Multiplier:
    """StepLR: x gamma every step_size steps (counted from the end of warm-up), floored at min."""
    return lambda s: max(cfg.gamma ** (s // cfg.step_size), cfg.min_lr_ratio)


def _piecewise(cfg: ScheduleConfig, total: int) -> Multiplier:
    """Linear interpolation between knots; the official CIFAR-10 ConvMixer recipe evaluates it at
    the end of each step (`np.interp(epoch + (i + 1) / len(loader), ...)`), so we do too."""
    xs = np.asarray(cfg.milestones, dtype=np.float64)
    ys = np.asarray(cfg.values, dtype=np.float64)
    return lambda s: float(np.interp((s + 1) / total, xs, ys))


def _constant(cfg: ScheduleConfig, total: int) -> Multiplier:
    return lambda s: 1.0


_SHAPES: dict[str, Callable[[ScheduleConfig, int], Multiplier]] = {
    "onecycle": _onecycle,
    "cosine": _cosine_decay,
    "step": _step_decay,
    "piecewise": _piecewise,
    "constant": _constant,
}


def lr_multiplier(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """The schedule as a function of the 0-based optimiser step: linear warm-up, then the shape
    stretched over the remaining steps."""
    if total_steps < 1:
        raise ConfigError("the run has no training steps", "check data.batch_size and the data size")
    warm = warmup_steps(cfg, steps_per_epoch, total_steps)
    shape = _SHAPES[cfg.name](cfg, total_steps - warm)

    def f(step: int) -> float:
        if step < warm:
            # (s + 1) / warm: the first step already moves, the last warm-up step reaches peak.
            return (step + 1) / warm
        return shape(step - warm)

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to be stepped after every optimiser step (its state is just the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch))


def lr_curve(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> list[float]:
    """Every step's multiplier (for plots and tests)."""
    f = lr_multiplier(cfg, total_steps, steps_per_epoch)
    return [f(s) for s in range(total_steps)]
