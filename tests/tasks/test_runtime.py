"""The test stage's runtimes (tasks/runtime.py): the choices offered, the runners on the task's
forward (bf16 torch, onnxruntime fp32 and INT8) against the fp32 torch model, the weights given
back, and the calibration inputs (training images, segmentation windows). The CLI form runs in
tests/e2e/test_deploy_runtimes.py."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb_params, randomize_bn
from datamodules.demo import classification_demo
from datamodules.imagenet import ImageNetDataModule
from tasks.classification import ClassificationTask
from tasks.runtime import RuntimeSpec, build_runner, first_inputs
from tasks.segmentation import SegmentationTask


@pytest.mark.parametrize("runtime, precision, message", [
    ("tensorrt", "fp32", "--runtime 'tensorrt': choose one of torch, onnxruntime"),
    ("torch", "fp16", "--precision 'fp16': choose one of fp32, bf16, int8"),
    ("torch", "int8", "--runtime torch --precision int8 is not offered (torch: fp32, bf16; onnxruntime: fp32, int8)"),
    ("onnxruntime", "bf16", "--runtime onnxruntime --precision bf16 is not offered"),
])
def test_the_choices_are_named(runtime, precision, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RuntimeSpec(runtime, precision)


def test_calibration_images_come_from_the_training_split_seeded(tmp_path):
    root = classification_demo(tmp_path, train_per_class=4, val_per_class=2, image_size=40)
    dm = ImageNetDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0, pin_memory=False)
    batches = dm.calibration_batches(10, seed=3)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    again = torch.cat(dm.calibration_batches(10, seed=3))
    assert torch.equal(torch.cat(batches), again)
    assert not torch.equal(again, torch.cat(dm.calibration_batches(10, seed=4)))
    dm.setup("validate")
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    # no calibration image is a validation image
    assert not any(torch.equal(c, v) for c in again for v in val)
    assert [tuple(b.shape) for b in first_inputs(batches, 6)] == [(4, 3, 32, 32), (2, 3, 32, 32)]


def test_segmentation_calibrates_on_the_windows_it_runs():
    task = SegmentationTask(backbone="resnet_tiny_d8", num_classes=5, head_channels=8, aux_channels=4,
                            backbone_kwargs={"img_size": 32}, slide_stride=[24, 24])
    images = torch.randn(2, 3, 40, 56)
    windows = task.calibration_inputs(images)
    assert windows.shape == (2 * 2 * 2, 3, 32, 32)  # 2 rows x 2 cols of 32-windows, stride 24, per image
    assert torch.equal(windows[0], images[0, :, :32, :32]) and torch.equal(windows[-1], images[1, :, 8:, 24:])


def _classifier(deploy: bool = True) -> ClassificationTask:
    task = ClassificationTask(backbone="repmlp_res_tiny", num_classes=7)
    randomize_bn(perturb_params(task.backbone))
    if deploy:
        task.convert_to_deploy()
    return task.eval()
