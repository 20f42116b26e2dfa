"""ConvBN, the RepMLP residual blocks, the block protocol and the model-level walker."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from backbones import (
    Bottleneck,
    ConvBN,
    ReparamBlock,
    RepMLPBottleneck,
    RepMLPLight,
    max_relative_error,
    model_relative_error,
    reparameterize_model,
)
from backbones.layers.repmlp_blocks import RepMLPCfg
from backbones.reparam.walker import find_reparam_method

CONVBN = [
    # in, out, kernel, stride, groups, dilation, padding_mode, input size
    (4, 8, 3, 1, 1, 1, "zeros", (9, 7)),
    (8, 4, 3, 2, 2, 1, "zeros", (11, 10)),
    (6, 6, 5, 2, 6, 1, "zeros", (13, 9)),       # depthwise
    (4, 6, (1, 3), 1, 2, 1, "zeros", (8, 9)),   # non-square kernel
    (4, 4, 3, 1, 1, 2, "zeros", (12, 12)),      # dilation
    (4, 8, 3, 1, 1, 1, "reflect", (7, 9)),
    (4, 8, 1, 2, 4, 1, "zeros", (9, 9)),
    (3, 5, 7, 2, 1, 1, "replicate", (15, 17)),
]


@pytest.mark.parametrize("cfg", CONVBN)
@pytest.mark.parametrize("act", [False, True])
def test_convbn_equivalence(cfg, act):
    cin, cout, k, s, g, d, mode, size = cfg
    train = randomize_bn(ConvBN(cin, cout, k, s, groups=g, dilation=d, act=act, padding_mode=mode)).eval()
    deploy = reparameterize_model(train)
    x = torch.randn(2, cin, *size)
    assert model_relative_error(train, deploy, x) <= 1e-5
    train64 = copy.deepcopy(train).double()
    deploy = reparameterize_model(train64)
    x64 = x.double()
    assert model_relative_error(train64, deploy, x64) <= 1e-10
    built = ConvBN(cin, cout, k, s, groups=g, dilation=d, act=act, padding_mode=mode, deploy=True).double()
    assert {n: p.shape for n, p in built.state_dict().items()} == {n: p.shape for n, p in deploy.state_dict().items()}
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert torch.equal(built.eval()(x64), deploy(x64))


def test_convbn_non_affine_bn_and_idempotency():
    block = ConvBN(4, 4, 3)
    block.bn = nn.BatchNorm2d(4, affine=False, eps=1e-2)
    randomize_bn(block).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = block(x)
        block.switch_to_deploy()
        block.switch_to_deploy()
        assert max_relative_error(ref, block(x)) <= 1e-5
    assert set(block.state_dict()) == {"conv.weight", "conv.bias"}


def test_convbn_groups_error():
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=4"):
        ConvBN(4, 6, 3, groups=3)


COMPOSITES = {
    "bottleneck_c_ne_o": lambda deploy: RepMLPBottleneck(16, 16, 32, (8, 8), RepMLPCfg(4, kernels=(1, 3), groups=2), r=2, deploy=deploy),
    "bottleneck_same": lambda deploy: RepMLPBottleneck(32, 8, 32, (10, 6), RepMLPCfg((5, 3), kernels=(1, 3), groups=4, fc1_reduction=2), r=1, deploy=deploy),
    "bottleneck_dilated_pad": lambda deploy: RepMLPBottleneck(16, 8, 16, (9, 9), RepMLPCfg(4, kernels=(1, 3), pad_input=True), r=2, dilation=2, deploy=deploy),
    "light": lambda deploy: RepMLPLight(32, 4, 32, (8, 8), RepMLPCfg(4, kernels=(1, 3), groups=2), deploy=deploy),
    "light_c_ne_o": lambda deploy: RepMLPLight(16, 8, 32, (6, 6), RepMLPCfg(6, kernels=(1, 3, 5), groups=4), deploy=deploy),
    "resnet_bottleneck_stride2": lambda deploy: Bottleneck(16, 8, 32, stride=2, deploy=deploy),
    "resnet_bottleneck_dilated": lambda deploy: Bottleneck(32, 8, 32, dilation=2, deploy=deploy),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_blocks(name):
    make = COMPOSITES[name]
    train = randomize_bn(make(False), seed=3).eval()
    size = train.repmlp.input_size if hasattr(train, "repmlp") else (9, 11)
    x = torch.randn(2, train.conv1.conv.in_channels, *size)
    deploy = copy.deepcopy(train)
    deploy.switch_to_deploy()
    assert deploy.deploy and all(m.deploy for m in deploy.modules() if isinstance(m, ReparamBlock))
    assert model_relative_error(train, deploy, x) <= 1e-5
    train64 = copy.deepcopy(train).double()
    assert model_relative_error(train64, reparameterize_model(train64), x.double()) <= 1e-10
    built = make(True)
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0
    deploy.switch_to_deploy()  # idempotent
    assert model_relative_error(deploy, built, x) == 0.0


def test_bottleneck_r_must_divide():
    with pytest.raises(ValueError, match="r=3 must divide mid_channels=16"):
        RepMLPBottleneck(16, 16, 16, 8, RepMLPCfg(4), r=3)


def test_repmlp_settings_are_one_value():
    """The RepMLP settings travel as one RepMLPCfg: a bare partition in its place is refused, and the
    block inside gets every field."""
    with pytest.raises(TypeError, match=r"RepMLPLight: mlp must be a RepMLPCfg, e.g. RepMLPCfg\(partition=7, groups=8\), got 4"):
        RepMLPLight(8, 8, 8, 8, 4)
    block = RepMLPBottleneck(8, 8, 8, (9, 6), RepMLPCfg((3, 2), kernels=(1,), groups=2, fc1_reduction=3, pad_input=True))
    mlp = block.repmlp
    assert (mlp.input_size, mlp.partition, mlp.kernels, mlp.groups, mlp.pad_input) == ((9, 6), (3, 2), (1,), 2, True)
    assert mlp.fc1.out_features == 4 * 3 * 3 // 3  # C * hp * wp // fc1_reduction, C = 8 // r


# ---------------------------------------------------------------- the walker
class CountingBlock(ReparamBlock):
    """A block that records how often it is converted."""

    def __init__(self, inner: nn.Module | None = None):
        super().__init__()
        self.deploy = False
        self.calls = 0
        self.inner = inner if inner is not None else nn.Identity()

    def _build_deploy(self):
        self.calls += 1
        super()._build_deploy()

    def forward(self, x):
        return self.inner(x)


def test_walker_converts_root_and_nested_blocks_once():
    leaf = CountingBlock()
    root = CountingBlock(nn.Sequential(CountingBlock(leaf), ConvBN(2, 2, 3)))
    out = reparameterize_model(root, inplace=True)
    assert out is root
    blocks = [m for m in root.modules() if isinstance(m, CountingBlock)]
    assert len(blocks) == 3 and all(b.calls == 1 and b.deploy for b in blocks)
    assert root.inner[1].deploy


def test_walker_copies_unless_inplace_and_sets_eval():
    model = nn.Sequential(ConvBN(3, 4, 3), nn.ReLU()).train()
    out = reparameterize_model(model)
    assert out is not model and not model[0].deploy and out[0].deploy
    assert model.training and not out.training


class ThirdPartyBlock(nn.Module):
    """timm/MobileOne convention: only ``reparameterize``; not idempotent on purpose."""

    def __init__(self):
        super().__init__()
        self.converted = 0

    def reparameterize(self):
        if self.converted:
            raise RuntimeError("converted twice")
        self.converted += 1


def test_walker_accepts_other_conventions_once():
    model = nn.Sequential(ThirdPartyBlock(), nn.Sequential(ThirdPartyBlock()))
    reparameterize_model(model, inplace=True)
    assert model[0].converted == 1 and model[1][0].converted == 1
    assert find_reparam_method(nn.ReLU()) is None


class InjectingBlock(nn.Module):
    """MMPretrain RepMLPBlock convention: ``local_inject``, not idempotent."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def local_inject(self):
        del self.bn  # a second call raises AttributeError


