"""MarginHead: ArcFace / CosFace / AM-Softmax logits against float64 references, the ArcFace
fallback past θ = π − m, gradients at the extremes, argument errors, and DDP gradient equality
of the replicated class-centre matrix (2 gloo processes vs one process on the global batch)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port, gloo_group
from torch import nn

from backbones import max_relative_error
from tasks.heads.margin import DEFAULT_SCALE_MARGIN, MarginHead


def _reference(head: MarginHead, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 logits computed from angles: target s·cos(θ+m) (ArcFace, θ+m < π) or s·(cos θ − m)."""
    e = F.normalize(emb.double(), dim=1)
    w = F.normalize(head.weight.detach().double(), dim=1)
    cos = (e @ w.t()).clamp(-1, 1)
    s, m = head.scale, head.margin
    logits = s * cos
    rows = torch.arange(len(labels))
    theta = torch.acos(cos[rows, labels])
    if head.loss == "arcface":
        assert (theta + m < math.pi).all(), "reference only defined for θ + m < π"
        logits[rows, labels] = s * torch.cos(theta + m)
    else:
        logits[rows, labels] = s * (torch.cos(theta) - m)
    return logits


def _unit_angle_batch(thetas: torch.Tensor, dim: int = 8) -> tuple[MarginHead, torch.Tensor, torch.Tensor]:
    """A head whose class-0 centre is (0.7·e1, not unit) and embeddings at angles ``thetas`` to it."""
    head = MarginHead(dim, 5, "arcface")
    with torch.no_grad():
        head.weight[0] = 0.0
        head.weight[0, 0] = 0.7
    emb = torch.zeros(len(thetas), dim, dtype=torch.float64)
    emb[:, 0] = torch.cos(thetas)
    emb[:, 1] = torch.sin(thetas)
    emb = (emb * 2.5).float()  # not unit either
    return head, emb, torch.zeros(len(thetas), dtype=torch.long)


# --------------------------------------------------------------------------- logits
def test_defaults():
    assert DEFAULT_SCALE_MARGIN == {"arcface": (64.0, 0.5), "cosface": (64.0, 0.4), "amsoftmax": (30.0, 0.35)}
    for loss, (s, m) in DEFAULT_SCALE_MARGIN.items():
        head = MarginHead(16, 10, loss)
        assert (head.loss, head.scale, head.margin) == (loss, s, m)
        assert head.weight.shape == (10, 16)
    assert MarginHead(16, 10).loss == "arcface"


@pytest.mark.parametrize("loss,scale,margin", [
    ("arcface", None, None),
    ("cosface", None, None),
    ("amsoftmax", None, None),
    ("arcface", 30.0, 0.3),
    ("cosface", 16, 0.25),
    ("amsoftmax", 10.0, 0.5),
])
def test_logits_match_float64_angles(loss, scale, margin):
    torch.manual_seed(1)
    head = MarginHead(32, 7, loss, scale=scale, margin=margin)
    s_expected, m_expected = DEFAULT_SCALE_MARGIN[loss]
    if scale is not None:
        s_expected, m_expected = float(scale), float(margin)
    assert (head.scale, head.margin) == (s_expected, m_expected)
    emb = torch.randn(12, 32) * 3
    labels = torch.randint(0, 7, (12,))
    # put a few embeddings close to their centre so targets span a range of angles
    with torch.no_grad():
        emb[:4] = head.weight[labels[:4]] * 50 + 0.2 * torch.randn(4, 32) * head.weight.norm(dim=1).mean()
    logits = head(emb, labels)
    assert logits.shape == (12, 7) and logits.dtype == torch.float32
    ref = _reference(head, emb, labels)
    assert (logits.double() - ref).abs().max().item() <= 1e-4 * s_expected
    # non-targets are plain s·cos θ; targets really carry a margin
    mask = F.one_hot(labels, 7).bool()
    plain = s_expected * head.cosine(emb).double()
    assert torch.allclose(logits.double()[~mask], plain[~mask], atol=1e-5 * s_expected)
    assert (logits.double()[mask] < plain[mask] - 0.05 * s_expected * m_expected).all()


def test_logits_scale_with_s_and_depend_on_m():
    torch.manual_seed(2)
    emb, labels = torch.randn(6, 16), torch.randint(0, 4, (6,))
    a = MarginHead(16, 4, "cosface", scale=10.0, margin=0.2)
    b = MarginHead(16, 4, "cosface", scale=20.0, margin=0.2)
    c = MarginHead(16, 4, "cosface", scale=10.0, margin=0.0)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        c.weight.copy_(a.weight)
    torch.testing.assert_close(b(emb, labels), 2 * a(emb, labels))
    diff = c(emb, labels) - a(emb, labels)
    torch.testing.assert_close(diff, 10.0 * 0.2 * F.one_hot(labels, 4).float())


def test_arcface_sweep_monotone_and_below_plain_logit():
    s, m = DEFAULT_SCALE_MARGIN["arcface"]
    thetas = torch.linspace(0, math.pi, 721, dtype=torch.float64)
    head, emb, labels = _unit_angle_batch(thetas)
    with torch.no_grad():
        target = head(emb, labels)[:, 0].double()
        plain = s * head.cosine(emb)[:, 0].double()
    # float32 cosines near θ = 0 limit the accuracy of sin θ = sqrt(1 − cos²θ): ~1e-2 at s = 64
    before = thetas + m < math.pi - 1e-9
    after = thetas > math.pi - m + 1e-9
    assert before.sum() + after.sum() == len(thetas)
    assert (target[before] - s * torch.cos(thetas[before] + m)).abs().max() < 2e-2
    # past θ = π − m (cos(θ+m) would rise again): insightface's fallback s·(cos θ − m·sin(π − m))
    fallback = s * (torch.cos(thetas[after]) - m * math.sin(math.pi - m))
    assert (target[after] - fallback).abs().max() < 1e-3
    # monotonically non-increasing in θ over [0, π] and never above the no-margin logit
    assert (target.diff() <= 1e-4).all(), target.diff().max()
    assert (target <= plain + 1e-4).all()
    assert target[0] == pytest.approx(s * math.cos(m), abs=2e-2)
    assert target[-1] == pytest.approx(s * (-1 - m * math.sin(m)), abs=1e-3)
    # the fallback drops below −s at the switch (a downward jump of s·(cos m + m·sin m − 1) ≈ 7.5),
    # which keeps the logit decreasing: it is not continuous there
    last_before, first_after = target[before][-1].item(), target[after][0].item()
    assert last_before == pytest.approx(-s, abs=0.1) and first_after < last_before - 5


