"""One sweep trial: the Ray resources it needs and the Tune function that trains it.

The trial function builds the trial's TrainConfig from the sampled values, trains with
`cmx.pipelines.trainer.train` (or Ray Train for data-parallel trials) and reports every epoch.
`WorkerGroupRelease`, on the driver, frees the workers of data-parallel trials Tune stopped.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from ray import tune

import cmx.sweep as sweep_package
from cmx.cluster.data_parallel import release_orphaned_worker_groups, run_data_parallel
from cmx.core import metrics
from cmx.core.constraints import violated
from cmx.core.metrics import DIVERGED, NODE_ID, REJECTED, TrialStatus
from cmx.core.search_space import decode_params
from cmx.core.sweep_spec import CONFIRM_KEY, SweepSpec, constraint_config, trial_run_config
from cmx.models import count_flops, count_params, create_model
from cmx.models.factory import variant_arguments
from cmx.pipelines.trainer import train


def worst_value(metric: str, mode: str) -> float:
    """What a rejected or diverged trial reports, so the searcher learns to avoid it."""
    if mode == "max":
        return 0.0
    return 1e9


IMPORTS_DONE = time.perf_counter()  # this module and what it imports (torch, the trainer): see imports_s
_trials_in_this_process = 0


def _import_seconds() -> float:
    """How long this process took to import the trial function (torch, FFCV's users, the trainer)
    on its first trial; 0 for later trials of a reused actor, which import nothing."""
    global _trials_in_this_process
    _trials_in_this_process += 1
    return IMPORTS_DONE - sweep_package.IMPORTED_AT if _trials_in_this_process == 1 else 0.0


def run_trial(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
    """The Tune function: build the trial's TrainConfig, train, report every epoch."""
    imports_s = _import_seconds()
    entered = time.perf_counter()
    import torch

    spec = SweepSpec.model_validate(spec_json)
    rerun = config.get(CONFIRM_KEY)
    if rerun is not None:
        config = rerun["config"]
    params = decode_params(spec, {k: v for k, v in config.items() if k in spec.space})
    cfg = trial_run_config(spec, params, int(rerun["seed"]) if rerun is not None else None)
    rule = violated(spec.constraints, constraint_config(cfg, spec.constraints, variant_arguments))
    if rule is not None:
        tune.report({**_worst(spec), REJECTED: 1.0, metrics.EPOCH: 0})
        return
    import ray

    # Where the trial ran: shown per epoch so a retried trial's move to another node is visible.
    extra: dict[str, Any] = {**_model_cost(cfg), NODE_ID: ray.get_runtime_context().get_node_id()}
    trial_setup = {f"{metrics.SETUP_PREFIX}imports_s": imports_s, f"{metrics.SETUP_PREFIX}trial_s": 0.0}
    if cfg.loop.threads is not None and spec.resources.workers == 1:
        torch.set_num_threads(cfg.loop.threads)
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    checkpoint = tune.get_checkpoint()
    ctx = checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)
    with ctx as resume_dir:
        resume_from = Path(resume_dir) if resume_dir else None
        if spec.resources.workers > 1:
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

        trial_setup[f"{metrics.SETUP_PREFIX}trial_s"] = time.perf_counter() - entered  # config, cost, checkpoint

        def report(r: Any) -> None:
            ckpt = tune.Checkpoint.from_directory(str(r.checkpoint_dir)) if r.checkpoint_dir else None
            setup = {**trial_setup, **r.setup, metrics.SETUP_SECONDS: sum(trial_setup.values()) + sum(r.setup.values())}
            tune.report({**r.metrics, **extra, **(setup if r.setup else {}), metrics.EPOCH: r.epoch}, checkpoint=ckpt)

        result = train(cfg, run_dir, reporter=report, resume_from=resume_from, progress=False)
    if result.status == TrialStatus.DIVERGED:
        tune.report({**_worst(spec), **extra, DIVERGED: 1.0, metrics.EPOCH: result.epochs_completed + 1})


def _worst(spec: SweepSpec) -> dict[str, float]:
    out = {spec.search.metric: worst_value(spec.search.metric, spec.search.mode)}
    for o in spec.objectives():
        out[o.metric] = worst_value(o.metric, o.mode)
    return out


def _model_cost(cfg: Any) -> dict[str, float]:
    """Parameter count (millions) and GFLOPs, for multi-objective searches."""

    model = create_model(cfg.model.name, **cfg.model.overrides())
    res = cfg.data.resolution
    return {
        metrics.PARAMS_M: count_params(model) / 1e6,
        metrics.GFLOPS: count_flops(model, (3, res, res)) / 1e9,
    }


class WorkerGroupRelease(tune.Callback):
    """Frees the workers' CPUs/GPUs of each data-parallel trial Tune stops, while the sweep runs.

    A stopped trial's Train controller dies with its actor and leaves its worker group's placement
    group held (`release_orphaned_worker_groups`); without this the next trial waits forever.
    """

    def __init__(self, every_s: float = 1.0, settle_s: float = 10.0) -> None:
        self.every_s = every_s  # how often the driver looks (one GCS read)
        self.settle_s = settle_s  # at the end: how long controllers may take to die with their trials
        self._next = 0.0

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            release_orphaned_worker_groups()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune has stopped every trial actor; their controllers die a moment later.
        deadline = time.monotonic() + self.settle_s
        while release_orphaned_worker_groups().in_use and time.monotonic() < deadline:
            time.sleep(0.2)
