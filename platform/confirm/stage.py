"""Run (or continue) a sweep's confirm stage on Ray Tune.

The re-runs are one Tune experiment, `confirm/` inside the sweep folder: a grid over the
(configuration, seed) pairs of `cmx.confirm.plan`, no searcher, no scheduler stopping, each
trained by the sweep's own trial function (`run_trial`) at the full epoch budget. Running it again
restores that experiment: finished re-runs stay done, unfinished ones continue from their
checkpoints. With `base.data.test_path`, each completed re-run's best checkpoint is then measured
on the test split (once). The summary is written to the sweep folder and, with tracking on, to its MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from cmx.cluster.ray_compat import replace_restored_callbacks
from cmx.cluster.runtime import NodeCapacity, alive_nodes, init_ray, local_capacity
from cmx.confirm.plan import (
    CONFIRM_DIR,
    PLAN_FILE,
    ConfirmSummary,
    plan_reruns,
    plan_text,
    read_reruns,
    summarise,
    top_trials,
    write_summary,
)
from cmx.confirm.tracking import ConfirmTracking, forget_reruns, log_summary
from cmx.core.errors import ConfigError
from cmx.core.metrics import TrialStatus
from cmx.core.sweep_spec import CONFIRM_KEY, ConfirmConfig, SweepSpec
from cmx.core.uris import is_uri
from cmx.sweep.checkpoint_retention import CheckpointRetention
from cmx.sweep.resources import ResourcePlan, concurrency, plan_resources
from cmx.sweep.storage import check_trusted, experiment_path, experiment_root, remove_dir
from cmx.sweep.trial_logs import KeepTrialLogs
from cmx.sweep.tune_state import StateBackup, repair_torn_state
from cmx.sweep.tuner import trainable_for
from cmx.tracking.heldout import evaluate_trials_on_test


def confirm_path(spec: SweepSpec) -> str:
    """The confirm stage's Tune experiment folder inside the sweep folder."""
    return f"{experiment_path(spec)}/{CONFIRM_DIR}"


def run_confirm(
    spec: SweepSpec,
    settings: ConfirmConfig,
    *,
    address: str | None = None,
    fresh: bool = False,
    callbacks: list[Any] | None = None,
    on_start: Callable[[int, bool], None] | None = None,
) -> ConfirmSummary:
    """Re-train the sweep's top `settings.top_k` configurations with `settings.seeds` new seeds each."""
    path = experiment_path(spec)
    if is_uri(path):
        raise ConfigError(
            f"sweep {spec.name}: the confirm stage reads the sweep folder, and {path} is not a local path",
            "use a local or shared (NFS) storage.path for sweeps you confirm",
        )
    check_trusted(experiment_root(spec), path)
    plan_resources(spec, [local_capacity()] if address is None else [NodeCapacity("?", "?", 1e9, 1e9)])
    candidates = top_trials(spec, path, settings.top_k)
    reruns = plan_reruns(candidates, settings.seeds)
    where = confirm_path(spec)
    resumed = _prepare(spec, where, plan_text(reruns), fresh)
    if fresh and spec.tracking.enabled:
        forget_reruns(spec, path)
    all_callbacks = [*(callbacks or []), CheckpointRetention(), KeepTrialLogs(), StateBackup(where)]
    if spec.tracking.enabled:
        all_callbacks.append(ConfirmTracking(spec=spec, sweep_dir=path))
    init_ray(address)
    plan = plan_resources(spec, alive_nodes())
    trainable = trainable_for(spec, plan)
    if resumed:
        tuner = tune.Tuner.restore(where, trainable=trainable, resume_unfinished=True, resume_errored=True)
        replace_restored_callbacks(tuner, all_callbacks)
    else:
        tuner = _new_tuner(spec, plan, trainable, [r.tune_config() for r in reruns], all_callbacks)
    if on_start:
        on_start(len(reruns), resumed)
    tuner.fit()
    measure_test(spec, where)
    summary = summarise(spec, settings, candidates, read_reruns(spec, where))
    write_summary(path, summary)
    if spec.tracking.enabled:
        log_summary(spec, path, summary)
    return summary


def measure_test(spec: SweepSpec, where: str) -> None:
    """Each completed re-run's best checkpoint on `base.data.test_path`, once: the score is kept in
    the re-run's folder (`metrics.TEST_SCORE_FILE`), so a continued stage measures only new re-runs."""
    test_path = spec.base.data.test_path
    if not test_path:
        return
    done = {
        r.trial_id: r.checkpoint
        for r in read_reruns(spec, where)
        if r.status == TrialStatus.COMPLETED.tag and r.checkpoint is not None
    }
    folders = {trial_id: Path(where) / f"trial_{trial_id}" for trial_id in done}
    evaluate_trials_on_test(done, test_path, threads=spec.base.loop.threads, keep_in=folders)


def _prepare(spec: SweepSpec, where: str, plan: str, fresh: bool) -> bool:
    """Continue the saved confirm experiment if its plan is this one; True when it resumes."""
    folder = Path(where)
    saved = folder / PLAN_FILE
    if fresh:
        remove_dir(where)
    elif tune.Tuner.can_restore(where):
        if saved.is_file() and saved.read_text() != plan:
            raise ConfigError(
                f"sweep {spec.name}: its confirm stage at {where} re-runs other configurations or seeds "
                "(confirm.top_k / confirm.seeds changed, or the sweep found new top trials)",
                f"start the confirm stage over: cmx sweep confirm {spec.name} --fresh",
            )
        try:
            repair_torn_state(where)
        except ValueError as e:
            raise ConfigError(
                f"sweep {spec.name}: its confirm stage at {where} cannot be continued: {e}",
                f"start it over: cmx sweep confirm {spec.name} --fresh",
            ) from None
        return True
    else:
        remove_dir(where)  # a stage killed before Tune saved anything: nothing to keep
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(plan)
    return False


def _new_tuner(
    spec: SweepSpec, plan: ResourcePlan, trainable: Any, points: list[dict[str, Any]], callbacks: list[Any]
) -> Any:
    objective = spec.objectives()[0]
    tune_config = tune.TuneConfig(
        num_samples=1,
        max_concurrent_trials=concurrency(spec, plan),
        reuse_actors=spec.resources.reuse_actors and plan.worker_bundle is None,
        trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        trial_name_creator=lambda t: f"confirm_{t.trial_id}",
    )
    run_config = tune.RunConfig(
        name=CONFIRM_DIR,
        storage_path=experiment_path(spec),
        failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None,
            checkpoint_score_attribute=objective.metric,
            checkpoint_score_order=objective.mode,
        ),
        callbacks=callbacks,
        verbose=0,
    )
    return tune.Tuner(
        trainable,
        param_space={CONFIRM_KEY: tune.grid_search(points)},
        tune_config=tune_config,
        run_config=run_config,
    )
