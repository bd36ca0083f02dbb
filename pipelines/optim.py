"""Optimisers, with weight decay kept off norm layers and biases (chosen by module type)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmx.core.config import OptimConfig

# Every normalisation layer torch ships: BatchNorm*/InstanceNorm*/SyncBatchNorm share _NormBase.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _is_norm(module: nn.Module) -> bool:
    """Torch norm layers, and timm's (LayerNorm2d, BatchNormAct2d, ... subclass torch's)."""
    return isinstance(module, NORM_TYPES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and norm-layer parameters plus every module's `bias`.

    The choice walks modules and compares parameter identity, never names: a parameter named
    `bias_scale` or a conv called `norm_proj` is classified by what it is, not what it is called.
    """
    no_decay: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                no_decay[id(p)] = p
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            no_decay[id(bias)] = bias
    decay: list[nn.Parameter] = []
    skip: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (skip if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups


def create_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (the paper's), Adam, or SGD with momentum/nesterov, over `param_groups(model)`.

    Adam's `weight_decay` is L2 added to the gradient (torch semantics); AdamW's is decoupled.
    `fused=True` (CUDA only) runs the update as one kernel per parameter group.
    """
    groups = param_groups(model, cfg.weight_decay)
    extra: dict[str, Any] = {"fused": True} if fused else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        **extra,
    )
