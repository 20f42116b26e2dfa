"""``tasks.compare`` on synthetic ``results.json`` files: what it refuses, how it shows a metric,
what it plots. The measurement is stubbed (tests/e2e/test_compare.py measures real runs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks.compare as compare_module
from tasks.compare import main as compare_main

DATA = {"kind": "image_folder_classification", "root": "/data/imagenet", "split": "val", "image_size": [32, 32],
        "classes": ["cat", "dog"]}


def _run(tmp_path: Path, name: str, **fields) -> Path:
    """A run folder holding a well-formed results.json with ``fields`` replaced (None removes one)."""
    results = {"task": "classification", "backbone": name, "metrics": {"test/top1": 0.5, "test/loss": 1.5},
               "params": 1000, "flops": 2e6, "input_size": [32, 32], "hparams": {"backbone": name},
               "primary_metric": "test/top1", "data": DATA, "reparam": {"relative_error": 1e-7}}
    results.update(fields)
    results = {k: v for k, v in results.items() if v is not None}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder / "results.json"


@pytest.fixture
def plotted(monkeypatch) -> SimpleNamespace:
    """The panels and caption compare draws (captured instead of drawn), with the measurement stubbed."""
    plot = SimpleNamespace(panels=[], caption=None)
    monkeypatch.setattr(compare_module, "measure", lambda run, batch_size, iters, device="cpu": {
        "params_train": run.results["params"], "params_deploy": run.results["params"] // 2,
        "gflops": run.results["flops"] / 1e9, "throughput": 100.0})

    def draw(panels, path, caption=""):
        plot.panels, plot.caption = panels, caption

    monkeypatch.setattr(compare_module, "draw_panels", draw)
    return plot


def _compare(tmp_path: Path, *args: str) -> int:
    return compare_main([*map(str, args), "--out", str(tmp_path / "cmp"), "--iters", "1"])


def test_runs_on_different_data_are_refused_naming_both(tmp_path, plotted, capsys):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", data={**DATA, "root": "/data/other", "image_size": [64, 64]})
    c = _run(tmp_path, "c", data={**DATA, "image_size": [64, 64]})  # a model's input size is not the data
    d = _run(tmp_path, "d", data=None)
    assert _compare(tmp_path, a, b) == 2
    err = capsys.readouterr().err
    assert f"{a} and {b} were tested on different data: root" in err and "/data/other" in err
    assert "--allow-different-data" in err and not (tmp_path / "cmp").exists()
    assert _compare(tmp_path, a, d) == 2
    err = capsys.readouterr().err
    assert f"{d} records no test data" in err and "older version" in err and "--allow-different-data" in err
    assert _compare(tmp_path, a, c) == 0
    assert "Test data: image_folder_classification val split of /data/imagenet, 2 classes" in capsys.readouterr().out


def test_different_data_allowed_with_the_flag_is_labelled(tmp_path, plotted, capsys):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", data={**DATA, "split": "train"})
    c = _run(tmp_path, "c", data=None)
    assert _compare(tmp_path, a, b, c, "--allow-different-data") == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "**Mixed test data**" in table and "| data |" in table
    assert "val split of /data/imagenet, 2 classes |" in table and "train split of /data/imagenet, 2 classes |" in table
    assert "| not recorded |" in table
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert [row["data"].split(" ")[1] for row in rows] == ["val", "train", "recorded"]


def test_runs_ranked_by_different_metrics_are_refused(tmp_path, plotted, capsys):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", primary_metric="test/loss")
    assert _compare(tmp_path, a, b) == 2
    err = capsys.readouterr().err
    assert f"{a} has primary_metric 'test/top1', {b} has 'test/loss'" in err


def test_a_run_without_its_metric_is_shown_as_missing_and_not_plotted(tmp_path, plotted):
    a = _run(tmp_path, "a", metrics={"test/top1": 0.25})
    b = _run(tmp_path, "b", metrics={"test/loss": 2.0})
    c = _run(tmp_path, "c", metrics={"test/top1": None})  # NaN is written as null
    assert _compare(tmp_path, a, b, c) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| a (baseline) | 25.00 | — |" in table and "| b | — | — |" in table and "| c | — | — |" in table
    assert [[(p.label, p.y) for p in panel.points] for panel in plotted.panels] == [[("a", 25.0)]] * 2
    assert "not plotted, no test/top1: b, c" in plotted.caption


def test_a_metric_that_is_not_a_fraction_is_shown_raw(tmp_path, plotted):
    a = _run(tmp_path, "a", primary_metric="test/loss", metrics={"test/loss": 230.17})
    b = _run(tmp_path, "b", primary_metric="test/loss", metrics={"test/loss": 229.5})
    assert _compare(tmp_path, a, b) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| model | test/loss | Δ vs baseline |" in table and "(%)" not in table
    assert "| a (baseline) | 230.2 | — |" in table and "| b | 229.5 | -0.67 |" in table
    assert [p.y for p in plotted.panels[0].points] == [230.17, 229.5]


@pytest.mark.parametrize("field,value", [
    ("task", 3), ("backbone", None), ("metrics", {"test/top1": "high"}), ("metrics", [0.5]), ("params", 1.5),
    ("params", True), ("flops", "2e6"), ("input_size", [32]), ("input_size", [0, 32]), ("input_size", "32x32"),
    ("hparams", []), ("primary_metric", None), ("primary_metric", 1), ("data", [DATA]), ("reparam", {"relative_error": "small"}),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, plotted, capsys, field, value):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b")
    results = json.loads(b.read_text())
    if value is None:
        del results[field]
    else:
        results[field] = value
    b.write_text(json.dumps(results))
    assert _compare(tmp_path, a, b) == 2
    err = capsys.readouterr().err
    expected = f"{b}: missing {field}" if value is None else f"{b}: field {field!r} must be"
    assert expected in err and not (tmp_path / "cmp").exists()


def test_each_runtime_and_precision_is_a_row_measured_against_the_baselines_fp32_torch_row(tmp_path, plotted, capsys):
    base = _run(tmp_path, "b", metrics={"test/top1": 0.8})
    fp32 = _run(tmp_path, "r", metrics={"test/top1": 0.9})
    int8 = _run(tmp_path, "r_int8", backbone="r", runtime="onnxruntime", precision="int8", metrics={"test/top1": 0.85})
    base_bf16 = _run(tmp_path, "b_bf16", backbone="b", runtime="torch", precision="bf16", metrics={"test/top1": 0.79})
    assert _compare(tmp_path, base_bf16, fp32, int8, base, "--baseline", "b") == 0
    rows = {row["model"]: row for row in csv.DictReader(open(tmp_path / "cmp" / "comparison.csv"))}
    assert set(rows) == {"b", "b [torch bf16]", "r", "r [onnxruntime int8]"}
    assert rows["b"]["baseline"] == "True" and rows["b [torch bf16]"]["baseline"] == "False"
    assert (rows["r [onnxruntime int8]"]["runtime"], rows["r [onnxruntime int8]"]["precision"]) == ("onnxruntime", "int8")
    assert float(rows["r [onnxruntime int8]"]["delta"]) == pytest.approx(0.05)
    assert float(rows["b [torch bf16]"]["delta"]) == pytest.approx(-0.01)
    assert {p.group for p in plotted.panels[0].points} == {"torch fp32", "torch bf16", "onnxruntime int8"}
    assert "| r [onnxruntime int8] | 85.00 | +5.00 |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_runtime_field_out_of_its_choices_is_named(tmp_path, plotted, capsys):
    bad = _run(tmp_path, "a", runtime="tensorrt")
    assert _compare(tmp_path, bad) == 2
    assert f"{bad}: field 'runtime' must be one of torch, onnxruntime" in capsys.readouterr().err


def test_a_run_folder_gives_a_row_per_test_in_it(tmp_path, plotted):
    """fit --test_after_fit [torch/fp32, torch/int8] leaves results.json and results.torch-int8.json
    in one folder: both are rows, the fp32 one first; a folder of several runs is refused."""
    fp32 = _run(tmp_path, "r", metrics={"test/top1": 0.9})
    int8 = json.loads(fp32.read_text()) | {"runtime": "torch", "precision": "int8", "metrics": {"test/top1": 0.88}}
    (fp32.parent / "results.torch-int8.json").write_text(json.dumps(int8))
    (fp32.parent / ".results.json.x.tmp").write_text("{")  # an interrupted save is no test
    runs = compare_module.load_runs(str(fp32.parent))
    assert [(r.path.name, r.spec.precision) for r in runs] == [("results.json", "fp32"), ("results.torch-int8.json", "int8")]
    assert [r.path.name for r in compare_module.load_runs(str(tmp_path))] == ["results.json", "results.torch-int8.json"]
    assert _compare(tmp_path, fp32.parent) == 0
    rows = {row["model"]: row for row in csv.DictReader(open(tmp_path / "cmp" / "comparison.csv"))}
    assert set(rows) == {"r", "r [torch int8]"} and float(rows["r [torch int8]"]["delta"]) == pytest.approx(-0.02)
    _run(tmp_path, "other")
    with pytest.raises(compare_module.CompareError, match="holds 2 runs; name one of them"):
        compare_module.load_runs(str(tmp_path))
