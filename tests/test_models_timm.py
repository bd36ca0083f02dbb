"""timm parity: timm's ConvMixer checkpoints load strictly into cmx's and give the same logits and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer

from cmx.models import create_model


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine params, so eval mode is not an identity."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("name", ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"])
def test_timm_checkpoint_loads_strict_and_matches(name: str) -> None:
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    _randomize_bn(ref)
    ours = create_model(name).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max().item()
    assert want.abs().max().item() > 1e-3  # the comparison is not between two near-zero tensors
    # ...and back: cmx weights load into timm.
    ref.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_train_step_math_equals_timm(act: str) -> None:
    """Same weights, same batch, train mode: logits, loss gradients and BN running stats agree."""
    torch.manual_seed(0)
    acts = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}
    ref = TimmConvMixer(dim=64, depth=3, kernel_size=5, patch_size=2, num_classes=10, act_layer=acts[act])
    ours = create_model("convmixer_tiny", depth=3, act_layer=act)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    outs = []
    for m in (ref, ours):
        out = m(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    ours_params = dict(ours.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(ours_params[n].grad, p.grad, atol=1e-4, rtol=1e-3, msg=n)
    ours_buffers = dict(ours.named_buffers())
    for n, b in ref.named_buffers():
        torch.testing.assert_close(ours_buffers[n], b, atol=1e-5, rtol=1e-4, msg=n)
