"""Compare test runs of one task side by side: ``python -m tasks.compare RUN_OR_RESULTS... [--baseline NAME] [--out DIR]``.

Each argument is a ``results.json`` written by ``python -m tasks.X test`` (or by ``fit``, which
tests the deploy model when it ends), or the run folder holding it: then every test in it, the
``results.<runtime>-<precision>.json`` of ``--test_after_fit`` pairs too. A test is one row: a model on
the runtime and precision it was tested on (``name [onnxruntime int8]`` when not fp32 torch). For
every row:

- the task's metric (top-1, mIoU or verification accuracy) and its difference to the baseline
  (the baseline model's fp32 torch row);
- measured now, on a model rebuilt from the run's hyperparameters (random weights: size and speed
  do not depend on them): parameters of the train-time and of the deploy form, the deploy
  model's FLOPs at the run's input size, and its throughput in images/s on this machine, on the
  row's runtime and precision, at ``--batch-size`` (median of ``--iters`` batches after a warm-up);
- the train-to-deploy conversion error the run recorded.

Writes ``comparison.md``, ``comparison.csv``, and ``comparison.png`` and ``.svg`` (metric against throughput
and against deploy parameters, one point per row with the metric, a marker shape per runtime and
precision, the baseline marked) into
``--out`` and prints the table. Refused: runs of different tasks, runs ranked by different
primary metrics, and runs tested on different data (or with no record of it) unless
``--allow-different-data``, which labels each row with its data instead.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from backbones.complexity import count_macs, count_params

from .base import RESULTS_FILE, RESULTS_PATTERN
from .plot import FORMATS, Panel, Point, draw_panels
from .runtime import PRECISIONS, RUNTIMES, RuntimeSpec, build_runner

__all__ = ["CompareError", "Run", "load_run", "load_runs", "check_comparable", "measure", "compare", "main"]

# Metrics known to be fractions, shown x100 as percentages under these names; any other is shown raw.
PERCENT_METRICS = {"test/top1": "top-1 (%)", "test/mIoU": "mIoU (%)", "test/acc": "verification acc. (%)"}
# Fields of a run's data record that do not identify the data: models differ in input size.
DATA_NOT_IDENTITY = ("image_size",)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics(value: Any) -> bool:  # null: a metric that was NaN (e.g. mIoU of an unlabelled split)
    return isinstance(value, dict) and all(isinstance(k, str) and (v is None or _number(v)) for k, v in value.items())


def _size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_integer(v) and v > 0 for v in value)


def _reparam(value: Any) -> bool:
    return value is None or isinstance(value, dict) and (value.get("relative_error") is None or _number(value["relative_error"]))


# Every field of results.json that this module reads: (required, check, what it must be).
FIELDS = {
    "task": (True, lambda v: isinstance(v, str), "a string"),
    "backbone": (True, lambda v: isinstance(v, str), "a string"),
    "metrics": (True, _metrics, "an object of numbers (or null) by metric name"),
    "params": (True, _integer, "an integer"),
    "flops": (True, _number, "a number"),
    "input_size": (True, _size, "a list of two positive integers"),
    "hparams": (True, lambda v: isinstance(v, dict), "an object"),
    "primary_metric": (True, lambda v: isinstance(v, str), "a string"),
    "data": (False, lambda v: v is None or isinstance(v, dict), "an object or null"),
    "reparam": (False, _reparam, "null or an object whose relative_error is a number or null"),
    "runtime": (False, lambda v: v in RUNTIMES, f"one of {', '.join(RUNTIMES)}"),
    "precision": (False, lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
}


class CompareError(ValueError):
    """A run that cannot be read or compared; the message names the file."""


@dataclass
class Run:
    """One tested model, as read from its ``results.json``."""

    name: str
    path: Path
    results: dict[str, Any]

    @property
    def task(self) -> str:
        return self.results["task"]

    @property
    def metric_key(self) -> str:
        return self.results["primary_metric"]

    @property
    def metric(self) -> Optional[float]:
        """The primary metric; None when the run did not record it (or recorded NaN as null)."""
        value = self.results["metrics"].get(self.metric_key)
        return None if value is None else float(value)

    @property
    def data(self) -> Optional[dict[str, Any]]:
        return self.results.get("data")

    @property
    def spec(self) -> RuntimeSpec:
        """What the run was tested on (files written before runtimes were recorded: torch fp32)."""
        return RuntimeSpec(self.results.get("runtime", "torch"), self.results.get("precision", "fp32"))

    @property
    def conversion_error(self) -> Optional[float]:
        return (self.results.get("reparam") or {}).get("relative_error")


def _results_paths(arg: str) -> list[Path]:
    """The results files an argument names: the file itself, or every test of a run folder
    (``results.json`` and the ``results.<runtime>-<precision>.json`` beside it), or those of the one
    run folder below it."""
    path = Path(arg)
    if path.is_file():
        return [path]
    if not path.exists():
        raise CompareError(f"{arg}: no such file or folder (give a run folder or its {RESULTS_FILE})")
    here = sorted(path.glob(RESULTS_PATTERN), key=lambda p: (p.name != RESULTS_FILE, p.name))
    if here:
        return here
    folders = sorted({p.parent for p in path.rglob(RESULTS_PATTERN)})
    if len(folders) == 1:
        return _results_paths(str(folders[0]))
    if not folders:
        raise CompareError(f"{arg}: no {RESULTS_FILE} in this folder or below; run `python -m tasks.<task> test` first")
    listing = "\n  ".join(str(p) for p in folders[:10])
    raise CompareError(f"{arg} holds {len(folders)} runs; name one of them:\n  {listing}")


def load_runs(arg: str) -> list[Run]:
    """The tests an argument names (:func:`_results_paths`), one :class:`Run` each."""
    return [load_run(path) for path in _results_paths(arg)]


def load_run(path: Path) -> Run:
    """Read one results file; its name is the backbone (see :func:`compare` for how rows are told apart)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: not a readable results file ({exc})") from exc
    if not isinstance(results, dict):
        raise CompareError(f"{path}: not a results file (a JSON object); re-run `python -m tasks.<task> test` to rewrite it")
    missing = [k for k, (required, _, _) in FIELDS.items() if required and k not in results]
    if missing:
        raise CompareError(f"{path}: missing {', '.join(missing)}; re-run `python -m tasks.<task> test` to rewrite it")
    for key, (_, valid, what) in FIELDS.items():
        if key in results and not valid(results[key]):
            raise CompareError(f"{path}: field {key!r} must be {what}, got {_short(results[key])}")
    return Run(results["backbone"], path, results)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _data_label(data: Optional[dict[str, Any]]) -> str:
    """One line naming a run's test data (kind, split, root or generator, classes or sets)."""
    if data is None:
        return "not recorded"
    generator = data.get("generator")
    source = (", ".join(f"{k}={v}" for k, v in generator.items()) if isinstance(generator, dict)
              else str(data.get("root", "unknown root")))
    label = f"{data.get('kind', 'unknown kind')} {data.get('split', '?')} split of {source}"
    if isinstance(data.get("classes"), list):
        label += f", {len(data['classes'])} classes"
    if isinstance(data.get("sets"), list):
        label += f", sets {', '.join(map(str, data['sets']))}"
    return label


