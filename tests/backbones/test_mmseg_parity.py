"""Parity with mmsegmentation itself: heads (PSP, UPerNet, FCN), ResNetV1c backbone and the task's
mmseg_heads option.

Needs mmseg 1.2.x with a compiled mmcv (``.ci/run`` installs them when the prebuilt mmcv wheel is
available); skipped otherwise, and nothing else in the project needs them.
"""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn

from backbones import create, reparameterize_model
from backbones.weights.mmseg import convert_mmseg_state_dict
from tasks.heads.decode import FCNHead, PSPHead, UPerHead

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


@pytest.mark.parametrize("align_corners", [False, True])
def test_uper_head_equals_mmseg_uper_head_in_float64(align_corners):
    """Same keys, same outputs (float64, eval, randomized BN) as mmseg's UPerHead; and after our
    head's deploy conversion (every BN folded) too. Odd map sizes make every resize non-trivial."""
    torch.manual_seed(0)
    widths, sizes = (12, 20, 28, 36), ((17, 23), (9, 12), (5, 6), (3, 3))
    ours = UPerHead(widths, 19, channels=16, pool_scales=(1, 2, 3, 6), align_corners=align_corners)
    with torch.no_grad():
        for p in ours.parameters():  # off the initialization (conv_seg's is tiny)
            p.add_(0.2 * torch.randn_like(p))
    ours = randomize_bn(ours).double().eval()
    theirs = mmseg_heads.UPerHead(in_channels=list(widths), in_index=[0, 1, 2, 3], channels=16,
                                  pool_scales=(1, 2, 3, 6), dropout_ratio=0.1, num_classes=19, norm_cfg=BN,
                                  align_corners=align_corners).double().eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    feats = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip(widths, sizes)]
    with torch.no_grad():
        expected = theirs(feats)
        scale = expected.abs().max().item()
        assert expected.shape == (2, 19, 17, 23)
        assert (ours(feats) - expected).abs().max().item() <= 1e-10 * scale
        deploy = reparameterize_model(ours)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
        assert (deploy(feats) - expected).abs().max().item() <= 1e-10 * scale


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


@pytest.mark.parametrize("backbone,decode_head,size", [
    ("resnet_tiny_d8", "psp", (96, 80)),
    ("resnet_tiny", "uper", (96, 80)),  # UPerNet on an output-stride-32 ResNet, as mmseg's upernet_r50
    ("repmlpnet_tiny", "uper", (128, 128)),
])
def test_task_with_mmseg_heads_matches_the_project_heads(backbone, decode_head, size):
    from tasks.segmentation import SegmentationTask

    kwargs = dict(backbone=backbone, num_classes=7, head_channels=16, aux_channels=8, decode_head=decode_head,
                  backbone_kwargs={"img_size": list(size)})
    torch.manual_seed(0)
    ours = randomize_bn(SegmentationTask(**kwargs)).eval()
    theirs = SegmentationTask(mmseg_heads=True, **kwargs).eval()
    assert type(theirs.decode_head).__name__ == {"psp": "PSPHead", "uper": "UPerHead"}[decode_head]
    assert type(theirs.decode_head).__module__.startswith("mmseg")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=0, atol=1e-6)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    decode_a, aux_a = ours._heads(x)
    torch.manual_seed(1)  # same dropout masks
    decode_b, aux_b = theirs._heads(x)
    assert torch.allclose(decode_a, decode_b, atol=1e-5) and torch.allclose(aux_a, aux_b, atol=1e-5)
