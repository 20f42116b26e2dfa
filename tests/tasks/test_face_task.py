"""FaceTask pieces that need no training run: gradient clipping, the step schedule, checkpoints' heads."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from backbones.weights import weights_of_checkpoint
from tasks.face import FaceTask


def _task(**kwargs) -> FaceTask:
    return FaceTask(backbone="faceresnet_tiny", num_classes=5, verification_sets=["a", "b"], **kwargs)


def _clip(task: FaceTask) -> None:
    """Lightning's clipping hook as the fit loop calls it (no trainer-level clipping configured)."""
    task.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    task.configure_gradient_clipping(torch.optim.SGD(task.parameters(), lr=0.1))


def test_clip_grad_norm_clips_the_backbone_only():
    task = _task(clip_grad_norm=0.5)
    for p in task.parameters():
        p.grad = torch.full_like(p, 3.0)
    _clip(task)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in task.backbone.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-3)
    assert torch.all(task.head.weight.grad == 3.0)  # insightface clips the backbone, not the class centres
    unclipped = _task()
    for p in unclipped.parameters():
        p.grad = torch.full_like(p, 3.0)
    _clip(unclipped)
    assert all(torch.all(p.grad == 3.0) for p in unclipped.parameters())


def test_step_schedule_divides_at_the_milestones():
    task = _task(schedule="step", step_milestones=(0.6, 0.8667, 0.9667), step_gamma=0.1)
    total = 420_000
    factors = {step: task.lr_factor(step, total, 0) for step in (0, 251_999, 252_000, 364_013, 364_014, 406_014, 419_999)}
    assert factors[0] == factors[251_999] == 1.0
    assert math.isclose(factors[252_000], 0.1) and math.isclose(factors[364_013], 0.1)
    assert math.isclose(factors[364_014], 0.01) and math.isclose(factors[406_014], 0.001)
    with pytest.raises(ValueError, match="step_milestones"):
        _task(schedule="step", step_milestones=(0.9, 0.5))


def test_embedding_is_normalized_and_flip_summed():
    task = _task().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        emb = task.embed(x)
        raw = task(x) + task(x.flip(-1))
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(emb, torch.nn.functional.normalize(raw, dim=1), atol=1e-6)


def test_a_checkpoint_head_is_adopted_outside_fit_and_explained_in_fit():
    trained = _task()
    state = {"state_dict": trained.state_dict(), "deploy": False, "backbone": trained.backbone_spec(),
             "pytorch-lightning_version": "2.6.6"}
    weights = weights_of_checkpoint(state, "trained.ckpt")
    tester = FaceTask(backbone="faceresnet_tiny", num_classes=0, verification_sets=["a"])
    assert tester.head is None
    tester.load_weights(weights)  # no trainer: not fitting
    assert tester.head is not None and tester.head.weight.shape == (5, 128)
    assert torch.equal(tester.head.weight, trained.head.weight)
    other = FaceTask(backbone="faceresnet_tiny", num_classes=7, verification_sets=["a"])
    other.trainer_stage = lambda: "fit"  # resuming a fit with another training set
    with pytest.raises(ValueError, match="identity-count mismatch.*5 identities.*7"):
        other.load_weights(weights)
