"""Mixup / CutMix (tasks.augment.mixup) and the classification task's soft-target loss.

The expectations are computed here independently: the draws are replayed by hand from the same
seed in the documented order, the CutMix box is recomputed from them with timm's rule, and the
smoothed loss uses timm's ``mixup_target`` formula written out (off = ε/K, on = 1-ε+off)."""
from __future__ import annotations

import copy
import math
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tasks.augment import Mixup, MixupConfig
from tasks.classification import ClassificationTask, main

K = 5


def batch(n: int = 6, h: int = 20, w: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (no two equal pixels across images) and labels that differ from their partners'."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 2, 3, 4, 1, 2, 0])[:n]
    return torch.rand(n, 3, h, w, generator=g), labels


def beta(alpha: float) -> float:
    a = torch.tensor(alpha, dtype=torch.float64)
    return float(torch.distributions.Beta(a, a).sample())


def timm_target(labels: torch.Tensor, lam: float, k: int, smoothing: float) -> torch.Tensor:
    """timm's mixup_target, written out."""
    off = smoothing / k
    on = 1.0 - smoothing + off
    t = torch.full((len(labels), k), off, dtype=torch.float64)
    t2 = t.clone()
    for i, y in enumerate(labels.tolist()):
        t[i, y] = on
        t2[i, labels.flip(0)[i]] = on
    return lam * t + (1.0 - lam) * t2


def timm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SoftTargetCrossEntropy: mean over rows of -Σ target · log_softmax."""
    return (-target * F.log_softmax(logits.double(), dim=1)).sum(1).mean()


# ---------------------------------------------------------------------- targets and mixup
def test_targets_sum_to_one_and_weigh_own_and_partner_label():
    mixer = Mixup(MixupConfig(mixup_alpha=1.0, cutmix_alpha=1.0), K)
    x, y = batch()
    for seed in range(20):
        torch.manual_seed(seed)
        params = mixer.draw(x.shape[-2], x.shape[-1])
        _, targets = mixer.apply(x, y, params)
        assert targets.shape == (6, K)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        for i in range(6):
            assert targets[i, y[i]] == pytest.approx(params.lam, abs=1e-6)
            assert targets[i, y[5 - i]] == pytest.approx(1 - params.lam, abs=1e-6)


def test_mixup_images_are_the_weighted_sum_with_the_flipped_batch():
    mixer = Mixup(MixupConfig(mixup_alpha=0.8), K)
    x, y = batch()
    torch.manual_seed(3)
    mixed, targets = mixer(x, y)
    torch.manual_seed(3)  # replay: gate, then λ ~ Beta(0.8, 0.8)
    assert float(torch.rand(())) < 1.0
    lam = beta(0.8)
    assert 0.0 < lam < 1.0
    expected = torch.stack([lam * x[i] + (1 - lam) * x[5 - i] for i in range(6)])
    assert torch.equal(mixed, expected)
    torch.testing.assert_close(targets, timm_target(y, lam, K, 0.0).float())
    assert not torch.equal(x, mixed) and torch.equal(x, batch()[0])  # the input batch is left as it was


def replay_cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """timm's rand_bbox from the same draws: sides int(side·√(1-λ)), half each way, clipped."""
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w))


@pytest.mark.parametrize("correct_lam", [True, False])
def test_cutmix_box_comes_from_the_partner_and_lambda_is_the_kept_area(correct_lam):
    mixer = Mixup(MixupConfig(cutmix_alpha=1.0, correct_lam=correct_lam), K)
    x, y = batch()
    h, w = x.shape[-2:]
    clipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        mixed, targets = mixer(x, y)
        torch.manual_seed(seed)  # replay: gate, λ ~ Beta(1, 1), centre row, centre column
        torch.rand(())
        lam0 = beta(1.0)
        top, bottom, left, right = replay_cutmix_box(h, w, lam0)
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        # the pixels that changed are exactly the box, and they are the partner's
        changed = (mixed != x).any(0).any(0)
        assert torch.equal(changed, inside)
        assert torch.equal(mixed[:, :, inside], x.flip(0)[:, :, inside])
        assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
        area = (bottom - top) * (right - left)
        full_h, full_w = int(h * math.sqrt(1 - lam0)) // 2 * 2, int(w * math.sqrt(1 - lam0)) // 2 * 2
        clipped += area < full_h * full_w
        lam = 1 - area / (h * w) if correct_lam else lam0
        torch.testing.assert_close(targets, timm_target(y, lam, K, 0.0).float())
    assert clipped >= 5  # the border clipping (what correct_lam corrects) was exercised


