"""The training function every sweep trial runs: typed config in, reporter callback per epoch,
`TrainResult` out. No Ray, no MLflow: whoever calls it (the CLI, a Tune trial, a Ray Train
worker) adapts the reporter.

Split as in ffcv-imagenet: `create_train_loader` / `create_val_loader`,
`create_model_and_scaler`, `create_optimizer` (optim.py), `train_loop` (one epoch), `val_loop`;
`train()` wires them, checkpoints, reports and decides when to stop. Runs single-process, or
DDP-aware when a torch.distributed process group exists (rank 0 writes files, metrics are
reduced across ranks).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmx.core import metrics as M
from cmx.core.config import DataConfig, TrainConfig, dump_yaml
from cmx.core.errors import CheckpointError, ConfigError, DataError
from cmx.core.files import read_json, read_utf8
from cmx.core.metrics import TrialStatus
from cmx.core.uris import is_uri
from cmx.models import create_model
from cmx.pipelines import distributed as dist
from cmx.pipelines.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cmx.pipelines.cpu_allocator import keep_freed_memory
from cmx.pipelines.loaders import build_loader
from cmx.pipelines.optim import create_optimizer
from cmx.pipelines.schedules import build_scheduler

__all__ = [
    "EpochReport",
    "Reporter",
    "TrainResult",
    "create_model_and_scaler",
    "create_train_loader",
    "create_val_loader",
    "evaluate",
    "load_checkpoint",
    "train",
    "train_loop",
    "val_loop",
]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"


@dataclass
class EpochReport:
    """What the reporter gets after every epoch (top-1/top-5 are percentages)."""

    epoch: int  # epochs completed so far (1-based)
    metrics: dict[str, float]  # keys: cmx.metrics constants
    checkpoint_dir: Path | None  # holds only this epoch's checkpoint file; None on ranks > 0
    is_best: bool
    setup: dict[str, float] = field(default_factory=dict)  # first report of a start or resume: SetupClock


@dataclass
class SetupClock:
    """Seconds a run (or a resume) spent before training, by phase: where a cold start goes."""

    runtime: float = 0.0  # device, threads, determinism flags (`setup_runtime`)
    restore: float = 0.0  # reading the checkpoint to resume from
    loaders: float = 0.0  # building the train and val loaders
    model: float = 0.0  # model, optimizer, schedule (and restoring their state)
    first_batch: float = 0.0  # the first batch of the first epoch (FFCV's compiled pipeline)

    def metrics(self) -> dict[str, float]:
        """As reported metrics: `time/setup/<phase>_s`."""
        return {f"{M.SETUP_PREFIX}{k}_s": v for k, v in asdict(self).items()}


Reporter = Callable[[EpochReport], None]


@dataclass
class TrainResult:
    """How a run ended; `message` is one line for people."""

    status: TrialStatus  # COMPLETED, PATIENCE_STOPPED, DIVERGED or SCHEDULER_STOPPED (stop_after)
    epochs_completed: int
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    run_dir: Path
    best_checkpoint: Path | None
    message: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        out = asdict(self)
        out["status"] = self.status.value
        out["run_dir"] = str(self.run_dir)
        out["best_checkpoint"] = str(self.best_checkpoint) if self.best_checkpoint else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        """Inverse of `to_json`."""
        best = data.get("best_checkpoint")
        return cls(
            **{
                **data,
                "status": TrialStatus(data["status"]),
                "run_dir": Path(data["run_dir"]),
                "best_checkpoint": Path(best) if best else None,
            }
        )


# ----------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where and how the loop runs; fixed for the whole run."""

    device: torch.device
    threads: int
    amp_dtype: torch.dtype | None  # None: fp32
    rank: int
    world: int

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16/fp16 autocast on the run's device, or nothing for fp32."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def default_threads() -> int:
    """CPUs this process may use (affinity-aware: containers and `taskset` shrink it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available; under DDP, the GPU this rank was given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("loop.device=cuda but no CUDA GPU is visible", "use loop.device=cpu")
        if dist.is_distributed():
            # Ray Train and torchrun set the current device (or LOCAL_RANK) per worker.
            index = torch.cuda.current_device() if torch.cuda.device_count() == 1 else dist.local_rank()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_runtime(config: TrainConfig) -> Runtime:
    """Device, precision, threads, determinism and cuDNN flags for this process."""
    loop = config.loop
    device = resolve_device(loop.device)
    if loop.precision == "fp16" and device.type != "cuda":
        raise ConfigError("loop.precision=fp16 needs a CUDA GPU (GradScaler)", "use loop.precision=bf16 on CPU")
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[loop.precision]
    threads = loop.threads or default_threads()
    torch.set_num_threads(threads)
    if device.type == "cpu" and loop.cpu_allocator == "keep":
        keep_freed_memory()
    if loop.deterministic:
        # cuBLAS needs this workspace setting to be deterministic (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # imports torch._dynamo: counted as `runtime`
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Fixed input shapes per epoch: let cuDNN pick the fastest conv algorithms, use TF32.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return Runtime(device, threads, amp, dist.rank(), dist.world_size())


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _TorchFlags:
    """Restores process-wide torch settings that `train()` changes (tests run many trainings)."""

    def __enter__(self) -> _TorchFlags:
        self.saved = (
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        threads, det, cudnn_det, bench = self.saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.backends.cudnn.deterministic = cudnn_det
        torch.backends.cudnn.benchmark = bench


# ----------------------------------------------------------------------------- data


def _require(path: str | None, key: str) -> str:
    if not path:
        raise ConfigError(f"{key} is not set", f"set it in the config file or with --set {key}=PATH")
    return path


def check_data_paths(data: DataConfig) -> None:
    """Both splits are set and, when local, exist: checked before a run folder or MLflow run is made."""
    for key in ("train_path", "val_path"):
        path = _require(getattr(data, key), f"data.{key}")
        if not is_uri(path) and not Path(path).expanduser().exists():
            raise DataError(f"data.{key}: {path} does not exist", "fix the path, or export the data first")


def create_train_loader(config: TrainConfig, rt: Runtime) -> Any:
    """The training loader (FFCV or torchvision per `data.backend`), sharded under DDP."""

    _require(config.data.train_path, "data.train_path")
    return build_loader(
        config.data,
        "train",
        device=str(rt.device),
        seed=config.loop.seed,
        distributed=rt.world > 1,
        deterministic=config.loop.deterministic,
    )


def create_val_loader(data: DataConfig, rt: Runtime, seed: int = 0) -> Any:
    """The validation loader (sequential, centre crop), sharded under DDP."""

    _require(data.val_path, "data.val_path")
    return build_loader(data, "val", device=str(rt.device), seed=seed, distributed=rt.world > 1)


def _batches(loader: Any, rt: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate one epoch; reset torch threads after FFCV's epoch thread changed them (docs/architecture.md, FFCV),
    and close the iterator when the consumer stops early."""
    it = iter(loader)
    first = True
    try:
        for images, labels in it:
            if first:
                torch.set_num_threads(rt.threads)
                first = False
            if images.device != rt.device:
                images = images.to(rt.device, non_blocking=True)
                labels = labels.to(rt.device, non_blocking=True)
            yield images, labels
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


# ----------------------------------------------------------------------------- model and optimiser


def _memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.loop.channels_last else torch.contiguous_format


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The registry model with the config's overrides and the data's class count (CPU)."""

    model = create_model(config.model.name, num_classes=num_classes, **config.model.overrides())
    check = getattr(model, "validate_input_size", None)
    if check is not None:
        for res in _resolutions(config):
            check(res, res)
    return model


def _resolutions(config: TrainConfig) -> set[int]:
    data = config.data
    out = {data.resolution, data.val_resolution}
    if data.progressive is not None:
        out |= {data.progressive.start_res, data.progressive.end_res}
    return out


def create_model_and_scaler(
    config: TrainConfig, num_classes: int, rt: Runtime
) -> tuple[nn.Module, torch.amp.GradScaler]:
    """The model on the device (seeded: identical on every rank), and a GradScaler that is
    enabled only for fp16."""
    torch.manual_seed(config.loop.seed)
    model = build_model(config, num_classes)
    model.to(rt.device).to(memory_format=_memory_format(config))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=config.loop.precision == "fp16")
    return model, scaler


@dataclass
class Parts:
    """Everything with state that a checkpoint holds, plus how the model is run."""

    model: nn.Module  # the plain module: state_dict() source
    forward: nn.Module  # what training calls: compiled and/or DDP-wrapped
    evaluator: nn.Module  # what validation calls: EMA weights when enabled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    mixup: Any  # timm.data.Mixup or None
    num_classes: int


def build_parts(config: TrainConfig, rt: Runtime, num_classes: int, steps_per_epoch: int) -> Parts:
    """Model, scaler, optimiser, per-step scheduler, EMA and mixup for one run."""
    model, scaler = create_model_and_scaler(config, num_classes, rt)
    optimizer = create_optimizer(model, config.optim, fused=rt.device.type == "cuda")
    scheduler = build_scheduler(optimizer, config.schedule, config.loop.epochs * steps_per_epoch, steps_per_epoch)
    ema = None
    if config.loop.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.loop.ema_decay), use_buffers=True)
    compiled: nn.Module = torch.compile(model) if config.loop.compile else model  # type: ignore[assignment]
    forward = compiled
    if rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        forward = DistributedDataParallel(compiled, device_ids=ids, gradient_as_bucket_view=True)
    evaluator = ema.module if ema is not None else compiled
    return Parts(
        model,
        forward,
        evaluator,
        optimizer,
        scheduler,
        scaler,
        ema,
        _mixup(config, num_classes),
        num_classes,
    )


def _mixup(config: TrainConfig, num_classes: int) -> Any:
    """timm's Mixup/CutMix (soft targets with label smoothing folded in), or None."""
    loop = config.loop
    if loop.mixup <= 0 and loop.cutmix <= 0:
        return None
    if config.data.batch_size % 2:
        raise ConfigError(
            f"mixup/cutmix need an even data.batch_size (got {config.data.batch_size})",
            "timm's Mixup flips the batch to pair images",
        )
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=loop.mixup,
        cutmix_alpha=loop.cutmix,
        label_smoothing=loop.label_smoothing,
        num_classes=num_classes,
    )


# ----------------------------------------------------------------------------- loops


@dataclass
class EpochStats:
    """One training epoch, summed over this rank's batches."""

    loss_sum: float
    samples: int
    seconds: float
    lr: float
    diverged: bool = False
    bad_loss: float = 0.0
    first_batch_s: float = 0.0  # waiting for the first batch (FFCV compiles its pipeline then)


def _loss(logits: torch.Tensor, images_targets: torch.Tensor, smoothing: float, soft: bool) -> torch.Tensor:
    if soft:  # mixup/cutmix targets: probabilities, smoothing already applied by timm's Mixup
        return torch.sum(-images_targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), images_targets, label_smoothing=smoothing)


def train_loop(
    epoch: int,
    parts: Parts,
    loader: Any,
    config: TrainConfig,
    rt: Runtime,
    *,
    on_step: Callable[[int, float | None], None] | None = None,
) -> EpochStats:
    """One epoch of training (epoch is 0-based). Stops at the first non-finite loss, checked on
    every rank together so that no rank waits forever in a collective."""
    loop, optim = config.loop, config.optim
    parts.forward.train()
    loader.set_epoch(epoch)
    # On CPU .item() costs nothing; on GPU it syncs, so the finite check runs every 25 steps.
    check_every = 1 if rt.device.type == "cpu" else 25
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    samples, lr, shown = 0, parts.optimizer.param_groups[0]["lr"], None
    total = len(loader)
    start = time.perf_counter()
    first_batch_s = 0.0
    for i, (images, labels) in enumerate(_batches(loader, rt)):
        if i == 0:
            first_batch_s = time.perf_counter() - start
        images = images.contiguous(memory_format=_memory_format(config))
        targets, soft = labels, False
        if parts.mixup is not None:
            if images.shape[0] % 2 == 0:
                images, targets = parts.mixup(images, labels)
            else:  # a ragged last batch (drop_last=False): smoothed one-hot, no mixing
                from timm.data.mixup import mixup_target

                targets = mixup_target(labels, parts.num_classes, 1.0, loop.label_smoothing)
            soft = True
        with rt.autocast():
            logits = parts.forward(images)
        loss = _loss(logits, targets, loop.label_smoothing, soft)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        if optim.grad_clip is not None:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), optim.grad_clip)
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update_parameters(parts.model)
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        samples += n
        if (i + 1) % check_every == 0 or i + 1 == total:
            value = float(loss_sum)
            if dist.any_rank(not math.isfinite(value)):
                if rt.device.type == "cuda":
                    torch.cuda.synchronize(rt.device)
                return EpochStats(value, samples, time.perf_counter() - start, lr, True, value, first_batch_s)
            shown = value / max(samples, 1)
        if on_step is not None:
            on_step(i + 1, shown)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    value = float(loss_sum)
    if dist.any_rank(not math.isfinite(value)):  # the last batch's check when len() was unknown
        return EpochStats(value, samples, seconds, lr, True, value, first_batch_s)
    return EpochStats(value, samples, seconds, lr, first_batch_s=first_batch_s)


