"""The CPU fusion pass over a converted model: applied by the conversion and by deploy building,
no state-dict change, the plain ops' outputs, idempotent, and train-time modules left alone."""
from __future__ import annotations

import pytest
import torch
from conftest import perturb_params, randomize_bn
from torch import nn

import backbones
from backbones import max_relative_error, reparameterize_model
from backbones.deploy.cpu_fusion import FUSED_BLOCKS, FusedConvAct, fuse_for_cpu
from backbones.deploy.fused_conv import fusion, fusion_enabled
from backbones.layers.convbn import ConvBN
from backbones.layers.merged_conv import MergedConvBlock

MODELS = ["resnet18_tiny", "repmlp_res_tiny", "repmlp_res_light_tiny", "repvgg_a0_tiny", "mobileone_s0_tiny"]
FUSED_CLASSES = set(FUSED_BLOCKS.values())


def conv_units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (ConvBN, MergedConvBlock))]


def unit_conv(unit: nn.Module) -> nn.Conv2d:
    return unit.conv if isinstance(unit, ConvBN) else unit.reparam_conv


def assert_fused(model: nn.Module) -> None:
    """Every deploy conv unit runs a FusedConvAct; every known residual block is its fused counterpart."""
    units = conv_units(model)
    assert units and all(u.deploy and isinstance(unit_conv(u), FusedConvAct) for u in units)
    assert all(isinstance(u.act, nn.Identity) for u in units)  # the ReLU moved into the fused conv
    residual = [m for m in model.modules() if isinstance(m, tuple(FUSED_BLOCKS))]
    assert all(type(m) in FUSED_CLASSES for m in residual)


def assert_not_fused(model: nn.Module) -> None:
    assert not any(isinstance(m, FusedConvAct) or type(m) in FUSED_CLASSES for m in model.modules())


def trained(name: str) -> nn.Module:
    torch.manual_seed(0)
    return perturb_params(randomize_bn(backbones.create(name))).eval()


@pytest.mark.parametrize("name", MODELS)
def test_conversion_and_deploy_building_apply_the_pass(name):
    model = trained(name)
    converted = reparameterize_model(model)
    built = backbones.create(name, deploy=True)
    assert_fused(converted)
    assert_fused(built)
    if name.startswith(("resnet", "repmlp")):  # these end their blocks in a residual add
        assert any(type(m) in FUSED_CLASSES for m in converted.modules())
    assert_not_fused(model)  # the train-time model is not touched (the conversion copies it)
    assert_not_fused(reparameterize_model(model, fuse=False))
    assert_not_fused(fuse_for_cpu(model))  # train-time modules have nothing to fuse
    # a deploy checkpoint loads strictly into the model built for it
    built.load_state_dict(converted.state_dict())


@pytest.mark.parametrize("name", MODELS)
def test_pass_changes_no_key_shape_or_parameter_and_gives_the_plain_outputs(name):
    model = trained(name)
    plain = reparameterize_model(model, fuse=False)
    before = plain.state_dict(keep_vars=True)
    x = torch.randn(2, 3, *model.img_size)
    with torch.inference_mode():
        expected = plain(x)
    fused = fuse_for_cpu(plain)
    after = fused.state_dict(keep_vars=True)
    assert fused is plain
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the same Parameters and buffers, not copies
    with torch.inference_mode():
        out = fused(x)
        with fusion(False):
            unfused = fused(x)
        train_form = model(x)
    assert max_relative_error(expected, out) <= 1e-5  # float32 sums in another order, over a whole network
    assert torch.equal(expected, unfused)  # switched off, the fused modules run exactly the plain ops
    assert max_relative_error(train_form, out) <= 1e-4


def test_pass_is_idempotent():
    fused = reparameterize_model(trained("repmlp_res_tiny"))
    modules = dict(fused.named_modules())
    types = {k: type(m) for k, m in modules.items()}
    assert fuse_for_cpu(fused) is fused
    again = dict(fused.named_modules())
    assert again.keys() == modules.keys() and all(again[k] is modules[k] for k in modules)
    assert {k: type(m) for k, m in again.items()} == types
    # converting a fused model again: a copy, still fused once (no FusedConvAct inside a FusedConvAct)
    twice = reparameterize_model(fused)
    assert_fused(twice)
    assert not any(isinstance(c, FusedConvAct) for m in twice.modules() if isinstance(m, FusedConvAct)
                   for c in m.children())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(fused(x), twice(x))


def test_fused_deploy_model_backpropagates_like_the_plain_one():
    """Autograd takes the plain ops: the same gradients as the unfused deploy model."""
    model = trained("resnet18_tiny")
    plain = reparameterize_model(model, fuse=False)
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, *model.img_size)
    for m in (plain, fused):
        m(x).square().mean().backward()
    grads = {k: p.grad for k, p in plain.named_parameters()}
    assert all(g is not None for g in grads.values())
    for k, p in fused.named_parameters():
        assert max_relative_error(grads[k], p.grad) <= 1e-5, k


@pytest.mark.skipif(not fusion_enabled(), reason="this torch build has no oneDNN fused conv")
def test_fused_conv_act_takes_the_conv_and_its_activation():
    conv = nn.Conv2d(4, 8, 3, 2, padding=1, dilation=1, groups=2, padding_mode="zeros").eval()
    relu = nn.ReLU(inplace=True)
    fused = FusedConvAct(conv, relu)
    assert fused.weight is conv.weight and fused.bias is conv.bias and fused.act is relu
    assert list(fused.state_dict()) == ["weight", "bias"]
    assert (fused.stride, fused.padding, fused.groups) == (conv.stride, conv.padding, conv.groups)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert max_relative_error(torch.relu(conv(x)), fused(x)) <= 1e-6
        conv.weight.mul_(-1)  # an in-place write to the shared weight repacks it
        assert max_relative_error(torch.relu(conv(x)), fused(x)) <= 1e-6
