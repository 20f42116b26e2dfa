"""The test stage's runtimes (tasks/runtime.py): the choices offered, the runners on the task's
forward (bf16 and INT8 torch, onnxruntime fp32 and INT8) against the fp32 torch model, the weights given
back, and the calibration inputs (training images, segmentation windows). The CLI form runs in
tests/e2e/test_deploy_runtimes.py."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb_params, randomize_bn

from backbones.deploy import bf16_supported
from datamodules.demo import classification_demo
from datamodules.imagenet import ImageNetDataModule
from tasks.classification import ClassificationTask
from tasks.runtime import RuntimeSpec, build_runner, first_inputs
from tasks.segmentation import SegmentationTask


@pytest.mark.parametrize("runtime, precision, message", [
    ("tensorrt", "fp32", "--runtime 'tensorrt': choose one of torch, onnxruntime"),
    ("torch", "fp16", "--precision 'fp16': choose one of fp32, bf16, int8"),
    ("onnxruntime", "bf16", "--runtime onnxruntime --precision bf16 is not offered (torch: fp32, bf16, int8; "
                            "onnxruntime: fp32, int8)"),
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
    task = ClassificationTask(backbone="repmlp_res_tiny", num_classes=7, backbone_kwargs={"img_size": 64})
    randomize_bn(perturb_params(task.backbone))
    if deploy:
        task.convert_to_deploy()
    return task.eval()


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16 (tested where it has: the AMX machines)")
def test_bf16_runner_runs_the_deploy_model_in_bf16_and_gives_the_fp32_weights_back():
    task = _classifier()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = task(x)
        runner = build_runner(task, RuntimeSpec("torch", "bf16"))
        assert next(task.backbone.parameters()).dtype == torch.bfloat16
        out = runner(x)
    assert out.dtype == torch.float32 and runner.calls == 1 and runner.batch_size == 4 and runner.seconds > 0
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    assert 0 < error < 3e-2
    runner.close()
    after = task.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_a_train_time_model_is_converted_before_it_runs_elsewhere(capsys):
    pytest.importorskip("onnxruntime")
    task = _classifier(deploy=False)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = task(x)
        runner = build_runner(task, RuntimeSpec("onnxruntime", "fp32"), [x])
        out = runner(x)
    assert task.deploy and "converting the train-time model to its deploy form first" in capsys.readouterr().out
    assert ((out - reference).abs().max() / reference.abs().max()).item() < 1e-4
    runner.close()


def test_onnxruntime_int8_runner_keeps_the_predictions_of_the_calibrated_model():
    pytest.importorskip("onnxruntime")
    task = _classifier()
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 3, 64, 64, generator=generator) for _ in range(4)]
    x = torch.randn(16, 3, 64, 64, generator=generator)
    with torch.no_grad():
        reference = task(x)
        runner = build_runner(task, RuntimeSpec("onnxruntime", "int8"), calibration)
        out = runner(x)
    assert runner.files[0].name == "model.int8.onnx" and runner.files[0].is_file()
    agree = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.75, agree
    runner.close()
    assert not runner.files[0].exists()  # the temporary export goes with the runner


def test_torch_int8_runner_is_compiled_for_the_test_batch_and_leaves_the_task_as_it_was(capsys):
    pytest.importorskip("torchao")
    task = _classifier()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 3, 64, 64, generator=generator) for _ in range(4)]
    x = torch.randn(16, 3, 64, 64, generator=generator)
    with torch.no_grad():
        reference = task(x)
    with pytest.raises(ValueError, match="--runtime torch --precision int8 needs inputs from the training images"):
        build_runner(task, RuntimeSpec("torch", "int8"), None)
    runner = build_runner(task, RuntimeSpec("torch", "int8"), calibration, batch_size=4)
    assert "INT8 (torch PT2E, compiled for batch 4" in capsys.readouterr().out
    out = torch.cat([runner(b) for b in x.split(4)])
    assert runner.calls == 4 and runner.batch_size == 4
    agree = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.75, agree
    assert 0 < ((out - reference).abs().max() / reference.abs().max()).item() < 0.1
    runner.close()
    after = task.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(task(x), reference)
