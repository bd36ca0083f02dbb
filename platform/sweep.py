"""Sweep orchestration on Ray Tune: Optuna proposes, ASHA stops or pauses, each trial runs `train()`.

This module builds and runs the Tuner; Tune callbacks (tracking, checkpoint retention, state backup,
trial logs) and the asha-promotion scheduler live in their own modules. The training function
knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmx import metrics
from cmx.errors import ConfigError
from cmx.home import sweeps_dir
from cmx.ray_runtime import NodeCapacity
from cmx.sweep_config import SweepSpec, trial_config

SPEC_FILE = "cmx-sweep.yaml"  # the validated spec, saved in the experiment dir
SOURCE_FILE = "cmx-space.yaml"  # the user's file as written
BEST_CONFIG_FILE = "best-config.yaml"
REJECTED = "trial/rejected"
NODE_ID = "trial/node_id"
DIVERGED = "trial/diverged"
# A tiny CPU share for the Tune function that only drives a TorchTrainer (0 is rejected by Ray).
DRIVER_CPU = 0.01


# ------------------------------------------------------------------ resources


@dataclass(frozen=True)
class ResourcePlan:
    """Ray resource bundles for one trial and how many trials fit at once."""

    trial_bundle: dict[str, float]
    worker_bundle: dict[str, float] | None
    workers: int
    concurrent: int


def plan_resources(spec: SweepSpec, nodes: list[NodeCapacity], source: str = "resources") -> ResourcePlan:
    """Check the per-trial request fits on the nodes; ConfigError names the field if not."""
    r = spec.resources
    if not nodes:
        raise ConfigError("no alive Ray nodes", "start the cluster first")
    if r.workers == 1:
        need_cpu, need_gpu = r.cpus, r.gpus
    else:
        need_cpu, need_gpu = r.cpus_per_worker, r.gpus_per_worker
    field_cpu = "resources.cpus" if r.workers == 1 else "resources.cpus_per_worker"
    field_gpu = "resources.gpus" if r.workers == 1 else "resources.gpus_per_worker"
    max_cpu = max(n.cpus for n in nodes)
    max_gpu = max(n.gpus for n in nodes)
    if need_cpu > max_cpu:
        raise ConfigError(
            f"{source}: {field_cpu}={need_cpu:g} but the largest node has {max_cpu:g} CPUs",
            f"lower {field_cpu} to at most {max_cpu:g}",
        )
    if need_gpu > max_gpu:
        raise ConfigError(
            f"{source}: {field_gpu}={need_gpu:g} but the largest node has {max_gpu:g} GPUs",
            f"set {field_gpu}: 0 or run on a GPU cluster (--address)",
        )
    slots = 0
    for n in nodes:
        fits_cpu = math.floor(n.cpus / need_cpu + 1e-9)
        fits_gpu = math.floor(n.gpus / need_gpu + 1e-9) if need_gpu > 0 else fits_cpu
        slots += min(fits_cpu, fits_gpu)
    if r.workers == 1:
        bundle = {"CPU": r.cpus, **({"GPU": r.gpus} if r.gpus else {})}
        return ResourcePlan(bundle, None, 1, max(1, slots))
    if slots < r.workers:
        raise ConfigError(
            f"{source}: resources.workers={r.workers} but the cluster holds only {slots} such workers",
            "lower resources.workers or the per-worker CPUs/GPUs",
        )
    worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    return ResourcePlan({"CPU": DRIVER_CPU}, worker, r.workers, max(1, slots // r.workers))


def concurrency(spec: SweepSpec, plan: ResourcePlan) -> int:
    """Trials run at once: what fits, capped by search.max_concurrent."""
    cap = spec.search.max_concurrent or plan.concurrent
    return max(1, min(cap, plan.concurrent, spec.search.num_samples))


# ------------------------------------------------------------------ the trial


def worst_value(metric: str, mode: str) -> float:
    """What a rejected or diverged trial reports, so the searcher learns to avoid it."""
    if mode == "max":
        return 0.0
    return 1e9


def run_trial(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
    """The Tune function: build the trial's TrainConfig, train, report every epoch."""
    import torch
    from ray import tune

    from cmx.constraints import violated
    from cmx.search_space import decode_params

    spec = SweepSpec.model_validate(spec_json)
    params = decode_params(spec, {k: v for k, v in config.items() if k in spec.space})
    cfg = trial_config(spec, params)
    cfg.loop.epochs = spec.max_epochs
    rule = violated(spec.constraints, cfg.model_dump(mode="json"))
    if rule is not None:
        tune.report({**_worst(spec), REJECTED: 1.0, metrics.EPOCH: 0})
        return
    import ray

    # Where the trial ran: shown per epoch so a retried trial's move to another node is visible.
    extra: dict[str, Any] = {**_model_cost(cfg), NODE_ID: ray.get_runtime_context().get_node_id()}
    if spec.resources.workers == 1:
        threads = max(1, int(spec.resources.cpus))
        torch.set_num_threads(threads)
        cfg.loop.threads = threads
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    checkpoint = tune.get_checkpoint()
    ctx = checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)
    with ctx as resume_dir:
        resume_from = Path(resume_dir) if resume_dir else None
        if spec.resources.workers > 1:
            from cmx.ray_train import run_data_parallel

            run_data_parallel(
                cfg,
                run_dir,
                workers=spec.resources.workers,
                cpus_per_worker=spec.resources.cpus_per_worker,
                gpus_per_worker=spec.resources.gpus_per_worker,
                resume_from=resume_from,
                inside_tune=True,
                max_failures=spec.resources.max_failures,
            )
            return
        from cmx.pipelines.trainer import train

        def report(r: Any) -> None:
            ckpt = tune.Checkpoint.from_directory(str(r.checkpoint_dir)) if r.checkpoint_dir else None
            tune.report({**r.metrics, **extra, metrics.EPOCH: r.epoch}, checkpoint=ckpt)

        result = train(cfg, run_dir, reporter=report, resume_from=resume_from, progress=False)
    if result.status == "diverged":
        tune.report({**_worst(spec), **extra, DIVERGED: 1.0, metrics.EPOCH: result.epochs_completed + 1})


