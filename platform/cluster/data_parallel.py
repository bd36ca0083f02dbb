"""Data-parallel training under Ray Train's `TorchTrainer`. The only module with Ray Train calls.

Each worker runs the ordinary `cmx.pipelines.trainer.train` inside the process group Ray Train
creates (gloo on CPU, NCCL on GPU); the trainer sees torch.distributed and shards its FFCV
loaders, wraps the model in DDP, reduces metrics and writes files on rank 0. Every rank calls
`ray.train.report` once per epoch; rank 0 attaches the epoch's checkpoint directory. When a worker
dies, Ray Train restarts the group (`FailureConfig(max_failures)`) and every worker resumes from
the last reported checkpoint.

Used two ways: standalone (`cmx train --workers N`, starts a local Ray unless one is running or
an address is given) and inside a Ray Tune trial function (`inside_tune=True`), where
`TuneReportCallback` forwards rank 0's metrics and checkpoint path to Tune (docs/architecture.md, Ray Train).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from cmx.cluster.ray_compat import actor_placement_groups
from cmx.cluster.runtime import init_ray, shutdown_ray
from cmx.core.config import TrainConfig
from cmx.core.errors import ClusterError, CmxError, ConfigError
from cmx.core.metrics import EPOCH
from cmx.pipelines.trainer import Display, EpochReport, read_metrics, read_result, train

# Test hook: "RANK:EPOCH:MARKER" makes that rank exit hard right after reporting that epoch, once
# (the marker file records that it happened), to prove a restarted group resumes exactly.
KILL_ENV = "CMX_TEST_KILL_WORKER"


def worker_config(config: TrainConfig, cpus_per_worker: float, gpus_per_worker: float) -> TrainConfig:
    """The config each worker trains: device from the GPU request, threads from the CPU share.

    Ray sets OMP threads only for whole CPUs; with a fractional share torch would keep its
    default (all cores per worker), so `loop.threads` is set explicitly (docs/architecture.md, Ray Train).
    """
    cfg = config.model_copy(deep=True)
    if gpus_per_worker > 0:
        if cfg.loop.device == "cpu":
            raise ConfigError("--gpus-per-worker > 0 but loop.device=cpu", "drop one of them")
        cfg.loop.device = "cuda"
    else:
        if cfg.loop.device == "cuda":
            raise ConfigError("loop.device=cuda needs --gpus-per-worker > 0 for data-parallel runs")
        cfg.loop.device = "cpu"
    if cfg.loop.threads is None:
        cfg.loop.threads = max(1, math.floor(cpus_per_worker))
    return cfg


def _preflight(cfg: TrainConfig) -> None:
    """Fail on the driver, not N times in the workers, for errors a retry cannot fix."""
    for key in ("train_path", "val_path"):
        value = getattr(cfg.data, key)
        if not value:
            raise ConfigError(f"data.{key} is not set", f"set it with --set data.{key}=PATH")
        if not Path(value).expanduser().exists():
            raise ConfigError(f"data.{key}: {value} does not exist", "check the path")
    if cfg.loop.precision == "fp16" and cfg.loop.device != "cuda":
        raise ConfigError("loop.precision=fp16 needs GPUs", "use bf16 on CPU workers")


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    cfg = TrainConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    kill = _kill_plan(rank)

    def reporter(report: EpochReport) -> None:
        checkpoint = None
        if report.checkpoint_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(report.checkpoint_dir))
        ray.train.report(
            {**report.metrics, "epoch": report.epoch, "is_best": report.is_best},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"epoch-{report.epoch:05d}" if checkpoint else None,
        )
        if kill is not None and report.epoch == kill[0] and not kill[1].exists():
            kill[1].write_text(f"rank {rank} killed after epoch {report.epoch}\n")
            os._exit(1)

    run = functools.partial(
        train, cfg, run_dir, reporter=reporter, progress=False, stop_after=loop_config.get("stop_after")
    )
    resume = ray.train.get_checkpoint()
    if resume is not None:  # a restarted worker group, or a re-run with the same name/storage
        with resume.as_directory() as d:
            run(resume_from=Path(d))
        return
    start = loop_config.get("resume_from")
    run(resume_from=Path(start) if start else None)


def _kill_plan(rank: int) -> tuple[int, Path] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    want, epoch, marker = spec.split(":", 2)
    return (int(epoch), Path(marker)) if int(want) == rank else None


def run_data_parallel(
    config: TrainConfig,
    run_dir: Path,
    *,
    workers: int,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    resume_from: Path | None = None,
    inside_tune: bool = False,
    max_failures: int = 2,
    address: str | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> Any:
    """Train on `workers` Ray Train workers; returns the run's TrainResult (None if it left none).
    `stop_after` ends it after that epoch, as `trainer.train` does.

    Standalone, a local Ray is started (and stopped) unless Ray is already initialised or
    `address` names a cluster. `progress=True` prints the per-epoch lines from rank 0's log.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    if cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be > 0 (got {cpus_per_worker})")
    run_dir = Path(run_dir).expanduser().resolve()
    cfg = worker_config(config, cpus_per_worker, gpus_per_worker)
    _preflight(cfg)
    started = False
    if not inside_tune and not ray.is_initialized():
        # Local Ray gets at least the CPUs the workers ask for (oversubscribing a small machine
        # beats refusing to run); the Train controller actor itself needs none.
        cpus = max(math.ceil(workers * cpus_per_worker), os.cpu_count() or 1)
        init_ray(address, num_cpus=cpus if address is None else None, dashboard=False)
        started = True
    callbacks: list[Any] = []  # Ray Train callbacks (TuneReportCallback when inside a Tune trial)
    name = "train"
    if inside_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
        name = f"train-{ray.tune.get_context().get_trial_id()}"
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "resume_from": str(resume_from) if resume_from else None,
            "stop_after": stop_after,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if gpus_per_worker > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(run_dir / "ray"),
            # Train V2's FailureConfig (the default at run time); the type stubs show V1's.
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
                max_failures=max_failures, controller_failure_limit=max(1, max_failures)
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )
    stop = threading.Event()
    tail = None
    if progress:
        tail = threading.Thread(target=_tail_metrics, args=(run_dir, cfg.loop.epochs, stop), daemon=True)
        tail.start()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _explain(e) from None
    finally:
        stop.set()
        if tail is not None:
            tail.join(timeout=5)
        if started:
            shutdown_ray()
    return read_result(run_dir)