class InjectingNet(nn.Module):
    """MMPretrain RepMLPNet convention: the root's ``switch_to_deploy`` converts its blocks itself."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(InjectingBlock(), nn.Sequential(InjectingBlock()))

    def switch_to_deploy(self):
        for m in self.modules():
            if hasattr(m, "local_inject"):
                m.local_inject()


@pytest.mark.parametrize("wrap", ["bare", "inside_a_reparam_block"])
def test_walker_does_not_descend_into_a_module_it_converted(wrap):
    """The walker's rule: a module whose conversion method it called converts its own subtree, so
    the RepMLPNet root's blocks get their non-idempotent ``local_inject`` once (a second raises)."""
    net = InjectingNet()
    model = net if wrap == "bare" else CountingBlock(nn.Sequential(net, ThirdPartyBlock()))
    by_hand = copy.deepcopy(net)
    by_hand.switch_to_deploy()
    reparameterize_model(model, inplace=True)
    assert not any(hasattr(m, "bn") for m in net.blocks.modules())
    # the walker keeps no state on the modules: their attributes are what the conversion left
    assert [sorted(vars(m)) for m in net.modules()] == [sorted(vars(m)) for m in by_hand.modules()]
    if wrap != "bare":
        assert model.calls == 1 and model.inner[1].converted == 1


def test_walker_calls_only_the_outermost_conversion():
    """A third-party block nested in one that has its own conversion method is left to that method:
    timm's leaf convention inside a root that does not convert it stays as it was."""

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ThirdPartyBlock()

        def switch_to_deploy(self):
            pass  # converts nothing: the walker must not reach past it

    model = nn.Sequential(Root(), ThirdPartyBlock())
    reparameterize_model(model, inplace=True)
    assert model[0].block.converted == 0 and model[1].converted == 1


def test_walker_refuses_sync_batchnorm():
    model = nn.Sequential(ConvBN(3, 4, 3), ConvBN(4, 4, 3))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with pytest.raises(TypeError, match=r"SyncBatchNorm \(0\.bn, 1\.bn\).*revert"):
        reparameterize_model(model)
