"""What the confirm stage re-runs and what it found, read from the sweep folder (no Ray start).

The plan: the sweep's top-k trials by its objective (best value over their epochs, as the sweep
ranks them), each re-run with `seeds` new `loop.seed` values (the trial's own seed + 1, + 2, ...:
deterministic, never the search's). The summary: per configuration the mean ± std over its
re-runs of the objective, val top-1 and, when measured, test top-1, each re-run read at its best
epoch; the winner is the configuration with the best mean objective.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cmx.core import metrics
from cmx.core.config import validate_config
from cmx.core.errors import ConfigError, DataError
from cmx.core.files import atomic_write_text, read_json, read_utf8
from cmx.core.metrics import DIVERGED, REJECTED, TrialStatus
from cmx.core.search_space import decode_params
from cmx.core.sweep_spec import CONFIRM_KEY, ConfirmConfig, SweepSpec, trial_config
from cmx.sweep.results import status_of, sweep_status

CONFIRM_DIR = "confirm"  # the re-runs' Tune experiment, inside the sweep folder
PLAN_FILE = "cmx-confirm-plan.json"  # in CONFIRM_DIR: the re-runs it was started with
SUMMARY_FILE = "confirm-summary.json"  # in the sweep folder
TABLE_FILE = "confirm-summary.md"


@dataclass(frozen=True)
class Candidate:
    """One of the sweep's top-k trials, to be confirmed."""

    trial_id: str
    value: float  # its best objective value in the search
    config: dict[str, Any]  # its Tune config, as run_trial reads it
    params: dict[str, Any]  # searched keys -> decoded values
    seed: int  # the loop.seed it was searched with


@dataclass(frozen=True)
class Rerun:
    """One full-budget re-run: a candidate's configuration with a new seed."""

    of: str  # the trial id it confirms
    seed: int
    config: dict[str, Any]

    def tune_config(self) -> dict[str, Any]:
        """The value of `CONFIRM_KEY` in the re-run's Tune config (see `cmx.sweep.trial.run_trial`)."""
        return {"of": self.of, "seed": self.seed, "config": self.config}


class RerunResult(BaseModel):
    """What one re-run reported, at its best epoch."""

    trial_id: str  # the re-run's own Tune trial id
    of: str
    seed: int
    status: str  # a TrialStatus tag
    epochs: int
    best_epoch: int | None = None
    values: dict[str, float] = Field(default_factory=dict)  # metric -> value at best_epoch
    checkpoint: str | None = None  # its best checkpoint folder, for the test evaluation


