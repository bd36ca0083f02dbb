"""ConvMixer family: every registered variant trains a step; the design space; the registry; cost counters."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cmx.core.errors import ModelError
from cmx.models import (
    ConvMixer,
    ModelCfg,
    count_flops,
    count_params,
    create_model,
    get_model_cfg,
    list_models,
    register_model,
    resolve_kernel_sizes,
)
from cmx.models import registry as registry_module
from cmx.models.convmixer import MixedDepthwiseConv2d
from cmx.models.flops import traced_flops

IMAGENET_VARIANTS = {"convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"}


def _test_resolution(name: str) -> int:
    """The variant's own resolution when small; 4 patches across for the ImageNet ones (keeps CPU cost low)."""
    cfg = get_model_cfg(name)
    return cfg.input_size if cfg.input_size <= 32 else 4 * cfg.arch["patch_size"]


# ----------------------------------------------------------------------------- every variant


def test_registry_has_the_paper_and_small_variants() -> None:
    names = set(list_models())
    assert names >= IMAGENET_VARIANTS
    assert {"convmixer_256_8_ks5_p2", "convmixer_128_4_ks5_p2", "convmixer_tiny", "convmixer_nano"} <= names
    assert any(any(len(k) > 1 for k in resolve_kernel_sizes(**_ks(n))) for n in names), "a mixed-kernel variant"


def _ks(name: str) -> dict:
    a = get_model_cfg(name).arch
    return {"kernel_size": a.get("kernel_size", 9), "depth": a["depth"], "dim": a["dim"]}


@pytest.mark.parametrize("name", list_models())
def test_every_variant_trains_one_step_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    cfg = get_model_cfg(name)
    res = _test_resolution(name)
    x = torch.randn(2, model.in_chans, res, res)
    out = model(x)
    assert out.shape == (2, cfg.arch.get("num_classes", 1000))
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert model.default_cfg["input_size"] == (model.in_chans, cfg.input_size, cfg.input_size)
    assert model.default_cfg["num_classes"] == model.num_classes


@pytest.mark.parametrize("name", list_models())
def test_arch_config_rebuilds_the_same_model(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
        again = ConvMixer(**json.loads(json.dumps(model.arch_config)))  # JSON-safe, as saved in checkpoints
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert again.kernel_sizes == model.kernel_sizes


# ----------------------------------------------------------------------------- model interface


def test_timm_interface() -> None:
    model = create_model("convmixer_tiny").eval()
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 64, 16, 16)
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    assert model.get_classifier() is model.head
    model.reset_classifier(5)
    assert model(x).shape == (3, 5)
    assert model.arch_config["num_classes"] == 5 and model.default_cfg["num_classes"] == 5
    model.reset_classifier(0, global_pool="max")
    assert model(x).shape == (3, 64)
    assert torch.allclose(model(x), feats.amax((2, 3)), atol=1e-6)


def test_drop_path_is_on_the_residual_branch_and_train_only() -> None:
    torch.manual_seed(0)
    model = create_model("convmixer_tiny", drop_path_rate=0.5)
    rates = [b[0].drop_path.drop_prob if hasattr(b[0].drop_path, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])  # linear, 0 at the first block
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        outs = {tuple(model(x)[0].tolist()) for _ in range(6)}
    assert len(outs) > 1


def test_relu_and_silu_activations() -> None:
    for act, cls in (("relu", torch.nn.ReLU), ("silu", torch.nn.SiLU)):
        model = create_model("convmixer_nano", act_layer=act)
        assert isinstance(model.stem[1], cls) and isinstance(model.blocks[0][2], cls)
    assert isinstance(create_model("convmixer_768_32", dim=8, depth=1).stem[1], torch.nn.ReLU)


def test_channels_last_weights_by_default_and_optional() -> None:
    fast = create_model("convmixer_nano")
    plain = create_model("convmixer_nano", channels_last=False)
    assert fast.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.stem[0].weight.is_contiguous()
    assert "channels_last" not in fast.arch_config  # a runtime choice, not architecture


