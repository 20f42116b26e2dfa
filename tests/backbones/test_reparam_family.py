"""The re-parameterization family, block by block: ACB, RepVGG, QARepVGG, DBB, OREPA, the large
kernel conv of RepLKNet and MobileOne, each over one matrix of geometries (in != out, strides,
groups up to depthwise, dilation, every padding mode, odd and non-square inputs)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import perturb_params, randomize_bn
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.overrides import TorchFunctionMode

from backbones import (
    OREPA,
    ACBlock,
    ConvGeometry,
    DiverseBranchBlock,
    MobileOneBlock,
    ReparamLargeKernelConv,
    RepVGGBlock,
    create,
    max_relative_error,
    model_relative_error,
    reparameterize_model,
)
from backbones.layers.conv_types import make_conv


def _geometry(k, s, g, d, mode):
    return ConvGeometry(k, stride=s, dilation=d, groups=g, padding_mode=mode)


BLOCKS = {
    "acb": lambda c, o, k, s, g, d, mode, deploy: ACBlock(c, o, _geometry(k, s, g, d, mode), deploy=deploy),
    "repvgg": lambda c, o, k, s, g, d, mode, deploy: RepVGGBlock(c, o, _geometry(k, s, g, d, mode), deploy=deploy),
    "qarepvgg": lambda c, o, k, s, g, d, mode, deploy: RepVGGBlock(c, o, _geometry(k, s, g, d, mode),
                                                                   quant_friendly=True, deploy=deploy),
    "dbb": lambda c, o, k, s, g, d, mode, deploy: DiverseBranchBlock(c, o, _geometry(k, s, g, d, mode), deploy=deploy),
    "orepa": lambda c, o, k, s, g, d, mode, deploy: OREPA(c, o, _geometry(k, s, g, d, mode), dw_multiplier=2,
                                                          deploy=deploy),
    "large_kernel": lambda c, o, k, s, g, d, mode, deploy: ReparamLargeKernelConv(
        c, o, _geometry(2 * k + 1, s, g, d, mode), small_kernel=k, deploy=deploy),
    "mobileone": lambda c, o, k, s, g, d, mode, deploy: MobileOneBlock(c, o, _geometry(k, s, g, d, mode),
                                                                       num_conv_branches=3, deploy=deploy),
}

GEOMETRIES = [
    # in, out, kernel, stride, groups, dilation, padding_mode, input (H, W)
    (4, 8, 3, 1, 1, 1, "zeros", (9, 7)),
    (8, 8, 3, 1, 2, 1, "zeros", (10, 11)),     # in == out: identity branches
    (8, 4, 3, 2, 2, 1, "zeros", (11, 10)),
    (6, 6, 5, 2, 6, 1, "zeros", (13, 9)),      # depthwise, stride 2
    (6, 6, 3, 1, 6, 1, "reflect", (7, 9)),
    (4, 6, 5, 1, 1, 1, "circular", (9, 12)),
    (5, 5, 3, 1, 1, 1, "replicate", (8, 6)),
    (4, 4, 3, 1, 1, 2, "zeros", (12, 13)),     # dilation
    (4, 6, 3, 2, 2, 2, "reflect", (15, 11)),
]
DILATION_UNSUPPORTED = {"dbb"}


def _randomized(block: nn.Module, seed: int = 0) -> nn.Module:
    return perturb_params(randomize_bn(block, seed), seed).eval()


def _geometry_id(g):
    c, o, k, s, groups, d, mode, size = g
    return f"{c}to{o}-k{k}-s{s}-g{groups}-d{d}-{mode}-{size[0]}x{size[1]}"


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_geometry_id)
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_block_equivalence_matrix(kind, geometry):
    c, o, k, s, g, d, mode, size = geometry
    make = BLOCKS[kind]
    if d > 1 and kind in DILATION_UNSUPPORTED:
        with pytest.raises(ValueError, match=f"dilation={d} is not supported"):
            make(c, o, k, s, g, d, mode, False)
        return
    train = _randomized(make(c, o, k, s, g, d, mode, False))
    x = torch.randn(2, c, *size)
    deploy = reparameterize_model(train)
    assert list(deploy.state_dict()) == ["reparam_conv.weight", "reparam_conv.bias"]
    assert model_relative_error(train, deploy, x) <= 1e-5

    train64 = copy.deepcopy(train).double()
    assert model_relative_error(train64, reparameterize_model(train64), x.double()) <= 1e-10

    # a repeated conversion, under every alias, changes nothing
    again = copy.deepcopy(deploy)
    again.switch_to_deploy()
    again.reparameterize()
    assert model_relative_error(deploy, again, x) == 0.0

    # deploy=True builds the same keys and shapes, loads strictly and computes the same outputs
    built = make(c, o, k, s, g, d, mode, True)
    assert {n: t.shape for n, t in built.state_dict().items()} == {n: t.shape for n, t in deploy.state_dict().items()}
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_equivalent_kernel_is_differentiable_and_channels_last(kind):
    """QAT and regularizers read ``get_equivalent_kernel_bias`` while training: gradients reach the branches."""
    block = _randomized(BLOCKS[kind](8, 8, 3, 1, 2, 1, "zeros", False))
    kernel, bias = block.get_equivalent_kernel_bias()
    (kernel.square().sum() + bias.sum()).backward()
    grads = [p.grad for p in block.parameters()]
    assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    x = torch.randn(2, 8, 9, 11).to(memory_format=torch.channels_last)
    assert model_relative_error(block, reparameterize_model(block), x) <= 1e-5


def test_large_kernel_31_with_5():
    """RepLKNet's configuration: a 31x31 depthwise conv with a parallel 5x5, on a map smaller than the kernel."""
    block = _randomized(ReparamLargeKernelConv(16, 16, ConvGeometry(31, groups=16), small_kernel=5))
    x = torch.randn(2, 16, 14, 19)
    deploy = reparameterize_model(block)
    assert deploy.reparam_conv.weight.shape == (16, 1, 31, 31)
    assert model_relative_error(block, deploy, x) <= 1e-5