def _worst(spec: SweepSpec) -> dict[str, float]:
    out = {spec.search.metric: worst_value(spec.search.metric, spec.search.mode)}
    for o in spec.objectives():
        out[o.metric] = worst_value(o.metric, o.mode)
    return out


def _model_cost(cfg: Any) -> dict[str, float]:
    """Parameter count (millions) and GFLOPs, for multi-objective searches."""
    from cmx.models import count_flops, count_params, create_model

    model = create_model(cfg.model.name, **cfg.model.overrides())
    res = cfg.data.resolution
    return {
        metrics.PARAMS_M: count_params(model) / 1e6,
        metrics.GFLOPS: count_flops(model, (3, res, res)) / 1e9,
    }


# ------------------------------------------------------------------ building the Tuner


def experiment_root(spec: SweepSpec) -> str:
    """Tune's storage_path for this sweep."""
    return spec.storage.path or str(sweeps_dir())


def experiment_path(spec: SweepSpec) -> str:
    """Where this sweep's state lives (storage/name)."""
    root = experiment_root(spec)
    return f"{root.rstrip('/')}/{spec.name}"


def spec_fingerprint(spec: SweepSpec) -> str:
    """A hash of what defines the sweep, to refuse resuming with a changed space."""
    data = spec.model_dump(mode="json")
    data.pop("tracking", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def build_searcher(spec: SweepSpec) -> Any:
    """OptunaSearch for optuna-*/random; None for grid (Tune's own variant generator)."""
    if spec.search.algorithm == "grid":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from cmx.search_space import encode_params, make_sampler, optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objectives = spec.objectives()
    multi = len(objectives) > 1
    return OptunaSearch(
        space=optuna_space(spec),
        metric=[o.metric for o in objectives] if multi else objectives[0].metric,
        mode=[o.mode for o in objectives] if multi else objectives[0].mode,
        sampler=make_sampler(spec),
        points_to_evaluate=[encode_params(spec, p) for p in spec.search.points_to_evaluate] or None,
    )


def grid_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space for the grid algorithm (non-grid keys sampled at random)."""
    from ray import tune

    from cmx.sweep_config import ChoiceDist, FloatDist, GridDist, IntDist

    space: dict[str, Any] = {}
    for key, d in spec.space.items():
        if isinstance(d, GridDist):
            space[key] = tune.grid_search(d.values)
        elif isinstance(d, ChoiceDist):
            space[key] = tune.choice(d.values)
        elif isinstance(d, IntDist):
            space[key] = (tune.lograndint if d.log else tune.randint)(d.low, d.high + 1)
        elif isinstance(d, FloatDist) and not d.log:
            space[key] = tune.uniform(d.low, d.high)
        else:
            space[key] = tune.loguniform(d.low, d.high)  # type: ignore[union-attr]
    return space


def build_scheduler(spec: SweepSpec, max_concurrent: int | None = None) -> Any:
    """ASHA / HyperBand / median stopping on scheduler.metric (default: the first objective), in epochs.

    `max_concurrent` caps the trials asha-promotion resumes while others are at work.
    """
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        MedianStoppingRule,
    )

    s = spec.scheduler
    stop_on = spec.stopping_objective()
    # Time is the trainer's epoch: Tune's training_iteration restarts when a data-parallel trial resumes.
    common = {"metric": stop_on.metric, "mode": stop_on.mode, "time_attr": metrics.EPOCH}
    if s.name == "asha-promotion":
        from cmx.promotion_asha import PromotionASHA

        return PromotionASHA(
            max_t=spec.max_epochs,
            grace_period=min(s.grace_period, spec.max_epochs),
            reduction_factor=s.reduction_factor,
            skip_flags=(REJECTED, DIVERGED),
            max_concurrent=max_concurrent,
            **common,
        )
    if s.name == "asha":
        return ASHAScheduler(
            max_t=spec.max_epochs,
            grace_period=min(s.grace_period, spec.max_epochs),
            reduction_factor=s.reduction_factor,
            **common,
        )
    if s.name == "hyperband":
        return HyperBandScheduler(max_t=spec.max_epochs, reduction_factor=s.reduction_factor, **common)
    if s.name == "median":
        return MedianStoppingRule(grace_period=s.grace_period, **common)
    return FIFOScheduler()


def trainable_for(spec: SweepSpec, plan: ResourcePlan) -> Any:
    """run_trial with the spec bound and the trial's resources attached."""
    from ray import tune

    fn = tune.with_parameters(run_trial, spec_json=spec.model_dump(mode="json"))
    if plan.worker_bundle is None:
        return tune.with_resources(fn, plan.trial_bundle)
    return tune.with_resources(fn, tune.PlacementGroupFactory([plan.trial_bundle]))


@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep produced."""

    name: str
    path: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_config_path: Path | None = None
    best_checkpoint: str | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    resumed: bool = False

    @property
    def all_failed(self) -> bool:
        """True when no trial produced a usable result."""
        return bool(self.trials) and all(t["status"] in ("failed", "rejected", "diverged") for t in self.trials)


def run_sweep(
    spec: SweepSpec,
    *,
    source_text: str,
    address: str | None = None,
    fresh: bool = False,
    callbacks: list[Any] | None = None,
    on_start: Callable[[ResourcePlan, bool], None] | None = None,
) -> SweepOutcome:
    """Run (or resume) the sweep to completion and summarise it."""
    from ray import tune

    from cmx.checkpoint_retention import CheckpointRetention
    from cmx.ray_runtime import alive_nodes, init_ray, local_capacity
    from cmx.trial_logs import KeepTrialLogs
    from cmx.tune_state import StateBackup

    # Check what needs no cluster before Ray starts (the tracking store included).
    plan_resources(spec, [local_capacity()] if address is None else [NodeCapacity("?", "?", 1e9, 1e9)])
    path = experiment_path(spec)
    callbacks = [
        *(callbacks or []),
        *_tracking_callbacks(spec, path, source_text),
        CheckpointRetention(),
        KeepTrialLogs(),
    ]
    if "://" not in path:
        callbacks.append(StateBackup(path))
    init_ray(address)
    plan = plan_resources(spec, alive_nodes())
    resumed = _prepare_experiment_dir(spec, path, source_text, fresh)
    trainable = trainable_for(spec, plan)
    if resumed:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(spec, plan, trainable, callbacks)
    if on_start:
        on_start(plan, resumed)
    if resumed:
        # Restored tuners keep their saved RunConfig; this driver's callbacks are re-attached.
        tuner._local_tuner._run_config.callbacks = callbacks  # noqa: SLF001 - no public setter
    started = time.monotonic()
    grid = tuner.fit()
    outcome = summarise(spec, grid, path)
    outcome.resumed = resumed
    budget = spec.search.time_budget
    out_of_time = budget is not None and time.monotonic() - started >= budget * 0.95
    expected = _expected_trials(spec)
    outcome.interrupted = not out_of_time and len(outcome.trials) < expected
    return outcome


def _tracking_callbacks(spec: SweepSpec, path: str, source_text: str) -> list[Any]:
    """The MLflow callback when tracking is on; raises TrackingError if its store is unreachable."""
    if not spec.tracking.enabled:
        return []
    from cmx.tracking_callback import MLflowTrackingCallback

    return [MLflowTrackingCallback(spec=spec, experiment_dir=path, source_text=source_text)]


def _expected_trials(spec: SweepSpec) -> int:
    if spec.search.algorithm == "grid":
        from cmx.search_space import grid_size

        return grid_size(spec) * spec.search.num_samples
    return spec.search.num_samples


def _new_tuner(spec: SweepSpec, plan: ResourcePlan, trainable: Any, callbacks: list[Any] | None) -> Any:
    from ray import tune

    objective = spec.objectives()[0]
    searcher = build_searcher(spec)
    max_concurrent: int | None = concurrency(spec, plan)
    scheduler = build_scheduler(spec, max_concurrent)
    if spec.scheduler.name == "asha-promotion":
        from cmx.promotion_asha import RungFeedback

        # Tune's concurrency limiter counts paused trials as running and would stop proposing
        # once they fill it: RungFeedback and the scheduler cap the trials at work instead.
        if searcher is not None:
            searcher = RungFeedback(searcher, scheduler.new_book(), max_concurrent)
        max_concurrent = None
    tune_config = tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=spec.search.num_samples,
        max_concurrent_trials=max_concurrent,
        time_budget_s=spec.search.time_budget,
        # Reusing trial actors saves Ray's worker start per trial (stack notes: 2.1 s -> 0.6 s).
        reuse_actors=spec.resources.reuse_actors and plan.worker_bundle is None,
        trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        trial_name_creator=lambda t: f"trial_{t.trial_id}",
    )
    run_config = tune.RunConfig(
        name=spec.name,
        storage_path=experiment_root(spec),
        failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        # Tune keeps every checkpoint; CheckpointRetention deletes the superseded ones once no saved
        # experiment state refers to them (Tune's num_to_keep deletes too early for a safe resume).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None,
            checkpoint_score_attribute=objective.metric,
            checkpoint_score_order=objective.mode,
        ),
        callbacks=callbacks or [],
        verbose=0,
    )
    param_space = grid_param_space(spec) if searcher is None else None
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _prepare_experiment_dir(spec: SweepSpec, path: str, source_text: str, fresh: bool) -> bool:
    """Save the spec beside Tune's state (local or s3://...); True when an earlier run is resumed."""
    from ray import tune

    from cmx.storage_files import read_text, remove_dir, write_text

    if tune.Tuner.can_restore(path) and not fresh:
        _repair_saved_state(spec, path)
        saved = read_text(path, SPEC_FILE)
        if saved is not None:
            old = SweepSpec.model_validate(yaml.safe_load(saved))
            if spec_fingerprint(old) != spec_fingerprint(spec):
                raise ConfigError(
                    f"sweep {spec.name!r} already exists at {path} with a different search space",
                    "use --name NEW to start another sweep, or --fresh to discard the old one",
                )
        return True
    if fresh:
        remove_dir(path)
    write_text(path, SPEC_FILE, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    write_text(path, SOURCE_FILE, source_text)
    return False


def _repair_saved_state(spec: SweepSpec, path: str) -> None:
    """Put back Tune's state files that a killed driver left cut off (local storage only)."""
    if "://" in path:
        return
    from cmx.tune_state import repair_torn_state

    try:
        repair_torn_state(path)
    except ValueError as e:
        raise ConfigError(
            f"sweep {spec.name!r} at {path} cannot be resumed: {e}",
            "start it over with --fresh, or keep it and start another with --name NEW",
        ) from None


# ------------------------------------------------------------------ results


def _trial_status(spec: SweepSpec, metrics_: dict[str, Any], error: Any) -> str:
    if error is not None:
        return "failed"
    if metrics_.get(REJECTED):
        return "rejected"
    if metrics_.get(DIVERGED):
        return "diverged"
    return "completed" if metrics.epochs_of(metrics_) >= spec.max_epochs else "stopped early"


def summarise(spec: SweepSpec, grid: Any, path: str) -> SweepOutcome:
    """Turn a ResultGrid into rows, the best trial, its config file and checkpoint."""
    from cmx.search_space import decode_params

    objective = spec.objectives()[0]
    outcome = SweepOutcome(name=spec.name or "sweep", path=path)
    best_row, best_result = None, None
    for result in grid:
        m = dict(result.metrics or {})
        config = result.config or {}
        params = decode_params(spec, {k: v for k, v in config.items() if k in spec.space})
        row = {
            "trial_id": m.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"),
            "status": _trial_status(spec, m, result.error),
            "epochs": metrics.epochs_of(m),
            "params": params,
            "metrics": {k: v for k, v in m.items() if "/" in k},
            "path": str(result.path),
            "error": str(result.error).splitlines()[0] if result.error else None,
        }
        outcome.trials.append(row)
        value = _best_of_trial(result, objective.metric, objective.mode)
        row["best"] = value
        if (
            row["status"] in ("completed", "stopped early")
            and value is not None
            and (best_row is None or _better(value, best_row["best"], objective.mode))
        ):
            best_row, best_result = row, result
    outcome.trials.sort(key=lambda r: _sort_key(r, objective.mode))
    if best_row is not None:
        outcome.best = best_row
        cfg = trial_config(spec, best_row["params"])
        cfg.loop.epochs = spec.max_epochs
        if "://" not in path:
            outcome.best_config_path = Path(path) / BEST_CONFIG_FILE
            outcome.best_config_path.write_text(
                f"# Best trial {best_row['trial_id']} of sweep {spec.name}: "
                f"{objective.metric}={best_row['best']:.4f}\n# Run it: cmx train --config {outcome.best_config_path}\n"
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


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _sort_key(row: dict[str, Any], mode: str) -> tuple[int, float]:
    usable = row["status"] in ("completed", "stopped early") and row["best"] is not None
    value = row["best"] if usable else 0.0
    return (0 if usable else 1, -value if mode == "max" else value)


def pareto_front(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Non-dominated trials over all objectives (final reported values)."""
    objs = spec.objectives()
    usable = [r for r in rows if r["status"] in ("completed", "stopped early")]

    def vec(r: dict[str, Any]) -> list[float]:
        return [r["metrics"].get(o.metric, math.nan) * (1 if o.mode == "max" else -1) for o in objs]

    front = []
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


# ------------------------------------------------------------------ on disk


def list_sweeps(root: str | None = None) -> list[dict[str, Any]]:
    """Sweeps under the storage root, newest first, read from disk (no Ray start)."""
    base = Path(root or sweeps_dir())
    out = []
    for spec_file in sorted(base.glob(f"*/{SPEC_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True):
        out.append(sweep_status(spec_file.parent))
    return out


def sweep_status(path: str | Path) -> dict[str, Any]:
    """Trial counts and best result of a sweep directory, from Tune's saved state."""
    path = Path(path)
    if not (path / SPEC_FILE).exists():
        raise ConfigError(f"{path}: not a cmx sweep directory", "list sweeps with `cmx sweep list`")
    spec = SweepSpec.model_validate(yaml.safe_load((path / SPEC_FILE).read_text()))
    objective = spec.objectives()[0]
    trials = []
    for trial_dir in sorted(path.glob("trial_*")):
        rows = _read_results(trial_dir / "result.json")
        last = rows[-1] if rows else {}
        values = [r[objective.metric] for r in rows if isinstance(r.get(objective.metric), (int, float))]
        best = (max(values) if objective.mode == "max" else min(values)) if values else None
        error = (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists()
        status = _trial_status(spec, last, "error" if error else None) if rows or error else "pending"
        trials.append(
            {
                "trial_id": trial_dir.name.removeprefix("trial_"),
                "status": status,
                "epochs": metrics.epochs_of(last),
                "best": best,
            }
        )
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    done = [t for t in trials if t["best"] is not None and t["status"] in ("completed", "stopped early")]
    best = None
    if done:
        best = (max if objective.mode == "max" else min)(done, key=lambda t: t["best"])
    return {
        "name": spec.name,
        "path": str(path),
        "metric": objective.metric,
        "num_samples": _expected_trials(spec),
        "trials": trials,
        "counts": counts,
        "best": best,
        "complete": sum(counts.get(s, 0) for s in ("completed", "stopped early", "failed", "rejected", "diverged"))
        >= _expected_trials(spec),
    }


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows
