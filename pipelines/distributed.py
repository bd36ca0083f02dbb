"""torch.distributed helpers for data-parallel training. Whoever starts the workers (Ray Train,
torchrun) creates the process group; this module only asks it questions. No Ray here."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this node, from LOCAL_RANK (set by Ray Train and torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one that writes checkpoints, metrics files and progress."""
    return rank() == 0


def _reduce_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Reduce a dict of floats across ranks (`sum`, `max`, `min`, `mean`); identity when alone."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    reduce_op = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }[op]
    dist.all_reduce(t, op=reduce_op)
    if op == "mean":
        t /= world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is true on any rank (keeps ranks in lock-step)."""
    if not is_distributed():
        return flag
    return all_reduce({"flag": 1.0 if flag else 0.0}, "max")["flag"] > 0


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order ([obj] when alone)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if is_distributed():
        dist.barrier()
