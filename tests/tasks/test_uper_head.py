"""UPerNet: the UPerHead (mmseg layout; checked against a functional UPerNet written from mmseg's
structure, and re-parameterized exactly) and the segmentation task with ``decode_head="uper"`` on
RepMLPNet and a plain (output stride 32) ResNet. Parity with mmseg's own UPerHead is in
tests/backbones/test_mmseg_parity.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_params, randomize_bn

from backbones import reparameterize_model
from backbones.reparam.walker import max_relative_error
from tasks.heads.decode import PPM, PSPHead, UPerHead
from tasks.segmentation import SegmentationTask

WIDTHS = (6, 10, 14, 18)
# stride-4..32 maps of an odd-sized input: the top-down and fusion resizes are not exact doublings
SHAPES = ((17, 23), (9, 12), (5, 6), (3, 3))


def _maps(dtype=torch.float64, n=2, widths=WIDTHS, shapes=SHAPES) -> list[torch.Tensor]:
    return [torch.randn(n, c, h, w, dtype=dtype) for c, (h, w) in zip(widths, shapes)]


def _head(**kwargs) -> UPerHead:
    torch.manual_seed(0)
    defaults = dict(in_channels=WIDTHS, num_classes=5, channels=8, pool_scales=(1, 2, 3, 6))
    head = UPerHead(**{**defaults, **kwargs})
    return randomize_bn(perturb_params(head, seed=3))  # conv_seg off its tiny init, biases nonzero


# --------------------------------------------------------------------------- structure
def test_keys_and_shapes_are_mmseg_upernet():
    """The exact key set and shapes of mmseg's UPerHead (upernet_r50: decode_head.*), 4 levels."""
    ch, c = 8, WIDTHS
    head = UPerHead(c, 19, channels=ch)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items() if not k.endswith("num_batches_tracked")}

    def cbr(prefix, cin, k):
        return {f"{prefix}.conv.weight": (ch, cin, k, k),
                **{f"{prefix}.bn.{n}": (ch,) for n in ("weight", "bias", "running_mean", "running_var")}}

    expected = {"conv_seg.weight": (19, ch, 1, 1), "conv_seg.bias": (19,)}
    for i in range(4):
        expected.update(cbr(f"psp_modules.{i}.1", c[3], 1))
    expected.update(cbr("bottleneck", c[3] + 4 * ch, 3))
    for i in range(3):
        expected.update(cbr(f"lateral_convs.{i}", c[i], 1))
        expected.update(cbr(f"fpn_convs.{i}", ch, 3))
    expected.update(cbr("fpn_bottleneck", 4 * ch, 3))
    assert shapes == expected
    # mmseg's defaults
    default = UPerHead((16, 32, 64, 128), 19)
    assert default.conv_seg.in_channels == 512 and default.dropout.p == 0.1 and default.align_corners is False
    assert len(default.psp_modules) == 4


def test_pyramid_pooling_is_one_module_shared_with_pspnet():
    psp, uper = PSPHead(18, 5, channels=8), UPerHead(WIDTHS, 5, channels=8)
    assert type(psp.psp_modules) is PPM and type(uper.psp_modules) is PPM
    ppm_keys = {k for k in psp.state_dict() if k.startswith(("psp_modules.", "bottleneck."))}
    assert ppm_keys == {k for k in uper.state_dict() if k.startswith(("psp_modules.", "bottleneck."))}


# --------------------------------------------------------------------------- numerics
def _cbr(sd: dict, prefix: str, x: torch.Tensor, padding: int) -> torch.Tensor:
    y = F.conv2d(x, sd[f"{prefix}.conv.weight"], padding=padding)
    y = F.batch_norm(y, sd[f"{prefix}.bn.running_mean"], sd[f"{prefix}.bn.running_var"], sd[f"{prefix}.bn.weight"],
                     sd[f"{prefix}.bn.bias"], False, 0.0, 1e-5)
    return F.relu(y)


