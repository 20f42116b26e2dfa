"""The pure tensor functions of backbones.reparam, each against the computation it replaces."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from backbones.reparam.math import (
    add_branches,
    avg_kernel,
    bn_scale_shift,
    conv_bias_to_fc,
    conv_to_fc,
    fuse_bn,
    fuse_bn_before_linear,
    identity_kernel,
    merge_1x1_kxk,
    merge_depthwise_pointwise,
    pad_kernel,
)
from backbones.reparam.walker import max_relative_error


def _bn(n, affine=True, eps=1e-5, dtype=torch.float32):
    return randomize_bn(nn.BatchNorm2d(n, eps=eps, affine=affine).to(dtype).eval())


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fuse_bn_matches_conv_then_bn(affine, eps, conv_bias):
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=conv_bias)
    bn = _bn(8, affine, eps)
    x = torch.randn(2, 6, 9, 7)
    w, b = fuse_bn(conv.weight, conv.bias, bn)
    assert max_relative_error(bn(conv(x)), F.conv2d(x, w, b, padding=1, groups=2)) < 1e-6


def test_fuse_bn_linear_and_row_blocks():
    # A BN over S channels after an FC with S*h*w rows (each channel covers h*w contiguous rows).
    fc = nn.Linear(10, 4 * 6)
    bn = randomize_bn(nn.BatchNorm1d(4).eval())
    x = torch.randn(3, 10)
    expected = bn(fc(x).reshape(3, 4, 6)).reshape(3, 24)
    w, b = fuse_bn(fc.weight, fc.bias, bn)
    assert max_relative_error(expected, F.linear(x, w, b)) < 1e-6
    with pytest.raises(ValueError, match="do not split evenly"):
        fuse_bn(torch.randn(10, 3), None, bn)


def test_fuse_bn_needs_running_stats():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        bn_scale_shift(bn)


@pytest.mark.parametrize("affine", [True, False])
def test_fuse_bn_before_linear(affine):
    bn = _bn(5, affine)
    fc = nn.Linear(5 * 3 * 2, 7)
    v = torch.randn(4, 5, 3, 2)
    w, b = fuse_bn_before_linear(fc.weight, fc.bias, bn)
    assert max_relative_error(fc(bn(v).flatten(1)), F.linear(v.flatten(1), w, b)) < 1e-6


@pytest.mark.parametrize("k,target,stride", [((1, 1), 3, 1), ((3, 3), 7, 2), ((1, 3), (5, 5), 1), ((3, 1), (3, 5), 2)])
def test_pad_kernel_keeps_conv_output(k, target, stride):
    w = torch.randn(4, 3, *k)
    big = pad_kernel(w, target)
    th, tw = (target, target) if isinstance(target, int) else target
    assert big.shape == (4, 3, th, tw)
    x = torch.randn(2, 3, 11, 8)
    a = F.conv2d(x, w, stride=stride, padding=(k[0] // 2, k[1] // 2))
    b = F.conv2d(x, big, stride=stride, padding=(th // 2, tw // 2))
    assert max_relative_error(a, b) < 1e-6


def test_pad_kernel_rejects_even_and_too_small_targets():
    with pytest.raises(ValueError, match="even"):
        pad_kernel(torch.randn(1, 1, 2, 2), 5)
    with pytest.raises(ValueError, match="must be odd"):
        pad_kernel(torch.randn(1, 1, 3, 3), 4)
    with pytest.raises(ValueError, match="does not fit"):
        pad_kernel(torch.randn(1, 1, 5, 5), 3)


def test_add_branches_equals_sum_of_convs():
    ks = [(1, 1), (3, 3), (5, 5), (1, 5)]
    branches = [(torch.randn(6, 2, *k), torch.randn(6)) for k in ks] + [(torch.randn(6, 2, 3, 1), None)]
    x = torch.randn(2, 4, 10, 9)
    expected = sum(F.conv2d(x, w, b, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=2) for w, b in branches)
    w, b = add_branches(*branches)
    assert w.shape == (6, 2, 5, 5)
    assert max_relative_error(expected, F.conv2d(x, w, b, padding=2, groups=2)) < 1e-6
    with pytest.raises(ValueError, match="add_branches needs at least one"):
        add_branches()


def _conv_on_partitions(x, kernel, bias, h, w, groups):
    """Reference: the conv applied to each h x w partition separately, zero padding at partition borders."""
    n, c, H, W = x.shape
    parts = x.reshape(n, c, H // h, h, W // w, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, h, w)
    out = F.conv2d(parts, kernel, bias, padding=(kernel.shape[2] // 2, kernel.shape[3] // 2), groups=groups)
    o = out.shape[1]
    return out.reshape(n, H // h, W // w, o, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, o, H, W)


def _fc_on_partitions(x, weight, bias, h, w, groups):
    n, c, H, W = x.shape
    parts = x.reshape(n, c, H // h, h, W // w, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * h * w, 1, 1)
    out = F.conv2d(parts, weight[:, :, None, None], bias, groups=groups)
    o = out.shape[1] // (h * w)
    return out.reshape(n, H // h, W // w, o, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, o, H, W)


CASES = [
    # C, O, groups, (kh, kw), (h, w)
    (4, 4, 1, (3, 3), (5, 5)),
    (4, 8, 2, (3, 3), (4, 6)),   # C != O: the official code's bug case
    (8, 4, 4, (5, 5), (7, 5)),
    (6, 6, 6, (3, 3), (3, 4)),   # depthwise
    (4, 6, 2, (1, 5), (6, 6)),   # non-square kernel
    (3, 5, 1, (5, 3), (3, 7)),   # kernel larger than the partition in one direction
    (4, 4, 2, (1, 1), (2, 3)),
]


@pytest.mark.parametrize("C,O,g,k,hw", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_conv_to_fc_matches_partitioned_conv(C, O, g, k, hw, dtype, tol):
    h, w = hw
    kernel = torch.randn(O, C // g, *k, dtype=dtype)
    bias = torch.randn(O, dtype=dtype)
    x = torch.randn(2, C, 2 * h, 3 * w, dtype=dtype)
    fc_w = conv_to_fc(kernel, h, w, g)
    assert fc_w.shape == (O * h * w, C * h * w // g)
    expected = _conv_on_partitions(x, kernel, bias, h, w, g)
    got = _fc_on_partitions(x, fc_w, conv_bias_to_fc(bias, h, w), h, w, g)
    assert max_relative_error(expected, got) < tol


def test_conv_to_fc_is_differentiable():
    kernel = torch.randn(4, 2, 3, 3, requires_grad=True)
    conv_to_fc(kernel, 4, 4, 2).square().sum().backward()
    assert kernel.grad is not None and kernel.grad.abs().sum() > 0


def test_conv_to_fc_rejects_even_kernels():
    with pytest.raises(ValueError, match="even"):
        conv_to_fc(torch.randn(4, 4, 2, 2), 4, 4)


def test_max_relative_error_nested_and_mismatch():
    a = {"x": torch.ones(3), "y": [torch.full((2,), 2.0)]}
    b = {"x": torch.ones(3), "y": [torch.tensor([2.0, 2.2])]}
    assert abs(max_relative_error(a, b) - 0.1) < 1e-6
    with pytest.raises(ValueError, match="shapes differ"):
        max_relative_error(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="structure"):
        max_relative_error([torch.ones(1)], [torch.ones(1), torch.ones(1)])


def test_relative_error_is_nan_for_non_finite_outputs():
    from backbones.reparam.walker import max_relative_error

    ok = torch.ones(3)
    assert max_relative_error(ok, ok) == 0.0
    for broken in (torch.tensor([1.0, float("nan"), 1.0]), torch.tensor([1.0, float("inf"), 1.0])):
        assert math.isnan(max_relative_error(ok, broken)) and math.isnan(max_relative_error(broken, ok))


@pytest.mark.parametrize("channels,groups,k", [(6, 1, 1), (6, 2, 3), (6, 6, 5)])
def test_identity_and_avg_kernels_equal_the_ops(channels, groups, k):
    x = torch.randn(2, channels, 9, 8, dtype=torch.float64)
    eye = identity_kernel(channels, channels // groups, k, like=x)
    assert eye.dtype == torch.float64
    assert torch.equal(F.conv2d(x, eye, padding=k // 2, groups=groups), x)
    pool = avg_kernel(channels, channels // groups, k, like=x)
    expected = F.avg_pool2d(x, k, 2, k // 2)  # count_include_pad=True, the AvgPool2d default
    assert max_relative_error(expected, F.conv2d(x, pool, stride=2, padding=k // 2, groups=groups)) < 1e-14
    with pytest.raises(ValueError, match="even"):
        identity_kernel(4, 4, 2)


@pytest.mark.parametrize("cin,mid,cout,groups,k,stride", [(4, 6, 8, 1, 3, 1), (4, 8, 6, 2, 3, 2), (6, 12, 6, 6, 5, 1)])
def test_merge_1x1_kxk_equals_the_two_convs(cin, mid, cout, groups, k, stride):
    k1, b1 = torch.randn(mid, cin // groups, 1, 1), torch.randn(mid)
    k2, b2 = torch.randn(cout, mid // groups, k, k), torch.randn(cout)
    x = torch.randn(2, cin, 9, 10)
    # The KxK conv pads the 1x1 output with what the 1x1 gives on zero input: its bias.
    mid_map = F.pad(F.conv2d(x, k1, b1, groups=groups), [k // 2] * 4)
    border = torch.ones(1, 1, 9 + k - 1, 10 + k - 1)
    border[..., k // 2:-(k // 2), k // 2:-(k // 2)] = 0
    mid_map = mid_map + border * b1.reshape(1, -1, 1, 1)
    expected = F.conv2d(mid_map, k2, b2, stride=stride, groups=groups)
    kernel, bias = merge_1x1_kxk(k1, b1, k2, b2, groups)
    merged = F.conv2d(x, kernel, bias, stride=stride, padding=k // 2, groups=groups)
    assert max_relative_error(expected, merged) < 1e-5
    with pytest.raises(ValueError, match="do not chain"):
        merge_1x1_kxk(k1, b1, torch.randn(cout, mid + 1, k, k), b2, groups)


@pytest.mark.parametrize("cin,t,cout,groups", [(4, 1, 6, 1), (4, 3, 8, 2), (6, 2, 6, 3)])
def test_merge_depthwise_pointwise_equals_the_two_convs(cin, t, cout, groups):
    dw, pw = torch.randn(cin * t, 1, 3, 5), torch.randn(cout, cin * t // groups, 1, 1)
    x = torch.randn(2, cin, 8, 9)
    expected = F.conv2d(F.conv2d(x, dw, padding=(1, 2), groups=cin), pw, groups=groups)
    merged = F.conv2d(x, merge_depthwise_pointwise(dw, pw, cin, groups), padding=(1, 2), groups=groups)
    assert max_relative_error(expected, merged) < 1e-5
    with pytest.raises(ValueError, match="in_channels=5"):
        merge_depthwise_pointwise(dw, pw, 5, groups)