def test_cutmix_minmax_box_size_and_place():
    mixer = Mixup(MixupConfig(cutmix_minmax=(0.25, 0.75)), K)
    x, y = batch(h=16, w=24)
    sizes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        mixed, targets = mixer(x, y)
        torch.manual_seed(seed)  # replay: gate, height, width, top, left
        torch.rand(())
        cut_h, cut_w = int(torch.randint(4, 12, ())), int(torch.randint(6, 18, ()))
        top, left = int(torch.randint(0, 16 - cut_h, ())), int(torch.randint(0, 24 - cut_w, ()))
        inside = torch.zeros(16, 24, dtype=torch.bool)
        inside[top:top + cut_h, left:left + cut_w] = True
        assert torch.equal((mixed != x).any(0).any(0), inside)
        lam = 1 - cut_h * cut_w / (16 * 24)
        torch.testing.assert_close(targets, timm_target(y, lam, K, 0.0).float())
        sizes.add((cut_h, cut_w))
    assert len(sizes) > 10


def test_switch_prob_is_the_observed_cutmix_fraction_and_prob_the_mixed_fraction():
    mixer = Mixup(MixupConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3), K)
    torch.manual_seed(0)
    draws = [mixer.draw(8, 8) for _ in range(4000)]
    mixed = [d for d in draws if d.lam != 1.0 or d.cutmix]
    cutmix = sum(d.cutmix for d in mixed)
    # binomial standard errors: 0.0077 and 0.0118; 4 of them
    assert len(mixed) / 4000 == pytest.approx(0.6, abs=0.031)
    assert cutmix / len(mixed) == pytest.approx(0.3, abs=0.047)
    assert all(d.box is not None for d in mixed if d.cutmix) and all(d.box is None for d in mixed if not d.cutmix)


def test_prob_zero_leaves_the_batch_untouched():
    mixer = Mixup(MixupConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0), K)
    x, y = batch()
    torch.manual_seed(0)
    for _ in range(20):
        mixed, targets = mixer(x, y)
        assert torch.equal(mixed, x)
        assert torch.equal(targets, F.one_hot(y, K).float())


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_follows_beta_alpha_alpha(alpha):
    mixer = Mixup(MixupConfig(mixup_alpha=alpha), K)
    torch.manual_seed(1)
    lams = torch.tensor([mixer.draw(8, 8).lam for _ in range(4000)], dtype=torch.float64)
    var = 1 / (4 * (2 * alpha + 1))  # Beta(α, α): mean 1/2, variance 1/(4(2α+1))
    assert float(lams.mean()) == pytest.approx(0.5, abs=4 * math.sqrt(var / 4000))
    assert float(lams.var()) == pytest.approx(var, rel=0.08)
    assert float(lams.min()) > 0 and float(lams.max()) < 1


def test_smoothed_soft_target_loss_equals_timms_formula():
    eps = 0.1
    mixer = Mixup(MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0), K)
    x, y = batch()
    logits = torch.randn(6, K, generator=torch.Generator().manual_seed(5)) * 3
    for seed in range(6):
        torch.manual_seed(seed)
        params = mixer.draw(20, 28)
        _, targets = mixer.apply(x, y, params)
        ours = F.cross_entropy(logits, targets, label_smoothing=eps)
        theirs = timm_loss(logits, timm_target(y, params.lam, K, eps))
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    # and the smoothing is really there: without it the loss differs
    assert float(F.cross_entropy(logits, targets)) != pytest.approx(float(theirs), rel=1e-3)


