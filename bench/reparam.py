"""Re-parameterization benchmark: convert every registered model, check it, and time both forms.

Run ``python -m bench.reparam [--models GLOB ...] [--batch 8] [--repeats N] [--threads T]
[--markdown FILE] [--sections ...] [--batches 1 8]``. It prints markdown with six sections:

1. one row per registered model (``backbones.list_models()`` filtered by ``--models``): parameters
   of the train-time and deploy forms, multiply-adds of the deploy form at the model's native
   resolution (batch 1, ``torch.utils.flop_counter.FlopCounterMode``), the max relative error of
   the conversion (BN statistics and affine parameters randomized first), the conversion time, and
   the CPU forward latency of the train-time form (eval mode) vs the deploy form; for the target
   model also the train form in the other memory layout, the target's verdict (against the train
   form as built, in NCHW), the ratio against the train form in its faster layout, and where the
   time goes (inside RepMLP blocks; inside conv kernels, against this machine's matmul rate);
2. ResNet-50 vs the deploy RepMLP-Res50 models (224) in images/s;
3. the deploy RepMLP block alone, one row per block shape of the selected models, with every
   exact FC3 formulation we know of timed side by side (each is checked against the block first);
4. training cost of ``--train-model`` (ResNet-18) built with each 3x3 ``conv_type`` (ConvBN, ACB,
   DBB, OREPA): time per training step and the activation memory autograd keeps, vs DBB;
5. deploy inference runtimes (``--sections runtimes``; models by default ``RUNTIME_MODELS``, batches
   ``--batches``, default 1 and 8): torch fp32 (the reference, CPU fusion pass), torch bf16
   (:func:`backbones.deploy.to_bf16`, native bf16 CPUs only), torch INT8 (PT2E + Inductor,
   :func:`backbones.deploy.pt2e.quantize_pt2e`, compiled per batch size), ONNX Runtime fp32
   (:func:`backbones.deploy.export_onnx`) and INT8 (:func:`backbones.deploy.quantize_int8`); as
   ratios against torch fp32, with each row's
   achieved GMAC/s as a fraction of this machine's matmul rate in its precision (the roof, timed
   in the same interleaved run: see :func:`roof_matmuls`), and the accuracy against torch fp32;
6. mixed-precision training (``--sections precision``) of ``--precision-model``
   (``repmlp_res50_g8_224``) at ``--precision-batch`` 32: a training step in fp32, bf16 autocast
   (what ``--trainer.precision bf16-mixed`` runs) and each in the channels_last layout
   (``--model.channels_last``, :mod:`backbones.memory_format`), as ratios against fp32; then the
   loss of a short run on the classification demo set in fp32 and in bf16-mixed from the same
   initialization, beside fp32 with another data order (the noise).

Timing method: the machine is shared, so no figure is meant to be read on its own. Every
comparison is measured in one process, with the variants interleaved (A, B, A, B, ...; the order
of each round alternates, A B then B A, so neither variant always runs first), after warm-up
runs, under ``torch.inference_mode`` (section 4: with autograd); each time is the median over
the rounds, and the figures to quote are the ratios. The "IQR" after a ratio is the 25th-75th percentile of the per-round ratios
and shows how noisy the run was. ``--repeats`` fixes the number of rounds; by default it is
chosen from a time budget per comparison (fewer rounds for the big 320 models).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import importlib.util
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import backbones
from backbones.complexity import count_macs, count_params, input_channels
from backbones.deploy import Bf16Inference, OnnxModel, bf16_supported, export_onnx, quantize_int8, to_bf16
from backbones.deploy.fused_conv import fusion, fusion_enabled
from backbones.deploy.pt2e import quantize_pt2e
from backbones.layers.repmlp import RepMLP
from backbones.memory_format import to_channels_last

TARGET_MODEL = "repmlp_res50_g8_224"
TARGET_RATIO = 1.3  # the issue: deploy >= 1.3x faster than the train-time form (eval) at batch 8
TARGET_BATCH = 8
THROUGHPUT_MODELS = ("resnet50", "repmlp_res50_g8_224", "repmlp_res50_light_224")
VERIFY_RTOL = 1e-5  # every FC3 formulation must match the block to this relative error
NEAR_FASTEST = 0.03  # "within noise" band for the per-shape FC3 verdict
SECTIONS = ("models", "throughput", "fc3", "train", "runtimes", "precision")
# the five, and QARepVGG-A0 beside RepVGG-A0 for INT8 (QARepVGG is RepVGG made to quantize well)
RUNTIME_MODELS = ("resnet50", "repmlp_res50_g8_224", "repmlp_res50_light_224", "repvgg_a0", "qarepvgg_a0", "mobileone_s0")
RUNTIME_BATCHES = (1, 8)
BF16_TARGET = 3.0  # the issue: bf16 deploy >= 3x the float32 deploy at batch 8 (aim 4x)
INT8_TARGET = 4.0  # the issue: int8 deploy >= 4x the float32 deploy at batch 8 (aim 6x)
ROOF_N = 2048  # size of the roof matmuls (section 5), as matmul_gmacs_per_s
# INT8 calibration on random-normal images (speed does not depend on them); agreement with fp32 on
# real images: the classification demo's validation set at the model's input size
RUNTIMES_CALIBRATION, RUNTIMES_HELD_OUT = 16, 64
TRAIN_CONV_TYPES = ("conv", "acb", "dbb", "orepa")  # section 4, on --train-model

# Time budgets (seconds of timed rounds) when --repeats is not given, and the round limits.
MODEL_BUDGET_S, MODEL_REPS = 20.0, (3, 25)
TARGET_BUDGET_S, TARGET_REPS = 60.0, (3, 75)  # the target's ratio is within a few % of it: more rounds
THROUGHPUT_BUDGET_S, THROUGHPUT_REPS = 40.0, (5, 25)
BLOCK_BUDGET_S, BLOCK_REPS = 4.0, (10, 200)
TRAIN_BUDGET_S, TRAIN_REPS = 30.0, (3, 20)
RUNTIMES_BUDGET_S, RUNTIMES_REPS = 40.0, (5, 25)


# ============================================================================ output
class Report:
    """Prints each line at once (progress is visible) and keeps them for ``--markdown``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self("| " + " | ".join(row) + " |")

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.lines) + "\n")


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout and --markdown hold only the report."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ============================================================================ timing
@dataclass
class Timings:
    """Per-round wall times (seconds) of interleaved variants."""

    times: dict[str, list[float]]
    rounds: int
    extra: dict[str, list[float]] = field(default_factory=dict)  # e.g. time inside RepMLP blocks

    def median_ms(self, name: str) -> float:
        return statistics.median(self.times[name]) * 1e3

    def ratio(self, slow: str, fast: str) -> float:
        """median(slow) / median(fast): > 1 means ``fast`` is faster."""
        return statistics.median(self.times[slow]) / statistics.median(self.times[fast])

    def paired_iqr(self, slow: str, fast: str) -> tuple[float, float]:
        """25th and 75th percentile of the per-round ratios slow/fast."""
        ratios = sorted(a / b for a, b in zip(self.times[slow], self.times[fast]))
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q = statistics.quantiles(ratios, n=4, method="inclusive")
        return q[0], q[2]

    def spread(self) -> float:
        """Noise indicator: the largest median / fastest-round ratio over the variants, minus 1."""
        return max(statistics.median(t) / min(t) for t in self.times.values()) - 1

    def ratio_text(self, slow: str, fast: str) -> str:
        lo, hi = self.paired_iqr(slow, fast)
        return f"{self.ratio(slow, fast):.2f} ({lo:.2f}–{hi:.2f})"


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: Optional[int],
    budget_s: float,
    reps_range: tuple[int, int],
    warmup: int = 2,
    after_call: Optional[Callable[[str], None]] = None,
    grad: bool = False,
) -> Timings:
    """Time ``fns`` side by side: warm-up rounds, then rounds of one call each, order alternating.

    Without ``repeats`` the number of rounds is ``budget_s`` divided by the duration of a warm-up
    round, clamped to ``reps_range``. ``after_call(name)`` runs (untimed) after each timed call.
    The calls run under ``torch.inference_mode`` unless ``grad`` (training steps).
    """
    names = list(fns)
    with contextlib.nullcontext() if grad else torch.inference_mode():
        round_s = math.inf  # the quickest warm-up round (a load burst should not cut the rounds)
        for _ in range(warmup):
            start = time.perf_counter()
            for name in names:
                fns[name]()
            round_s = min(round_s, time.perf_counter() - start)
        if repeats is None:
            repeats = int(budget_s / max(round_s, 1e-9))
            repeats = min(max(repeats, reps_range[0]), reps_range[1])
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
                if after_call is not None:
                    after_call(name)
    return Timings(times, repeats)