def test_large_depthwise_kernel_runs_channels_last_on_cpu():
    """From 15x15 on, torch's NCHW CPU depthwise conv takes a path 40-50x slower than channels_last:
    the block runs in channels_last whatever its input's layout, with the same values, in both forms
    and for training (gradients reach the input and every branch)."""
    block = _randomized(ReparamLargeKernelConv(8, 8, ConvGeometry(17, groups=8), small_kernel=5))
    x = torch.randn(2, 8, 13, 18, requires_grad=True)
    block.train()
    out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    out.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
    block.eval()
    with torch.no_grad():
        expected = block.large(x) + block.small(x)  # the branches on the NCHW input, outside the block
        deploy = reparameterize_model(block)
        for form in (block, deploy):
            y = form(x)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert max_relative_error(expected, y) <= 1e-5
    small = ReparamLargeKernelConv(8, 8, ConvGeometry(13, groups=8), small_kernel=5)  # below the size: left as it comes
    assert small(torch.randn(1, 8, 9, 9)).is_contiguous()
    dense = ReparamLargeKernelConv(8, 8, ConvGeometry(17), small_kernel=5)  # not depthwise: left as it comes
    assert dense(torch.randn(1, 8, 9, 9)).is_contiguous()


def test_dbb_depthwise_and_internal_width():
    """Depthwise DBB has no 1x1 branch, a pool-only average branch and a doubled inner width."""
    dw = DiverseBranchBlock(6, 6, ConvGeometry(3, groups=6))
    assert not hasattr(dw, "pointwise") and not hasattr(dw, "avg_conv") and dw.internal_channels == 12
    wide = _randomized(DiverseBranchBlock(4, 6, internal_channels=10))
    assert not wide.identity_based
    x = torch.randn(2, 4, 9, 9)
    assert model_relative_error(wide, reparameterize_model(wide), x) <= 1e-5


def test_orepa_trains_one_conv_and_one_bn():
    """OREPA's point: whatever its branches, the forward runs one conv and one BN."""
    block = OREPA(8, 8, ConvGeometry(3, groups=2)).train()
    modules, functions = [], []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            functions.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: modules.append(type(m).__name__))
    try:
        with Record():
            block(torch.randn(2, 8, 6, 6))
    finally:
        handle.remove()
    assert modules == ["BatchNorm2d", "Identity", "OREPA"]
    assert sum("conv" in f for f in functions) == 1 and functions.count("batch_norm") == 1
    assert torch.equal(block.vector[:, 0], torch.tensor([0.25, 0.25, 0.0, 0.5, 1.0, 0.5]))
    # the frequency prior covers the whole kernel for K > 3 (the official code fills only 3x3 of it):
    # cos(pi (h + 1/2) f / K), along rows for the first half of the channels, along columns for the rest
    prior = OREPA(4, 4, ConvGeometry(5)).prior.double()
    assert prior[:, 4, 4].abs().sum() > 0
    assert abs(prior[1, 3, 0] - math.cos(math.pi * 3.5 * 2 / 5)) < 1e-7 and torch.equal(prior[1, :, 0], prior[1, :, 4])
    assert abs(prior[3, 0, 2] - math.cos(math.pi * 2.5 * 2 / 5)) < 1e-7 and torch.equal(prior[3, 0], prior[3, 4])


def test_orepa_accepts_any_padding():
    block = _randomized(OREPA(4, 6, ConvGeometry(3, stride=2, padding=0)))
    x = torch.randn(2, 4, 9, 8)
    deploy = reparameterize_model(block)
    assert deploy(x).shape == (2, 6, 4, 3)
    assert model_relative_error(block, deploy, x) <= 1e-5


@pytest.mark.parametrize("conv_type", ["dbb", "orepa"])
def test_meta_device_init_then_load_state_dict(conv_type):
    """Empty-weight init (meta device, to_empty, load_state_dict) must restore everything the
    forward reads: identity kernels are made on the fly, OREPA's prior is a persistent buffer."""
    source = perturb_params(randomize_bn(create("resnet18_tiny", conv_type=conv_type)), seed=1).eval()
    with torch.device("meta"):
        empty = create("resnet18_tiny", conv_type=conv_type)
    empty = empty.to_empty(device="cpu")
    empty.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert model_relative_error(source, empty, x) == 0.0