@torch.no_grad()
def val_loop(model: nn.Module, loader: Any, rt: Runtime, *, channels_last: bool = True) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over this rank's shard, summed across ranks."""
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, top1, top5, n
    for images, labels in _batches(loader, rt):
        with rt.autocast():
            logits = model(images.contiguous(memory_format=fmt))
        logits = logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(labels[:, None])
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(dim=1).sum()
        sums[3] += labels.shape[0]
    loss, top1, top5, n = _summed(sums)
    if n == 0:
        raise DataError("the validation loader yielded no samples", "check data.val_path")
    return {M.VAL_LOSS: loss / n, M.VAL_TOP1: 100.0 * top1 / n, M.VAL_TOP5: 100.0 * top5 / n}


def _summed(sums: torch.Tensor) -> tuple[float, float, float, float]:
    """(loss, top1, top5, n) summed over ranks."""
    keys = ("loss", "top1", "top5", "n")
    r = dist.all_reduce({k: float(v) for k, v in zip(keys, sums.tolist(), strict=True)})
    return r["loss"], r["top1"], r["top5"], r["n"]


# ----------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """Progress that a checkpoint carries besides the tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0  # epochs since the early-stop metric last improved

    def update_best(self, metrics: dict[str, float], key: str) -> bool:
        """Record this epoch; True when `key` improved (strictly) on the best so far."""
        value = metrics[key]
        better = M.MODES[key] == "max"
        improved = self.best_value is None or (value > self.best_value if better else value < self.best_value)
        if improved and math.isfinite(value):
            self.best_value, self.best_epoch, self.best_metrics = value, self.epoch, dict(metrics)
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False


def checkpoint_state(
    parts: Parts, state: RunState, config: TrainConfig, class_names: list[str], rt: Runtime
) -> dict[str, Any] | None:
    """The checkpoint dict on rank 0 (None elsewhere). Collective: every rank must call it,
    because each rank's RNG state is gathered so that a resumed DDP run continues exactly."""
    rngs = dist.all_gather_object(rng_state())
    if rt.rank != 0:
        return None
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "config": config.model_dump(mode="json"),
        "class_names": list(class_names),
        "num_classes": parts.num_classes,
        "history": [dict(h) for h in state.history],
        "best": {
            "value": state.best_value,
            "epoch": state.best_epoch,
            "metrics": state.best_metrics,
        },
        "bad_epochs": state.bad_epochs,
        "world_size": rt.world,
        "torch_version": str(torch.__version__),
    }


