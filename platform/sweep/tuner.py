"""Sweep orchestration on Ray Tune: Optuna proposes, ASHA stops or pauses, each trial runs `train()`.

This module builds the searcher (`StudySearch`, writing the sweep's Optuna study), the scheduler
and the Tuner, and runs (or resumes) it; Tune
callbacks (tracking, checkpoint retention, state backup, trial logs) and the asha-promotion
scheduler live in their own modules.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from cmx.cluster.ray_compat import optuna_search_study, optuna_search_trials, replace_restored_callbacks
from cmx.cluster.runtime import NodeCapacity, alive_nodes, init_ray, local_capacity
from cmx.core import metrics
from cmx.core.config import check_test_apart
from cmx.core.errors import ConfigError
from cmx.core.metrics import DIVERGED, REJECTED, TrialStatus
from cmx.core.search_space import encode_params, make_sampler, optuna_space
from cmx.core.sweep_spec import ChoiceDist, FloatDist, GridDist, IntDist, SweepSpec
from cmx.core.uris import is_uri
from cmx.core.yaml_files import parse_yaml
from cmx.sweep.checkpoint_retention import CheckpointRetention
from cmx.sweep.mlflow_callback import MLflowTrackingCallback
from cmx.sweep.promotion_asha import PromotionASHA, RungFeedback
from cmx.sweep.resources import ResourcePlan, concurrency, plan_resources
from cmx.sweep.results import SweepOutcome, expected_trials, status_of, summarise
from cmx.sweep.storage import (
    SOURCE_FILE,
    SPEC_FILE,
    check_removable,
    check_trusted,
    experiment_path,
    experiment_root,
    read_text,
    remove_dir,
    spec_fingerprint,
    write_text,
)
from cmx.sweep.study import STATUS_ATTR, TRIAL_ID_ATTR, create_study, new_study_storage, warm_start
from cmx.sweep.trial import WorkerGroupRelease, run_trial
from cmx.sweep.trial_logs import KeepTrialLogs
from cmx.sweep.tune_state import StateBackup, repair_torn_state
from cmx.tracking.heldout import TestScore, evaluate_trials_on_test

log = logging.getLogger("cmx.sweep")


def build_searcher(spec: SweepSpec, path: str | None = None) -> Any:
    """StudySearch (Ray's OptunaSearch) for optuna-*/random; None for grid (Tune's own variant generator).

    The study lives in the sweep directory `path` (`cmx.sweep.study`), seeded with the
    `search.warm_start` trials; without `path`, in memory.
    """
    if spec.search.algorithm == "grid":
        return None
    from optuna.storages import InMemoryStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = InMemoryStorage() if path is None else new_study_storage(path)
    create_study(spec, storage, warm_start(spec, f"{path}/{SPEC_FILE}").trials)
    objectives = spec.objectives()
    multi = len(objectives) > 1
    return StudySearch(
        max_epochs=spec.max_epochs,
        space=optuna_space(spec),
        metric=[o.metric for o in objectives] if multi else objectives[0].metric,
        mode=[o.mode for o in objectives] if multi else objectives[0].mode,
        sampler=make_sampler(spec),
        points_to_evaluate=[encode_params(spec, p) for p in spec.search.points_to_evaluate] or None,
        study_name=spec.name,
        storage=storage,
    )


def grid_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space for the grid algorithm (non-grid keys sampled at random)."""
    from ray import tune

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
            space[key] = tune.loguniform(d.low, d.high)
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
    common: dict[str, Any] = {"metric": stop_on.metric, "mode": stop_on.mode, "time_attr": metrics.EPOCH}
    if s.name == "asha-promotion":
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

    # Check what needs no cluster before Ray starts (the tracking store included).
    check_test_apart(spec.base.data, f"sweep {spec.name}: base", must_exist=True)
    plan_resources(spec, [local_capacity()] if address is None else [NodeCapacity("?", "?", 1e9, 1e9)])
    path = experiment_path(spec)
    check_trusted(experiment_root(spec), path)
    if fresh:
        check_removable(path)
    callbacks = [
        *(callbacks or []),
        *_tracking_callbacks(spec, path, source_text),
        CheckpointRetention(),
        KeepTrialLogs(),
    ]
    if not is_uri(path):
        callbacks.append(StateBackup(path))
    init_ray(address)
    plan = plan_resources(spec, alive_nodes())
    if plan.worker_bundle is not None:
        callbacks.append(WorkerGroupRelease())
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
        replace_restored_callbacks(tuner, callbacks)
    started = time.monotonic()
    grid = tuner.fit()
    outcome = summarise(spec, grid, path)
    outcome.resumed = resumed
    budget = spec.search.time_budget
    out_of_time = budget is not None and time.monotonic() - started >= budget * 0.95
    expected = expected_trials(spec)
    outcome.interrupted = not out_of_time and len(outcome.trials) < expected
    if not outcome.interrupted:
        outcome.test = evaluate_best_on_test(spec, outcome)
    return outcome