class BlockClock:
    """Forward hooks that add up the wall time spent inside given modules, per model call."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.total = 0.0
        self._start: dict[int, float] = {}
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.total += time.perf_counter() - self._start.pop(id(module))

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ============================================================================ helpers
@dataclass
class ConvProfile:
    """One model's forward under ``torch.profiler``: wall ms, ms inside conv ops, conv MACs."""

    wall_ms: float
    conv_ms: float
    conv_macs: int

    @property
    def gmacs_per_s(self) -> float:
        return self.conv_macs / self.conv_ms / 1e6 if self.conv_ms else float("nan")


def conv_profile(model: nn.Module, x: Tensor, runs: int = 3) -> ConvProfile:
    """Per forward: wall time under the profiler, self time of every op with "convolution" in
    its name (plain ``aten::mkldnn_convolution`` and the fused ``mkldnn::_convolution_pointwise``
    alike, with their dispatch wrappers), and the convs' multiply-adds (``FlopCounterMode``)."""
    with torch.inference_mode():
        model(x)  # warm: packs the deploy weights
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                model(x)
            wall = (time.perf_counter() - start) / runs
        with FlopCounterMode(display=False) as counter:
            model(x)
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages() if "convolution" in e.key)
    counts = counter.get_flop_counts().get("Global", {})  # absent when nothing was counted
    macs = sum(n for op, n in counts.items() if "convolution" in str(op)) // 2
    return ConvProfile(wall * 1e3, conv_us / runs / 1e3, macs)


