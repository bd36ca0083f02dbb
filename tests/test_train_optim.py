"""Optimisers and weight-decay groups chosen by module type, never by parameter name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmx.core.config import OptimConfig
from cmx.pipelines.optim import create_optimizer, param_groups


class Tricky(nn.Module):
    """Names that would fool a substring rule: a conv called `norm`, a BN called `fc`, a weight
    called `bias_gain`, a bias-free conv and a LayerNorm without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Conv2d(3, 4, 3)  # weight decays, bias does not
        self.fc = nn.BatchNorm2d(4)  # no decay at all
        self.proj = nn.Conv2d(4, 4, 1, bias=False)  # decays
        self.ln = nn.LayerNorm(4, bias=False)  # no decay
        self.gn = nn.GroupNorm(2, 4)  # no decay
        self.bias_gain = nn.Parameter(torch.ones(4, 4))  # a matrix: decays
        self.head = nn.Linear(4, 2)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_by_module_type() -> None:
    m = Tricky()
    decay, no_decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([m.norm.weight, m.proj.weight, m.bias_gain, m.head.weight])
    assert _ids(no_decay["params"]) == _ids(
        [m.norm.bias, m.fc.weight, m.fc.bias, m.ln.weight, m.gn.weight, m.gn.bias, m.head.bias]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_frozen_and_shared_parameters_are_counted_once() -> None:
    m = Tricky()
    m.head.weight.requires_grad_(False)
    m.tied = nn.Linear(4, 4)
    m.tied.weight = m.proj.weight  # a weight shared by two modules
    shared = nn.Linear(4, 4)
    m.a, m.b = shared, shared  # a module registered twice
    groups = param_groups(m, 0.1)
    flat = [id(p) for g in groups for p in g["params"]]
    assert len(flat) == len(set(flat))
    assert id(m.head.weight) not in flat


def test_timm_convmixer_norms_and_biases_skip_decay() -> None:
    from timm.models.convmixer import ConvMixer

    m = ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=10)
    decay, no_decay = param_groups(m, 0.01)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert _ids(p for bn in bns for p in bn.parameters()) <= _ids(no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])  # in ConvMixer every 1-D param is a bias/BN


@pytest.mark.parametrize(
    ("cfg", "cls", "checks"),
    [
        (OptimConfig(name="adamw", lr=0.01, eps=1e-3), torch.optim.AdamW, {"eps": 1e-3}),
        (OptimConfig(name="adam", lr=1e-3), torch.optim.Adam, {"lr": 1e-3}),
        (
            OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True),
            torch.optim.SGD,
            {"momentum": 0.9, "nesterov": True},
        ),
        (OptimConfig(name="sgd", lr=0.1, momentum=0.0, nesterov=True), torch.optim.SGD, {"nesterov": False}),
    ],
)
def test_create_optimizer(cfg: OptimConfig, cls: type, checks: dict) -> None:
    m = Tricky()
    opt = create_optimizer(m, cfg)
    assert type(opt) is cls
    for key, value in checks.items():
        assert opt.param_groups[0][key] == value
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]
    loss = m.head(m.bias_gain).sum()
    loss.backward()
    opt.step()  # runs
