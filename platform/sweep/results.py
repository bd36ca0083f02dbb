"""A sweep's results: one row per trial, its outcome, the best trial and the Pareto front,
from Tune's ResultGrid after a run or from the sweep directory on disk (no Ray start).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cmx.core import metrics
from cmx.core.config import load_yaml, validate_config
from cmx.core.errors import ConfigError, DataError
from cmx.core.files import read_utf8
from cmx.core.metrics import DIVERGED, REJECTED, TrialStatus, better
from cmx.core.paths import sweeps_dir
from cmx.core.search_space import decode_params, grid_size
from cmx.core.sweep_spec import SweepSpec, trial_config
from cmx.core.uris import is_uri
from cmx.sweep.storage import BEST_CONFIG_FILE, SPEC_FILE

if TYPE_CHECKING:
    from cmx.tracking.heldout import TestScore


@dataclass(frozen=True)
class TrialRow:
    """One trial of a finished (or interrupted) sweep, as the outcome table shows it."""

    trial_id: str
    status: TrialStatus
    epochs: int  # the trainer's epochs finished
    params: dict[str, Any]  # searched keys -> decoded values
    metrics: dict[str, Any]  # the last reported "group/name" metrics
    path: str  # the trial's folder
    error: str | None  # first line of its error, if it failed
    best: float | None  # best value of the first objective over its epochs


@dataclass(frozen=True)
class TrialProgress:
    """One trial as the sweep folder shows it (`cmx sweep status`, no Ray start)."""

    trial_id: str
    status: TrialStatus
    epochs: int
    best: float | None


@dataclass(frozen=True)
class SweepStatus:
    """A sweep folder's trials, counts per status and best trial so far."""

    name: str | None
    path: str
    metric: str  # the first objective
    num_samples: int  # trials the sweep runs in all
    trials: list[TrialProgress]
    counts: dict[TrialStatus, int]
    best: TrialProgress | None
    complete: bool  # every expected trial ended for good


@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep produced."""

    name: str
    path: str
    trials: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    best_config_path: Path | None = None
    best_checkpoint: str | None = None
    pareto: list[TrialRow] = field(default_factory=list)
    interrupted: bool = False
    resumed: bool = False
    test: dict[str, TestScore] = field(default_factory=dict)  # trial id -> its score on data.test_path

    @property
    def all_failed(self) -> bool:
        """True when no trial produced a usable result."""
        return bool(self.trials) and all(t.status.failure for t in self.trials)


def trial_status(spec: SweepSpec, metrics_: dict[str, Any], error: Any) -> TrialStatus:
    """A trial's outcome from its last reported result and its error (None when it had none)."""
    return status_of(spec.max_epochs, metrics_, error)


def status_of(max_epochs: int, metrics_: dict[str, Any], error: Any) -> TrialStatus:
    """`trial_status` for a sweep of `max_epochs` epochs (what the sweep's Optuna study records)."""
    if error is not None:
        return TrialStatus.FAILED
    if metrics_.get(REJECTED):
        return TrialStatus.REJECTED
    if metrics_.get(DIVERGED):
        return TrialStatus.DIVERGED
    if metrics.epochs_of(metrics_) >= max_epochs:
        return TrialStatus.COMPLETED
    return TrialStatus.SCHEDULER_STOPPED


def summarise(spec: SweepSpec, grid: Any, path: str) -> SweepOutcome:
    """Turn a ResultGrid into rows, the best trial, its config file and checkpoint."""

    objective = spec.objectives()[0]
    outcome = SweepOutcome(name=spec.name or "sweep", path=path)
    best_row: TrialRow | None = None
    best_result: Any = None
    for result in grid:
        m = dict(result.metrics or {})
        config = result.config or {}
        row = TrialRow(
            trial_id=m.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"),
            status=trial_status(spec, m, result.error),
            epochs=metrics.epochs_of(m),
            params=decode_params(spec, {k: v for k, v in config.items() if k in spec.space}),
            metrics={k: v for k, v in m.items() if "/" in k},
            path=str(result.path),
            error=str(result.error).splitlines()[0] if result.error else None,
            best=_best_of_trial(result, objective.metric, objective.mode),
        )
        outcome.trials.append(row)
        if (
            row.status.usable
            and row.best is not None
            and (best_row is None or better(row.best, best_row.best, objective.mode))
        ):
            best_row, best_result = row, result
    outcome.trials.sort(key=lambda r: _sort_key(r, objective.mode))
    if best_row is not None:
        outcome.best = best_row
        cfg = trial_config(spec, best_row.params)
        cfg.loop.epochs = spec.max_epochs
        if not is_uri(path):
            outcome.best_config_path = Path(path) / BEST_CONFIG_FILE
            outcome.best_config_path.write_text(
                f"# Best trial {best_row.trial_id} of sweep {spec.name}: "
                f"{objective.metric}={best_row.best:.4f}\n# Run it: cmx train --config {outcome.best_config_path}\n"
                + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            )
        best_ckpts = getattr(best_result, "best_checkpoints", None) or []
        if best_ckpts:
            ordered = sorted(
                best_ckpts,
                key=lambda c: c[1].get(objective.metric, -math.inf),
                reverse=objective.mode == "max",
            )
            outcome.best_checkpoint = ordered[0][0].path
        elif best_result.checkpoint is not None:
            outcome.best_checkpoint = best_result.checkpoint.path
    if len(spec.objectives()) > 1:
        outcome.pareto = pareto_front(spec, outcome.trials)
    return outcome