def matmul_gmacs_per_s(n: int = 2048, runs: int = 5) -> float:
    """This machine's fp32 matrix-multiply rate (an n x n x n matmul, median of ``runs``):
    the practical ceiling of a convolution's multiply-adds per second on it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return n ** 3 / statistics.median(times) / 1e9


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN running statistics and affine parameters, so the conversion check means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def mparams(model: nn.Module) -> float:
    return count_params(model) / 1e6


def gmacs(model: nn.Module, size: tuple[int, int], in_chans: int) -> float:
    return count_macs(model, size, in_chans) / 1e9


def stage_of(module_name: str) -> str:
    """``layer2.1.repmlp`` → ``c3`` (layer1..layer4 are the paper's c2..c5)."""
    head = module_name.split(".")[0]
    if head.startswith("layer") and head[5:].isdigit():
        return f"c{int(head[5:]) + 1}"
    return head


def fmt_gmacs(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def fmt_err(value: float) -> str:
    return f"{value:.1e}"


# ============================================================================ FC3 formulations
@dataclass(frozen=True)
class BlockShape:
    """Everything that defines a RepMLP block's deploy structure."""

    in_channels: int
    out_channels: int
    input_size: tuple[int, int]
    partition: tuple[int, int]
    kernels: tuple[int, ...]
    groups: int
    fc1_reduction: int
    pad_input: bool

    @classmethod
    def of(cls, m: RepMLP) -> "BlockShape":
        reduction = 1
        if m.has_global_perceptron:
            reduction = m.fc1.in_features // m.fc1.out_features
        return cls(m.in_channels, m.out_channels, m.input_size, m.partition, m.kernels, m.groups,
                   reduction, m.pad_input)

    def build(self, deploy: bool = False) -> RepMLP:
        return RepMLP(self.in_channels, self.out_channels, self.input_size, self.partition, self.kernels,
                      self.groups, self.fc1_reduction, self.pad_input, deploy=deploy)

    def label(self) -> str:
        (H, W), (h, w) = self.input_size, self.partition
        io = f"{self.in_channels}" if self.in_channels == self.out_channels else f"{self.in_channels}→{self.out_channels}"
        part = f"{h}" if h == w else f"{h}x{w}"
        return f"{io}ch {H}x{W} p{part} g{self.groups}"


def _with_fc(fc: Callable[[RepMLP, Tensor], Tensor]) -> Callable[[RepMLP, Tensor], Tensor]:
    """A deploy block forward from the block's public pieces: ``split_partitions`` → ``fc`` on the
    ``(M, C*h*w)`` partitions → ``merge_partitions``."""

    def forward(m: RepMLP, x: Tensor) -> Tensor:
        return m.merge_partitions(fc(m, m.split_partitions(x)))

    return forward


def _fc_bmm(m: RepMLP, parts: Tensor) -> Tensor:
    """Grouped fc3 as one batched matmul, then the bias (what the train-time forward does around fc3)."""
    g, weight, bias = m.groups, m.fc3.weight, m.fc3.bias
    rows = parts.shape[0]
    # (g, M, Chw/g) @ (g, Chw/g, Ohw/g) → (g, M, Ohw/g)
    out = torch.bmm(parts.reshape(rows, g, -1).transpose(0, 1), weight.reshape(g, weight.shape[0] // g, -1).transpose(1, 2))
    return out.transpose(0, 1).reshape(rows, -1) + bias


def _fc_conv(m: RepMLP, parts: Tensor) -> Tensor:
    """Grouped fc3 as a grouped 1x1 conv on ``(M, C*h*w, 1, 1)``: fc3's weight is stored in that shape."""
    return F.conv2d(parts[:, :, None, None], m.fc3.weight, m.fc3.bias, groups=m.groups).flatten(1)


def _fc_baddbmm(m: RepMLP, parts: Tensor) -> Tensor:
    """Grouped fc3 as one batched matmul with the bias fused in (saves the separate bias pass)."""
    g, weight, bias = m.groups, m.fc3.weight, m.fc3.bias
    rows = parts.shape[0]
    out_per_group = weight.shape[0] // g
    a = parts.reshape(rows, g, -1).transpose(0, 1)  # (g, M, Chw/g), a strided view
    b = weight.reshape(g, out_per_group, -1).transpose(1, 2)  # (g, Chw/g, Ohw/g)
    out = torch.baddbmm(bias.reshape(g, 1, out_per_group), a, b)
    return out.transpose(0, 1).reshape(rows, -1)


def _fc_einsum(m: RepMLP, parts: Tensor) -> Tensor:
    g, weight, bias = m.groups, m.fc3.weight, m.fc3.bias
    rows = parts.shape[0]
    out = torch.einsum("mgk,gnk->mgn", parts.reshape(rows, g, -1), weight.reshape(g, weight.shape[0] // g, -1))
    return out.reshape(rows, -1) + bias


def _fc_linear_loop(m: RepMLP, parts: Tensor) -> Tensor:
    g, weight, bias = m.groups, m.fc3.weight.flatten(1), m.fc3.bias
    k, o = weight.shape[1], weight.shape[0] // g
    return torch.cat(
        [F.linear(parts[:, i * k:(i + 1) * k], weight[i * o:(i + 1) * o], bias[i * o:(i + 1) * o]) for i in range(g)],
        dim=1,
    )


OWN_FORWARD = "block"  # the deploy block's own forward, which every other formulation is compared with
# name → (description, how it is run): a block forward ``fn(block, x)``, or the input layout that
# the block's own forward gets
FC3_VARIANTS: dict[str, tuple[str, Any]] = {
    OWN_FORWARD: ("`RepMLP.forward` of the deploy block: GP add fused into one group-major gather, baddbmm, "
            "direct permute back", "nchw"),
    "split-bmm": ("split_partitions → grouped bmm → bias add → merge_partitions (what the train-time path "
                  "does around fc3)", _with_fc(_fc_bmm)),
    "conv": ("split → grouped 1x1 conv → merge", _with_fc(_fc_conv)),
    "baddbmm": ("split → bmm with the bias fused in → merge", _with_fc(_fc_baddbmm)),
    "einsum": ("split → torch.einsum over groups → merge", _with_fc(_fc_einsum)),
    "linear-loop": ("split → one F.linear per group + cat → merge", _with_fc(_fc_linear_loop)),
    f"{OWN_FORWARD}-NHWC": ("the block's forward on a channels_last input", "channels_last"),
}


# ============================================================================ section 1
@dataclass
class ModelResult:
    name: str
    row: list[str]
    ratio: Optional[float] = None
    ratio_iqr: Optional[tuple[float, float]] = None
    plain_ratio: Optional[float] = None  # train-form / deploy form run with plain (unfused) ops
    train_ms_by_layout: Optional[dict[str, float]] = None  # target only: "NCHW" and "channels_last"
    train_ms: Optional[float] = None
    deploy_ms: Optional[float] = None
    repmlp_ms: Optional[tuple[float, float]] = None  # time inside RepMLP blocks: train, deploy
    convs: Optional[tuple[str, ConvProfile, ConvProfile]] = None  # target only: faster train layout, train, deploy
    shapes: list[tuple[BlockShape, str]] = field(default_factory=list)


def bench_model(name: str, args: argparse.Namespace, seed: int) -> ModelResult:
    torch.manual_seed(seed)
    progress(f"{name}: build")
    model = randomize_bn(backbones.create(name), seed).eval()
    size = tuple(getattr(model, "img_size", (224, 224)))
    in_chans = input_channels(model)
    shapes = [(BlockShape.of(m), f"{name} {stage_of(n)}") for n, m in model.named_modules() if isinstance(m, RepMLP)]

    progress(f"{name}: convert")
    t0 = time.perf_counter()
    deploy = backbones.reparameterize_model(model)
    convert_s = time.perf_counter() - t0

    x2 = torch.randn(2, in_chans, *size)
    error = backbones.model_relative_error(model, deploy, x2)
    gmacs_train = gmacs(model, size, in_chans)
    gmacs_deploy = gmacs(deploy, size, in_chans)

    progress(f"{name}: time train-form (eval) vs deploy at batch {args.batch}")
    x = torch.randn(args.batch, in_chans, *size)
    # the target's train form also in the other layout (copied before the clocks hook it): the
    # deploy form's fused convs return channels_last whatever the input, so the report also
    # compares it with the train form moved by hand to its faster layout
    train_other = x_other = None
    if name == TARGET_MODEL:
        other_layout = torch.contiguous_format if args.channels_last else torch.channels_last
        train_other = copy.deepcopy(model).to(memory_format=other_layout)
        x_other = x.contiguous(memory_format=other_layout)
    if args.channels_last:
        model, deploy = model.to(memory_format=torch.channels_last), deploy.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    models = {"train": model, "deploy": deploy}
    clocks = {k: BlockClock([m for m in mdl.modules() if isinstance(m, RepMLP)]) for k, mdl in models.items()}
    inside: dict[str, list[float]] = {k: [] for k in models}
    for clock in clocks.values():
        clock.take()

    def after(k: str) -> None:
        if k in clocks:
            inside[k].append(clocks[k].take())
        else:  # "plain" ran the hooked deploy model: drop that time ("train_other" has no hooks)
            clocks["deploy"].take()

    def deploy_plain() -> Tensor:
        with fusion(False):
            return deploy(x)

    # the deploy form as it runs (fused kernels, packed weights) and with plain ops, to show what those add
    variants = {"train": lambda: model(x), "deploy": lambda: deploy(x), "plain": deploy_plain}
    if train_other is not None:
        variants["train_other"] = lambda: train_other(x_other)
    timings = interleaved(variants,
                          args.repeats, *((TARGET_BUDGET_S, TARGET_REPS) if name == TARGET_MODEL else
                                          (MODEL_BUDGET_S, MODEL_REPS)), after_call=after)
    for clock in clocks.values():
        clock.remove()
    has_repmlp = bool(shapes)
    repmlp_ms = (statistics.median(inside["train"]) * 1e3, statistics.median(inside["deploy"]) * 1e3) if has_repmlp else None

    row = [
        f"`{name}`", f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}",
        f"{mparams(model):.2f} / {mparams(deploy):.2f}",
        f"{fmt_gmacs(gmacs_train)} / {fmt_gmacs(gmacs_deploy)}",
        fmt_err(error), f"{convert_s:.2f}",
        f"{timings.median_ms('train'):.1f}", f"{timings.median_ms('deploy'):.1f}",
        timings.ratio_text("train", "deploy"), timings.ratio_text("train", "plain"),
        f"{repmlp_ms[0]:.1f} / {repmlp_ms[1]:.1f}" if repmlp_ms else "–",
        str(timings.rounds), f"+{100 * timings.spread():.0f}%",
    ]
    by_layout = convs = None
    if train_other is not None:
        layouts = ("channels_last", "NCHW") if args.channels_last else ("NCHW", "channels_last")
        by_layout = dict(zip(layouts, (timings.median_ms("train"), timings.median_ms("train_other"))))
        faster = min(by_layout, key=by_layout.get)  # a tie goes to the layout the run was asked for
        progress(f"{name}: profile the convolutions of the deploy form and of the faster train form")
        train_p = conv_profile(model, x) if faster == layouts[0] else conv_profile(train_other, x_other)
        convs = (faster, train_p, conv_profile(deploy, x))
    return ModelResult(name, row, timings.ratio("train", "deploy"), timings.paired_iqr("train", "deploy"),
                       timings.ratio("train", "plain"), by_layout, timings.median_ms("train"),
                       timings.median_ms("deploy"), repmlp_ms, convs=convs, shapes=shapes)


def section_models(names: list[str], args: argparse.Namespace, out: Report) -> list[ModelResult]:
    layout = ", channels_last" if args.channels_last else ""
    out(f"## 1. Train-time (eval) vs deploy, per model (batch {args.batch} for latency{layout})")
    out()
    results = []
    header = ["model", "input", "params train / deploy (M)", "GMACs train / deploy (bs 1)", "max rel. err",
              "convert (s)", f"train ms (bs {args.batch})", f"deploy ms (bs {args.batch})",
              "train/deploy (per-round IQR)", "train/deploy, plain ops (IQR)", "in RepMLP blocks ms train / deploy",
              "rounds", "noise"]
    for i, name in enumerate(names):
        results.append(bench_model(name, args, seed=i))
    out.table(header, [r.row for r in results])
    out()
    out("GMACs: multiply-adds (G) of one image at the model's native `img_size`, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` (conv/matmul only; flops = 2 x MACs). Max rel. err: "
        "`backbones.model_relative_error` on a batch of 2 after randomizing every BN's running stats and "
        "affine parameters. Convert: one `backbones.reparameterize_model` call (includes its deep copy and "
        "the CPU fusion pass). "
        "Latency: medians over interleaved rounds; train/deploy > 1 means the deploy form is faster. The deploy "
        "form runs each conv with its bias, residual add and ReLU as one oneDNN kernel on a weight prepacked once "
        f"(the pass `backbones.deploy.cpu_fusion.fuse_for_cpu`, {'on' if fusion_enabled() else 'NOT available in this torch build'}); "
        "\"plain ops\" times the same deploy model with that off (`fusion(False)`), i.e. what BN folding and the "
        "merges alone give. "
        "\"In RepMLP blocks\": median wall time per forward spent inside the RepMLP blocks (forward hooks), "
        "the only part the FC3 formulation can change. Noise: how far the median round lies above the "
        "fastest round (worst variant); tens of percent mean the machine was busy and the row should be re-run.")
    out()
    target = next((r for r in results if r.name == TARGET_MODEL), None)
    if target is None:
        out(f"**Target** (deploy `{TARGET_MODEL}` >= {TARGET_RATIO}x faster than its train-time form): "
            "not measured in this run (model not selected).")
    else:
        notes = [f"measured at batch {args.batch}, the target is at batch {TARGET_BATCH}"] if args.batch != TARGET_BATCH else []
        notes += ["the deploy form and its input in channels_last"] if args.channels_last else []
        note = f" (note: {'; '.join(notes)})" if notes else ""
        lo, hi = target.ratio_iqr
        nchw_ms, cl_ms = target.train_ms_by_layout["NCHW"], target.train_ms_by_layout["channels_last"]
        faster_train_ms = min(nchw_ms, cl_ms)
        strict = faster_train_ms / target.deploy_ms
        # the target compares the forms as built: the train form in torch's default (NCHW) layout
        as_built = nchw_ms / target.deploy_ms
        verdict = "PASS" if as_built >= TARGET_RATIO else "FAIL"
        out(f"**Target**: deploy `{TARGET_MODEL}` >= {TARGET_RATIO:.2f}x faster than its train-time form (eval, as "
            f"built: NCHW) at batch {TARGET_BATCH}: measured **{as_built:.2f}x → {verdict}**"
            + ("" if args.channels_last else f" (per-round IQR {lo:.2f}–{hi:.2f}); with plain ops "
                                             f"{target.plain_ratio:.2f}x")
            + f"{note}. Stricter, beyond the target: the train form moved by hand to channels_last (weights and "
            f"input) took {cl_ms:.1f} ms against {nchw_ms:.1f} ms in NCHW; against the faster of the two the "
            f"deploy form ({target.deploy_ms:.1f} ms) is **{strict:.2f}x** faster.")
        if target.repmlp_ms is not None:
            rt, rd = target.repmlp_ms
            ceiling = faster_train_ms / max(target.deploy_ms - rd, 1e-9)
            out()
            out(f"Where the time is: the deploy forward spends {rd:.1f} of {target.deploy_ms:.1f} ms "
                f"({100 * rd / target.deploy_ms:.1f}%) inside its RepMLP blocks (train form: {rt:.1f} of "
                f"{target.train_ms:.1f} ms). Even RepMLP blocks that took no time at all would give, against the "
                f"train form in its faster layout, {faster_train_ms:.1f} / {target.deploy_ms - rd:.1f} = "
                f"{ceiling:.2f}x; the rest of "
                f"the gap is what the deploy form saves outside them (BN passes folded into the convs, fused "
                f"kernels on prepacked weights).")
        if target.convs is not None:
            layout, train_p, deploy_p = target.convs
            peak = matmul_gmacs_per_s()
            out()
            out(f"Convolutions (`torch.profiler`, 3 forwards each, so a little slower than above; MACs by "
                f"`FlopCounterMode`): the deploy form spends {deploy_p.conv_ms:.1f} of {deploy_p.wall_ms:.1f} ms "
                f"in conv kernels ({deploy_p.conv_macs / 1e9:.1f} GMAC at {deploy_p.gmacs_per_s:.0f} GMAC/s); "
                f"the train form in {layout}, its faster layout, {train_p.conv_ms:.1f} of {train_p.wall_ms:.1f} ms "
                f"({train_p.conv_macs / 1e9:.1f} GMAC at {train_p.gmacs_per_s:.0f} GMAC/s). A 2048^3 fp32 matmul "
                f"runs at {peak:.0f} GMAC/s on this machine, so the deploy convs are at "
                f"{100 * deploy_p.gmacs_per_s / peak:.0f}% of it. Outside its convs the deploy form takes "
                f"{deploy_p.wall_ms - deploy_p.conv_ms:.1f} ms against the train form's "
                f"{train_p.wall_ms - train_p.conv_ms:.1f} ms; a deploy form that spent no time at all outside its "
                f"convs would be {train_p.wall_ms / deploy_p.conv_ms:.2f}x faster than this train form.")
    out()
    return results


# ============================================================================ section 2
def section_throughput(args: argparse.Namespace, out: Report) -> None:
    layout = ", channels_last" if args.channels_last else ""
    out(f"## 2. ResNet-50 vs deploy RepMLP-Res50 throughput (batch {args.batch}, 224x224{layout})")
    out()
    progress("throughput: build " + ", ".join(THROUGHPUT_MODELS))
    models = {}
    for i, name in enumerate(THROUGHPUT_MODELS):
        torch.manual_seed(100 + i)
        models[name] = backbones.reparameterize_model(randomize_bn(backbones.create(name), 100 + i))
    x = torch.randn(args.batch, 3, 224, 224)
    if args.channels_last:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    progress("throughput: timing")
    timings = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.repeats, THROUGHPUT_BUDGET_S,
                          THROUGHPUT_REPS)
    base = THROUGHPUT_MODELS[0]
    rows = []
    for name in THROUGHPUT_MODELS:
        ms = timings.median_ms(name)
        rows.append([f"`{name}` (deploy)", f"{ms:.1f}", f"{args.batch / ms * 1e3:.1f}",
                     "1.00" if name == base else timings.ratio_text(base, name)])
    out.table(["model", f"ms / batch of {args.batch}", "images/s", f"throughput vs {base} (per-round IQR)"], rows)
    out()
    out(f"All three in deploy form (the ResNet-50's BN folded too), interleaved, {timings.rounds} rounds "
        f"(noise +{100 * timings.spread():.0f}%); > 1 means faster than ResNet-50.")
    out()


# ============================================================================ section 3
def _variant_fns(shape: BlockShape, seed: int, batch: int) -> tuple[dict[str, Callable[[], Tensor]], dict[str, Tensor], RepMLP]:
    torch.manual_seed(seed)
    train = randomize_bn(shape.build(), seed).eval()
    deploy = backbones.reparameterize_model(train)
    x = torch.randn(batch, shape.in_channels, *shape.input_size)
    inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    fns: dict[str, Callable[[], Tensor]] = {}
    for name, (_, how) in FC3_VARIANTS.items():
        if isinstance(how, str):  # the block's own forward on that input layout
            fns[name] = lambda xin=inputs[how]: deploy(xin)
        else:
            fns[name] = lambda how=how: how(deploy, x)
    fns["train block"] = lambda: train(x)
    return fns, inputs, deploy


def section_fc3(shapes: list[tuple[BlockShape, list[str]]], args: argparse.Namespace, out: Report) -> None:
    out(f"## 3. Deploy RepMLP block: FC3 formulations side by side (batch {args.batch}, ms per block forward)")
    out()
    out(f"The deploy block has one forward, `{OWN_FORWARD}`; the others are formulations kept here for "
        f"comparison. Variants (all on the same deploy weights; each is checked against the block's own "
        f"output to {VERIFY_RTOL:g} relative error before it is timed):")
    out()
    for name, (desc, _) in FC3_VARIANTS.items():
        out(f"- `{name}`: {desc}")
    out("- `train block`: the train-time block in eval mode (for the block-level train/deploy ratio)")
    out()
    variant_names = list(FC3_VARIANTS)
    header = ["block", "used in", "train block", *variant_names, "max rel. err", "fastest",
              f"`{OWN_FORWARD}` / fastest", "rounds", "noise"]
    rows, verdicts = [], []
    for i, (shape, used_in) in enumerate(shapes):
        progress(f"fc3: {shape.label()} ({', '.join(used_in)})")
        fns, inputs, deploy = _variant_fns(shape, 1000 + i, args.batch)
        with torch.inference_mode():
            ref = deploy(inputs["nchw"])
            errors = {k: backbones.max_relative_error(ref, fns[k]()) for k in variant_names}
        bad = [k for k, e in errors.items() if not e <= VERIFY_RTOL]
        timed = {k: fns[k] for k in variant_names if k not in bad}
        timed["train block"] = fns["train block"]
        timings = interleaved(timed, args.repeats, BLOCK_BUDGET_S, BLOCK_REPS)
        ms = {k: timings.median_ms(k) for k in timed}
        fastest = min((k for k in variant_names if k in ms), key=ms.get)
        own_over_best = ms[OWN_FORWARD] / ms[fastest] if OWN_FORWARD in ms else math.nan
        verdicts.append((shape, fastest, own_over_best, timings))
        cells = [f"{ms[k]:.2f}" if k in ms else "MISMATCH" for k in variant_names]
        rows.append([shape.label(), ", ".join(used_in), f"{ms['train block']:.2f}", *cells,
                     fmt_err(max(errors.values())), f"`{fastest}`", f"{own_over_best:.2f}", str(timings.rounds),
                     f"+{100 * timings.spread():.0f}%"])
        if bad:
            progress(f"fc3: {', '.join(bad)} did not match the block (errors {[errors[k] for k in bad]})")
    out.table(header, rows)
    out()
    out("Per shape:")
    out()
    all_pass = True
    for shape, fastest, own_over_best, timings in verdicts:
        passed = own_over_best - 1 < NEAR_FASTEST  # NaN (the block's own output mismatched) fails
        all_pass &= passed
        line = f"- {shape.label()}: fastest measured `{fastest}`"
        if fastest != OWN_FORWARD:
            line += (f"; it beats `{OWN_FORWARD}` by {100 * (own_over_best - 1):.1f}% "
                     f"({timings.ratio_text(OWN_FORWARD, fastest)})"
                     + (" — within noise" if passed else " — a candidate formulation"))
        line += (f"; block-level train/deploy = {timings.ratio_text('train block', OWN_FORWARD)}: "
                 f"**{'PASS' if passed else 'FAIL'}**")
        out(line)
    out()
    out(f"**FC3 verdict**: the deploy block's own forward is the fastest formulation (or within "
        f"{100 * NEAR_FASTEST:.0f}% of it) on {'every' if all_pass else 'NOT every'} shape → "
        f"**{'PASS' if all_pass else 'FAIL'}** (a bench-only formulation that beats it by more is flagged "
        "above as a candidate).")
    out()


def collect_shapes(names: list[str], results: Optional[list[ModelResult]]) -> list[tuple[BlockShape, list[str]]]:
    """Unique RepMLP block shapes of the selected models, in order of appearance, with where they occur."""
    found: dict[BlockShape, list[str]] = {}
    if results is None:
        pairs = []
        for name in names:
            model = backbones.create(name, deploy=True)
            pairs += [(BlockShape.of(m), f"{name} {stage_of(n)}") for n, m in model.named_modules() if isinstance(m, RepMLP)]
            del model
    else:
        pairs = [p for r in results for p in r.shapes]
    for shape, where in pairs:
        places = found.setdefault(shape, [])
        if where not in places:
            places.append(where)
    return list(found.items())


# ============================================================================ main
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ============================================================================ section 4
def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass (storages counted once,
    parameters excluded): the part of training memory the branches of a block multiply."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return total


def section_train(args: argparse.Namespace, out: Report) -> None:
    size, batch, name = args.train_size, args.train_batch, args.train_model
    out(f"## 4. Training cost of the 3x3 conv types: `{name}`, batch {batch}, {size}x{size}")
    out()
    progress(f"train: build {name} with conv_type " + ", ".join(TRAIN_CONV_TYPES))
    models, steps, memory = {}, {}, {}
    x = torch.randn(batch, 3, size, size)
    for i, conv_type in enumerate(TRAIN_CONV_TYPES):
        torch.manual_seed(200 + i)
        model = backbones.create(name, conv_type=conv_type).train()
        labels = torch.randint(0, model.num_classes, (batch,))
        memory[conv_type] = saved_activation_bytes(model, x)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, opt=opt, labels=labels) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            opt.step()

        models[conv_type], steps[conv_type] = model, step
    progress("train: timing")
    timings = interleaved(steps, args.repeats, TRAIN_BUDGET_S, TRAIN_REPS, warmup=1, grad=True)
    rows = []
    for conv_type in TRAIN_CONV_TYPES:
        rows.append([f"`{conv_type}`", f"{mparams(models[conv_type]):.2f}", f"{timings.median_ms(conv_type):.0f}",
                     timings.ratio_text(conv_type, "dbb") if conv_type != "dbb" else "1.00",
                     f"{memory[conv_type] / 2 ** 20:.0f}", f"{memory[conv_type] / memory['dbb']:.2f}"])
    out.table(["conv_type", "train params (M)", "ms / training step", "time vs DBB (per-round IQR)",
               "activations saved (MiB)", "memory vs DBB"], rows)
    out()
    out(f"A step is forward, cross-entropy, backward and an SGD update, interleaved, {timings.rounds} rounds "
        f"(noise +{100 * timings.spread():.0f}%); < 1 means cheaper than DBB. Memory is what autograd saves for "
        "backward in one step, parameters excluded (it scales with the batch; on a GPU it is most of the peak). "
        f"OREPA / DBB: time {timings.ratio('orepa', 'dbb'):.2f}, memory {memory['orepa'] / memory['dbb']:.2f} "
        "(the OREPA paper, ResNet-18 on GPUs: 0.50 and 0.69).")
    out()


# ============================================================================ section 6
# variant → (bf16 autocast, channels_last); the reference first
PRECISION_ROWS = {"fp32": (False, False), "fp32 channels_last": (False, True),
                  "bf16-mixed": (True, False), "bf16-mixed channels_last": (True, True)}
PRECISION_TARGET = 2.0  # the issue: the bf16-mixed train step >= 2x fp32 at batch 32


def _train_copy(model: nn.Module, bf16: bool, channels_last: bool, lr: float = 5e-3) -> Callable[[Tensor, Tensor], float]:
    """A training step on a copy of ``model``, as ``--trainer.precision bf16-mixed`` (autocast)
    and ``--model.channels_last`` run it: ``(images, labels)`` → the loss."""
    model = copy.deepcopy(model).train()
    if channels_last:
        to_channels_last(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x: Tensor, labels: Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _demo_batches(size: int, batch: int, steps: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``steps`` training batches of the classification demo set at ``size`` px, in the
    order and with the augmentation of a run seeded with ``seed``."""
    from datamodules.imagenet import ImageNetDataModule

    data = ImageNetDataModule(image_size=size, batch_size=batch, num_workers=0, pin_memory=False, seed=seed)
    data.prepare_data()
    data.setup("fit")
    batches = []
    for images, labels in data.train_dataloader():
        if len(batches) == steps:
            break
        if images.shape[0] == batch:
            batches.append((images, labels))
    return batches


def section_precision(args: argparse.Namespace, out: Report) -> None:
    name, batch, steps = args.precision_model, args.precision_batch, args.precision_steps
    size = backbones.input_size(name)
    out(f"## 6. Mixed-precision training: `{name}`, batch {batch}, {size[0]}x{size[1]}")
    out()
    if not bf16_supported():
        out("Skipped: this CPU has no native bf16 (`backbones.deploy.bf16_supported()` is False); "
            "autocast would emulate it, slower than float32.")
        out()
        return
    progress(f"precision: build {name}, demo batches")
    torch.manual_seed(300)
    model = backbones.create(name, num_classes=10).train()  # the demo set's 10 classes
    data = _demo_batches(size[0], batch, steps, seed=0)
    x, labels = data[0]
    steps_of = {row: _train_copy(model, *flags) for row, flags in PRECISION_ROWS.items()}
    progress("precision: timing")
    timings = interleaved({row: (lambda f=f: f(x, labels)) for row, f in steps_of.items()},
                          args.repeats, TRAIN_BUDGET_S, TRAIN_REPS, warmup=1, grad=True)
    rows = [[row, f"{timings.median_ms(row):.0f}",
             "1.00" if row == "fp32" else timings.ratio_text("fp32", row)] for row in PRECISION_ROWS]
    out.table(["variant", "ms / training step", "speed-up vs fp32 (per-round IQR)"], rows)
    out()
    best = max(PRECISION_ROWS, key=lambda row: timings.ratio("fp32", row))
    verdict = "met" if timings.ratio("fp32", best) >= PRECISION_TARGET else "NOT met"
    out(f"A step is forward, cross-entropy, backward and an SGD update, interleaved, {timings.rounds} rounds "
        f"(noise +{100 * timings.spread():.0f}%). Target: a bf16-mixed step >= {PRECISION_TARGET:g}x fp32: "
        f"**{verdict}** by `{best}` ({timings.ratio('fp32', best):.2f}x).")
    out()

    progress(f"precision: loss curves, {steps} steps each")
    curves = {"fp32": [], "bf16-mixed channels_last": []}
    for row in curves:  # fresh copies from the same initialization, on the same batches
        train_step = _train_copy(model, *PRECISION_ROWS[row])
        curves[row] = [train_step(images, y) for images, y in data]
    reordered = _train_copy(model, False, False)  # fp32 again, another order and augmentation: the noise
    noise_curve = [reordered(images, y) for images, y in _demo_batches(size[0], batch, steps, seed=1)]
    # mean over the steps: one step's loss swings with its batch far more than the curve does
    bf16_gap = statistics.fmean(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16-mixed channels_last"]))
    noise = statistics.fmean(abs(a - b) for a, b in zip(curves["fp32"], noise_curve))
    out.table(["step", *[str(i) for i in range(len(noise_curve))]],
              [["fp32", *[f"{v:.3f}" for v in curves["fp32"]]],
               ["bf16-mixed channels_last", *[f"{v:.3f}" for v in curves["bf16-mixed channels_last"]]],
               ["fp32, data seed 1", *[f"{v:.3f}" for v in noise_curve]]])
    out()
    out(f"Loss of a short run from one initialization on the classification demo set (SGD lr 5e-3, momentum 0.9): "
        f"bf16-mixed differs from fp32 by {bf16_gap:.3f} on average over the steps, fp32 with another data order and "
        f"augmentation by {noise:.3f}: bf16-mixed is {'within' if bf16_gap <= noise else 'OUTSIDE'} the noise.")
    out()


# ============================================================================ section 5
# row name → (runtime, precision); the reference first
RUNTIME_ROWS = {"torch fp32": ("torch", "fp32"), "torch bf16": ("torch", "bf16"), "torch int8": ("torch", "int8"),
                "ort fp32": ("onnxruntime", "fp32"), "ort int8": ("onnxruntime", "int8")}


def roof_matmuls(n: int = ROOF_N) -> dict[str, Callable[[], Any]]:
    """One n x n x n matrix multiply per precision and runtime, timed alongside the models as their
    roofs: fp32 and bf16 as ``torch.mm`` (oneDNN, which runs the convs too; bf16 only with native
    bf16); ``int8 torch`` as a PT2E-quantized, compiled ``nn.Linear`` (oneDNN's u8 x s8 GEMM behind
    ``qlinear_pointwise``, the kernels of the torch int8 models); ``int8 onnxruntime`` as ONNX
    Runtime's ``MatMulInteger`` (uint8 x int8 → int32), i.e. MLAS's U8S8 GEMM behind the INT8
    model's QLinearConv/QDQ ops. Both int8 GEMMs use AVX512-VNNI or AMX where the CPU has them.
    (``torch._int_mm`` also runs on CPU, but its rate swung 45–500 GMAC/s between tries here.)
    The fp32 roof serves the ONNX Runtime fp32 rows too (MLAS's SGEMM reached it within a few % here)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns: dict[str, Callable[[], Any]] = {"fp32": lambda: a @ b}
    if bf16_supported():
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns["bf16"] = lambda: a16 @ b16
    if _has_torchao():
        linear = nn.Linear(n, n, bias=False).eval()
        int8_linear = quantize_pt2e(linear, [a.relu()])  # activations as after a ReLU: the u8 range used
        x = torch.randn(n, n).relu()
        fns["int8 torch"] = lambda: int8_linear(x)
    if _has_onnxruntime():
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        gen = torch.Generator().manual_seed(0)
        weight = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen).numpy()
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "roof",
                                  [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                                  [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
                                  [numpy_helper.from_array(weight, "B")])
        options = ort.SessionOptions()  # as OnnxModel's: torch's thread count, no spinning after each run
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                       .SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {"A": torch.randint(0, 256, (n, n), dtype=torch.uint8, generator=gen).numpy()}
        fns["int8 onnxruntime"] = lambda: session.run(None, feed)
    return fns


ROOFS = ("fp32", "bf16", "int8 torch", "int8 onnxruntime")


def _roof_key(runtime: str, precision: str) -> str:
    """The roof a row is measured against: its precision's, and for int8 its runtime's GEMM."""
    return f"int8 {runtime}" if precision == "int8" else precision


def _has_onnxruntime() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def _has_torchao() -> bool:
    return importlib.util.find_spec("torchao") is not None


def demo_images(size: tuple[int, int], count: int) -> Tensor:
    """``(count, 3, H, W)``: validation images of the classification demo set (generated once into
    the demo cache), evenly over its classes, with the classification task's evaluation transform."""
    from datamodules.demo import classification_demo
    from datamodules.image_folder import find_classes, list_samples, read_image
    from datamodules.imagenet import eval_transform

    root = classification_demo(train_per_class=1, val_per_class=max(1, -(-count // 10)), image_size=max(size))
    samples = list_samples(root / "val", find_classes(root / "train"))
    transform = eval_transform(size)
    picked = samples[:: max(1, len(samples) // count)][:count]
    return torch.stack([transform(image=read_image(path))["image"] for path, _ in picked])


def section_runtimes(names: list[str], args: argparse.Namespace, out: Report) -> None:
    out(f"## 5. Deploy inference runtimes: fp32 / bf16 / int8 x torch / onnxruntime (batch "
        f"{', '.join(map(str, args.batches))}; {torch.get_num_threads()} threads)")
    out()
    has_ort, has_bf16, has_pt2e = _has_onnxruntime(), bf16_supported(), _has_torchao()
    if not has_bf16:
        out("No torch bf16 rows: this CPU has no native bf16 (`backbones.deploy.bf16_supported()` is False).")
    if not has_ort:
        out("No onnxruntime rows: the onnx extra is not installed (`pip install -e \".[onnx]\"`).")
    if not has_pt2e:
        out("No torch int8 rows: the int8 extra is not installed (`pip install -e \".[int8]\"`).")
    rows, roof_rows, notes = [], [], []
    roofs = {f"roof {k}": fn for k, fn in roof_matmuls().items()}
    with tempfile.TemporaryDirectory() as folder:
        for i, name in enumerate(names):
            progress(f"runtimes: {name}: build")
            torch.manual_seed(500 + i)
            fp32 = backbones.reparameterize_model(randomize_bn(backbones.create(name), 500 + i)).eval()
            size, in_chans = backbones.input_size(name), input_channels(fp32)
            model_gmacs = gmacs(fp32, size, in_chans)
            gen = torch.Generator().manual_seed(600 + i)
            # speed does not depend on the calibration data: a few random-normal batches
            calibration = torch.randn(RUNTIMES_CALIBRATION, in_chans, *size, generator=gen)
            held_out = demo_images(size, RUNTIMES_HELD_OUT) if in_chans == 3 else \
                torch.randn(RUNTIMES_HELD_OUT, in_chans, *size, generator=gen)
            runners: dict[str, Callable[[Tensor], Tensor]] = {"torch fp32": fp32}
            if has_bf16:
                runners["torch bf16"] = Bf16Inference(to_bf16(copy.deepcopy(fp32)))
            if has_ort:
                progress(f"runtimes: {name}: export, quantize")
                onnx_fp32 = export_onnx(fp32, held_out[:1], Path(folder) / f"{name}.onnx")
                onnx_int8 = quantize_int8(onnx_fp32, Path(folder) / f"{name}_int8.onnx", calibration.split(4))
                runners["ort fp32"], runners["ort int8"] = OnnxModel(onnx_fp32), OnnxModel(onnx_int8)

            def accuracy(fn: Callable[[Tensor], Tensor], chunk: int) -> tuple[float, float]:
                """Max rel. error and top-1 agreement against torch fp32 on the held-out images that
                fill whole chunks."""
                images = held_out[:len(held_out) // chunk * chunk]
                with torch.inference_mode():
                    reference, logits = fp32(images), torch.cat([fn(b) for b in images.split(chunk)])
                agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
                return backbones.max_relative_error(reference, logits), agree

            quality = {k: accuracy(fn, 8) for k, fn in runners.items()}
            for batch in args.batches:
                x = torch.randn(batch, in_chans, *size, generator=gen)
                fns = {k: (lambda fn=fn: fn(x)) for k, fn in runners.items()}
                if has_pt2e:
                    progress(f"runtimes: {name}: torch int8: PT2E prepare, calibrate, convert, compile for batch {batch}")
                    int8 = quantize_pt2e(fp32, list(calibration.split(batch)), batch)
                    fns["torch int8"] = lambda: int8(x)
                    fns = {k: fns[k] for k in RUNTIME_ROWS if k in fns}  # rows in the table's order
                    quality["torch int8"] = accuracy(int8, 8)
                    notes.append(f"`{name}` batch {batch}: torch int8 compiled in {int8.compile_seconds:.0f} s")
                progress(f"runtimes: {name}: timing at batch {batch}")
                timings = interleaved({**fns, **roofs}, args.repeats, RUNTIMES_BUDGET_S, RUNTIMES_REPS)
                roof = {k[5:]: ROOF_N ** 3 / statistics.median(timings.times[k]) / 1e9 for k in roofs}
                for k in fns:
                    rate = model_gmacs * batch / timings.median_ms(k) * 1e3
                    error, agree = quality.get(k, (math.nan, math.nan))
                    no_quality = k == "torch fp32" or k not in quality
                    rows.append([f"`{name}`", str(batch), *RUNTIME_ROWS[k], f"{timings.median_ms(k):.1f}",
                                 "1.00" if k == "torch fp32" else timings.ratio_text("torch fp32", k),
                                 f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}",
                                 f"{100 * rate / roof[key]:.0f}%" if (key := _roof_key(*RUNTIME_ROWS[k])) in roof else "–",
                                 "–" if no_quality else fmt_err(error), "–" if no_quality else f"{agree:.2f}"])
                roof_rows.append([f"`{name}`", str(batch), fmt_gmacs(model_gmacs),
                                  *(f"{roof[p]:.0f}" if p in roof else "–" for p in ROOFS),
                                  f"{timings.rounds} (+{100 * timings.spread():.0f}%)"])
                for row, label, target in (("torch bf16", "bf16", BF16_TARGET), ("torch int8", "int8", INT8_TARGET)):
                    if batch == TARGET_BATCH and row in fns:
                        speedup = timings.ratio("torch fp32", row)
                        notes.append(f"{label} target ({row} >= {target:g}x torch fp32 at batch {TARGET_BATCH}): "
                                     f"`{name}` {speedup:.2f}x → {'meets' if speedup >= target else 'misses'} it")
            del runners, fns
    out.table(["model (deploy)", "batch", "runtime", "precision", "ms / batch", "speed vs torch fp32 (per-round IQR)",
               "GMAC/s", "of its roof", "max rel. err", "top-1 agreement"], rows)
    out()
    out.table(["model", "batch", "GMACs / image", *(f"{p} roof GMAC/s" for p in ROOFS), "rounds (noise)"], roof_rows)
    out()
    for note in notes:
        out(f"- {note}")
    if notes:
        out()
    out(f"Each model x batch is one interleaved run of every runtime and of the roofs, {ROOF_N}^3 matrix "
        "multiplies: fp32 and bf16 `torch.mm`; int8 torch a PT2E-quantized compiled `nn.Linear` (oneDNN's "
        "u8 x s8 GEMM) and int8 onnxruntime `MatMulInteger` (MLAS's u8 x s8 GEMM), both on VNNI/AMX. \"Of "
        "its roof\" is the row's GMACs x batch / time over the roof of its precision (int8: of its runtime) "
        "from the same run. torch fp32 is the deploy model with the CPU fusion pass; torch bf16 "
        "`to_bf16` + `Bf16Inference` (input cast to bf16 channels_last, output back to float32); torch int8 "
        "`quantize_pt2e` (PT2E static, S8 per-channel weights, U8 activations; Inductor with freezing, compiled "
        "for the batch size); ort fp32 "
        "`export_onnx` + `OnnxModel`; ort int8 `quantize_int8` (static QDQ, U8 activations, S8 per-channel "
        f"weights); both INT8 calibrated on {RUNTIMES_CALIBRATION} random-normal images. Accuracy against torch fp32 on "
        f"{RUNTIMES_HELD_OUT} real images (the classification demo's validation set at the model's input size; "
        "random weights separate classes weakly, so top-1 agreement is a lower bound on what a trained model keeps). ONNX Runtime sessions do not spin. On a "
        "loaded machine 2 threads can run slower than 1 (a descheduled thread stalls every kernel): compare "
        "`--threads 1` too.")
    out()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reparam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, metavar="GLOB",
                        help="shell-style patterns over backbones.list_models() (default: all; section "
                             f"runtimes: {' '.join(RUNTIME_MODELS)})")
    parser.add_argument("--batch", type=int, default=TARGET_BATCH, help="sections 1-3: batch size of the latency measurements")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per comparison (default: from a time budget per comparison)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="also write the report to FILE")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the whole models (sections 1 and 2) and their inputs in channels_last")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which sections to run (default: all)")
    parser.add_argument("--train-model", default="resnet18",
                        help="section 4: the model built with each conv_type (default: resnet18)")
    parser.add_argument("--train-size", type=int, default=224, help="section 4: input size (default: 224)")
    parser.add_argument("--train-batch", type=int, default=32,
                        help="section 4: batch size (default: 32, the OREPA paper's batch per GPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(RUNTIME_BATCHES), metavar="N",
                        help="section 5: batch sizes (default: 1 8)")
    parser.add_argument("--precision-model", default=TARGET_MODEL,
                        help=f"section 6: the model trained in fp32 and bf16-mixed (default: {TARGET_MODEL})")
    parser.add_argument("--precision-batch", type=int, default=32, help="section 6: batch size (default: 32)")
    parser.add_argument("--precision-steps", type=int, default=12,
                        help="section 6: steps of the loss-curve comparison (default: 12)")
    args = parser.parse_args(argv)
    if min(args.batch, *args.batches, *(v for v in (args.repeats, args.threads) if v is not None)) < 1:
        parser.error("--batch, --batches, --repeats and --threads must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    patterns = args.models or ["*"]
    names = [n for n in backbones.list_models() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not names:
        print(f"no registered model matches {patterns}; registered: {', '.join(backbones.list_models())}",
              file=sys.stderr)
        return 2

    out = Report()
    started = time.perf_counter()
    command = "python -m bench.reparam" + ("" if argv is None and len(sys.argv) <= 1 else
                                           " " + shlex.join(list(argv) if argv is not None else sys.argv[1:]))
    out("# RepMLP re-parameterization benchmark")
    out()
    out(f"- command: `{command}`")
    out(f"- torch {torch.__version__}, {torch.get_num_threads()} threads (os.cpu_count() = {os.cpu_count()}), "
        f"mkldnn {'on' if (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) else 'off'}, Python {platform.python_version()}")
    out(f"- CPU: {cpu_name()}; load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out(f"- models: {', '.join(names)}")
    if "runtimes" in args.sections and not args.models:
        out(f"- models of section 5 (its default list): {', '.join(RUNTIME_MODELS)}")
    out(f"- timing: interleaved rounds (order alternating), warm-up first, `torch.inference_mode`, medians; "
        f"batch {args.batch}; rounds {'fixed at ' + str(args.repeats) if args.repeats else 'from a time budget per comparison'}; "
        f"memory format {'channels_last' if args.channels_last else 'NCHW (contiguous)'}")
    out()

    results = section_models(names, args, out) if "models" in args.sections else None
    if "throughput" in args.sections:
        if any(n in THROUGHPUT_MODELS for n in names):
            section_throughput(args, out)
        else:
            out("## 2. ResNet-50 vs deploy RepMLP-Res50 throughput: skipped (none of "
                f"{', '.join(THROUGHPUT_MODELS)} selected)")
            out()
    if "fc3" in args.sections:
        shapes = collect_shapes(names, results)
        if shapes:
            section_fc3(shapes, args, out)
        else:
            out("## 3. FC3 formulations: skipped (no selected model has RepMLP blocks)")
            out()

    if "train" in args.sections:
        section_train(args, out)
    if "runtimes" in args.sections:
        section_runtimes(names if args.models else list(RUNTIME_MODELS), args, out)
    if "precision" in args.sections:
        section_precision(args, out)

    out(f"Total run time {time.perf_counter() - started:.0f} s; load average at end: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    if args.markdown:
        out.save(args.markdown)
        print(f"(report written to {args.markdown})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
