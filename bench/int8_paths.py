"""CPU inference paths for a deploy model, float32 and INT8, timed side by side.

Run ``python -m bench.int8_paths [--models resnet50 repmlp_res50_g8_224] [--batch 8] [--threads 2]
[--calibration 32] [--repeats N] [--pt2e]``. For each model (converted from its train-time form with
randomized BN statistics) it times, interleaved in one process (``bench.reparam.interleaved``):

- ``torch``: the PyTorch deploy model in float32 (CPU fusion pass on), the reference;
- ``ort fp32``: its ONNX export (:func:`backbones.deploy.export_onnx`) in ONNX Runtime;
- ``ort int8``: the static QDQ INT8 copy (:func:`backbones.deploy.quantize_int8`, U8 activations,
  S8 per-channel weights) calibrated on ``--calibration`` random-normal images;
- with ``--pt2e``: torch's own INT8 path (torchao PT2E, ``X86InductorQuantizer``), calibrated on the
  same images, then ``torch.compile``d (its compile time is printed: minutes on 2 cores).

It prints per path the median ms per batch, the ratio of torch's median to the path's (> 1: faster
than torch fp32, with the 25th-75th percentile of the per-round ratios), and the accuracy against
torch fp32 on 32 other random-normal images: max relative error of the logits and top-1 agreement
(random weights give weakly separated classes, so agreement is a lower bound on what a trained
model keeps). Only the ratios measured in one run are meant to be compared.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import backbones
from backbones.deploy import OnnxModel, export_onnx, quantize_int8
from bench.reparam import interleaved, progress, randomize_bn


def pt2e_int8(model: nn.Module, example: Tensor, calibration: list[Tensor]) -> tuple[Callable[[Tensor], Tensor], float]:
    """torchao's PT2E x86 INT8 model, compiled (and the seconds the first compiled call took)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
        for batch in calibration:
            prepared(batch)
        compiled = torch.compile(convert_pt2e(prepared))
        start = time.perf_counter()
        compiled(example)
    return compiled, time.perf_counter() - start


def accuracy(reference: Tensor, out: Tensor) -> str:
    agree = (reference.argmax(1) == out.argmax(1)).float().mean().item()
    return f"max rel err {backbones.max_relative_error(reference, out):.3g}, top-1 agreement {agree:.2f}"


def bench(name: str, args: argparse.Namespace, folder: Path) -> None:
    torch.manual_seed(0)
    model = backbones.reparameterize_model(randomize_bn(backbones.create(name), 0)).eval()
    size = backbones.input_size(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, *size, generator=gen)
    calibration = list(torch.randn(args.calibration, 3, *size, generator=gen).split(args.batch))
    held_out = torch.randn(32, 3, *size, generator=gen)
    progress(f"{name}: export")
    fp32 = export_onnx(model, x[:1], folder / f"{name}.onnx")
    progress(f"{name}: quantize")
    int8 = quantize_int8(fp32, folder / f"{name}_int8.onnx", calibration)
    paths: dict[str, Callable[[Tensor], Tensor]] = {
        "torch": model, "ort fp32": OnnxModel(fp32, args.threads), "ort int8": OnnxModel(int8, args.threads)}
    if args.pt2e:
        progress(f"{name}: PT2E prepare, calibrate, convert, compile")
        try:
            paths["pt2e int8 (compiled)"], compile_s = pt2e_int8(model, x, calibration)
            print(f"{name}: PT2E first compiled call {compile_s:.0f} s")
        except Exception as exc:  # report and time the others: the PT2E path is optional
            print(f"{name}: PT2E path failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    with torch.inference_mode():
        reference = model(held_out)
        quality = {k: accuracy(reference, torch.cat([fn(b) for b in held_out.split(args.batch)]))
                   for k, fn in paths.items() if k != "torch"}
    progress(f"{name}: timing")
    timings = interleaved({k: (lambda fn=fn: fn(x)) for k, fn in paths.items()}, args.repeats, 60.0, (5, 40))
    print(f"\n{name}, batch {args.batch}, {args.threads} threads, {timings.rounds} rounds")
    for k in paths:
        ratio = "1.00 (reference)" if k == "torch" else timings.ratio_text("torch", k)
        print(f"  {k:22s} {timings.median_ms(k):8.1f} ms  speed vs torch fp32 {ratio}  {quality.get(k, '')}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "repmlp_res50_g8_224"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--pt2e", action="store_true", help="also torchao's PT2E x86 INT8, compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            bench(name, args, Path(folder))


if __name__ == "__main__":
    main()
