"""The demo classification run deployed where users deploy: exported to ONNX (fp32 and INT8) with
``python -m tasks.export``, and scored by the test stage on onnxruntime INT8 and on torch bf16,
each against the run's own fp32 test (same data, same metric code)."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_failed, assert_ok, read_results, run_task

pytest.importorskip("onnxruntime", reason="the ONNX runtime tests need the extra: pip install -e '.[onnx]'")


@pytest.fixture(scope="module")
def run(demo_runs, tmp_path_factory):
    """A copy of the classification demo run (the shared one stays untouched), its demo cache and a cwd."""
    _, demo_root, original, _ = demo_runs("classification")
    cwd = tmp_path_factory.mktemp("deploy")
    copy = cwd / "run"
    shutil.copytree(original, copy)
    return cwd, demo_root, copy


def test_export_writes_checked_onnx_beside_the_checkpoint_and_never_overwrites(run):
    cwd, demo_root, folder = run
    proc = assert_ok(run_task("export", str(folder), "--precision", "int8", "--calibration_images", "64",
                              cwd=cwd, demo_root=demo_root))
    assert "check: onnxruntime fp32 against the PyTorch model, max relative error" in proc.stdout
    assert "INT8: calibrated on 64 training inputs" in proc.stdout
    assert (folder / "deploy.int8.onnx").stat().st_size > 0 and not list(folder.glob(".export-*"))
    assert_ok(run_task("export", str(folder), cwd=cwd, demo_root=demo_root))
    assert (folder / "deploy.onnx").stat().st_size > (folder / "deploy.int8.onnx").stat().st_size
    assert_failed(run_task("export", str(folder), cwd=cwd, demo_root=demo_root), "deploy.onnx already exists", "--overwrite")
    assert_failed(run_task("export", str(folder), "--format", "tflite", cwd=cwd, demo_root=demo_root),
                  "--format 'tflite': choose one of onnx")


@pytest.mark.parametrize("runtime, precision, drop", [("onnxruntime", "int8", 0.03), ("torch", "bf16", 0.01)])
def test_the_test_stage_scores_each_runtime_against_fp32(run, runtime, precision, drop):
    cwd, demo_root, folder = run
    name = f"{runtime}-{precision}"
    proc = assert_ok(run_task("classification", "test", "--config", str(folder / "config.yaml"),
                              "--ckpt_path", str(folder / "deploy.ckpt"), "--runtime", runtime, "--precision", precision,
                              "--calibration_images", "64", "--trainer.logger.init_args.name", name,
                              cwd=cwd, demo_root=demo_root))
    results, fp32 = read_results(cwd / "runs" / name / "version_0"), read_results(folder)
    assert (results["runtime"], results["precision"], fp32["runtime"], fp32["precision"]) == (runtime, precision, "torch", "fp32")
    assert results["data"] == fp32["data"]  # same images, same metric code
    assert results["metrics"]["test/top1"] >= fp32["metrics"]["test/top1"] - drop, (results["metrics"], fp32["metrics"])
    throughput = results["throughput"]
    assert throughput["images"] == fp32["throughput"]["images"] > 0 and throughput["images_per_s"] > 0
    assert throughput["threads"] >= 1 and throughput["batch_size"] >= 1
    print(json.dumps({name: results["metrics"]["test/top1"], "fp32": fp32["metrics"]["test/top1"]}))
    assert proc.returncode == 0
