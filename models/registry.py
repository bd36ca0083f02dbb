"""The model registry: variants are small functions that return their config; models are built on demand.

`@register_model` records a function returning a `ModelCfg`; `get_model_cfg(name)` reads a
variant's settings without building it (cheap: the CLI lists every variant this way), and
`cmx.models.factory.create_model(name, **overrides)` builds it. Mirrors timm's registry, minus pretrained downloads.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmx.core.config import IMAGENET_MEAN, IMAGENET_STD
from cmx.core.errors import ModelError


@dataclass(frozen=True)
class ModelCfg:
    """A variant: ConvMixer constructor arguments plus the input it was designed for."""

    arch: dict[str, Any]
    input_size: int = 224  # default square train/eval resolution, pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.96  # timm's eval crop for the ImageNet ConvMixers
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def default_cfg(self, name: str) -> dict[str, Any]:
        """timm-style `default_cfg` dict for this variant."""
        in_chans = self.arch.get("in_chans", 3)
        return {
            "architecture": name,
            "input_size": (in_chans, self.input_size, self.input_size),
            "num_classes": self.arch.get("num_classes", 1000),
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": "bicubic",
            "first_conv": "stem.0",
            "classifier": "head",
            **self.extra,
        }


_VARIANTS: dict[str, Callable[[], ModelCfg]] = {}


def register_model(fn: Callable[[], ModelCfg]) -> Callable[[], ModelCfg]:
    """Decorator: register a variant under its function name (duplicates are an error)."""
    name = fn.__name__
    if name in _VARIANTS and _VARIANTS[name] is not fn:
        raise ModelError(f"model {name!r} is already registered", "pick another function name")
    _VARIANTS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style pattern, sorted."""
    return sorted(n for n in _VARIANTS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    """Whether `name` is a registered variant."""
    return name in _VARIANTS


def get_model_cfg(name: str) -> ModelCfg:
    """A variant's config without building it; unknown names suggest the closest one."""
    fn = _VARIANTS.get(name)
    if fn is None:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else "see `cmx models list`"
        raise ModelError(f"unknown model {name!r}", hint)
    return fn()