def test_fast_path_matches_reference_path_outputs_and_gradients() -> None:
    """channels_last (default) and NCHW give the same logits and gradients from the same weights."""
    torch.manual_seed(0)
    ref = create_model("convmixer_tiny", channels_last=False)
    fast = create_model("convmixer_tiny")
    fast.load_state_dict(ref.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    outs = []
    for m in (ref, fast):
        out = m(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    grads = dict(fast.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, atol=1e-4, rtol=1e-3, msg=n)


# ----------------------------------------------------------------------------- kernel design space


@pytest.mark.parametrize(
    ("spec", "depth", "expected"),
    [
        (5, 3, [(5,), (5,), (5,)]),
        ([3, 5, 7], 3, [(3,), (5,), (7,)]),
        ([[3, 5], 7, [9]], 3, [(3, 5), (7,), (9,)]),  # [9] is a plain kernel, not a mix
        ([{"blocks": 2, "kernel_size": 3}, {"blocks": 1, "kernel_size": [5, 7]}], 3, [(3,), (3,), (5, 7)]),
        ((3, (5, 7)), 2, [(3,), (5, 7)]),  # tuples from Python work too
    ],
)
def test_kernel_specs_resolve_per_block(spec: object, depth: int, expected: list) -> None:
    assert resolve_kernel_sizes(spec, depth, dim=16) == expected  # type: ignore[arg-type]


def test_mixed_kernels_split_channels_and_concatenate() -> None:
    torch.manual_seed(0)
    conv = MixedDepthwiseConv2d(12, [3, 5, 7])
    x = torch.randn(2, 12, 9, 9)
    parts = [
        F.conv2d(x[:, 4 * i : 4 * i + 4], c.weight, c.bias, padding=k // 2, groups=4)
        for i, (c, k) in enumerate(zip(conv.convs, (3, 5, 7), strict=True))
    ]
    torch.testing.assert_close(conv(x), torch.cat(parts, 1))


def test_mixed_block_of_equal_kernels_equals_one_depthwise_conv() -> None:
    torch.manual_seed(0)
    mixed = MixedDepthwiseConv2d(8, [5, 5])
    plain = torch.nn.Conv2d(8, 8, 5, groups=8, padding="same")
    with torch.no_grad():
        plain.weight.copy_(torch.cat([c.weight for c in mixed.convs]))
        plain.bias.copy_(torch.cat([c.bias for c in mixed.convs]))
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(mixed(x), plain(x))


def test_mixed_variant_params_and_keys() -> None:
    model = create_model("convmixer_256_8_mix3579_p2")
    assert model.kernel_sizes == [(3, 5, 7, 9)] * 8
    block0 = model.blocks[0][0].fn[0]
    assert isinstance(block0, MixedDepthwiseConv2d)
    assert [c.weight.shape for c in block0.convs] == [(64, 1, k, k) for k in (3, 5, 7, 9)]
    assert "blocks.0.0.fn.0.convs.3.weight" in model.state_dict()
    dw = sum(64 * (k * k + 1) for k in (3, 5, 7, 9))
    plain = count_params("convmixer_256_8_ks5_p2") - 8 * 256 * (25 + 1)
    assert count_params(model) == plain + 8 * dw


def test_per_block_list_without_mixing_keeps_timm_keys() -> None:
    plain = create_model("convmixer_nano", channels_last=False).state_dict()
    listed = create_model("convmixer_nano", kernel_size=[3, [3]]).state_dict()
    staged = create_model("convmixer_nano", kernel_size=[{"blocks": 2, "kernel_size": 3}]).state_dict()
    assert list(plain) == list(listed) == list(staged)


# ----------------------------------------------------------------------------- invalid architectures


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth": 0}, "depth must be an int >= 1, got 0"),
        ({"depth": 3, "kernel_size": [3, 5]}, "kernel_size: list has 2 entries but depth is 3"),
        (
            {"depth": 4, "kernel_size": [{"blocks": 1, "kernel_size": 3}, {"blocks": 2, "kernel_size": 5}]},
            "stage blocks sum to 3 but depth is 4",
        ),
        ({"kernel_size": [{"blocks": 2, "kernel": 3}]}, "kernel_size[0]: a stage needs exactly the keys"),
        ({"kernel_size": [{"blocks": 0, "kernel_size": 3}]}, "kernel_size[0].blocks must be an int >= 1"),
        ({"kernel_size": {"blocks": 2, "kernel_size": 3}}, "kernel_size: a single mapping is not a schedule"),
        ({"dim": 10, "kernel_size": [[3, 5, 7], 3]}, "kernel_size[0]: dim=10 cannot be split evenly into 3"),
        ({"kernel_size": 4}, "kernel_size: kernel 4 must be odd and >= 1"),
        ({"kernel_size": 0}, "kernel_size: kernel 0 must be odd"),
        ({"kernel_size": -3}, "kernel_size: kernel -3 must be odd"),
        ({"kernel_size": [3, [5, 6]]}, "kernel_size[1][1]: kernel 6 must be odd"),
        ({"kernel_size": [3, []]}, "kernel_size[1]: empty mixed-kernel list"),
        ({"kernel_size": "5"}, "kernel_size: expected an odd int"),
        ({"patch_size": 0}, "patch_size must be an int >= 1, got 0"),
        ({"dim": 0}, "dim must be an int >= 1"),
        ({"act_layer": "tanh"}, "act_layer: unknown activation 'tanh'"),
        ({"drop_path_rate": 1.0}, "drop_path_rate must be in [0, 1)"),
        ({"global_pool": "token"}, "global_pool: unknown pooling"),
    ],
)
def test_invalid_architectures_raise_model_error(overrides: dict, message: str) -> None:
    with pytest.raises(ModelError) as e:
        create_model("convmixer_nano", **overrides)
    assert message in e.value.one_line()


def test_patch_larger_than_image_names_both() -> None:
    model = create_model("convmixer_nano", patch_size=7)
    with pytest.raises(ModelError, match=r"patch_size=7 is larger than the input image 6x8"):
        model.validate_input_size(6, 8)
    model.validate_input_size(7, 7)
    with pytest.raises(ModelError, match="patch_size=7.*5x5"):
        model(torch.randn(1, 3, 5, 5))


def test_wrong_channel_count_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"expected input of shape \(N, 3, H, W\)"):
        create_model("convmixer_nano")(torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------- registry


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ModelError) as e:
        create_model("convmixer_256_8_ks5_p3")
    assert "unknown model 'convmixer_256_8_ks5_p3'" in e.value.message
    assert "did you mean 'convmixer_256_8_ks5_p2'" in (e.value.hint or "")