class ReleasedGroups(NamedTuple):
    """What one `release_orphaned_worker_groups` pass did."""

    removed: int  # worker groups whose controller had died, now removed
    in_use: int  # groups whose creating actor is still alive (a running trial's workers)


def release_orphaned_worker_groups() -> ReleasedGroups:
    """Remove this job's worker groups whose Train controller has died.

    Tune stops a data-parallel trial (ASHA, a pause, the sweep's end) by ending its actor, and the
    Train controller that actor owns dies with it, gracelessly; the workers' placement group stays,
    holding their CPUs/GPUs, until the whole job ends. Ray's own cleaner asks the dashboard's state
    API, whose client stops at "multiple active Ray instances" when a second Ray runs on the
    machine: the next trial then waits forever. The sweep driver calls this instead
    (docs/architecture.md, Ray Train).
    """
    import ray
    from ray.util import remove_placement_group

    removed = in_use = 0
    for group, creator_dead in actor_placement_groups(ray.get_runtime_context().get_job_id()):
        if not creator_dead:
            in_use += 1
            continue
        remove_placement_group(group)  # idempotent: Ray's cleaner may have removed it meanwhile
        removed += 1
    return ReleasedGroups(removed, in_use)


def _explain(error: Exception) -> CmxError:
    """A worker's own cmx error when there is one, else one line about the failure."""
    failures = getattr(error, "worker_failures", None) or {}
    for exc in failures.values():
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, CmxError):
            return cause
    first = next(iter(failures.values()), error)
    text = str(getattr(first, "cause", None) or first).strip().splitlines()
    return ClusterError(
        f"data-parallel training failed: {text[-1] if text else type(first).__name__}",
        "see the worker logs above; a checkpointed run continues with --resume RUN_DIR",
    )


def _tail_metrics(run_dir: Path, epochs: int, stop: threading.Event) -> None:
    """Print rank 0's metrics lines as they appear (the workers' stdout stays in Ray's logs)."""

    display = Display(True, epochs)
    shown = 0
    while True:
        rows = read_metrics(run_dir)
        shown = min(shown, len(rows))  # a restarted group rewrites the log from its checkpoint
        for row in rows[shown:]:
            display.end_epoch(int(row[EPOCH]), row, bool(row.get("is_best")))
        shown = len(rows)
        if stop.is_set():
            return
        time.sleep(0.5)