def functional_upernet(sd: dict, feats: list[torch.Tensor], scales, align_corners: bool) -> torch.Tensor:
    """mmseg's UPerHead forward (eval mode) written from its state dict alone."""
    def up(t, size):
        return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=align_corners)

    top = feats[-1]
    ppm = [up(_cbr(sd, f"psp_modules.{i}.1", F.adaptive_avg_pool2d(top, s), 0), top.shape[-2:])
           for i, s in enumerate(scales)]
    levels = [_cbr(sd, f"lateral_convs.{i}", f, 0) for i, f in enumerate(feats[:-1])]
    levels.append(_cbr(sd, "bottleneck", torch.cat([top, *ppm], 1), 1))
    for i in range(len(levels) - 1, 0, -1):
        levels[i - 1] = levels[i - 1] + up(levels[i], levels[i - 1].shape[-2:])
    outs = [_cbr(sd, f"fpn_convs.{i}", levels[i], 1) for i in range(len(levels) - 1)] + [levels[-1]]
    fused = torch.cat([outs[0]] + [up(o, outs[0].shape[-2:]) for o in outs[1:]], 1)
    return F.conv2d(_cbr(sd, "fpn_bottleneck", fused, 1), sd["conv_seg.weight"], sd["conv_seg.bias"])


@pytest.mark.parametrize("align_corners", [False, True])
def test_forward_equals_a_functional_upernet_in_float64(align_corners):
    head = _head(align_corners=align_corners).double().eval()
    feats = _maps()
    with torch.no_grad():
        out = head(feats)
        expected = functional_upernet(head.state_dict(), feats, (1, 2, 3, 6), align_corners)
    assert out.shape == (2, 5, 17, 23)  # the finest map's size
    assert (out - expected).abs().max().item() <= 1e-10 * expected.abs().max().item()
    # the top-down path matters: zeroing the coarsest input changes the finest logits
    feats[3] = torch.zeros_like(feats[3])
    with torch.no_grad():
        assert not torch.allclose(head(feats), out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reparameterizes_exactly(dtype, tol):
    head = _head().to(dtype).eval()
    feats = _maps(dtype)
    with torch.no_grad():
        before = head(feats)
    deploy = reparameterize_model(head)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    assert all(k.endswith(("conv.weight", "conv.bias")) or k.startswith("conv_seg.") for k in deploy.state_dict())
    with torch.no_grad():
        assert max_relative_error(before, deploy(feats)) <= tol
        assert max_relative_error(before, reparameterize_model(deploy)(feats)) <= tol  # idempotent
    built = UPerHead(WIDTHS, 5, channels=8, deploy=True)  # a head built deploy=True has the same keys
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}


def test_dropout_acts_in_training_only():
    head = _head(dropout=0.5).eval()
    feats = _maps(torch.float32)
    with torch.no_grad():
        assert torch.equal(head(feats), head(feats))
        head.train()
        assert not torch.allclose(head(feats), head(feats))


def test_bad_inputs_name_the_shapes():
    head = _head()
    with pytest.raises(ValueError, match=r"UPerHead built for 4 maps \(N, C, h, w\) with C = \[6, 10, 14, 18\], "
                                         r"got shapes \[\(2, 6, 17, 23\), \(2, 10, 9, 12\), \(2, 14, 5, 6\)\]"):
        head(_maps()[:3])
    with pytest.raises(ValueError, match=r"got shapes .*\(2, 7, 9, 12\)"):
        head(_maps(widths=(6, 7, 14, 18)))
    with pytest.raises(ValueError, match="at least one feature map"):
        UPerHead((), 5)


# --------------------------------------------------------------------------- the task
def _task(backbone="repmlpnet_tiny", backbone_kwargs=None, **kwargs) -> SegmentationTask:
    torch.manual_seed(0)
    if backbone_kwargs is None and backbone == "repmlpnet_tiny":
        backbone_kwargs = {"img_size": [128, 128]}
    defaults = dict(num_classes=5, decode_head="uper", head_channels=16, aux_channels=8)
    return SegmentationTask(backbone=backbone, backbone_kwargs=backbone_kwargs, **{**defaults, **kwargs})