def test_unknown_override_is_named() -> None:
    with pytest.raises(ModelError) as e:
        create_model("convmixer_nano", kernel=5)
    assert "unknown argument 'kernel'" in e.value.message
    assert "kernel_size" in (e.value.hint or "")


def test_variant_config_without_building() -> None:
    cfg = get_model_cfg("convmixer_768_32")
    assert isinstance(cfg, ModelCfg)
    assert cfg.arch == {"dim": 768, "depth": 32, "kernel_size": 7, "patch_size": 7, "act_layer": "relu"}
    assert cfg.input_size == 224
    small = get_model_cfg("convmixer_256_8_ks5_p2")
    assert (small.input_size, small.arch["num_classes"]) == (32, 10)
    assert get_model_cfg("convmixer_128_4_ks5_p2").input_size == 28
    assert list_models("convmixer_256_*") == sorted(n for n in list_models() if n.startswith("convmixer_256_"))


def test_register_a_custom_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_VARIANTS", dict(registry_module._VARIANTS))

    @register_model
    def convmixer_test_32_2() -> ModelCfg:
        return ModelCfg(dict(dim=32, depth=2, kernel_size=[3, [3, 5]], patch_size=4, num_classes=3), 16)

    assert "convmixer_test_32_2" in list_models()
    model = create_model("convmixer_test_32_2")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert model.default_cfg["input_size"] == (3, 16, 16)

    def convmixer_nano() -> ModelCfg:  # same name as a registered variant
        return ModelCfg({"dim": 8, "depth": 1})

    with pytest.raises(ModelError, match="already registered"):
        register_model(convmixer_nano)


# ----------------------------------------------------------------------------- cost counters


def test_paper_param_counts() -> None:
    assert round(count_params("convmixer_1536_20") / 1e6, 1) == 51.6
    assert round(count_params("convmixer_768_32") / 1e6, 1) == 21.1
    assert round(count_params("convmixer_1024_20_ks9_p14") / 1e6, 1) == 24.4


def test_flops_match_the_formula() -> None:
    # nano at 32 px: 16x16 tokens, dim 16, k3, p2; 2 FLOPs per multiply-add of convs and linear.
    tokens, dim, k, p, depth = 16 * 16, 16, 3, 2, 2
    macs = tokens * dim * 3 * p * p + depth * tokens * (dim * k * k + dim * dim) + dim * 10
    assert count_flops("convmixer_nano") == 2 * macs
    assert count_flops("convmixer_nano", 64) == count_flops("convmixer_nano", (3, 64, 64))
    assert count_flops("convmixer_nano", batch_size=2) == 4 * macs


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        ({}, (3, 32, 32)),
        ({"kernel_size": [[3, 5], 5, 7, 9]}, (3, 30, 33)),  # mixed kernels; sides not multiples of the patch
        ({"kernel_size": [{"blocks": 2, "kernel_size": 3}, {"blocks": 2, "kernel_size": 7}]}, (3, 28, 28)),
        ({"patch_size": 7, "num_classes": 0}, (3, 224, 160)),
        ({"in_chans": 1, "dim": 48}, (1, 28, 28)),
    ],
)
def test_closed_form_flops_equal_torchs_flop_counter(overrides: dict, size: tuple[int, int, int]) -> None:
    """The closed form a trial uses (no tracing) counts exactly what FlopCounterMode counts."""
    model = create_model("convmixer_tiny", **overrides)
    assert isinstance(model, ConvMixer)
    assert count_flops(model, size) == traced_flops(model, size, 224) > 0
    assert count_flops(model, size, batch_size=3) == traced_flops(model, size, 224, batch_size=3)


def test_flops_of_an_instance_leave_it_untouched() -> None:
    model = create_model("convmixer_tiny", kernel_size=[[3, 5], 5, 7, 9]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = count_flops(model, (3, 32, 32))
    assert flops == count_flops("convmixer_tiny", kernel_size=[[3, 5], 5, 7, 9])
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert count_params(model) == count_params("convmixer_tiny", kernel_size=[[3, 5], 5, 7, 9])
    # ImageNet default resolution, counted on the meta device (no 51.6M-parameter init).
    assert 100e9 < count_flops("convmixer_1536_20") < 105e9