@pytest.mark.parametrize("make,message", [
    (lambda: ACBlock(4, 4, ConvGeometry(3, padding=0)), r"ACBlock: padding=0 is not supported.*'same' padding"),
    (lambda: RepVGGBlock(4, 4, ConvGeometry(2)), "kernel_size must be an odd int"),
    (lambda: MobileOneBlock(4, 6, ConvGeometry(3, groups=4)), "groups=4 must divide in_channels=4 and out_channels=6"),
    (lambda: DiverseBranchBlock(4, 4, ConvGeometry(3, dilation=2)), "dilation=2 is not supported.*average-pool"),
        (lambda: DiverseBranchBlock(8, 4, ConvGeometry(3, groups=4)), "depthwise block .*needs in_channels == out_channels"),
    (lambda: ACBlock(4, 4, ConvGeometry(3, padding_mode="mirror")), "padding_mode must be one of"),
    (lambda: ReparamLargeKernelConv(4, 4, ConvGeometry(7), small_kernel=9), "small_kernel=9 must be odd and at most kernel_size=7"),
    (lambda: MobileOneBlock(4, 4, num_conv_branches=0), "num_conv_branches must be at least 1"),
    (lambda: make_conv("dcn", 4, 4, ConvGeometry(3)), r"conv_type must be one of \['acb', 'conv', 'dbb', 'orepa'\]"),
])
def test_unsupported_geometry_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make,message", [
    (lambda: ConvGeometry(3, stride=0), "ConvGeometry: stride must be a positive int, got 0"),
    (lambda: ConvGeometry(3, padding=-1), r"ConvGeometry: padding must be None \('same'\) or an int >= 0, got -1"),
    (lambda: ConvGeometry(4), "ConvGeometry: kernel_size must be an odd int, got 4"),
])
def test_bad_geometry_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_block_takes_its_geometry_as_one_value():
    """The geometry is one typed argument: a bare kernel size in its place is refused with the
    form to write, and the block's attributes are the geometry's, padding resolved to "same"."""
    with pytest.raises(TypeError, match=r"RepVGGBlock: geometry must be a ConvGeometry, e.g. ConvGeometry\(3, stride=2\), got 3"):
        RepVGGBlock(4, 4, 3)
    block = DiverseBranchBlock(4, 8, ConvGeometry(5, stride=2, padding_mode="reflect"))
    assert block.geometry == ConvGeometry(5, stride=2, padding=2, padding_mode="reflect")
    assert (block.kernel_size, block.stride, block.padding, block.padding_mode) == (5, 2, 2, "reflect")


def test_geometry_reads_from_yaml():
    """LightningCLI's parser (jsonargparse) builds a block, geometry included, from a YAML mapping."""
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(OREPA, "block", instantiate=True)
    cfg = parser.parse_string("block: {in_channels: 4, out_channels: 8, geometry: {kernel_size: 5, stride: 2, "
                              "padding_mode: circular}, dw_multiplier: 2}")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    block = instantiate(cfg).block
    assert isinstance(block, OREPA) and block.geometry == ConvGeometry(5, 2, 2, padding_mode="circular")
    assert block(torch.randn(1, 4, 9, 9)).shape == (1, 8, 5, 5)
    with pytest.raises(ArgumentError, match="block.geometry.padding_mode"):
        parser.parse_string("block: {in_channels: 4, out_channels: 8, geometry: {padding_mode: mirror}}")


def test_walker_refuses_sync_batchnorm_inside_family_blocks():
    """SyncBatchNorm is not a BatchNorm2d: the official RepLKNet fusion silently skips it; ours refuses."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(RepVGGBlock(4, 4), DiverseBranchBlock(4, 4)))
    with pytest.raises(TypeError, match=r"SyncBatchNorm \(0\.dense\.bn.*revert"):
        reparameterize_model(model)


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_sync_batchnorm_round_trip(kind):
    """DDP with ``sync_batchnorm`` swaps every BN for SyncBatchNorm, and Lightning swaps them back
    before the deploy conversion: the block must keep its structure (DBB's BN-and-pad keeps padding)."""
    block = _randomized(BLOCKS[kind](8, 8, 3, 1, 2, 1, "zeros", False))
    x = torch.randn(2, 8, 9, 11)
    sync = TorchSyncBatchNorm().apply(copy.deepcopy(block))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    assert model_relative_error(block, sync, x) == 0.0
    sync.train()(x).sum().backward()  # no process group on CPU: SyncBatchNorm normalizes locally
    back = TorchSyncBatchNorm().revert(sync)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    assert model_relative_error(back, reparameterize_model(back), x) <= 1e-5


def test_train_mode_outputs_differ_eval_mode_match():
    """The conversion is exact in eval mode only (BN running statistics): the error a user sees in train mode."""
    block = _randomized(RepVGGBlock(4, 4))
    x = torch.randn(4, 4, 8, 8)
    deploy = reparameterize_model(block)
    block.train()
    with torch.no_grad():
        assert max_relative_error(block(x), deploy(x)) > 1e-2