def check_comparable(runs: Sequence[Run], allow_different_data: bool = False) -> bool:
    """Refuse (CompareError naming both results files and the field) runs of different tasks, runs
    ranked by different primary metrics, and, unless ``allow_different_data``, runs whose data
    records differ in anything but :data:`DATA_NOT_IDENTITY` or that have no data record.
    Returns whether the runs' data differ or go unrecorded (only possible with ``allow_different_data``)."""
    tasks = sorted({r.task for r in runs})
    if len(tasks) > 1:
        by_task = "; ".join(f"{t}: {', '.join(str(r.path) for r in runs if r.task == t)}" for t in tasks)
        raise CompareError(f"runs of different tasks cannot be compared ({by_task}); compare one task at a time")
    first = runs[0]
    for r in runs[1:]:
        if r.metric_key != first.metric_key:
            raise CompareError(f"runs ranked by different metrics cannot be compared: {first.path} has primary_metric "
                               f"{first.metric_key!r}, {r.path} has {r.metric_key!r}")
    flag = "--allow-different-data"
    identity = lambda r: {k: v for k, v in (r.data or {}).items() if k not in DATA_NOT_IDENTITY}  # noqa: E731
    mixed = False
    for r in runs:
        if r.data is None:
            if not allow_different_data:
                raise CompareError(f"{r.path} records no test data (field 'data'): it was written by an older version; "
                                   f"re-run `python -m tasks.{r.task} test` to rewrite it, or pass {flag}")
            mixed = True
        elif identity(r) != identity(first) or first.data is None:
            mixed = True
            if not allow_different_data:
                a, b = identity(first), identity(r)
                field = next(k for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k))
                raise CompareError(f"{first.path} and {r.path} were tested on different data: {field} "
                                   f"{_short(a.get(field))} vs {_short(b.get(field))}; compare runs on the same "
                                   f"test data, or pass {flag} to compare them anyway (each row is labelled with its data)")
    return mixed


