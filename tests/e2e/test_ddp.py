"""DDP through the real CLI on CPU (gloo): two processes on one machine, and two torchrun "nodes".

For each task a 2-process ``fit`` (with its validation and the ``test`` after fit) must give the
metrics that one process gives for the same weights on the same data: the evaluation sets are
sized so that the ranks get unequal shares, which a padding sampler would count twice. The deploy
model is written once. (Training itself differs from a single-process run by design: each rank
normalizes its half of the batch, and SyncBatchNorm needs a GPU.)
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_ok, free_port, read_results, run_task
from datamodules.demo import cityscapes_demo, classification_demo

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
COMMON = ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
          "--data.num_workers", "0"]


def _last_val(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every ``val/`` metric."""
    values: dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v})
    return values


def _assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a and a.keys() == b.keys(), (a, b)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a[key], b[key])


def _ddp_fit_equals_single_process(task: str, args: list[str], cwd: Path) -> dict:
    """2-process fit + test, then one process validates its last checkpoint and tests its deploy
    checkpoint: the metrics must be equal. Returns the DDP run's results."""
    proc = assert_ok(run_task(task, "fit", *args, *DDP, cwd=cwd, demo_root=cwd, timeout=500))
    assert (proc.stdout + proc.stderr).count("ReparamCallback: deploy model written") == 1
    runs = cwd / "runs"
    [run] = [p.parent for p in runs.rglob("deploy.ckpt")]  # one deploy model, one run folder
    assert len(list(run.parent.iterdir())) == 1 and "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr

    name = ["--trainer.logger.init_args.name"]
    assert_ok(run_task(task, "validate", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *name, "single-val",
                       cwd=cwd, demo_root=cwd))
    _assert_same(_last_val(run / "metrics.csv"), _last_val(runs / "single-val" / "version_0" / "metrics.csv"))

    assert_ok(run_task(task, "test", *args, "--ckpt_path", str(run / "deploy.ckpt"), *name, "single-test", cwd=cwd, demo_root=cwd))
    ddp, single = read_results(run), read_results(runs / "single-test" / "version_0")
    assert ddp["deploy"] and single["deploy"]
    _assert_same(ddp["metrics"], single["metrics"])
    return ddp


def test_classification(tmp_path):
    root = classification_demo(tmp_path / "data", train_per_class=2, val_per_class=2, image_size=72)
    sorted((root / "val").rglob("*.JPEG"))[0].unlink()  # 19 images: ranks take 10 and 9
    _ddp_fit_equals_single_process("classification", ["--data.root", str(root), "--data.batch_size", "4", *COMMON], tmp_path)


def test_segmentation(tmp_path):
    root = cityscapes_demo(tmp_path / "data", train_images=4, val_images=2)
    image = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    label = sorted((root / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    shutil.copy(image, image.with_name("extra_000000_000019_leftImg8bit.png"))  # 3 images: ranks take 2 and 1
    shutil.copy(label, label.with_name("extra_000000_000019_gtFine_labelIds.png"))
    args = ["--data.root", str(root), "--model.backbone", "resnet_tiny_d8", "--model.head_channels", "16",
            "--model.aux_channels", "8", "--data.batch_size", "2", "--data.persistent_workers", "false", *COMMON]
    _ddp_fit_equals_single_process("segmentation", args, tmp_path)
    # the validate subcommand under DDP, too
    last = tmp_path / "runs" / "segmentation-demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert_ok(run_task("segmentation", "validate", *args, *DDP, "--ckpt_path", str(last), "--trainer.logger.init_args.name",
                       "ddp-val", cwd=tmp_path, demo_root=tmp_path, timeout=300))
    runs = tmp_path / "runs"
    _assert_same(_last_val(runs / "ddp-val" / "version_0" / "metrics.csv"), _last_val(runs / "single-val" / "version_0" / "metrics.csv"))


def test_face(small_face_root, tmp_path):
    """20 pairs per set in batches of 3: rank 0 takes 4 batches, rank 1 three and a pair."""
    args = ["--data.root", str(small_face_root), "--data.batch_size", "8", "--data.val_batch_size", "3",
            "--trainer.limit_train_batches", "2", *COMMON]
    results = _ddp_fit_equals_single_process("face", args, tmp_path)
    assert [s["pairs"] for s in results["verification"].values()] == [20, 20]


def test_two_torchrun_nodes(tmp_path):
    """``torchrun --nnodes 2`` on localhost, one process per "node" (node ranks 0 and 1), as on a
    cluster: Lightning reads the torchelastic environment; fit, test and the deploy model once."""
    root = classification_demo(tmp_path / "data", train_per_class=2, val_per_class=1, image_size=72)
    port = str(free_port())
    env = {**os.environ, "REPMLP_DEMO_ROOT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "tasks.classification", "fit", "--data.root", str(root), "--data.batch_size", "4", *COMMON,
               "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"]
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=500)[0] for p in nodes]
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-4000:]
    text = "".join(outputs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text and text.count("ReparamCallback: deploy model written") == 1
    [run] = [p.parent for p in (tmp_path / "runs").rglob("deploy.ckpt")]
    results = read_results(run)
    assert results["deploy"] and 0.0 <= results["metrics"]["test/top1"] <= 1.0


@pytest.mark.parametrize("config", ["classification/imagenet_trainer.yaml", "segmentation/cityscapes_trainer.yaml",
                                    "face/face_trainer.yaml", "face/mobilefacenet.yaml"])
def test_gpu_configs_use_ddp_with_sync_batchnorm_and_keep_the_latest_state(config):
    """SyncBatchNorm is for GPUs (torch refuses it on CPU); Lightning reverts it before the deploy
    conversion, which refuses it otherwise (tests/backbones/test_blocks.py)."""
    trainer = yaml.safe_load((REPO / "configs" / config).read_text())
    trainer = trainer.get("trainer", trainer)
    assert trainer["accelerator"] == "gpu" and trainer["strategy"] == "ddp" and trainer["sync_batchnorm"] is True
    latest = [c["init_args"] for c in trainer["callbacks"] if c["init_args"].get("filename") == "last"]
    assert latest and ("every_n_train_steps" in latest[0] or latest[0].get("save_on_train_epoch_end"))