@pytest.mark.parametrize("loss", ["cosface", "amsoftmax"])
def test_additive_cosine_sweep(loss):
    s, m = DEFAULT_SCALE_MARGIN[loss]
    thetas = torch.linspace(0, math.pi, 181, dtype=torch.float64)
    head, emb, labels = _unit_angle_batch(thetas)
    head.loss, head.scale, head.margin = loss, s, m
    with torch.no_grad():
        target = head(emb, labels)[:, 0].double()
    assert (target - s * (torch.cos(thetas) - m)).abs().max() < 1e-4 * s
    assert (target.diff() <= 1e-5).all()


@pytest.mark.parametrize("loss", ["arcface", "cosface", "amsoftmax"])
@pytest.mark.parametrize("sign", [1.0, -1.0])  # θ = 0 (embedding along the centre) and θ = π (opposite)
def test_gradients_finite_at_extreme_angles(loss, sign):
    torch.manual_seed(3)
    head = MarginHead(8, 4, loss)
    labels = torch.tensor([0, 1, 2, 3])
    emb = (sign * 2.0 * head.weight.detach().clone()).requires_grad_(True)
    logits = head(emb, labels)
    cos_t = head.cosine(emb).gather(1, labels[:, None])
    assert torch.allclose(cos_t, torch.full_like(cos_t, sign), atol=1e-6)
    loss_value = F.cross_entropy(logits, labels)
    loss_value.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss_value)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0


def test_half_precision_embeddings_are_upcast():
    torch.manual_seed(4)
    head = MarginHead(8, 3, "arcface")
    emb, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    out = head(emb.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(emb.to(torch.bfloat16).float(), labels))


# --------------------------------------------------------------------------- errors
def test_invalid_loss_name():
    with pytest.raises(ValueError, match=r"model\.loss must be one of.*'arcface'.*got 'sphereface'"):
        MarginHead(8, 10, "sphereface")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 0, -3])
def test_num_classes_below_two(n):
    with pytest.raises(ValueError, match=f"num_classes={n}"):
        MarginHead(8, n)


# --------------------------------------------------------------------------- DDP (gloo, 2 CPU processes)
GLOBAL_BATCH, IN_DIM, EMB_DIM, CLASSES = 8, 6, 8, 5


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(IN_DIM, EMB_DIM)
        self.head = MarginHead(EMB_DIM, CLASSES, "arcface")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), y)


def _model() -> _Model:
    torch.manual_seed(21)
    model = _Model()
    with torch.no_grad():  # larger centres: the normalization's gradient is not trivially tiny
        model.head.weight.normal_(0, 1)
    return model


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(22)
    x = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    return x, y


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_step(rank: int, world_size: int, out_dir: str) -> None:
    model = nn.parallel.DistributedDataParallel(_model())
    x, y = _global_batch()
    half = GLOBAL_BATCH // world_size
    xr, yr = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    loss = F.cross_entropy(model(xr, yr), yr)
    loss.backward()
    if rank == 0:
        torch.save({"grads": _grads(model.module), "loss": loss.detach()}, Path(out_dir) / "rank0.pt")


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        _ddp_step(rank, world_size, out_dir)  # returns before the group goes: the DDP model must not outlive it


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "rank0.pt", weights_only=True)["grads"]

    model = _model()
    x, y = _global_batch()
    F.cross_entropy(model(x, y), y).backward()
    single = _grads(model)
    assert ddp.keys() == single.keys() == {"backbone.weight", "backbone.bias", "head.weight"}
    for name in single:
        assert single[name].abs().max() > 1e-3, name  # a meaningful gradient
        # float32 gradients of magnitude ~10 (s = 64): compare relative to the largest entry
        assert max_relative_error(single[name], ddp[name]) <= 1e-6, name

    # rank 0's local gradient alone (its half, no averaging) differs: the check can fail
    local = _model()
    local_loss = F.cross_entropy(local(x[:GLOBAL_BATCH // 2], y[:GLOBAL_BATCH // 2]), y[:GLOBAL_BATCH // 2])
    local_loss.backward()
    assert (local.head.weight.grad - single["head.weight"]).abs().max() > 1e-3


def test_logits_stay_float32_under_bf16_autocast():
    """``--trainer.precision bf16-mixed`` runs the task's step in autocast; the margin head computes
    its cosines in float32 anyway (bf16 would quantize s·cos in steps of s/256)."""
    torch.manual_seed(0)
    head = MarginHead(16, 50, "arcface")
    emb, labels = torch.randn(8, 16), torch.randint(0, 50, (8,))
    with torch.autocast("cpu", torch.bfloat16):
        mixed = head(emb.bfloat16(), labels)
    exact = _reference(head, emb.bfloat16().float(), labels)
    assert mixed.dtype == torch.float32
    assert max_relative_error(exact, mixed.double()) < 1e-5
