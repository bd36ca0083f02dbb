"""The ConvMixer family (timm-compatible weights), its registry, and cost counters."""

from cmx.models.convmixer import ConvMixer, resolve_kernel_sizes
from cmx.models.factory import create_model
from cmx.models.flops import count_flops, count_params
from cmx.models.registry import (
    ModelCfg,
    get_model_cfg,
    is_model,
    list_models,
    register_model,
)

__all__ = [
    "ConvMixer",
    "ModelCfg",
    "count_flops",
    "count_params",
    "create_model",
    "get_model_cfg",
    "is_model",
    "list_models",
    "register_model",
    "resolve_kernel_sizes",
]