class Stat(BaseModel):
    """Mean and sample std of one metric over a configuration's completed re-runs."""

    mean: float
    std: float | None  # None with a single value
    n: int

    def show(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.std is not None else f"{self.mean:.{digits}f}"


class ConfigSummary(BaseModel):
    """One confirmed configuration."""

    of: str
    rank: int  # its place in the search (1 = the sweep's winner)
    search_value: float
    params: dict[str, Any]
    seeds: list[int]
    completed: int  # re-runs that trained to the full budget
    stats: dict[str, Stat] = Field(default_factory=dict)  # metric -> mean ± std


class ConfirmSummary(BaseModel):
    """The confirm stage's result, saved as `confirm-summary.json` in the sweep folder."""

    sweep: str
    metric: str
    mode: str
    top_k: int
    seeds: int
    max_epochs: int
    configs: list[ConfigSummary]  # in search order
    reruns: list[RerunResult]
    winner: str | None  # trial id of the best mean objective
    search_winner: str | None  # trial id the search alone crowned
    complete: bool  # every planned re-run ended

    def winner_summary(self) -> ConfigSummary | None:
        return next((c for c in self.configs if c.of == self.winner), None)


def confirm_settings(spec: SweepSpec, top_k: int | None = None, seeds: int | None = None) -> ConfirmConfig:
    """The search file's `confirm:` (defaults when absent) with command-line overrides, validated."""
    base = spec.confirm or ConfirmConfig()
    data = {"top_k": base.top_k if top_k is None else top_k, "seeds": base.seeds if seeds is None else seeds}
    return validate_config(ConfirmConfig, data, f"sweep {spec.name}: confirm")


def top_trials(spec: SweepSpec, path: str | Path, k: int) -> list[Candidate]:
    """The sweep's k best usable trials by its first objective (fewer if fewer trained)."""
    if len(spec.objectives()) > 1:
        raise ConfigError(
            f"sweep {spec.name}: a multi-objective search has a Pareto front, not one winner to confirm",
            "confirm a single-objective sweep",
        )
    status = sweep_status(path)
    objective = spec.objectives()[0]
    sign = -1.0 if objective.mode == "max" else 1.0
    ranked = sorted(
        ((t.trial_id, t.best) for t in status.trials if t.status.usable and t.best is not None),
        key=lambda tb: sign * tb[1],
    )
    out = []
    for trial_id, best in ranked[:k]:
        params_file = Path(path) / f"trial_{trial_id}" / "params.json"
        config = read_json(params_file, what="trial config", error=DataError, hint="move the trial folder aside")
        if not isinstance(config, dict):
            raise DataError(f"{params_file}: not a trial config", "move the trial folder aside")
        params = decode_params(spec, {key: v for key, v in config.items() if key in spec.space})
        seed = trial_config(spec, params).loop.seed
        out.append(Candidate(trial_id, best, config, params, seed))
    if not out:
        raise ConfigError(
            f"sweep {spec.name}: no trial trained to a usable result, nothing to confirm",
            f"see `cmx sweep status {spec.name}`",
        )
    return out


def new_seeds(seed: int, n: int) -> list[int]:
    """The loop.seed values of a configuration's re-runs: after the one it was searched with."""
    return [seed + 1 + i for i in range(n)]


def plan_reruns(candidates: list[Candidate], seeds: int) -> list[Rerun]:
    """Every (configuration, new seed) pair, in search order."""
    return [Rerun(c.trial_id, s, c.config) for c in candidates for s in new_seeds(c.seed, seeds)]


def plan_text(reruns: list[Rerun]) -> str:
    """The plan as saved in PLAN_FILE (to notice a changed plan when a confirm stage continues)."""
    return json.dumps([r.tune_config() for r in reruns], sort_keys=True, indent=1)


def reported_metrics(spec: SweepSpec) -> list[str]:
    """What the summary shows: the objective, val top-1 and the test split's top-1/top-5."""
    names = [spec.objectives()[0].metric, metrics.VAL_TOP1, metrics.TEST_TOP1, metrics.TEST_TOP5]
    return list(dict.fromkeys(names))


def read_reruns(spec: SweepSpec, confirm_path: str | Path) -> list[RerunResult]:
    """Every re-run under `confirm_path`, from its params.json and result.json rows."""
    objective = spec.objectives()[0]
    wanted = reported_metrics(spec)
    out = []
    for trial_dir in sorted(Path(confirm_path).glob("trial_*")):
        params_file = trial_dir / "params.json"
        if not params_file.is_file():
            continue
        config = read_json(params_file, what="re-run config", error=DataError, hint="move the trial folder aside")
        point = config.get(CONFIRM_KEY) if isinstance(config, dict) else None
        if not isinstance(point, dict):
            continue
        rows = _rows(trial_dir / "result.json")
        error = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
        last = rows[-1] if rows else {}
        status = status_of(spec.max_epochs, last, "error" if error else None) if rows or error else None
        result = RerunResult(
            trial_id=trial_dir.name.removeprefix("trial_"),
            of=str(point["of"]),
            seed=int(point["seed"]),
            status=status.tag if status is not None else TrialStatus.PENDING.tag,
            epochs=metrics.epochs_of(last),
        )
        best = _best_row(rows, objective.metric, objective.mode, trial_dir)
        if best is not None:
            result.best_epoch = metrics.epochs_of(best)
            result.values = {m: float(best[m]) for m in wanted if _finite(best.get(m))}
            result.checkpoint = _checkpoint_of(trial_dir, best)
        if (trial_dir / metrics.TEST_SCORE_FILE).is_file():
            test = read_json(
                trial_dir / metrics.TEST_SCORE_FILE,
                what="test score",
                error=DataError,
                hint="delete it to measure again",
            )
            result.values.update({m: float(test[m]) for m in metrics.TEST if m in wanted and _finite(test.get(m))})
        out.append(result)
    return out


def _best_row(rows: list[dict[str, Any]], metric: str, mode: str, trial_dir: Path) -> dict[str, Any] | None:
    """The row with the best `metric`; among equal values the latest whose checkpoint is kept
    (checkpoint retention keeps one of a tie, the one Tune ranks best)."""
    scored = [r for r in rows if not (r.get(REJECTED) or r.get(DIVERGED)) and _finite(r.get(metric))]
    if not scored:
        return None
    top = (max if mode == "max" else min)(float(r[metric]) for r in scored)
    ties = [r for r in scored if float(r[metric]) == top]
    kept = [r for r in ties if _checkpoint_of(trial_dir, r) is not None]
    return (kept or ties)[-1]


def _checkpoint_of(trial_dir: Path, row: dict[str, Any]) -> str | None:
    """The checkpoint folder Tune saved with `row` (its `checkpoint_dir_name`), if still kept."""
    name = row.get("checkpoint_dir_name")
    if not isinstance(name, str) or not name.startswith("checkpoint_") or "/" in name:
        return None
    folder = trial_dir / name
    return str(folder) if folder.is_dir() else None


def summarise(
    spec: SweepSpec, settings: ConfirmConfig, candidates: list[Candidate], reruns: list[RerunResult]
) -> ConfirmSummary:
    """Mean ± std per configuration over its completed re-runs; the winner by the mean objective."""
    objective = spec.objectives()[0]
    planned = {(r.of, r.seed) for r in plan_reruns(candidates, settings.seeds)}
    mine = [r for r in reruns if (r.of, r.seed) in planned]
    configs = []
    for rank, c in enumerate(candidates, 1):
        done = [r for r in mine if r.of == c.trial_id and r.status == TrialStatus.COMPLETED.tag]
        stats = {}
        for name in reported_metrics(spec):
            values = [r.values[name] for r in done if name in r.values]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                stats[name] = Stat(mean=statistics.fmean(values), std=std, n=len(values))
        configs.append(
            ConfigSummary(
                of=c.trial_id,
                rank=rank,
                search_value=c.value,
                params=c.params,
                seeds=new_seeds(c.seed, settings.seeds),
                completed=len(done),
                stats=stats,
            )
        )
    scored = [c for c in configs if objective.metric in c.stats]
    winner = None
    if scored:
        pick = max if objective.mode == "max" else min
        winner = pick(scored, key=lambda c: c.stats[objective.metric].mean).of
    ended = {(r.of, r.seed) for r in mine if TrialStatus.from_tag(r.status).finished}
    return ConfirmSummary(
        sweep=str(spec.name),
        metric=objective.metric,
        mode=objective.mode,
        top_k=settings.top_k,
        seeds=settings.seeds,
        max_epochs=spec.max_epochs,
        configs=configs,
        reruns=sorted(mine, key=lambda r: (r.of, r.seed)),
        winner=winner,
        search_winner=candidates[0].trial_id if candidates else None,
        complete=planned <= ended,
    )


def table_text(summary: ConfirmSummary) -> str:
    """The summary as a Markdown table (the artifact logged to the sweep's run)."""
    names = list(dict.fromkeys(n for c in summary.configs for n in c.stats))
    head = ["rank", "trial", f"search {summary.metric}", "re-runs", *[f"{n} mean ± std" for n in names], "params"]
    lines = [
        f"# Confirmed winner of sweep {summary.sweep}: {summary.winner or 'none'}",
        "",
        f"Top {summary.top_k} by {summary.mode} {summary.metric}, each re-trained {summary.seeds}x for "
        f"{summary.max_epochs} epochs with new seeds; winner by the mean.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for c in summary.configs:
        mark = " (winner)" if c.of == summary.winner else ""
        cells = [str(c.rank), c.of + mark, f"{c.search_value:.4f}", f"{c.completed}/{len(c.seeds)}"]
        cells += [c.stats[n].show() if n in c.stats else "—" for n in names]
        cells.append(", ".join(f"{k}={v}" for k, v in c.params.items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(path: str | Path, summary: ConfirmSummary) -> Path:
    """Save the summary (JSON) and its table (Markdown) in the sweep folder; returns the JSON file."""
    out = Path(path) / SUMMARY_FILE
    atomic_write_text(out, summary.model_dump_json(indent=1))
    atomic_write_text(Path(path) / TABLE_FILE, table_text(summary))
    return out


def read_summary(path: str | Path) -> ConfirmSummary | None:
    """The saved summary of a sweep folder, or None before its confirm stage ran."""
    file = Path(path) / SUMMARY_FILE
    if not file.is_file():
        return None
    data = read_json(file, what="confirm summary", error=DataError, hint="re-create it: cmx sweep confirm NAME")
    return ConfirmSummary.model_validate(data)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    text = read_utf8(path, what="re-run results", error=DataError, hint="move the trial folder aside")
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