def test_task_builds_upernet_on_the_four_stages():
    task = _task()
    assert isinstance(task.decode_head, UPerHead) and task.decode_head.in_channels == (16, 32, 64, 128)
    assert task.auxiliary_head.convs[0].conv.in_channels == 64  # stage index 2, as for PSPNet
    x = torch.randn(2, 3, 128, 128)
    task.eval()
    with torch.no_grad():
        decode, aux = task._heads(x)
        assert decode.shape == (2, 5, 32, 32) and aux is None  # stride 4; no auxiliary head in eval
        assert task(x).shape == (2, 5, 128, 128)
    task.train()
    decode, aux = task._heads(x)
    assert aux.shape == (2, 5, 8, 8)
    with pytest.raises(ValueError, match="model.decode_head must be 'psp' or 'uper', got 'fcn'"):
        _task(decode_head="fcn")


def test_repmlpnet_window_is_the_training_crop():
    """RepMLPNet is registered fixed-size: built for the crop, it slides that window at inference."""
    from backbones.models.registry import model_cfg

    assert model_cfg("repmlpnet_tiny").fixed_size and model_cfg("repmlpnet_b256").fixed_size
    task = _task().eval()
    assert task.window == (128, 128)
    x = torch.randn(1, 3, 160, 300)
    with torch.no_grad():
        probs = task.predict_probs(x)
        assert probs.shape == (1, 5, 160, 300)
        assert torch.allclose(probs.sum(1), torch.ones(1, 160, 300), atol=1e-5)
        with pytest.raises(ValueError, match=r"built for 128x128 inputs"):
            task(x)


def test_every_trained_parameter_gets_a_gradient():
    """DDP (without find_unused_parameters) needs every trainable parameter in the loss: RepMLPNet's
    pooled classifier head never runs in segmentation, so the task freezes it."""
    task = _task().train()
    head_params = {id(p) for p in task.backbone.head.parameters()}
    assert head_params and all(not p.requires_grad for p in task.backbone.head.parameters())
    grouped = {id(p) for g in task.parameter_groups() for p in g["params"]}
    assert not head_params & grouped
    images, labels = torch.randn(2, 3, 128, 128), torch.randint(0, 5, (2, 128, 128))
    decode, aux = task._heads(images)
    (task.loss(decode, labels) + 0.4 * task.loss(aux, labels)).backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("backbone", ["repmlpnet_tiny", "resnet_tiny"])
def test_task_converts_backbone_and_uper_head(backbone):
    task = randomize_bn(perturb_params(_task(backbone), seed=4)).eval()
    x = torch.randn(2, 3, 128, 128)
    info = task.convert_to_deploy(x)
    assert info["relative_error"] <= 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.modules())
    assert task.decode_head.fpn_bottleneck.deploy and task.decode_head.lateral_convs[0].deploy
    built = _task(backbone, deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in task.state_dict().items()}


def test_plain_resnet_gives_stride_4_logits_at_any_size():
    """UPerNet on an output-stride-32 ResNet (mmseg's upernet_r50 uses ResNetV1c-50, not dilated)."""
    task = _task("resnet_tiny", backbone_kwargs={"img_size": 64}).eval()
    with torch.no_grad():
        for h, w in ((64, 64), (96, 160), (70, 50)):
            decode, _ = task._heads(torch.randn(1, 3, h, w))
            assert decode.shape[-2:] == (-(-h // 4), -(-w // 4))


def test_backbone_without_stages_is_refused():
    with pytest.raises(ValueError, match="model.backbone 'repvgg_a0_tiny' gives no four stage maps"):
        _task("repvgg_a0_tiny", backbone_kwargs={})
