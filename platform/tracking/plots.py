"""PNG plots of a finished sweep for its MLflow parent run (matplotlib Agg, no display needed).

Learning curves of every trial, parallel coordinates of the searched values against the
objective, Optuna's parameter importances, and the objective against the compute spent.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cmx.core.metrics import EPOCH_SECONDS, MODES, TrialStatus
from cmx.core.search_space import encode_params, optuna_space
from cmx.core.sweep_spec import FloatDist, IntDist, LogUniformDist

log = logging.getLogger("cmx.tracking")


@dataclass
class TrialSummary:
    """What the plots need from one trial."""

    trial_id: str
    status: TrialStatus
    params: dict[str, Any]  # searched keys -> decoded values
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch, with "epoch"
    best: float | None = None
    gpus: float = 0.0  # GPUs the trial held (for GPU-hours)

    @property
    def epochs(self) -> int:
        return len(self.history)

    def gpu_hours(self, seconds_key: str) -> float:
        return self.gpus * sum(float(r.get(seconds_key, 0.0)) for r in self.history) / 3600.0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def _value_label(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def learning_curves(trials: list[TrialSummary], metric: str, path: Path) -> Path:
    """`metric` (and train loss) against epoch, one line per trial; the best trial in bold."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    best = _best(trials, _mode_of(metric))
    for t in trials:
        for ax, key in zip(axes, (metric, "train/loss"), strict=True):
            pts = [(r["epoch"], r[key]) for r in t.history if key in r and math.isfinite(r[key])]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            bold = best is not None and t.trial_id == best.trial_id
            ax.plot(xs, ys, marker="o", ms=3, lw=2.5 if bold else 1, alpha=1 if bold else 0.6,
                    label=f"{t.trial_id}{' (best)' if bold else ''}")  # fmt: skip
    for ax, key in zip(axes, (metric, "train/loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if len(trials) <= 12:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"learning curves of {len(trials)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mode_of(metric: str) -> str:

    return MODES.get(metric, "max")


def _best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if t.best is not None and t.status.usable]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.best)  # type: ignore[arg-type, return-value]


def _axis_values(trials: list[TrialSummary], key: str, log_scale: bool) -> tuple[list[float], list[str] | None]:
    """Positions in [0, 1] for one parameter axis, and tick labels for categorical ones."""
    raw = [t.params.get(key) for t in trials]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
    if numeric:
        nums = cast(list[float], raw)
        vals = [math.log10(v) if log_scale and v > 0 else float(v) for v in nums]
        lo, hi = min(vals), max(vals)
        return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in vals], None
    labels = sorted({_value_label(v) for v in raw})
    pos = {lab: (i / (len(labels) - 1) if len(labels) > 1 else 0.5) for i, lab in enumerate(labels)}
    return [pos[_value_label(v)] for v in raw], labels