# ---------------------------------------------------------------------- bad values
@pytest.mark.parametrize("config, named", [
    (MixupConfig(mixup_alpha=-1.0), "model.mixup.mixup_alpha must be >= 0"),
    (MixupConfig(cutmix_alpha=-0.5), "model.mixup.cutmix_alpha must be >= 0"),
    (MixupConfig(mixup_alpha=1.0, prob=1.5), "model.mixup.prob must be a probability in [0, 1], got 1.5"),
    (MixupConfig(mixup_alpha=1.0, switch_prob=-0.1), "model.mixup.switch_prob must be a probability"),
    (MixupConfig(cutmix_minmax=(0.8, 0.2)), "model.mixup.cutmix_minmax must be two fractions"),
    (MixupConfig(cutmix_minmax=(0.2,)), "model.mixup.cutmix_minmax must be two fractions"),
    (MixupConfig(), "model.mixup: nothing to mix"),
    (MixupConfig(mixup_alpha=float("nan")), "model.mixup.mixup_alpha must be a finite number"),
    ({"mixup_alpha": 1.0, "alpha": 1.0}, "model.mixup: unknown option(s) ['alpha']"),  # a dict, as in hparams
])
def test_bad_config_values_are_named(config, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Mixup(config, K)


def test_an_odd_batch_is_an_error_naming_the_batch_size():
    mixer = Mixup(MixupConfig(mixup_alpha=1.0), K)
    x, y = batch(n=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"model\.mixup: the training batch has 5 images.*even.*data\.batch_size"):
        mixer(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    # int(4 * 0.3) == int(4 * 0.4): no height to draw from
    with pytest.raises(ValueError, match=r"model\.mixup\.cutmix_minmax \(0\.3, 0\.4\) leaves no box size.* 4 pixels"):
        Mixup(MixupConfig(cutmix_minmax=(0.3, 0.4)), K)(*batch(h=4, w=4))


def test_task_refuses_an_odd_data_batch_size_at_fit_start():
    task = ClassificationTask("resnet_tiny", num_classes=4, mixup=MixupConfig(mixup_alpha=1.0))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=1)

    class Data(pl.LightningDataModule):
        batch_size = 3

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.rand(6, 3, 16, 16), torch.arange(6) % 4), batch_size=3)

    with pytest.raises(ValueError, match=r"model\.mixup needs an even training batch.*data\.batch_size is 3"):
        trainer.fit(task, datamodule=Data())


# ---------------------------------------------------------------------- the task
class Record(pl.Callback):
    """The weights and RNG state before each training step, and the step's loss."""

    def __init__(self) -> None:
        self.before, self.losses = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append((copy.deepcopy(module).eval(), torch.get_rng_state()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_training_step_loss_is_the_smoothed_soft_target_cross_entropy():
    eps, n = 0.1, 4
    task = ClassificationTask("resnet_tiny", num_classes=4, label_smoothing=eps, lr=0.05,
                              mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
    assert task.hparams.mixup == dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
                                      switch_prob=0.5, correct_lam=True)  # plain values: weights_only-safe
    images = torch.rand(3 * n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0, 2, 1, 3])
    record = Record()
    torch.manual_seed(0)
    pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               max_epochs=1, callbacks=[record]).fit(task, DataLoader(TensorDataset(images, labels), batch_size=n))
    kinds = set()
    for step, ((model, rng), loss) in enumerate(zip(record.before, record.losses)):
        x, y = images[step * n:(step + 1) * n], labels[step * n:(step + 1) * n]
        torch.set_rng_state(rng)  # replay the step's draws: gate, switch, λ, (box)
        torch.rand(())
        use_cutmix = float(torch.rand(())) < 0.5
        lam = beta(1.0 if use_cutmix else 0.8)
        if use_cutmix:
            top, bottom, left, right = replay_cutmix_box(16, 16, lam)
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / 256
        else:
            x = lam * x + (1 - lam) * x.flip(0)
        kinds.add(use_cutmix)
        model.train()  # BN in training mode, as in the step
        with torch.no_grad():
            logits = model(x)
            expected = timm_loss(logits, timm_target(y, lam, 4, eps))
            hard = F.cross_entropy(logits, y, label_smoothing=eps)
        assert loss == pytest.approx(float(expected), rel=1e-5)
        assert loss != pytest.approx(float(hard), rel=1e-3)
    assert len(record.losses) == 3


def test_validation_keeps_hard_labels():
    task = ClassificationTask("resnet_tiny", num_classes=4, mixup=MixupConfig(mixup_alpha=1.0))
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 4
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, generator=torch.Generator())
    metrics = trainer.validate(task, loader, verbose=False)[0]
    assert torch.equal(torch.get_rng_state(), state)  # validation draws nothing
    task.eval()
    with torch.no_grad():
        logits = task(images)
    assert metrics["val/loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert metrics["val/top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


# ---------------------------------------------------------------------- the command line
def test_cli_reads_mixup_from_yaml_and_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  backbone: resnet_tiny\n"
                      "  mixup: {mixup_alpha: 0.8, cutmix_alpha: 1.0, cutmix_minmax: [0.2, 0.8]}\n"
                      "trainer: {logger: false}\n")
    cli = main(["-c", str(config), "--model.mixup.switch_prob", "0.25"], run=False)
    assert cli.model.mixup.config == MixupConfig(0.8, 1.0, (0.2, 0.8), 1.0, 0.25, True)
    with pytest.raises(ValueError, match=re.escape("model.mixup.prob must be a probability in [0, 1], got 2.0")):
        main(["-c", str(config), "--model.mixup.prob", "2"], run=False)