def _best_of_trial(result: Any, metric: str, mode: str) -> float | None:
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and metric in getattr(df, "columns", []):
        series = df[metric].dropna()
        if len(series):
            return float(series.max() if mode == "max" else series.min())
    value = (result.metrics or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _sort_key(row: TrialRow, mode: str) -> tuple[int, float]:
    if not row.status.usable or row.best is None:
        return (1, 0.0)
    return (0, -row.best if mode == "max" else row.best)


def pareto_front(spec: SweepSpec, rows: list[TrialRow]) -> list[TrialRow]:
    """Non-dominated trials over all objectives (final reported values)."""
    objs = spec.objectives()
    usable = [r for r in rows if r.status.usable]

    def vec(r: TrialRow) -> list[float]:
        return [r.metrics.get(o.metric, math.nan) * (1 if o.mode == "max" else -1) for o in objs]

    front: list[TrialRow] = []
    for r in usable:
        v = vec(r)
        dominated = any(
            all(b >= a for a, b in zip(v, vec(o), strict=True)) and any(b > a for a, b in zip(v, vec(o), strict=True))
            for o in usable
            if o is not r
        )
        if not dominated:
            front.append(r)
    return front


def list_sweeps(root: str | None = None, unreadable: list[ConfigError] | None = None) -> list[SweepStatus]:
    """Sweeps under the storage root, newest first, read from disk (no Ray start).

    A sweep whose saved spec cannot be read is left out (its error appended to `unreadable`), so
    one damaged folder does not hide the others.
    """
    base = Path(root or sweeps_dir())
    out = []
    for spec_file in sorted(base.glob(f"*/{SPEC_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            out.append(sweep_status(spec_file.parent))
        except ConfigError as e:
            if unreadable is not None:
                unreadable.append(e)
    return out


def sweep_status(path: str | Path) -> SweepStatus:
    """Trial counts and best result of a sweep directory, from Tune's saved state."""
    path = Path(path)
    if not (path / SPEC_FILE).exists():
        raise ConfigError(f"{path}: not a cmx sweep directory", "list sweeps with `cmx sweep list`")
    spec = validate_config(SweepSpec, load_yaml(path / SPEC_FILE), str(path / SPEC_FILE))
    objective = spec.objectives()[0]
    trials = []
    for trial_dir in sorted(path.glob("trial_*")):
        rows = _read_results(trial_dir / "result.json")
        last = rows[-1] if rows else {}
        values = [float(r[objective.metric]) for r in rows if isinstance(r.get(objective.metric), (int, float))]
        error = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
        trials.append(
            TrialProgress(
                trial_id=trial_dir.name.removeprefix("trial_"),
                status=trial_status(spec, last, "error" if error else None) if rows or error else TrialStatus.PENDING,
                epochs=metrics.epochs_of(last),
                best=(max(values) if objective.mode == "max" else min(values)) if values else None,
            )
        )
    counts: dict[TrialStatus, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    done = [(t, t.best) for t in trials if t.best is not None and t.status.usable]
    best = (max if objective.mode == "max" else min)(done, key=lambda tb: tb[1])[0] if done else None
    return SweepStatus(
        name=spec.name,
        path=str(path),
        metric=objective.metric,
        num_samples=expected_trials(spec),
        trials=trials,
        counts=counts,
        best=best,
        complete=sum(n for s, n in counts.items() if s.finished) >= expected_trials(spec),
    )


def expected_trials(spec: SweepSpec) -> int:
    if spec.search.algorithm == "grid":
        return grid_size(spec) * spec.search.num_samples
    return spec.search.num_samples


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    text = read_utf8(path, what="trial results", error=DataError, hint="move the trial folder aside")
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows
