"""Parity with mmsegmentation itself: heads, ResNetV1c backbone and the task's mmseg_heads option.

Needs mmseg 1.2.x with a compiled mmcv (``.ci/run`` installs them when the prebuilt mmcv wheel is
available); skipped otherwise, and nothing else in the project needs them.
"""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn

from backbones import create
from backbones.weights.mmseg import convert_mmseg_state_dict
from tasks.heads.decode import FCNHead, PSPHead

mmseg_heads = pytest.importorskip(
    "mmseg.models.decode_heads", reason="mmsegmentation with compiled mmcv ops is not installed (optional extra)")
mmseg_backbones = pytest.importorskip("mmseg.models.backbones")

BN = dict(type="BN", requires_grad=True)


def test_psp_and_fcn_heads_equal_mmseg_heads():
    torch.manual_seed(0)
    ours = randomize_bn(PSPHead(64, 19, channels=32, pool_scales=(1, 2, 3, 6))).eval()
    theirs = mmseg_heads.PSPHead(in_channels=64, in_index=0, channels=32, pool_scales=(1, 2, 3, 6),
                                 dropout_ratio=0.1, num_classes=19, norm_cfg=BN, align_corners=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, 13, 17)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs([x]), rtol=0, atol=1e-6)

    ours = randomize_bn(FCNHead(48, 19, channels=24)).eval()
    theirs = mmseg_heads.FCNHead(in_channels=48, in_index=0, channels=24, num_convs=1, concat_input=False,
                                 dropout_ratio=0.1, num_classes=19, norm_cfg=BN).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 48, 9, 11)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs([x]), rtol=0, atol=1e-6)


def test_resnet_v1c_d8_equals_mmseg_resnet_v1c_through_the_key_mapping():
    torch.manual_seed(0)
    theirs = mmseg_backbones.ResNetV1c(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                                       contract_dilation=True, norm_cfg=BN, style="pytorch")
    randomize_bn(theirs).eval()
    ckpt = {f"backbone.{k}": v for k, v in theirs.state_dict().items()}
    converted = {k[len("backbone."):]: v for k, v in convert_mmseg_state_dict(ckpt).items()}
    ours = create("resnet50_v1c_d8")
    ours.load_state_dict(converted, strict=True)
    ours.eval()
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        stages, expected = ours.forward_stages(x), theirs(x)
        assert len(stages) == len(expected) == 4
        for a, b in zip(stages, expected):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_task_with_mmseg_heads_matches_the_project_heads():
    from tasks.segmentation import SegmentationTask

    kwargs = dict(backbone="resnet_tiny_d8", num_classes=7, head_channels=16, aux_channels=8)
    torch.manual_seed(0)
    ours = randomize_bn(SegmentationTask(**kwargs)).eval()
    theirs = SegmentationTask(mmseg_heads=True, **kwargs).eval()
    assert type(theirs.decode_head).__module__.startswith("mmseg")
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=0, atol=1e-6)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    decode_a, aux_a = ours._heads(x)
    torch.manual_seed(1)  # same dropout masks
    decode_b, aux_b = theirs._heads(x)
    assert torch.allclose(decode_a, decode_b, atol=1e-5) and torch.allclose(aux_a, aux_b, atol=1e-5)