def restore(parts: Parts, ckpt: dict[str, Any], config: TrainConfig, rt: Runtime) -> RunState:
    """Load a checkpoint into the parts and return its run state; RNGs continue where they were."""
    saved_model = ckpt["config"].get("model")
    if saved_model != config.model.model_dump(mode="json"):
        raise CheckpointError(
            f"the checkpoint's model {saved_model} differs from the config's {config.model.model_dump(mode='json')}",
            "resume with the run's own config.yaml (only loop/optim/schedule may change)",
        )
    if ckpt.get("num_classes") != parts.num_classes:
        raise DataError(
            f"the checkpoint has {ckpt.get('num_classes')} classes, the data {parts.num_classes}",
            "resume on the same dataset",
        )
    try:
        parts.model.load_state_dict(ckpt["model"])
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        parts.scheduler.load_state_dict(ckpt["scheduler"])
        if parts.scaler.is_enabled() and ckpt.get("scaler"):
            parts.scaler.load_state_dict(ckpt["scaler"])
        if parts.ema is not None:
            if ckpt.get("ema"):
                parts.ema.load_state_dict(ckpt["ema"])
            else:  # EMA switched on at resume: start it from the current weights
                parts.ema.module.load_state_dict(parts.model.state_dict())
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not fit this run: {str(e).splitlines()[0][:300]}") from None
    per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    if len(per_rank) == rt.world:
        set_rng_state(per_rank[rt.rank])
    else:  # a different world size cannot continue each rank's stream; reseed per rank
        seed_everything(config.loop.seed + 1000 * ckpt["epoch"] + rt.rank)
    best = ckpt.get("best") or {}
    return RunState(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt["step"]),
        history=[dict(h) for h in ckpt.get("history", [])],
        best_value=best.get("value"),
        best_epoch=int(best.get("epoch") or 0),
        best_metrics=dict(best.get("metrics") or {}),
        bad_epochs=int(ckpt.get("bad_epochs", 0)),
    )


# ----------------------------------------------------------------------------- run directory


@dataclass(frozen=True)
class RunDir:
    """The files of one run."""

    root: Path

    @property
    def last_dir(self) -> Path:
        return self.root / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.root / "checkpoints" / "best"

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    def prepare(self, config: TrainConfig, state: RunState, resumed: bool) -> None:
        """Write the resolved config; a fresh run clears old outputs, a resumed one rewrites the
        metrics log from the checkpoint's history (epochs after it never happened)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not resumed:
            shutil.rmtree(self.root / "checkpoints", ignore_errors=True)
        (self.root / RESULT_FILE).unlink(missing_ok=True)
        (self.root / CONFIG_FILE).write_text(dump_yaml(config))
        with open(self.metrics_file, "w") as f:
            for row in state.history:
                f.write(json.dumps(row) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self, payload: dict[str, Any], *, last: bool, best: bool) -> Path | None:
        """Write this epoch's checkpoint to last/ and/or best/; returns last/ when written."""
        written: Path | None = None
        if last:
            save_checkpoint(payload, self.last_dir / CHECKPOINT_FILE)
            written = self.last_dir
        if best:
            save_checkpoint(payload, self.best_dir / CHECKPOINT_FILE)
        return written


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The JSON-lines metrics log of a run."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    text = read_utf8(path, what="metrics log", error=DataError, hint="the run folder is damaged: start a new run")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{number}: not JSON", "the run folder is damaged: start a new run") from None
    return rows


