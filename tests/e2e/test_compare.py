"""``python -m tasks.compare``: three real test runs side by side, and the runs it refuses."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import cv2
import pytest

from conftest import REPO, assert_ok, run_task
from datamodules.demo import SHAPES, classification_demo
from tasks.compare import main as compare_main

MODELS = ["resnet_tiny", "repmlp_res_tiny", "repmlp_res_light_tiny"]


def _compare(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.compare", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``python -m tasks.classification test`` of three models (untrained: the metric is whatever they score)."""
    cwd = tmp_path_factory.mktemp("compare")
    root = classification_demo(cwd / "data", train_per_class=1, val_per_class=2, image_size=72)
    for model in MODELS:
        assert_ok(run_task("classification", "test", "--data.root", str(root), "--model.backbone", model,
                           "--trainer.logger.init_args.name", model, "--trainer.enable_progress_bar", "false",
                           "--data.num_workers", "0", cwd=cwd, demo_root=cwd))
    return cwd


def test_three_runs_give_the_table_the_csv_and_the_plot(runs):
    proc = assert_ok(_compare("runs/resnet_tiny", "runs/repmlp_res_tiny/version_0", "runs/repmlp_res_light_tiny/version_0/results.json",
                              "--baseline", "resnet_tiny", "--out", "cmp", "--iters", "2", cwd=runs))
    out = runs / "cmp"
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["model"] for r in rows] == MODELS
    assert [r["baseline"] for r in rows] == ["True", "False", "False"]
    results = {m: json.loads((runs / "runs" / m / "version_0" / "results.json").read_text()) for m in MODELS}
    [root] = (runs / "data").iterdir()
    for result in results.values():  # what the runs were tested on
        data = result["data"]
        assert data.pop("image_size") == result["input_size"]
        assert data == {"kind": "image_folder_classification", "root": str(root.resolve()), "split": "val",
                        "classes": sorted(SHAPES)}
    for row in rows:
        metric = results[row["model"]]["metrics"]["test/top1"]
        assert float(row["metric"]) == pytest.approx(metric)
        assert float(row["delta"]) == pytest.approx(metric - results["resnet_tiny"]["metrics"]["test/top1"])
        assert float(row["throughput"]) > 0 and float(row["gflops"]) > 0
    # the RepMLP models lose parameters in conversion; the plain ResNet loses only its BN affine pairs
    params = {r["model"]: (int(r["params_train"]), int(r["params_deploy"])) for r in rows}
    assert all(deploy < train for train, deploy in params.values())
    assert float(rows[0]["speed_vs_baseline"]) == 1.0

    table = (out / "comparison.md").read_text()
    assert table in proc.stdout and "| resnet_tiny (baseline) |" in table and table.count("\n| repmlp_res_") == 2
    assert "top-1 (%)" in table and "batch 8" in table
    assert f"Test data: image_folder_classification val split of {root.resolve()}, {len(SHAPES)} classes." in table
    image = cv2.imread(str(out / "comparison.png"))
    assert image is not None and image.shape[1] > image.shape[0] > 300 and (image < 128).any()
    svg = (out / "comparison.svg").read_text()
    assert svg.startswith("<?xml") and "repmlp_res_tiny" in svg and "resnet_tiny (baseline)" in svg


def test_mixed_tasks_are_refused(runs, tmp_path, monkeypatch, capsys):
    other = json.loads((runs / "runs" / "resnet_tiny" / "version_0" / "results.json").read_text())
    other["task"] = "segmentation"
    (tmp_path / "results.json").write_text(json.dumps(other))
    monkeypatch.chdir(runs)
    assert compare_main(["runs/resnet_tiny", str(tmp_path / "results.json"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "runs of different tasks cannot be compared" in err and "classification: runs/resnet_tiny" in err
    assert not (tmp_path / "cmp").exists()


def test_unclear_arguments_are_named(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(runs)
    for argv, message in (
        (["runs"], "runs holds 3 runs; name one of them"),  # three runs below: which one?
        (["runs/resnet_tiny", "runs/repmlp_res_tiny", "--baseline", "resnet50"], "--baseline 'resnet50' must name exactly one run"),
        (["runs/missing"], "runs/missing: no such file or folder"),
    ):
        assert compare_main([*argv, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_a_converted_published_model_sits_beside_the_tested_runs(runs):
    """An official RepVGG file (made from the official key/shape listing, tests/published_layouts.py)
    converted with ``backbones.official``, tested with ``--model.weights`` on the same data, and
    compared with the runs above: one more row, measured like the others."""
    import torch
    from published_layouts import official_repvgg

    state = official_repvgg(depths=(1, 2, 2, 1), widths=(16, 32, 64, 128), stem=16, classes=len(SHAPES), seed=0)
    torch.save({k: v.float() for k, v in state.items()}, runs / "RepVGG-tiny-train.pth")
    convert = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", "repvgg_a0_tiny", "RepVGG-tiny-train.pth",
                              "published.safetensors", "--overwrite"], cwd=runs, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert convert.returncode == 0 and "official RepVGG checkpoint (DingXiaoH/RepVGG)" in convert.stdout, convert.stderr
    [root] = (runs / "data").iterdir()
    assert_ok(run_task("classification", "test", "--data.root", str(root), "--model.backbone", "repvgg_a0_tiny",
                       "--model.backbone_kwargs", "{}", "--model.weights", "published.safetensors",
                       "--trainer.logger.init_args.name", "published", "--trainer.enable_progress_bar", "false",
                       "--data.num_workers", "0", cwd=runs, demo_root=runs))
    assert_ok(_compare("runs/resnet_tiny", "runs/published", "--baseline", "resnet_tiny", "--out", "cmp_published",
                       "--iters", "2", cwd=runs))
    rows = {r["model"]: r for r in csv.DictReader(open(runs / "cmp_published" / "comparison.csv"))}
    assert set(rows) == {"resnet_tiny", "repvgg_a0_tiny"}
    published = json.loads((runs / "runs" / "published" / "version_0" / "results.json").read_text())
    assert float(rows["repvgg_a0_tiny"]["metric"]) == pytest.approx(published["metrics"]["test/top1"])
    assert float(rows["repvgg_a0_tiny"]["throughput"]) > 0
