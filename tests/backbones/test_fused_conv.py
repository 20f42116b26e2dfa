"""The deploy-time fused conv + bias (+ residual) + ReLU kernel on a prepacked weight: same outputs as
the plain ops, taken only where it applies, repacked when the weight changes, and actually taken by
the deploy models (built with deploy=True, which applies the CPU fusion pass)."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_params, randomize_bn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import backbones
import backbones.deploy.fused_conv as fused_conv
from backbones import max_relative_error
from backbones.complexity import count_macs
from backbones.deploy.fused_conv import conv_act, fusion, fusion_enabled

needs_onednn = pytest.mark.skipif(not fusion_enabled(), reason="this torch build has no oneDNN fused conv")


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Records each call of the fused kernel (``"relu"``, ``"none"`` or ``"add"``) and runs it."""
    made: list[str] = []
    op = fused_conv._POINTWISE

    class Recorder:
        def __call__(self, *args):
            made.append(args[7])  # the post-op: "relu" or "none"
            return op(*args)

        def binary(self, *args):
            made.append("add")
            return op.binary(*args)

    monkeypatch.setattr(fused_conv, "_POINTWISE", Recorder())
    monkeypatch.setattr(fused_conv, "MIN_FUSED_OUTPUT", 0)  # the test tensors are small
    return made


def plain(conv: nn.Conv2d, x: torch.Tensor, relu: bool, residual) -> torch.Tensor:
    y = conv(x) if residual is None else conv(x) + residual
    return F.relu(y) if relu else y


GEOMETRIES = [  # in, out, kernel, stride, dilation, groups, size
    (8, 16, 3, 1, 1, 1, (9, 7)),
    (16, 8, 1, 2, 1, 1, (11, 6)),
    (8, 8, 3, 2, 2, 2, (13, 10)),
    (12, 12, 5, 1, 1, 12, (8, 11)),
]


@needs_onednn
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}-k{g[2]}s{g[3]}d{g[4]}g{g[5]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("relu, with_residual", [(True, False), (True, True), (False, True), (False, False)])
def test_fused_kernel_equals_the_plain_ops(calls, geometry, layout, relu, with_residual):
    cin, cout, k, stride, dilation, groups, size = geometry
    conv = nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups, bias=True).eval()
    x = torch.randn(2, cin * (2 if layout == "strided" else 1), *size)
    x = x[:, ::2] if layout == "strided" else x  # a non-contiguous view
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_shape = conv(x).shape
    residual = torch.randn(out_shape) if with_residual else None
    act = nn.ReLU(inplace=True) if relu else nn.Identity()
    with torch.inference_mode():
        fused = conv_act(conv, x, act, residual)
        expected = plain(conv, x, relu, residual)
    assert calls == ["add" if with_residual else "relu" if relu else "none"]
    assert fused.shape == out_shape
    assert max_relative_error(expected, fused) <= 1e-6
    if relu:
        assert fused.min() == 0  # the ReLU really ran


@needs_onednn
def test_plain_path_where_the_kernel_does_not_apply(calls):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    relu = nn.ReLU()
    x = torch.randn(2, 4, 7, 5)
    residual = torch.randn(2, 6, 7, 5)

    # autograd: gradients must reach the conv through the plain ops
    out = conv_act(conv, x, relu, residual)
    out.sum().backward()
    assert conv.weight.grad is not None and calls == []
    with torch.no_grad():
        conv_act(conv, x, relu, residual)
    assert calls == ["add"]  # the same call without autograd is fused
    calls.clear()

    with torch.no_grad():
        double = conv_act(conv.double(), x.double(), relu)  # oneDNN's fused conv is float32 only here
        assert double.dtype == torch.float64 and torch.equal(double, F.relu(conv(x.double())))
        conv.float()
        broadcast = torch.randn(1, 6, 1, 1)  # broadcasting is the plain add's semantics
        assert torch.allclose(conv_act(conv, x, relu, broadcast), plain(conv, x, True, broadcast))
        reflect = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        assert torch.allclose(conv_act(reflect, x, relu), F.relu(reflect(x)))
        gelu = conv_act(conv, x, nn.GELU())  # an activation the kernel does not fuse
        assert torch.equal(gelu, F.gelu(conv(x)))
        inference = nn.Conv2d(4, 6, 3, padding=1)
        with torch.inference_mode():
            inference.weight = nn.Parameter(inference.weight.clone())  # keeps no version counter
        assert torch.allclose(conv_act(inference, x, relu), F.relu(inference(x)))
        with fusion(False):
            conv_act(conv, x, relu, residual)
        fused_conv.MIN_FUSED_OUTPUT = 2 * 6 * 7 * 5 + 1  # restored by monkeypatch
        conv_act(conv, x, relu, residual)  # too small to repay the kernel's fixed cost
        fused_conv.MIN_FUSED_OUTPUT = 0
        with FlopCounterMode(display=False) as counter:
            conv_act(conv, x, relu)
    assert calls == [] and counter.get_total_flops() > 0
    with torch.no_grad():
        conv_act(conv, x, relu)
    assert calls == ["relu"]  # and the switch is back on after the block


@needs_onednn
def test_packed_weight_is_reused_and_rebuilt_when_the_weight_changes(calls):
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, padding=1).eval()
    x = torch.randn(2, 6, 9, 7)

    def check() -> torch.Tensor:
        with torch.no_grad():
            out = conv_act(conv, x, nn.ReLU())
            assert max_relative_error(F.relu(conv(x)), out) <= 1e-6
        return fused_conv._PACKED[conv][-1]

    first = check()
    assert check() is first  # reused, not reordered per call
    y = torch.randn(3, 6, 12, 5)  # another input size runs on the same packed weight
    with torch.no_grad():
        assert max_relative_error(F.relu(conv(y)), conv_act(conv, y, nn.ReLU())) <= 1e-6
    assert fused_conv._PACKED[conv][-1] is first
    with torch.no_grad():
        conv.weight.mul_(-2)  # in-place write, as optimizers and initializers do
    assert check() is not first
    conv.load_state_dict({"weight": torch.randn(8, 6, 3, 3), "bias": torch.randn(8)})
    second = check()
    conv.weight = nn.Parameter(torch.randn(8, 6, 3, 3))  # another tensor
    assert check() is not second
    with torch.no_grad():
        conv.weight.data.mul_(3)  # bypasses the version counter: documented, cleared by hand
        fused_conv.clear_packed_weights()
    check()
    assert len(calls) == 7

    count = fused_conv.packed_weight_count()
    del conv
    gc.collect()
    assert fused_conv.packed_weight_count() == count - 1  # the packed copy goes with its conv


@needs_onednn
@pytest.mark.parametrize("name", ["repmlp_res_tiny", "repmlp_res_light_tiny", "resnet18_tiny", "repvgg_a0_tiny"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_deploy_models_run_fused_kernels_with_the_same_outputs(calls, name, channels_last):
    model = perturb_params(randomize_bn(backbones.create(name))).eval()
    deploy = backbones.create(name, deploy=True).eval()
    deploy.load_state_dict(backbones.reparameterize_model(model).state_dict())
    x = torch.randn(2, 3, *model.img_size)
    if channels_last:
        model, deploy = model.to(memory_format=torch.channels_last), deploy.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with fusion(False):
            unfused = deploy(x)
        assert calls == []
        fused = deploy(x)
        train_form = model(x)
    relus = sum(isinstance(m, nn.ReLU) for m in deploy.modules())
    assert "relu" in calls and len(calls) - calls.count("none") <= relus
    if name.startswith(("repmlp", "resnet")):
        assert "add" in calls  # every residual block ends in one kernel
        assert "none" in calls  # and its projection shortcut is one too
    assert max_relative_error(unfused, fused) <= 1e-6
    assert max_relative_error(train_form, fused) <= 1e-4
    with torch.no_grad():
        macs = count_macs(deploy, model.img_size)
        with fusion(False):
            assert macs == count_macs(deploy, model.img_size) > 0  # FlopCounterMode sees plain convs


def test_export_and_tracing_see_plain_ops():
    """torch.export and torch.jit.trace must record portable aten ops, not the oneDNN kernel."""
    model = backbones.reparameterize_model(backbones.create("resnet_tiny")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        # a dynamic batch (as the ONNX export asks) must not meet the fused path's size test
        dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        traced = torch.jit.trace(model, x)
        expected = model(x)
    for program in (exported, dynamic):
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert "aten.conv2d.default" in targets and not any("mkldnn" in t for t in targets)
    assert "mkldnn" not in str(traced.inlined_graph)
    with torch.no_grad():
        assert max_relative_error(expected, exported.module()(x)) <= 1e-6
        assert max_relative_error(expected, traced(x)) <= 1e-6
        x5 = torch.randn(5, 3, 64, 64)
        assert max_relative_error(model(x5), dynamic.module()(x5)) <= 1e-6
