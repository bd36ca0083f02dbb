"""`create_model(name, **overrides)`: the one entry point that builds a registered variant (as timm's)."""

from __future__ import annotations

import inspect
from typing import Any

from cmx.models.convmixer import ConvMixer, build_convmixer
from cmx.models.registry import get_model_cfg, is_model


def create_model(name: str, **overrides: Any) -> ConvMixer:
    """Build a registered variant; `overrides` replace its ConvMixer constructor arguments."""
    return build_convmixer(name, get_model_cfg(name), **overrides)


def variant_arguments(name: str) -> dict[str, Any]:
    """The constructor arguments variant `name` is built with: ConvMixer's defaults, then the variant's.

    An unknown name gives {} (the config check names it); sweep constraints read fields left at None here.
    """
    params = inspect.signature(ConvMixer.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **get_model_cfg(name).arch} if is_model(name) else {}