def _task_class(task: str) -> type:
    if task == "classification":
        from .classification import ClassificationTask as cls
    elif task == "segmentation":
        from .segmentation import SegmentationTask as cls
    elif task == "face":
        from .face import FaceTask as cls
    else:
        raise CompareError(f"unknown task {task!r}")
    return cls


def measure(run: Run, batch_size: int, iters: int, device: str = "cpu") -> dict[str, float]:
    """Rebuild the run's task from its hyperparameters (random weights) and measure it now:
    ``params_train``, ``params_deploy``, ``gflops`` of the deploy model at the run's input size,
    and ``throughput``: deploy images/s on ``device`` on the run's runtime and precision
    (:func:`tasks.runtime.build_runner`; INT8 calibrated on random inputs, which does not change
    its speed), the median of ``iters`` timed batches."""
    cls = _task_class(run.task)
    hparams = run.results["hparams"]  # ReparamTask.results already leaves out LightningCLI's private keys
    size = tuple(run.results["input_size"])
    params_train = count_params(cls(**{**hparams, "deploy": False}))
    task = cls(**{**hparams, "deploy": True}).eval()
    macs = count_macs(task, size)
    task = task.to(device)
    params_deploy = count_params(task)
    x = torch.randn(batch_size, 3, *size, device=device)
    spec = run.spec
    if not spec.is_default and device != "cpu":
        raise CompareError(f"{run.path}: {spec.runtime} {spec.precision} is measured on the CPU; run with --device cpu")
    runner = build_runner(task, spec, [x], log=lambda line: None)
    times = []
    with torch.inference_mode():
        for i in range(iters + 1):  # the first is a warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            runner(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    runner.close()
    return {"params_train": params_train, "params_deploy": params_deploy, "gflops": 2 * macs / 1e9,
            "throughput": batch_size / statistics.median(times)}