def evaluate_best_on_test(spec: SweepSpec, outcome: SweepOutcome) -> dict[str, TestScore]:
    """The best trial's best checkpoint on `base.data.test_path`, logged to its MLflow run and kept
    in its folder (a finished sweep run again reuses it); {} when the spec has no test split or the
    best checkpoint is not on local disk."""
    test_path = spec.base.data.test_path
    if not test_path or outcome.best is None or not outcome.best_checkpoint:
        return {}
    if is_uri(outcome.best_checkpoint):
        log.warning(
            "sweep %s: best checkpoint %s is not local; not evaluated on test", spec.name, outcome.best_checkpoint
        )
        return {}
    return evaluate_trials_on_test(
        {outcome.best.trial_id: outcome.best_checkpoint},
        test_path,
        tracking_uri=spec.tracking.uri,
        sweep=str(spec.name) if spec.tracking.enabled else None,
        threads=spec.base.loop.threads,
        keep_in={outcome.best.trial_id: outcome.best.path},
    )


def _tracking_callbacks(spec: SweepSpec, path: str, source_text: str) -> list[Any]:
    """The MLflow callback when tracking is on; raises TrackingError if its store is unreachable."""
    if not spec.tracking.enabled:
        return []

    return [MLflowTrackingCallback(spec=spec, experiment_dir=path, source_text=source_text)]


