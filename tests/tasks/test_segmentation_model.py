"""PSPNet pieces: heads (mmseg layout, re-parameterization), mmseg key mapping, the IoU metric,
sliding-window inference and the segmentation task's loss and deploy conversion."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_params, randomize_bn

from backbones import create, reparameterize_model
from backbones.deploy.cpu_fusion import FusedConvAct
from backbones.layers.convbn import ConvBN
from backbones.reparam.walker import max_relative_error
from backbones.weights import read_weights
from backbones.weights.mmseg import convert_mmseg_state_dict, is_mmseg_state_dict
from tasks.heads.decode import FCNHead, PSPHead
from tasks.metrics.segmentation import SegmentationIoU, iou_from_confusion
from tasks.segmentation import SegmentationTask


def _task(**kwargs) -> SegmentationTask:
    torch.manual_seed(0)
    defaults = dict(backbone="repmlp_res_tiny_d8", num_classes=5, head_channels=16, aux_channels=8)
    return SegmentationTask(**{**defaults, **kwargs})


# --------------------------------------------------------------------------- heads
def test_head_keys_follow_mmseg():
    psp = PSPHead(64, 19, channels=32)
    keys = set(psp.state_dict())
    for key in ("psp_modules.0.1.conv.weight", "psp_modules.3.1.bn.running_var", "bottleneck.conv.weight",
                "bottleneck.bn.weight", "conv_seg.weight", "conv_seg.bias"):
        assert key in keys
    assert psp.bottleneck.conv.weight.shape == (32, 64 + 4 * 32, 3, 3)
    assert "convs.0.conv.weight" in FCNHead(32, 19, channels=16).state_dict()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_heads_reparameterize_exactly(dtype, tol):
    for head, shape in ((PSPHead(24, 7, channels=12, pool_scales=(1, 2, 3, 6)), (2, 24, 13, 9)),
                        (FCNHead(24, 7, channels=12, num_convs=2), (2, 24, 11, 10))):
        head = randomize_bn(head.to(dtype)).eval()
        x = torch.randn(*shape, dtype=dtype)
        deploy = reparameterize_model(head)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
        assert max_relative_error(head(x), deploy(x)) <= tol
        again = reparameterize_model(deploy)
        assert max_relative_error(head(x), again(x)) <= tol


def test_psp_head_matches_a_functional_pyramid_pooling():
    head = randomize_bn(PSPHead(8, 3, channels=4, pool_scales=(1, 2), dropout=0.0)).eval()
    x = torch.randn(1, 8, 6, 6)

    def cbr(m, t):
        return F.relu(F.batch_norm(F.conv2d(t, m.conv.weight, padding=m.conv.padding), m.bn.running_mean,
                                   m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.0, m.bn.eps))

    branches = [F.interpolate(cbr(b[1], F.adaptive_avg_pool2d(x, s)), size=(6, 6), mode="bilinear",
                              align_corners=False) for b, s in zip(head.psp_modules, (1, 2))]
    expected = F.conv2d(cbr(head.bottleneck, torch.cat([x] + branches, 1)), head.conv_seg.weight, head.conv_seg.bias)
    assert torch.allclose(head(x), expected, atol=1e-6)


# --------------------------------------------------------------------------- mmseg checkpoints
def _to_mmseg_names(state_dict):
    """The inverse renaming, written independently of backbones.weights.mmseg."""
    stem = {("0", "conv"): 0, ("0", "bn"): 1, ("1", "conv"): 3, ("1", "bn"): 4, ("2", "conv"): 6, ("2", "bn"): 7}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"backbone\.stem\.(\d)\.(conv|bn)\.(.+)", key)
        if m:
            key = f"backbone.stem.{stem[m.group(1), m.group(2)]}.{m.group(3)}"
        m = re.match(r"backbone\.(layer\d\.\d+)\.conv(\d)\.(conv|bn)\.(.+)", key)
        if m:
            key = f"backbone.{m.group(1)}.{m.group(3)}{m.group(2)}.{m.group(4)}"
        m = re.match(r"backbone\.(layer\d\.\d+)\.shortcut\.(conv|bn)\.(.+)", key)
        if m:
            key = f"backbone.{m.group(1)}.downsample.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
        out[key] = value
    return out


def test_mmseg_pspnet_checkpoint_loads_into_the_baseline(tmp_path):
    task = perturb_params(randomize_bn(_task(backbone="resnet_tiny_d8")), seed=1)  # unlike a fresh task's
    ours = task.state_dict()
    mmseg = _to_mmseg_names(ours)
    assert "backbone.stem.4.running_mean" in mmseg and "backbone.layer1.0.bn2.weight" in mmseg
    assert "backbone.layer1.0.downsample.1.weight" in mmseg and "decode_head.conv_seg.weight" in mmseg
    assert is_mmseg_state_dict(mmseg) and not is_mmseg_state_dict(ours)
    converted = convert_mmseg_state_dict({f"module.{k}": v for k, v in mmseg.items()})
    assert converted.keys() == ours.keys()
    fresh = _task(backbone="resnet_tiny_d8")
    assert not torch.equal(fresh.state_dict()["backbone.layer1.0.conv1.bn.running_var"],
                           ours["backbone.layer1.0.conv1.bn.running_var"])
    path = tmp_path / "pspnet_mmseg.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": mmseg}, path)
    assert read_weights(path).format == "mmseg checkpoint"
    fresh.load_weights(str(path))
    assert fresh.state_dict().keys() == ours.keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_mmseg_upernet_checkpoint_loads_into_the_upernet_baseline(tmp_path):
    """An mmseg UPerNet checkpoint (ResNetV1c keys, decode_head.lateral_convs/fpn_convs/...) loads
    into the task with decode_head="uper" on a plain ResNet, every tensor in place."""
    kwargs = dict(backbone="resnet_tiny", decode_head="uper")
    ours = perturb_params(randomize_bn(_task(**kwargs)), seed=1).state_dict()
    mmseg = _to_mmseg_names(ours)
    for key in ("decode_head.lateral_convs.2.conv.weight", "decode_head.fpn_convs.0.bn.running_var",
                "decode_head.fpn_bottleneck.conv.weight", "decode_head.psp_modules.3.1.bn.weight",
                "auxiliary_head.convs.0.conv.weight", "backbone.layer4.0.downsample.0.weight"):
        assert key in mmseg, key
    path = tmp_path / "upernet_mmseg.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": mmseg}, path)
    fresh = _task(**kwargs)
    fresh.load_weights(str(path))
    assert fresh.state_dict().keys() == ours.keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours[k]), k
    # a PSPNet checkpoint does not fit a UPerNet task
    torch.save({"meta": {}, "state_dict": _to_mmseg_names(_task(backbone="resnet_tiny").state_dict())}, path)
    with pytest.raises(ValueError, match="lateral_convs"):
        _task(**kwargs).load_weights(str(path))


# --------------------------------------------------------------------------- metric
def test_iou_metric_equals_a_direct_confusion_matrix():
    rng = np.random.default_rng(0)
    metric = SegmentationIoU(num_classes=6, ignore_index=255)
    confusion = np.zeros((6, 6), np.int64)
    for _ in range(4):  # several updates of different sizes: the state is dataset-level
        h, w = rng.integers(5, 30, 2)
        target = rng.integers(0, 5, (2, h, w))  # class 5 never appears in the labels
        target[rng.random((2, h, w)) < 0.2] = 255
        pred = rng.integers(0, 5, (2, h, w))  # ... nor in the predictions: excluded from the mean
        metric.update(torch.from_numpy(pred), torch.from_numpy(target))
        keep = target != 255
        np.add.at(confusion, (target[keep], pred[keep]), 1)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    result = metric.compute()
    assert np.allclose(result["iou"].numpy(), iou, equal_nan=True)
    assert np.isnan(result["iou"][5].item())
    assert result["miou"].item() == pytest.approx(np.nanmean(iou))
    assert result["aacc"].item() == pytest.approx(tp.sum() / confusion.sum())
    # a per-image average differs: the metric must be the dataset-level one
    assert iou_from_confusion(torch.eye(3))["miou"].item() == 1.0


def test_metric_rejects_bad_labels_and_shapes():
    metric = SegmentationIoU(num_classes=3)
    with pytest.raises(ValueError, match="label value 7 out of range"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [255, 1]]]))
    with pytest.raises(ValueError, match="differs from label shape"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))


# --------------------------------------------------------------------------- task
def test_slide_inference_equals_whole_with_one_window_and_averages_overlaps():
    task = _task(backbone="resnet_tiny_d8", backbone_kwargs={"img_size": 64}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(task.slide_logits(x), task(x), atol=1e-6)
        # a wider image: stride 42 → windows at x = 0, 42, 84 and 86 (the last one clamped to the edge)
        wide = torch.randn(1, 3, 64, 150)
        out = task.slide_logits(wide)
        a, b, c, d = (task(wide[..., x:x + 64]) for x in (0, 42, 84, 86))
        assert torch.allclose(out[..., :42], a[..., :42], atol=1e-5)
        assert torch.allclose(out[..., 50:64], (a[..., 50:64] + b[..., 8:22]) / 2, atol=1e-5)
        assert torch.allclose(out[..., 100:106], (b[..., 58:] + c[..., 16:22] + d[..., 14:20]) / 3, atol=1e-5)
        assert torch.allclose(out[..., 148:], d[..., 62:], atol=1e-5)
        # an image smaller than the window is padded and cut back
        assert task.slide_logits(torch.randn(2, 3, 40, 50)).shape == (2, 5, 40, 50)


def test_slide_stride_must_not_leave_gaps():
    with pytest.raises(ValueError, match=r"model.slide_stride \(200, 200\) must be between 1 and the window \(128, 128\)"):
        _task(slide_stride=(200, 200))


def test_repmlp_window_is_the_training_crop():
    task = _task().eval()
    assert task.window == (128, 128)
    x = torch.randn(1, 3, 160, 300)
    with torch.no_grad():
        probs = task.predict_probs(x)
        assert probs.shape == (1, 5, 160, 300)
        assert torch.allclose(probs.sum(1), torch.ones(1, 160, 300), atol=1e-5)
        with pytest.raises(ValueError, match=r"built for 128x128 inputs"):
            task(x)  # a whole-image forward of another size names both sizes


def test_loss_average_modes():
    task = _task(backbone="resnet_tiny_d8")
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 4, 4))
    labels[0, :2] = 255
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert task.loss(logits, labels).item() == pytest.approx(per_pixel.sum().item() / labels.numel())
    task.hparams.loss_average = "non_ignored"
    assert task.loss(logits, labels).item() == pytest.approx(per_pixel.sum().item() / (labels != 255).sum().item())
    with pytest.raises(ValueError, match="label value 9 out of range"):
        task.training_step((torch.randn(1, 3, 128, 128), torch.full((1, 128, 128), 9)), 0)


def test_task_converts_backbone_and_heads():
    task = _task()
    randomize_bn(task)
    task.eval()
    x = torch.randn(2, 3, 128, 128)
    info = task.convert_to_deploy(x)
    assert info["relative_error"] <= 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.modules())
    assert task.backbone.deploy and task.decode_head.bottleneck.deploy
    # a task built deploy=True has the same keys and shapes
    built = _task(deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in task.state_dict().items()}
    # both run the CPU fusion pass over backbone and heads alike: every deploy ConvBN has a fused conv
    for model in (task, built):
        units = [m for m in model.modules() if isinstance(m, ConvBN)]
        assert units and all(isinstance(u.conv, FusedConvAct) for u in units)


def test_weights_match_loads_the_matching_tensors(tmp_path):
    """--model.weights_match matching: an ImageNet backbone (another class count) starts a
    segmentation task; the tensors whose name and shape fit are loaded, the rest named."""
    source = perturb_params(create("resnet_tiny_d8", img_size=64, num_classes=10), seed=2)
    path = tmp_path / "imagenet.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    task = _task(backbone="resnet_tiny_d8", weights=str(path), weights_match="matching")
    assert not torch.equal(task.backbone.layer2[0].conv2.conv.weight, source.layer2[0].conv2.conv.weight)
    task.setup("fit")  # the trainer's setup loads model.weights, once
    assert torch.equal(task.backbone.layer2[0].conv2.conv.weight, source.layer2[0].conv2.conv.weight)
    task.backbone.layer2[0].conv2.conv.weight.data.zero_()
    task.setup("test")
    assert not task.backbone.layer2[0].conv2.conv.weight.any()  # not loaded again over what was trained
    # a whole segmentation checkpoint (backbone + heads, DDP-prefixed): all of it fits
    seg = perturb_params(_task(backbone="resnet_tiny_d8"), seed=1)  # weights a fresh task does not have
    torch.save({f"module.{k}": v for k, v in seg.state_dict().items()}, path)
    assert not torch.equal(_task(backbone="resnet_tiny_d8").backbone.layer3[1].conv1.conv.weight,
                           seg.backbone.layer3[1].conv1.conv.weight)
    task = _task(backbone="resnet_tiny_d8")
    task.load_weights(str(path), match="matching")
    assert torch.equal(task.backbone.layer3[1].conv1.conv.weight, seg.backbone.layer3[1].conv1.conv.weight)
    assert torch.equal(task.decode_head.conv_seg.weight, seg.decode_head.conv_seg.weight)
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=f"model.weights {path}: no tensor of this train-time backbone weights "
                                         r"\(state dict\) fits the task"):
        _task(backbone="resnet_tiny_d8").load_weights(str(path), match="matching")
