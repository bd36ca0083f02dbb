"""`create_model(name, **overrides)`: the one entry point that builds a registered variant (as timm's)."""

from __future__ import annotations

from typing import Any

from cmx.models.convmixer import ConvMixer, build_convmixer
from cmx.models.registry import get_model_cfg


def create_model(name: str, **overrides: Any) -> ConvMixer:
    """Build a registered variant; `overrides` replace its ConvMixer constructor arguments."""
    return build_convmixer(name, get_model_cfg(name), **overrides)
