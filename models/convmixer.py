"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, arXiv:2201.09792) with a kernel design space.

The layout and state-dict keys are timm's (`timm.models.convmixer.ConvMixer`), so its checkpoints
load with `strict=True` whenever every block uses a single kernel. On top of the paper:
per-block kernel sizes, mixed kernels within a block (MixConv-style channel groups), stage
schedules, stochastic depth on the residual branch, and channels_last weights by default.

File order (timm's): blocks -> model class -> builder -> variants.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from cmx.core.config import CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from cmx.core.errors import ModelError
from cmx.models.registry import ModelCfg, register_model

__all__ = ["ConvMixer", "MixedDepthwiseConv2d", "build_convmixer", "resolve_kernel_sizes"]

# int: one kernel for every block; list: one entry per block, an entry that is itself a list mixes
# kernels inside that block; list of {blocks: n, kernel_size: k} mappings: a stage schedule.
KernelSize = Union[int, Sequence[Union[int, Sequence[int]]], Sequence[Mapping[str, Any]]]  # noqa: UP007

ACT_LAYERS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
GLOBAL_POOLS = ("avg", "max")


# ----------------------------------------------------------------------------- kernel specs


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _odd_kernel(k: Any, where: str) -> int:
    if not _is_int(k):
        raise ModelError(f"{where}: expected an odd int >= 1, got {k!r}", "e.g. kernel_size=9")
    if k < 1 or k % 2 == 0:
        raise ModelError(
            f"{where}: kernel {k} must be odd and >= 1",
            "padding='same' is symmetric only for odd kernels (3, 5, 7, 9, ...)",
        )
    return int(k)


def _block_kernels(entry: Any, where: str, dim: int) -> tuple[int, ...]:
    """One block's kernel(s): (k,) for a plain depthwise conv, (k1, k2, ...) for mixed kernels."""
    if isinstance(entry, Mapping):
        raise ModelError(f"{where}: a stage mapping cannot be mixed with per-block entries")
    if not isinstance(entry, Sequence) or isinstance(entry, str):
        return (_odd_kernel(entry, where),)
    if len(entry) == 0:
        raise ModelError(f"{where}: empty mixed-kernel list", "e.g. [3, 5, 7, 9]")
    kernels = tuple(_odd_kernel(k, f"{where}[{j}]") for j, k in enumerate(entry))
    if len(kernels) > 1 and dim % len(kernels):
        raise ModelError(
            f"{where}: dim={dim} cannot be split evenly into {len(kernels)} mixed-kernel groups",
            f"use a dim divisible by {len(kernels)}, or fewer kernels",
        )
    return kernels[:1] if len(kernels) == 1 else kernels


def resolve_kernel_sizes(kernel_size: KernelSize, depth: int, dim: int) -> list[tuple[int, ...]]:
    """Per-block kernel tuples (length > 1 means mixed kernels) from any accepted spec."""
    _check_int("depth", depth, 1)
    if isinstance(kernel_size, Mapping):
        raise ModelError(
            "kernel_size: a single mapping is not a schedule",
            "use a list: [{blocks: 4, kernel_size: 5}, {blocks: 4, kernel_size: 9}]",
        )
    if not isinstance(kernel_size, Sequence) or isinstance(kernel_size, str):
        return [(_odd_kernel(kernel_size, "kernel_size"),)] * depth
    if len(kernel_size) > 0 and all(isinstance(s, Mapping) for s in kernel_size):
        return _resolve_stages(kernel_size, depth, dim)  # type: ignore[arg-type]
    if len(kernel_size) != depth:
        raise ModelError(
            f"kernel_size: list has {len(kernel_size)} entries but depth is {depth}",
            "give one entry per block, an int for all blocks, or a stage schedule",
        )
    return [_block_kernels(e, f"kernel_size[{i}]", dim) for i, e in enumerate(kernel_size)]


def _resolve_stages(stages: Sequence[Mapping[str, Any]], depth: int, dim: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for i, stage in enumerate(stages):
        where = f"kernel_size[{i}]"
        extra = set(stage) - {"blocks", "kernel_size"}
        if extra or "blocks" not in stage or "kernel_size" not in stage:
            raise ModelError(
                f"{where}: a stage needs exactly the keys 'blocks' and 'kernel_size', got {sorted(stage)}",
                "e.g. {blocks: 4, kernel_size: 7}",
            )
        n = stage["blocks"]
        n = _check_int(f"{where}.blocks", n, 1)
        out += [_block_kernels(stage["kernel_size"], f"{where}.kernel_size", dim)] * n
    if len(out) != depth:
        raise ModelError(
            f"kernel_size: stage blocks sum to {len(out)} but depth is {depth}",
            "make the stages' 'blocks' add up to depth",
        )
    return out


def _plain(spec: Any) -> Any:
    """A JSON/YAML-friendly deep copy of a kernel spec (tuples become lists)."""
    if isinstance(spec, Mapping):
        return {k: _plain(v) for k, v in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [_plain(v) for v in spec]
    return int(spec) if _is_int(spec) else spec


# ----------------------------------------------------------------------------- blocks


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016); survivors are scaled by 1/keep, as in timm."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Residual(nn.Module):
    """`x + drop_path(fn(x))`; only `fn` holds parameters, so state-dict keys match timm's."""

    def __init__(self, fn: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.fn(x)) + x


class MixedDepthwiseConv2d(nn.Module):
    """Depthwise conv whose equal channel groups use their own kernel (MixConv, Tan & Le 2019)."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        self.kernel_sizes = tuple(kernel_sizes)
        self.split = dim // len(self.kernel_sizes)
        self.convs = nn.ModuleList(
            nn.Conv2d(self.split, self.split, k, groups=self.split, padding="same") for k in self.kernel_sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.split, dim=1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], dim=1)


def depthwise_conv(dim: int, kernels: tuple[int, ...]) -> nn.Module:
    """The spatial mixing conv of one block: plain depthwise (timm keys) or mixed kernels."""
    if len(kernels) == 1:
        return nn.Conv2d(dim, dim, kernels[0], groups=dim, padding="same")
    return MixedDepthwiseConv2d(dim, kernels)


# ----------------------------------------------------------------------------- model


class ConvMixer(nn.Module):
    """ConvMixer: patch-embedding stem, `depth` depthwise/pointwise mixing blocks, pooled linear head."""

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: KernelSize = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        act_layer: str = "gelu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        dim = _check_int("dim", dim, 1)
        depth = _check_int("depth", depth, 1)
        patch_size = _check_int("patch_size", patch_size, 1)
        in_chans = _check_int("in_chans", in_chans, 1)
        num_classes = _check_int("num_classes", num_classes, 0)
        if not isinstance(act_layer, str) or act_layer not in ACT_LAYERS:
            raise ModelError(f"act_layer: unknown activation {act_layer!r}", f"one of {', '.join(ACT_LAYERS)}")
        for arg, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
                raise ModelError(f"{arg} must be in [0, 1), got {rate!r}")
        _check_pool(global_pool)
        self.kernel_sizes = resolve_kernel_sizes(kernel_size, depth, dim)

        # Everything needed to rebuild this model (checkpoints save it; `ConvMixer(**arch_config)`).
        self.arch_config: dict[str, Any] = {
            "dim": dim,
            "depth": depth,
            "kernel_size": _plain(kernel_size),
            "patch_size": patch_size,
            "in_chans": in_chans,
            "num_classes": num_classes,
            "act_layer": act_layer,
            "drop_rate": drop_rate,
            "drop_path_rate": drop_path_rate,
            "global_pool": global_pool,
        }
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = dim
        self.global_pool = global_pool
        self.default_cfg: dict[str, Any] = {
            "input_size": (in_chans, 224, 224),
            "num_classes": num_classes,
            "first_conv": "stem.0",
            "classifier": "head",
        }
        self.pretrained_cfg = self.default_cfg

        act = ACT_LAYERS[act_layer]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim)
        )
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    Residual(nn.Sequential(depthwise_conv(dim, k), act(), nn.BatchNorm2d(dim)), dpr[i]),
                    nn.Conv2d(dim, dim, kernel_size=1),
                    act(),
                    nn.BatchNorm2d(dim),
                )
                for i, k in enumerate(self.kernel_sizes)
            ]
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if channels_last:
            # Measured (2-core Xeon, ConvMixer-256/8 at 32 px, batch 128): one training step is ~2x
            # faster with channels_last weights; convs then emit channels_last for any input.
            self.to(memory_format=torch.channels_last)

    def validate_input_size(self, height: int, width: int) -> None:
        """Raise ModelError if an image of this size cannot be cut into at least one patch."""
        if height < self.patch_size or width < self.patch_size:
            raise ModelError(
                f"patch_size={self.patch_size} is larger than the input image {height}x{width}",
                "use a smaller patch_size or a larger resolution",
            )

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for `num_classes` (0: no head, features only)."""
        _check_int("num_classes", num_classes, 0)
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = self.arch_config["global_pool"] = global_pool
        ref = self.stem[0].weight
        self.num_classes = self.arch_config["num_classes"] = num_classes
        self.default_cfg["num_classes"] = num_classes
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and mixing blocks: (N, C, H, W) -> (N, dim, H // patch, W // patch)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ModelError(
                f"expected input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}",
                "in_chans must match the images' channels",
            )
        self.validate_input_size(x.shape[-2], x.shape[-1])
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and (unless pre_logits) the linear classifier."""
        x = x.mean((2, 3)) if self.global_pool == "avg" else x.amax((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_int(arg: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ModelError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_pool(global_pool: Any) -> None:
    if not isinstance(global_pool, str) or global_pool not in GLOBAL_POOLS:
        raise ModelError(f"global_pool: unknown pooling {global_pool!r}", f"one of {', '.join(GLOBAL_POOLS)}")


# ----------------------------------------------------------------------------- builder


def constructor_args() -> list[str]:
    """Keyword arguments ConvMixer accepts (what `create_model` overrides may name)."""
    return [p for p in inspect.signature(ConvMixer.__init__).parameters if p != "self"]


def build_convmixer(name: str, cfg: ModelCfg, **overrides: Any) -> ConvMixer:
    """Build variant `name` from its config; unknown override keys are a ModelError."""
    known = constructor_args()
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known arguments: {', '.join(known)}"
            raise ModelError(f"{name}: unknown argument {key!r}", hint)
    model = ConvMixer(**{**cfg.arch, **overrides})
    model.default_cfg = {
        **cfg.default_cfg(name),
        "input_size": (model.in_chans, cfg.input_size, cfg.input_size),
        "num_classes": model.num_classes,
    }
    model.pretrained_cfg = model.default_cfg
    return model


# ----------------------------------------------------------------------------- variants


@register_model
def convmixer_1536_20() -> ModelCfg:
    """ImageNet ConvMixer-1536/20 (k9, p7, GELU): 51.6M params, 81.37% top-1 in the paper."""
    return ModelCfg(dict(dim=1536, depth=20, kernel_size=9, patch_size=7), note="81.37% IN-1k")


@register_model
def convmixer_768_32() -> ModelCfg:
    """ImageNet ConvMixer-768/32 (k7, p7, ReLU): 21.1M params, 80.16% top-1 in the paper."""
    return ModelCfg(dict(dim=768, depth=32, kernel_size=7, patch_size=7, act_layer="relu"), note="80.16% IN-1k")


@register_model
def convmixer_1024_20_ks9_p14() -> ModelCfg:
    """ImageNet ConvMixer-1024/20 (k9, p14, GELU): 24.4M params, 76.94% top-1 in the paper."""
    return ModelCfg(dict(dim=1024, depth=20, kernel_size=9, patch_size=14), note="76.94% IN-1k")


def _cifar(**arch: Any) -> ModelCfg:
    return ModelCfg({"num_classes": 10, **arch}, 32, CIFAR10_MEAN, CIFAR10_STD, crop_pct=1.0)


@register_model
def convmixer_256_8_ks5_p2() -> ModelCfg:
    """CIFAR-10 ConvMixer-256/8 (k5, p2): 92.5% in 25 epochs, >94% in 100 (paper)."""
    return _cifar(dim=256, depth=8, kernel_size=5, patch_size=2)


@register_model
def convmixer_256_16_ks9_p1() -> ModelCfg:
    """CIFAR-10 ConvMixer-256/16 (k9, p1): no downsampling, 16x the mixing cost of p2/depth 8."""
    return _cifar(dim=256, depth=16, kernel_size=9, patch_size=1)


@register_model
def convmixer_256_8_mix3579_p2() -> ModelCfg:
    """CIFAR-10 256/8, p2, every block mixes kernels 3/5/7/9 over four 64-channel groups."""
    return _cifar(dim=256, depth=8, kernel_size=[[3, 5, 7, 9]] * 8, patch_size=2)


@register_model
def convmixer_256_8_ks3to9_p2() -> ModelCfg:
    """CIFAR-10 256/8, p2, stage schedule: kernels 3, 5, 7, 9 for two blocks each."""
    stages = [{"blocks": 2, "kernel_size": k} for k in (3, 5, 7, 9)]
    return _cifar(dim=256, depth=8, kernel_size=stages, patch_size=2)


@register_model
def convmixer_128_4_ks5_p2() -> ModelCfg:
    """Fashion-MNIST (28 px, grey images repeated to 3 channels) ConvMixer-128/4, k5, p2."""
    arch = dict(dim=128, depth=4, kernel_size=5, patch_size=2, num_classes=10)
    return ModelCfg(arch, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, crop_pct=1.0)


@register_model
def convmixer_tiny() -> ModelCfg:
    """Tiny CPU demo model: dim 64, depth 4, k5, p2, 32 px."""
    return _cifar(dim=64, depth=4, kernel_size=5, patch_size=2)


@register_model
def convmixer_nano() -> ModelCfg:
    """Smallest model, for tests: dim 16, depth 2, k3, p2, 32 px."""
    return _cifar(dim=16, depth=2, kernel_size=3, patch_size=2)