def parallel_coordinates(
    trials: list[TrialSummary],
    keys: list[str],
    metric: str,
    mode: str,
    path: Path,
    log_keys: set[str] | None = None,
) -> Path:
    """One line per trial through every searched value and the objective, coloured by it."""
    plt = _pyplot()
    scored = [t for t in trials if t.best is not None and t.status.usable]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * (len(keys) + 1)), 4.5))
    if not scored:
        ax.text(0.5, 0.5, "no finished trials", ha="center")
    else:
        columns = []
        for key in keys:
            columns.append(_axis_values(scored, key, key in (log_keys or set())))
        objective = [float(t.best) for t in scored]  # type: ignore[arg-type]
        lo, hi = min(objective), max(objective)
        norm = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in objective]
        cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
        xs = list(range(len(keys) + 1))
        for i, _t in enumerate(scored):
            ys = [col[0][i] for col in columns] + [norm[i]]
            ax.plot(xs, ys, color=cmap(norm[i]), alpha=0.8, lw=1.5)
        for x, (key, (_, labels)) in enumerate(zip(keys, columns, strict=True)):
            ax.axvline(x, color="grey", lw=0.8)
            if labels:
                for j, lab in enumerate(labels):
                    ax.text(x + 0.03, j / (len(labels) - 1) if len(labels) > 1 else 0.5, lab, fontsize=7)
            else:
                vals = [t.params.get(key) for t in scored]
                ax.text(x + 0.03, 0.0, f"{min(vals):.3g}", fontsize=7)  # type: ignore[type-var]
                ax.text(x + 0.03, 1.0, f"{max(vals):.3g}", fontsize=7)  # type: ignore[type-var]
        ax.axvline(len(keys), color="black", lw=1)
        ax.text(len(keys) + 0.03, 0.0, f"{lo:.4g}", fontsize=7)
        ax.text(len(keys) + 0.03, 1.0, f"{hi:.4g}", fontsize=7)
        ax.set_xticks(xs, [*keys, metric], rotation=20, fontsize=8)
        ax.set_yticks([])
    ax.set_title(f"searched values vs best {metric} ({len(scored)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def param_importances(spec: Any, trials: list[TrialSummary], path: Path) -> Path | None:
    """Optuna's fANOVA importances on an in-memory study of the finished trials (None when there
    are too few trials or only one distinct value)."""
    import optuna

    objective = spec.objectives()[0]
    dists = optuna_space(spec)
    scored = [t for t in trials if t.best is not None and t.status.usable]
    if len(scored) < 2 or len({t.best for t in scored}) < 2:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if objective.mode == "max" else "minimize")
    for t in scored:
        params = encode_params(spec, {k: v for k, v in t.params.items() if k in dists})
        if set(params) != set(dists):
            continue
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(t.best)))  # type: ignore[arg-type]
        except ValueError as e:  # a value outside its distribution (the space changed)
            log.debug("importance: trial %s skipped: %s", t.trial_id, e)
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
        log.debug("importance: %s", e)
        return None
    if not importances:
        return None
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(importances[n], i, f" {importances[n]:.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"importance for {objective.metric} (fANOVA, {len(study.trials)} trials)")
    ax.set_title("hyperparameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_vs_cost(trials: list[TrialSummary], metric: str, path: Path, seconds_key: str) -> Path:
    """Best `metric` of each trial against what it cost: GPU-hours when trials held GPUs, else epochs."""
    plt = _pyplot()
    scored = [t for t in trials if t.best is not None and t.status.usable]
    gpu = any(t.gpus > 0 for t in scored)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for status, colour in ((TrialStatus.COMPLETED, "tab:green"), (TrialStatus.SCHEDULER_STOPPED, "tab:orange")):
        group = [t for t in scored if t.status == status]
        if group:
            xs = [t.gpu_hours(seconds_key) if gpu else t.epochs for t in group]
            ax.scatter(xs, [t.best for t in group], c=colour, label=str(status), alpha=0.8)
    ax.set_xlabel("GPU-hours" if gpu else "epochs trained")
    ax.set_ylabel(f"best {metric}")
    ax.grid(alpha=0.3)
    if scored:
        ax.legend()
    ax.set_title(f"best {metric} vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_plots(spec: Any, trials: list[TrialSummary], out_dir: Path) -> list[Path]:
    """All sweep plots as PNG files in `out_dir`."""

    out_dir.mkdir(parents=True, exist_ok=True)
    objective = spec.objectives()[0]
    keys = list(spec.space)
    log_keys = {
        k
        for k, d in spec.space.items()
        if isinstance(d, LogUniformDist) or (isinstance(d, (IntDist, FloatDist)) and d.log)
    }
    paths = [
        learning_curves(trials, objective.metric, out_dir / "learning_curves.png"),
        parallel_coordinates(
            trials,
            keys,
            objective.metric,
            objective.mode,
            out_dir / "parallel_coordinates.png",
            log_keys,
        ),
        accuracy_vs_cost(trials, objective.metric, out_dir / "accuracy_vs_cost.png", EPOCH_SECONDS),
    ]
    importance = param_importances(spec, trials, out_dir / "param_importances.png")
    if importance is not None:
        paths.append(importance)
    return paths