def _value(value: Optional[float], percent: bool, signed: bool = False) -> str:
    """A metric (or a difference of metrics) as shown: x100 for a fraction, raw otherwise; "—" when absent."""
    if value is None:
        return "—"
    if percent:
        return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def compare(args: Sequence[str], baseline: Optional[str], out: Path, batch_size: int, iters: int,
            device: str = "cpu", allow_different_data: bool = False) -> list[dict[str, Any]]:
    """Build the comparison (see the module doc); returns its rows."""
    runs = [run for a in args for run in load_runs(a)]
    mixed_data = check_comparable(runs, allow_different_data)
    task = runs[0].task
    for r in runs:  # a model on another runtime or precision is a row of its own
        if not r.spec.is_default:
            r.name = f"{r.name} [{r.spec.runtime} {r.spec.precision}]"
    names = [r.name for r in runs]
    for r in runs:  # the same backbone twice: tell the runs apart by their folders
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.parent.parent.name}/{r.path.parent.name})"
    # the baseline is a model's fp32 torch row, which every other row's Δ and speed are measured against
    candidates = [r for r in runs if baseline is None or r.name == baseline or r.results["backbone"] == baseline]
    plain = [r for r in candidates if r.spec.is_default]
    if baseline is None:
        base = plain[0] if plain else runs[0]
    else:
        matches = plain if len(plain) == 1 else candidates
        if len(matches) != 1:
            raise CompareError(f"--baseline {baseline!r} must name exactly one run; the runs are: {', '.join(r.name for r in runs)}")
        base = matches[0]
    metric_key = base.metric_key
    percent = metric_key in PERCENT_METRICS
    metric_name = PERCENT_METRICS.get(metric_key, metric_key)

    rows = []
    for r in runs:
        print(f"measuring {r.name} ({r.path}) ...", file=sys.stderr)
        measured = measure(r, batch_size, iters, device)
        rows.append({
            "model": r.name,
            "runtime": r.spec.runtime,
            "precision": r.spec.precision,
            "baseline": r is base,
            "metric": r.metric,
            "delta": None if r.metric is None or base.metric is None else r.metric - base.metric,
            "params_train": measured["params_train"],
            "params_deploy": measured["params_deploy"],
            "gflops": measured["gflops"],
            "input_size": "x".join(map(str, r.results["input_size"])),
            "throughput": measured["throughput"],
            "speed_vs_baseline": None,
            "conversion_error": r.conversion_error,
            "data": _data_label(r.data),
            "results": str(r.path),
        })
    base_row = next(row for row in rows if row["baseline"])
    for row in rows:
        row["speed_vs_baseline"] = row["throughput"] / base_row["throughput"]

    out.mkdir(parents=True, exist_ok=True)
    where = (f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
             f"torch {torch.__version__}, batch {batch_size}, median of {iters}")
    table = _markdown(rows, task, metric_name, percent, where, mixed_data)
    (out / "comparison.md").write_text(table)
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = [out / "comparison.md", out / "comparison.csv"]
    scored = [row for row in rows if row["metric"] is not None]  # a run without the metric has no place on the y axis
    unscored = [row["model"] for row in rows if row["metric"] is None]
    caption = f"{task}: {where}; {time.strftime('%Y-%m-%d')}"
    caption += "; mixed test data (see the table)" if mixed_data else ""
    caption += f"; not plotted, no {metric_key}: {', '.join(unscored)}" if unscored else ""
    if scored:
        points = lambda x: [Point(x(row), (100 if percent else 1) * row["metric"], row["model"], row["baseline"],  # noqa: E731
                                  f"{row['runtime']} {row['precision']}")
                            for row in scored]
        draw_panels(
            [Panel(f"{metric_name} vs deploy throughput", f"images/s (batch {batch_size}, {device})", metric_name,
                   points(lambda row: row["throughput"])),
             Panel(f"{metric_name} vs deploy parameters", "parameters (M)", metric_name,
                   points(lambda row: row["params_deploy"] / 1e6))],
            out / "comparison", caption=caption,
        )
        written += [out / f"comparison.{fmt}" for fmt in FORMATS]
    else:
        print(f"no run recorded {metric_key}: no plot", file=sys.stderr)
    print(table)
    print(f"written: {', '.join(map(str, written))}")
    return rows


def _markdown(rows: list[dict[str, Any]], task: str, metric_name: str, percent: bool, where: str, mixed_data: bool) -> str:
    data_column = " data |" if mixed_data else ""
    head = (f"| model | {metric_name} | Δ vs baseline | params train (M) | params deploy (M) | GFLOPs | input | "
            f"deploy images/s | speed vs baseline | conversion error |{data_column}")
    data_note = ("**Mixed test data** (--allow-different-data): the rows were tested on different data (the data "
                 "column); their metrics are not comparable as such." if mixed_data else f"Test data: {rows[0]['data']}.")
    lines = [f"# {task}: comparison", "", f"Throughput measured on {where}.", "", data_note, "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        error = row["conversion_error"]
        lines.append(
            f"| {row['model']}{' (baseline)' if row['baseline'] else ''} | {_value(row['metric'], percent)} | "
            f"{'—' if row['baseline'] else _value(row['delta'], percent, signed=True)} | {row['params_train'] / 1e6:.3g} | "
            f"{row['params_deploy'] / 1e6:.3g} | {row['gflops']:.3g} | {row['input_size']} | {row['throughput']:.1f} | "
            f"{row['speed_vs_baseline']:.2f}x | {'—' if error is None else f'{error:.1e}'} |"
            + (f" {row['data']} |" if mixed_data else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_RESULTS", help="run folders or results.json files (one task)")
    parser.add_argument("--baseline", help="model (backbone name) the others are compared with; default: the first run")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="output folder (default: ./comparison)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput measurement")
    parser.add_argument("--iters", type=int, default=5, help="timed batches per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-different-data", action="store_true",
                        help="compare runs tested on different data (or with no record of it); each row is labelled with its data")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iters < 1:
        parser.error("--batch-size and --iters must be at least 1")
    try:
        compare(args.runs, args.baseline, args.out, args.batch_size, args.iters, args.device, args.allow_different_data)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
