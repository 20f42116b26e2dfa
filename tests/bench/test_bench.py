"""bench.reparam's training-cost section (section 4) and its memory measure; the runtimes section (5)."""
from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

import backbones
from backbones.deploy import bf16_supported
from bench.reparam import conv_profile, matmul_gmacs_per_s, saved_activation_bytes
from conftest import REPO


def test_saved_activation_bytes_counts_inputs_not_parameters():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    x = torch.randn(2, 3, 8, 8)
    assert saved_activation_bytes(conv, x) == x.numel() * 4  # conv saves its input; its weight is excluded
    two = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    # + the ReLU output, which ReLU and the 1x1 conv both save: one storage, counted once
    assert saved_activation_bytes(two, x) == (x.numel() + 2 * 4 * 6 * 6) * 4
    assert all(p.grad is None for p in two.parameters())


def test_train_section_compares_conv_types_with_dbb():
    proc = subprocess.run([sys.executable, "-m", "bench.reparam", "--sections", "train", "--train-model",
                           "resnet18_tiny", "--train-size", "32", "--train-batch", "4", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`conv`", "`acb`", "`dbb`", "`orepa`"]
    assert "| `dbb` |" in proc.stdout and "OREPA / DBB: time" in proc.stdout


def test_conv_profile_counts_plain_and_fused_convs_and_their_macs():
    x = torch.randn(2, 8, 32, 32)
    macs = 2 * 16 * 32 * 32 * 8 * 9
    train = backbones.ConvBN(8, 16, 3, act=True).eval()
    for model in (train, backbones.reparameterize_model(train)):  # plain conv + BN; fused deploy conv
        p = conv_profile(model, x, runs=2)
        assert p.conv_macs == macs
        assert 0 < p.conv_ms < p.wall_ms
        assert p.gmacs_per_s == macs / p.conv_ms / 1e6
    # no conv, no conv time
    assert conv_profile(nn.Sequential(nn.ReLU()), x, runs=1).conv_ms == 0.0


def test_matmul_rate_is_a_positive_rate():
    assert 0.1 < matmul_gmacs_per_s(n=256, runs=3) < 1e5


def test_runtimes_section_times_every_runtime_against_torch_fp32_and_its_roof():
    proc = subprocess.run([sys.executable, "-m", "bench.reparam", "--sections", "runtimes",
                           "--models", "repvgg_a0_tiny", "--batches", "1", "2", "--repeats", "1", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = [[line.split("|")[1:-1] for line in block.splitlines()[2:]]
              for block in proc.stdout.split("\n\n") if block.startswith("| model")]
    runs, roofs = tables
    expected = [("torch", "fp32"), ("torch", "bf16"), ("torch", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    if not bf16_supported():
        assert "No torch bf16 rows" in proc.stdout
        expected.remove(("torch", "bf16"))
    assert [(r[1].strip(), r[2].strip(), r[3].strip()) for r in runs] == [
        (b, *e) for b in ("1", "2") for e in expected]
    for r in runs:
        assert r[0].strip() == "`repvgg_a0_tiny`" and float(r[4]) > 0 and r[7].strip().endswith("%")
        if r[3].strip() == "bf16":  # bf16's rounding, as in tests/backbones/test_bf16_deploy.py
            assert 0 < float(r[8]) <= 3e-2
        if r[3].strip() == "int8":  # quantized, and close (tests/backbones/test_pt2e_deploy.py)
            assert 0 < float(r[8]) < 0.3
    assert [r[1].strip() for r in roofs] == ["1", "2"]
    assert proc.stdout.count("torch int8 compiled in") == 2  # once per batch size
    assert all(float(c) > 0 for r in roofs for c in r[3:7] if c.strip() != "–")


def test_precision_section_times_bf16_mixed_and_channels_last_against_fp32():
    if not bf16_supported():
        return  # the section says it is skipped; nothing to time
    proc = subprocess.run([sys.executable, "-m", "bench.reparam", "--sections", "precision", "--precision-model",
                           "repmlp_res_tiny", "--precision-batch", "4", "--precision-steps", "2", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = [line.split("|")[1].strip() for line in proc.stdout.splitlines()
                if line.startswith("| ") and "ms" not in line and not line.startswith("| step")
                and not line.startswith("| fp32, data")][:4]
    assert variants == ["fp32", "fp32 channels_last", "bf16-mixed", "bf16-mixed channels_last"]
    assert "Target: a bf16-mixed step >= 2x fp32" in proc.stdout
    curves = [line for line in proc.stdout.splitlines() if line.startswith("| fp32 |") and line.count("|") == 4]
    assert curves, proc.stdout  # the loss curve row: 2 steps
    assert "the noise" in proc.stdout