def _new_tuner(spec: SweepSpec, plan: ResourcePlan, trainable: Any, callbacks: list[Any] | None) -> Any:
    from ray import tune

    objective = spec.objectives()[0]
    searcher = build_searcher(spec, experiment_path(spec))
    max_concurrent: int | None = concurrency(spec, plan)
    scheduler = build_scheduler(spec, max_concurrent)
    if spec.scheduler.name == "asha-promotion":
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
        # Reusing trial actors saves Ray's worker start per trial (2.1 s -> 0.6 s; docs/architecture.md, Ray Tune).
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

    if tune.Tuner.can_restore(path) and not fresh:
        _repair_saved_state(spec, path)
        saved = read_text(path, SPEC_FILE)
        if saved is not None:
            old = SweepSpec.model_validate(parse_yaml(saved, f"{path}/{SPEC_FILE}"))
            if spec_fingerprint(old) != spec_fingerprint(spec):
                raise ConfigError(
                    f"sweep {spec.name!r} already exists at {path} with a different search space",
                    "use --name NEW to start another sweep, or --fresh to discard the old one",
                )
        return True
    if fresh:
        check_removable(path)
        remove_dir(path)
    write_text(path, SPEC_FILE, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    write_text(path, SOURCE_FILE, source_text)
    return False


def _repair_saved_state(spec: SweepSpec, path: str) -> None:
    """Put back Tune's state files that a killed driver left cut off (local storage only)."""
    if is_uri(path):
        return

    try:
        repair_torn_state(path)
    except ValueError as e:
        raise ConfigError(
            f"sweep {spec.name!r} at {path} cannot be resumed: {e}",
            "start it over with --fresh, or keep it and start another with --name NEW",
        ) from None


# How each cmx trial status ends in the sweep's Optuna study (StudySearch).
STATES = {
    TrialStatus.COMPLETED: TrialState.COMPLETE,
    TrialStatus.SCHEDULER_STOPPED: TrialState.PRUNED,
    # Stopped by cmx before training (a broken constraint) or when the loss became non-finite: PRUNED
    # with no value, which TPE ranks below every trial that trained (FAIL trials it would ignore,
    # and propose the same region again); `cmx_status` says which.
    TrialStatus.REJECTED: TrialState.PRUNED,
    TrialStatus.DIVERGED: TrialState.PRUNED,
    TrialStatus.FAILED: TrialState.FAIL,
}


class StudySearch(OptunaSearch):
    """Ray's `OptunaSearch` that records in the sweep's study how each trial really ended.

    Ray's class tells Optuna COMPLETE whenever a value was reported: an ASHA-stopped trial looked
    finished, a rejected or diverged trial's placeholder worst value looked measured. Here cmx's
    `TrialStatus` decides (`STATES`): completed -> COMPLETE with the objective(s); stopped early ->
    PRUNED, its value the last intermediate one; rejected -> PRUNED with no intermediate values;
    diverged -> PRUNED with NaN at the epoch it diverged (no value); failed (raised) -> FAIL.
    Intermediate values are the objective at each of the trainer's epochs (step = `epoch`, as the
    schedulers count). Every trial gets the user attributes `cmx_trial_id` and `cmx_status`.

    Tune pickles the searcher (a journal storage as its file path) with its experiment state, so a
    resume continues the same study; a trial Optuna handed out after Tune's last save, which the
    restored sweep never runs, is failed in `restore`, and no trial is told its end twice
    (docs/architecture.md, Optuna study). Moving this class breaks resuming older sweeps.
    """

    def __init__(self, *, max_epochs: int, **kwargs: Any) -> None:
        self.max_epochs = max_epochs
        self.ended: set[str] = set()
        self.last_step: dict[str, int] = {}  # per trial, the last epoch told to the study
        super().__init__(**kwargs)

    def _metrics(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        trial = optuna_search_trials(self).get(trial_id)
        if trial is not None and config is not None:
            trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self.ended:
            return  # Optuna keeps no intermediate values for several objectives
        if result.get(REJECTED) or result.get(DIVERGED):
            return  # a placeholder value, not a measurement
        value = result.get(self.metric)
        trial = optuna_search_trials(self).get(trial_id)
        if trial is None or value is None or not math.isfinite(float(value)):
            return
        step = metrics.epochs_of(result)
        if step <= self.last_step.get(trial_id, 0):
            return  # Tune hands a trial's last result to on_trial_complete too
        self.last_step[trial_id] = step
        try:
            trial.report(float(value), step=step)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.ended.add(trial_id)  # ended in the study before the driver restarted

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.ended:
            return
        if result:
            self.on_trial_result(trial_id, result)  # Tune hands the last result to this call only
        self.ended.add(trial_id)
        trial = optuna_search_trials(self).get(trial_id)
        if trial is None:
            return
        status = status_of(self.max_epochs, result or {}, True if error else None)
        state = STATES.get(status, TrialState.FAIL)
        if status == TrialStatus.DIVERGED and not isinstance(self.metric, list):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.report(math.nan, step=metrics.epochs_of(result or {}))  # Optuna ranks NaN worst
        values: list[float] | None = None
        if state == TrialState.COMPLETE:
            got = [(result or {}).get(m) for m in self._metrics()]
            if all(v is not None and math.isfinite(float(v)) for v in got):
                values = [float(v) for v in got]  # type: ignore[arg-type]
            else:
                state = TrialState.FAIL
        study = optuna_search_study(self)
        try:
            trial.set_user_attr(STATUS_ATTR, status.tag)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # ended before the driver restarted: the first end stands
        study.tell(trial, values, state=state, skip_if_finished=True)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        study = optuna_search_study(self)
        if study is None:
            return
        known = {t.number for t in optuna_search_trials(self).values()}
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                # Handed out after Tune's last state save: the restored sweep never runs it.
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
