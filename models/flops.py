"""Parameter and FLOP counts.

A ConvMixer's FLOPs come from its closed form (`convmixer_flops`, microseconds); other models are
traced with torch's FlopCounterMode on the meta device (~0.1 s, but ~1.5 s for the first trace in
a process: a cost every fresh sweep trial used to pay).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmx.models.convmixer import ConvMixer
from cmx.models.factory import create_model
from cmx.models.registry import get_model_cfg

InputSize = int | tuple[int, int] | tuple[int, int, int]


def _model(model_or_name: nn.Module | str, **overrides: Any) -> nn.Module:
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            return create_model(model_or_name, **overrides)
    if overrides:
        raise TypeError("overrides apply only when a model name is given")
    return model_or_name


def count_params(model_or_name: nn.Module | str, trainable_only: bool = False, **overrides: Any) -> int:
    """Number of parameters of a model, or of a registered variant (built on the meta device)."""
    model = _model(model_or_name, **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _chw(model: nn.Module, input_size: InputSize | None, default: int) -> tuple[int, int, int]:
    in_chans = getattr(model, "in_chans", 3)
    if input_size is None:
        return in_chans, default, default
    if isinstance(input_size, int):
        return in_chans, input_size, input_size
    if len(input_size) == 2:
        return (in_chans, *input_size)
    return tuple(input_size)  # type: ignore[return-value]


def count_flops(
    model_or_name: nn.Module | str,
    input_size: InputSize | None = None,
    batch_size: int = 1,
    **overrides: Any,
) -> int:
    """Forward FLOPs (2 per multiply-add, convs and linears) at `input_size` (default: the variant's).

    `input_size` is an int (square), (H, W) or (C, H, W). A ConvMixer instance is re-created from its
    `arch_config` on the meta device, so nothing is computed and the model itself is untouched.
    """
    name = model_or_name if isinstance(model_or_name, str) else None
    model = _model(model_or_name, **overrides)
    default = get_model_cfg(name).input_size if name else _default_res(model)
    if isinstance(model, ConvMixer):
        _, height, width = _chw(model, input_size, default)
        return batch_size * convmixer_flops(model, height, width)
    return traced_flops(model, input_size, default, batch_size)


def traced_flops(model: nn.Module, input_size: InputSize | None, default: int, batch_size: int = 1) -> int:
    """FLOPs counted by torch's FlopCounterMode over one forward pass (on the meta device for a ConvMixer)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton (0.15 s): only when tracing

    if isinstance(model, ConvMixer):
        with torch.device("meta"):
            model = ConvMixer(**model.arch_config)
    device = next(model.parameters()).device
    x = torch.empty(batch_size, *_chw(model, input_size, default), device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x) if device.type == "meta" else _eval_forward(model, x)
    return int(counter.get_total_flops())


def convmixer_flops(model: ConvMixer, height: int, width: int) -> int:
    """A ConvMixer's forward FLOPs for one image, counted as FlopCounterMode counts them (2 per
    multiply-add of each conv and linear; bias, norm, activation and pooling not counted)."""
    dim, patch = model.arch_config["dim"], model.patch_size
    if height < patch or width < patch:
        model.validate_input_size(height, width)
    positions = (height // patch) * (width // patch)
    stem = dim * model.in_chans * patch * patch
    blocks = 0
    for kernels in model.kernel_sizes:
        split = dim // len(kernels)  # mixed kernels: equal channel groups, one kernel each
        blocks += sum(split * k * k for k in kernels) + dim * dim  # depthwise, then pointwise
    head = dim * model.num_classes
    return 2 * ((stem + blocks) * positions + head)


def _default_res(model: nn.Module) -> int:
    cfg = getattr(model, "default_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _eval_forward(model: nn.Module, x: torch.Tensor) -> None:
    """Forward in eval mode without changing the caller's train/eval state."""
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        model.train(was_training)
