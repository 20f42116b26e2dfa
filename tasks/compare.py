"""Compare test runs of one task side by side: ``python -m tasks.compare RUN_OR_RESULTS... [--baseline NAME] [--out DIR]``.

Each argument is a ``results.json`` written by ``python -m tasks.X test`` (or by ``fit``, which
tests the deploy model when it ends), or the run folder holding it. For every run:

- the task's metric (top-1, mIoU or verification accuracy) and its difference to the baseline;
- measured now, on a model rebuilt from the run's hyperparameters (random weights: size and speed
  do not depend on them): parameters of the train-time and of the deploy form, the deploy
  model's FLOPs at the run's input size, and its throughput in images/s on this machine at
  ``--batch-size`` (median of ``--iters`` batches after a warm-up);
- the train-to-deploy conversion error the run recorded.

Writes ``comparison.md``, ``comparison.csv`` and ``comparison.png`` (metric against throughput
and against deploy parameters, one point per model, the baseline marked) into ``--out`` and
prints the table. Runs of different tasks are refused.
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

from .base import RESULTS_FILE
from .scatter_png import Panel, Point, draw_panels

__all__ = ["Run", "load_run", "measure", "compare", "main"]

METRIC_NAMES = {"test/top1": "top-1 (%)", "test/mIoU": "mIoU (%)", "test/acc": "verification acc. (%)"}


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
        return self.results.get("primary_metric") or "test/loss"

    @property
    def metric(self) -> Optional[float]:
        value = self.results["metrics"].get(self.metric_key)
        return None if value is None else float(value)

    @property
    def conversion_error(self) -> Optional[float]:
        return (self.results.get("reparam") or {}).get("relative_error")


def _results_path(arg: str) -> Path:
    path = Path(arg)
    if path.is_file():
        return path
    if not path.exists():
        raise CompareError(f"{arg}: no such file or folder (give a run folder or its {RESULTS_FILE})")
    if (path / RESULTS_FILE).is_file():
        return path / RESULTS_FILE
    found = sorted(path.rglob(RESULTS_FILE))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CompareError(f"{arg}: no {RESULTS_FILE} in this folder or below; run `python -m tasks.<task> test` first")
    listing = "\n  ".join(str(p) for p in found[:10])
    raise CompareError(f"{arg} holds {len(found)} runs; name one of them:\n  {listing}")


def load_run(arg: str) -> Run:
    """Read one run; its name is the backbone, plus the run folder when given twice (see :func:`compare`)."""
    path = _results_path(arg)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: not a readable results file ({exc})") from exc
    missing = [k for k in ("task", "backbone", "metrics", "params", "flops", "input_size", "hparams") if k not in results]
    if missing:
        raise CompareError(f"{path}: missing {', '.join(missing)}; re-run `python -m tasks.<task> test` to rewrite it")
    return Run(results["backbone"], path, results)


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
    and ``throughput``: deploy images/s on ``device``, the median of ``iters`` timed batches."""
    cls = _task_class(run.task)
    hparams = run.results["hparams"]  # ReparamTask.results already leaves out LightningCLI's private keys
    size = tuple(run.results["input_size"])
    params_train = count_params(cls(**{**hparams, "deploy": False}))
    task = cls(**{**hparams, "deploy": True}).eval()
    macs = count_macs(task, size)
    task = task.to(device)
    x = torch.randn(batch_size, 3, *size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(iters + 1):  # the first is a warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            task(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return {"params_train": params_train, "params_deploy": count_params(task), "gflops": 2 * macs / 1e9,
            "throughput": batch_size / statistics.median(times)}


def _pct(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def compare(args: Sequence[str], baseline: Optional[str], out: Path, batch_size: int, iters: int,
            device: str = "cpu") -> list[dict[str, Any]]:
    """Build the comparison (see the module doc); returns its rows."""
    runs = [load_run(a) for a in args]
    tasks = sorted({r.task for r in runs})
    if len(tasks) > 1:
        by_task = "; ".join(f"{t}: {', '.join(str(r.path) for r in runs if r.task == t)}" for t in tasks)
        raise CompareError(f"runs of different tasks cannot be compared ({by_task}); compare one task at a time")
    names = [r.name for r in runs]
    for r in runs:  # the same backbone twice: tell the runs apart by their folders
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.parent.parent.name}/{r.path.parent.name})"
    if baseline is None:
        base = runs[0]
    else:
        matches = [r for r in runs if r.name == baseline or r.results["backbone"] == baseline]
        if len(matches) != 1:
            raise CompareError(f"--baseline {baseline!r} must name exactly one run; the runs are: {', '.join(r.name for r in runs)}")
        base = matches[0]
    metric_key = base.metric_key
    metric_name = METRIC_NAMES.get(metric_key, metric_key)

    rows = []
    for r in runs:
        print(f"measuring {r.name} ({r.path}) ...", file=sys.stderr)
        measured = measure(r, batch_size, iters, device)
        rows.append({
            "model": r.name,
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
            "results": str(r.path),
        })
    base_row = next(row for row in rows if row["baseline"])
    for row in rows:
        row["speed_vs_baseline"] = row["throughput"] / base_row["throughput"]

    out.mkdir(parents=True, exist_ok=True)
    where = (f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
             f"torch {torch.__version__}, batch {batch_size}, median of {iters}")
    table = _markdown(rows, tasks[0], metric_name, where)
    (out / "comparison.md").write_text(table)
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    points = lambda x: [Point(x(row), 100 * (row["metric"] or 0.0), row["model"], row["baseline"]) for row in rows]  # noqa: E731
    draw_panels(
        [Panel(f"{metric_name} vs deploy throughput", f"images/s (batch {batch_size}, {device})", metric_name,
               points(lambda row: row["throughput"])),
         Panel(f"{metric_name} vs deploy parameters", "parameters (M)", metric_name,
               points(lambda row: row["params_deploy"] / 1e6))],
        str(out / "comparison.png"), caption=f"{tasks[0]}: {where}; {time.strftime('%Y-%m-%d')}",
    )
    print(table)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")
    return rows


def _markdown(rows: list[dict[str, Any]], task: str, metric_name: str, where: str) -> str:
    head = (f"| model | {metric_name} | Δ vs baseline | params train (M) | params deploy (M) | GFLOPs | input | "
            f"deploy images/s | speed vs baseline | conversion error |")
    lines = [f"# {task}: comparison", "", f"Throughput measured on {where}.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        error = row["conversion_error"]
        lines.append(
            f"| {row['model']}{' (baseline)' if row['baseline'] else ''} | {_pct(row['metric'])} | "
            f"{'—' if row['baseline'] else _pct(row['delta'], signed=True)} | {row['params_train'] / 1e6:.3g} | "
            f"{row['params_deploy'] / 1e6:.3g} | {row['gflops']:.3g} | {row['input_size']} | {row['throughput']:.1f} | "
            f"{row['speed_vs_baseline']:.2f}x | {'—' if error is None else f'{error:.1e}'} |"
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
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iters < 1:
        parser.error("--batch-size and --iters must be at least 1")
    try:
        compare(args.runs, args.baseline, args.out, args.batch_size, args.iters, args.device)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