def read_result(run_dir: str | Path) -> TrainResult | None:
    """The `result.json` a finished run left, or None."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    data = read_json(path, what="run result", error=DataError, hint="the run folder is damaged: start a new run")
    return TrainResult.from_json(data)


# ----------------------------------------------------------------------------- progress


class Display:
    """Rank 0's console output: a bar within each epoch (terminals only) and one line per epoch."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        from rich.console import Console

        self.enabled = enabled
        self.epochs = epochs
        self.console = Console(highlight=False)
        self.bar: Any = None
        self.task: Any = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        if not (self.enabled and self.console.is_terminal):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn(f"epoch {epoch}/{self.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.bar.add_task("train", total=steps, loss="-")
        self.bar.start()

    def step(self, done: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=f"{loss:.4f}" if loss is not None else "-")

    def stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def end_epoch(self, epoch: int, m: dict[str, float], is_best: bool) -> None:
        self.stop_bar()
        if not self.enabled:
            return
        self.console.print(epoch_line(epoch, self.epochs, m, is_best), soft_wrap=True)

    def say(self, text: str) -> None:
        self.stop_bar()
        if self.enabled:
            self.console.print(text, soft_wrap=True)


def epoch_line(epoch: int, epochs: int, m: dict[str, float], is_best: bool) -> str:
    """The one-line epoch summary (rich markup)."""
    return (
        f"epoch {epoch:>3}/{epochs}  train loss {m[M.TRAIN_LOSS]:.4f}  "
        f"val loss {m[M.VAL_LOSS]:.4f}  top-1 {m[M.VAL_TOP1]:6.2f}%  top-5 {m[M.VAL_TOP5]:6.2f}%  "
        f"lr {m[M.LR]:.2e}  {m[M.IMAGES_PER_SEC]:,.0f} img/s  {m[M.EPOCH_SECONDS]:.1f} s  "
        f"{m[M.PEAK_MEMORY_MB]:,.0f} MB" + ("  [bold green]best[/]" if is_best else "")
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated this epoch, or on CPU the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def epoch_metrics(stats: EpochStats, val: dict[str, float], seconds: float, rt: Runtime) -> dict[str, float]:
    """The reported metrics, reduced across ranks: sums for samples, max for time and memory."""
    sums = dist.all_reduce({"loss": stats.loss_sum, "n": float(stats.samples)})
    worst = dist.all_reduce({"train_s": stats.seconds, "epoch_s": seconds, "mem": peak_memory_mb(rt.device)}, "max")
    return {
        M.TRAIN_LOSS: sums["loss"] / max(sums["n"], 1.0),
        **val,
        M.LR: float(stats.lr),
        M.IMAGES_PER_SEC: sums["n"] / max(worst["train_s"], 1e-9),
        M.EPOCH_SECONDS: worst["epoch_s"],
        M.PEAK_MEMORY_MB: worst["mem"],
    }


# ----------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `config` into `run_dir`, calling `reporter` after every epoch on every rank.

    `resume_from` is a checkpoint file, a checkpoint directory from an EpochReport, or a run
    directory. A non-finite loss ends the run with status "diverged" (never an exception); the
    last good checkpoint stays intact. `stop_after` ends the run after that epoch with status
    "stopped early", as a sweep's scheduler would: the schedule still spans `loop.epochs`.
    """
    run = RunDir(Path(run_dir).expanduser().resolve())
    with _TorchFlags():
        tick = time.perf_counter()
        rt = setup_runtime(config)
        main = rt.rank == 0
        clock = SetupClock(runtime=time.perf_counter() - tick)
        tick = time.perf_counter()
        ckpt = load_checkpoint(resolve_checkpoint(resume_from)) if resume_from is not None else None
        clock.restore, tick = time.perf_counter() - tick, time.perf_counter()
        seed_everything(config.loop.seed + rt.rank)
        train_loader = create_train_loader(config, rt)
        val_loader = create_val_loader(config.data, rt, config.loop.seed)
        clock.loaders, tick = time.perf_counter() - tick, time.perf_counter()
        check_same_classes(
            config.data.train_path, train_loader.class_names, config.data.val_path, val_loader.class_names
        )
        torch.set_num_threads(rt.threads)  # FFCV's Loader() sets it to its worker count
        steps = len(train_loader)
        if steps == 0:
            raise DataError(
                f"{config.data.train_path}: fewer samples than one batch of {config.data.batch_size}",
                "lower data.batch_size or set data.drop_last=false",
            )
        if train_loader.num_classes < 2:
            raise DataError(
                f"{config.data.train_path}: {train_loader.num_classes} class(es); a classifier needs at least two",
                "train on data with a folder per class",
            )
        parts = build_parts(config, rt, train_loader.num_classes, steps)
        class_names = list(train_loader.class_names)
        seed_everything(config.loop.seed + rt.rank)  # the training stream (model init re-seeds)
        state = restore(parts, ckpt, config, rt) if ckpt is not None else RunState()
        clock.model = time.perf_counter() - tick
        if main:
            run.prepare(config, state, resumed=ckpt is not None)
        display = Display(progress and main, config.loop.epochs)
        if ckpt is not None:
            display.say(f"resumed from epoch {state.epoch} (step {state.step})")
        status, message = _run_epochs(
            config, rt, run, parts, state, train_loader, val_loader, class_names, reporter, display, clock, stop_after
        )
        best = run.best_dir / CHECKPOINT_FILE
        result = TrainResult(
            status=status,
            epochs_completed=state.epoch,
            final_metrics={k: v for k, v in (state.history[-1] if state.history else {}).items() if k != M.EPOCH},
            best_metrics={k: v for k, v in state.best_metrics.items() if k != M.EPOCH},
            history=[dict(h) for h in state.history],
            run_dir=run.root,
            best_checkpoint=best if best.is_file() else None,
            message=message,
        )
        if main:
            (run.root / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1))
            display.say(message)
        return result


def check_same_classes(train_path: Any, train_names: Any, val_path: Any, val_names: Any) -> None:
    """Train and val must name the same classes in the same order (label i means one class)."""
    train_names, val_names = [str(c) for c in train_names], [str(c) for c in val_names]
    if train_names == val_names:
        return
    only_train = [c for c in train_names if c not in val_names]
    only_val = [c for c in val_names if c not in train_names]
    if only_train or only_val:
        diff = "; ".join(
            part
            for part in (
                f"only in train: {', '.join(only_train[:5])}" + (" ..." if len(only_train) > 5 else "")
                if only_train
                else "",
                f"only in val: {', '.join(only_val[:5])}" + (" ..." if len(only_val) > 5 else "") if only_val else "",
            )
            if part
        )
    else:
        diff = "same classes in another order"
    raise DataError(
        f"{train_path} and {val_path} have different classes ({diff})",
        "give both splits the same class folders (or convert them from folders that have)",
    )


def _run_epochs(
    config: TrainConfig,
    rt: Runtime,
    run: RunDir,
    parts: Parts,
    state: RunState,
    train_loader: Any,
    val_loader: Any,
    class_names: list[str],
    reporter: Reporter | None,
    display: Display,
    clock: SetupClock | None = None,
    stop_after: int | None = None,
) -> tuple[TrialStatus, str]:
    """The epoch loop: train, validate, record, checkpoint, report, stop early or on divergence."""
    loop, main = config.loop, rt.rank == 0
    steps = len(train_loader)
    end = loop.epochs if stop_after is None else min(loop.epochs, stop_after)
    for epoch in range(state.epoch, end):
        start = time.perf_counter()
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        display.start_epoch(epoch + 1, steps)
        stats = train_loop(epoch, parts, train_loader, config, rt, on_step=display.step)
        state.step += stats.samples and _steps_taken(stats, config, steps)
        if stats.diverged:
            display.stop_bar()
            last = run.last_dir / CHECKPOINT_FILE
            kept = (
                f"last good checkpoint: {last} (epoch {state.epoch})" if last.is_file() else "no checkpoint was written"
            )
            return TrialStatus.DIVERGED, (
                f"training diverged: the loss became {stats.bad_loss} in epoch {epoch + 1} "
                f"(lr {stats.lr:.3g}); stopped, {kept}"
            )
        val = val_loop(parts.evaluator, val_loader, rt, channels_last=loop.channels_last)
        metrics = epoch_metrics(stats, val, time.perf_counter() - start, rt)
        state.epoch = epoch + 1
        state.history.append({M.EPOCH: float(state.epoch), **metrics})
        is_best = state.update_best(metrics, loop.early_stop_metric)
        stop = loop.early_stop_patience is not None and state.bad_epochs >= loop.early_stop_patience
        final = stop or state.epoch == end
        write_last = config.checkpoint.every_epoch or final
        write_best = is_best and config.checkpoint.keep_best
        checkpoint_dir = None
        if write_last or write_best:
            payload = checkpoint_state(parts, state, config, class_names, rt)
            if payload is not None:
                checkpoint_dir = run.save(payload, last=write_last, best=write_best)
        if main:
            run.append_metrics({**state.history[-1], "step": state.step, "is_best": is_best})
        display.end_epoch(state.epoch, metrics, is_best)
        if reporter is not None:
            setup = {}
            if clock is not None:  # the first epoch of this start or resume
                clock.first_batch = stats.first_batch_s
                setup, clock = clock.metrics(), None
            reporter(EpochReport(state.epoch, dict(metrics), checkpoint_dir, is_best, setup))
        if stop:
            return TrialStatus.PATIENCE_STOPPED, (
                f"early stop: {loop.early_stop_metric} did not improve for {loop.early_stop_patience} "
                f"epochs (best {state.best_value:.4g} at epoch {state.best_epoch})"
            )
    best = (
        f"; best {loop.early_stop_metric} {state.best_value:.4g} at epoch {state.best_epoch}"
        if state.best_value is not None
        else ""
    )
    if state.epoch < loop.epochs:  # stop_after: cut as a sweep's scheduler cuts a trial
        return TrialStatus.SCHEDULER_STOPPED, f"stopped after epoch {state.epoch} of {loop.epochs}, as asked{best}"
    return TrialStatus.COMPLETED, f"completed {state.epoch} epochs{best}"


def _steps_taken(stats: EpochStats, config: TrainConfig, steps: int) -> int:
    """Optimiser steps in this epoch (all of them unless it diverged part-way)."""
    if not stats.diverged:
        return steps
    return math.ceil(stats.samples / config.data.batch_size)


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    checkpoint: str | Path,
    data_path: str | Path,
    *,
    batch_size: int | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    threads: int | None = None,
    use_ema: bool = True,
) -> dict[str, float]:
    """Top-1/top-5 (percent) and loss of a checkpoint on a `.beton` file or an ImageFolder.

    Uses the checkpoint's own data settings (resolution, crop, normalisation) and its EMA weights
    when it has them (those are what the run validated).
    """
    from pydantic import ValidationError

    state = load_checkpoint(checkpoint)
    try:
        saved = TrainConfig.model_validate(state["config"])
    except ValidationError as e:
        raise CheckpointError(f"{checkpoint}: its config no longer validates ({e.errors()[0]['msg']})") from None
    path = str(Path(data_path).expanduser())
    if not Path(path).exists():
        raise DataError(f"{path}: not found", "pass a .beton file or an ImageFolder directory")
    data = saved.data.model_dump()
    # The data evaluated on is the loader's val split here (it may be the run's test split).
    data.update(val_path=path, test_path=None, backend="ffcv" if path.endswith(".beton") else "torchvision")
    if batch_size is not None:
        data["val_batch_size"] = batch_size
    loop = saved.loop.model_dump()
    precision = "fp32" if loop["precision"] == "fp16" and not torch.cuda.is_available() else loop["precision"]
    loop.update(device=device, threads=threads, compile=False, deterministic=False, precision=precision)
    config = TrainConfig.model_validate({**saved.model_dump(), "data": data, "loop": loop})
    with _TorchFlags():
        rt = setup_runtime(config)
        loader = create_val_loader(config.data, rt)
        torch.set_num_threads(rt.threads)
        if loader.num_classes != state["num_classes"]:
            raise DataError(
                f"{path} has {loader.num_classes} classes, the checkpoint {state['num_classes']}",
                "evaluate on data with the classes the model was trained on",
            )
        saved_names = state.get("class_names")
        if saved_names and list(loader.class_names) != list(saved_names):
            raise DataError(
                f"{path}: class names differ from the checkpoint's ({list(loader.class_names)[:3]}... vs {saved_names[:3]}...)",
                "use data exported with the same classes",
            )
        model = build_model(config, state["num_classes"])
        weights = state["model"]
        if use_ema and state.get("ema"):
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        load_weights(model, weights, checkpoint)
        model.to(rt.device).to(memory_format=_memory_format(config))
        out = val_loop(model, loader, rt, channels_last=config.loop.channels_last)
        out["num_samples"] = float(loader.num_samples)
        return out
