"""End to end: ``--trainer.precision bf16-mixed --model.channels_last true`` for every task.

Training runs in bf16 autocast and the channels_last layout; the deploy conversion runs in fp32 on
NCHW tensors (its error stays at fp32 level) and the test stage runs the precision it is asked
for (``--precision``, fp32 by default), not the trainer's: the test after fit scores the deploy
model exactly as a separate fp32 test of ``deploy.ckpt`` does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from backbones.deploy import bf16_supported
from datamodules.demo import cityscapes_demo, classification_demo
from conftest import assert_ok, read_results, run_task

pytestmark = pytest.mark.skipif(not bf16_supported(), reason="bf16 autocast on CPU needs native bf16 to be worth testing")

COMMON = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
          "--data.num_workers", "0", "--trainer.precision", "bf16-mixed", "--model.channels_last", "true"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory, small_face_root) -> dict[str, list[str]]:
    """Per task: the arguments that point it at a small dataset."""
    classes = classification_demo(tmp_path_factory.mktemp("cls"), train_per_class=4, val_per_class=2)
    city = cityscapes_demo(tmp_path_factory.mktemp("city"), train_images=4, val_images=2)
    return {
        "classification": ["--data.root", str(classes), "--trainer.limit_val_batches", "1",
                           "--trainer.limit_test_batches", "1"],
        "segmentation": ["--data.root", str(city), "--data.batch_size", "2"],
        "face": ["--data.root", str(small_face_root), "--data.batch_size", "8"],
    }


@pytest.mark.parametrize("task", ["classification", "segmentation", "face"])
def test_bf16_mixed_channels_last_fit_converts_in_fp32_and_tests_in_fp32(task, roots, tmp_path):
    data = roots[task]
    proc = assert_ok(run_task(task, "fit", *COMMON, *data, cwd=tmp_path, demo_root=tmp_path))
    assert "Using bfloat16 Automatic Mixed Precision" in proc.stdout + proc.stderr
    run = tmp_path / "runs" / f"{task}-demo" / "version_0"
    deploy = json.loads((run / "deploy.json").read_text())
    # the conversion compares fp32 outputs: bf16 would leave errors near 1e-2
    assert deploy["relative_error"] <= 1e-5, deploy
    after_fit = read_results(run)
    assert after_fit["precision"] == "fp32" and after_fit["deploy"] is True

    # the same deploy checkpoint tested by a plain fp32 trainer: the same metrics to fp32 rounding
    # (a test in autocast would move them by bf16's rounding, far more on these tiny sets' losses)
    assert_ok(run_task(task, "test", "-c", str(run / "config.yaml"), "--ckpt_path", str(run / "deploy.ckpt"),
                       "--trainer.precision", "32-true", cwd=tmp_path, demo_root=tmp_path))
    again = read_results(run.parent / "version_1")
    assert again["metrics"].keys() == after_fit["metrics"].keys()
    for key, value in after_fit["metrics"].items():
        assert again["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_checkpoint_trained_in_channels_last_resumes_and_loads_in_nchw(roots, tmp_path):
    """The layout is a training detail: a channels_last run's checkpoint loads into a plain NCHW
    task (the test above) and the deploy files are NCHW (safetensors would refuse other strides)."""
    data = roots["classification"]
    assert_ok(run_task("classification", "fit", *COMMON, *data, "--test_after_fit", "false",
                       cwd=tmp_path, demo_root=tmp_path))
    run = tmp_path / "runs" / "classification-demo" / "version_0"
    assert (run / "deploy.safetensors").is_file()
    assert_ok(run_task("classification", "fit", *COMMON, *data, "--test_after_fit", "false",
                       "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=tmp_path, demo_root=tmp_path))
    assert json.loads((run / "deploy.json").read_text())["relative_error"] <= 1e-5
