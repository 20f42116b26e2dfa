"""Image classification with a RepMLP (or baseline) backbone.

    python -m tasks.classification fit                       # demo data, demo config
    python -m tasks.classification fit -c configs/classification/repmlp_res50_g8_224.yaml --data.root /data/imagenet
    python -m tasks.classification test -c CONFIG --ckpt_path runs/.../deploy.ckpt
    python -m tasks.classification predict -c CONFIG --ckpt_path runs/.../deploy.ckpt --data.predict_root FOLDER

The backbone's own classifier (``fc``) is the head, sized by ``num_classes``, which the command
line takes from the dataset (``data.num_classes``).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from callbacks.prediction_csv import TopKCSVWriter
from datamodules.imagenet import ImageNetDataModule
from tasks.augment import Mixup, MixupConfig
from tasks.base import ReparamTask
from tasks.lightning.cli import CONFIG_DIR, TaskCLI

__all__ = ["ClassificationTask", "ClassificationCLI", "main"]


class ClassificationTask(ReparamTask):
    """Cross-entropy classification; logs ``{train,val,test}/loss`` and ``{val,test}/top1, top5``.

    Args:
        backbone: registered model name; its ``fc`` is the classifier.
        backbone_kwargs: its constructor arguments.
        num_classes: classifier outputs (linked to ``data.num_classes`` on the command line).
        label_smoothing: cross-entropy label smoothing ε (training and evaluation).
        mixup: mixup / CutMix of the training batches (:class:`tasks.augment.MixupConfig`; YAML
            ``model: {mixup: {mixup_alpha: 0.8, cutmix_alpha: 1.0}}``); None: off. Training then
            uses soft targets, smoothed by ``label_smoothing`` as timm does; validation, test and
            top-1/top-5 keep the hard labels. Needs an even ``data.batch_size``.
        topk: the second accuracy reported (``top5``), capped at ``num_classes``.
        **kwargs: optimizer, schedule and ``deploy`` (see :class:`tasks.base.ReparamTask`).
    """

    task_name = "classification"
    primary_metric = "test/top1"

    def __init__(
        self,
        backbone: str = "repmlp_res_tiny",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        num_classes: int = 1000,
        label_smoothing: float = 0.0,
        mixup: Optional[MixupConfig] = None,
        topk: int = 5,
        **kwargs: Any,
    ) -> None:
        if isinstance(mixup, MixupConfig):
            # hyperparameters hold plain values: checkpoints load with weights_only=True
            mixup = asdict(mixup)
        super().__init__(backbone, backbone_kwargs, **kwargs)
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1], got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = Mixup(mixup, num_classes) if mixup is not None else None
        self.topk = min(topk, num_classes)
        self.build_model(self.deploy)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_top1", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_top5", MulticlassAccuracy(num_classes, top_k=self.topk, average="micro"))
            # a mean over images, summed across ranks: exact when the ranks hold unequal shares
            setattr(self, f"{stage}_loss", MeanMetric())

    def backbone_args(self) -> dict[str, Any]:
        return {**self.backbone_kwargs, "num_classes": self.num_classes}

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` images → ``(N, num_classes)`` logits."""
        return self.backbone(x)

    def mismatch_hints(self, state_dict: dict[str, Tensor]) -> list[str]:
        hints = []
        for key, value in self.state_dict().items():
            theirs = state_dict.get(key)
            if (theirs is not None and value.ndim == theirs.ndim and value.ndim in (1, 2)
                    and value.shape[0] == self.num_classes and theirs.shape[0] != self.num_classes):
                hints.append(
                    f"class-count mismatch: the checkpoint's classifier ({key}) has {theirs.shape[0]} classes, "
                    f"this run has {self.num_classes} (data.num_classes, from the dataset's class folders)"
                )
                break
        return hints

    def _check_labels(self, labels: Tensor) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            value = int(labels[bad][0])
            raise ValueError(f"label value {value} out of range [0, {self.num_classes}) (model.num_classes)")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.mixup is not None and isinstance(batch_size, int) and batch_size % 2:
            raise ValueError(f"model.mixup needs an even training batch (each image is mixed with the one at the "
                             f"mirrored position), but data.batch_size is {batch_size}: make it even")

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        images, labels = batch
        self._check_labels(labels)
        targets = labels
        if stage == "train" and self.mixup is not None:
            images, targets = self.mixup(images, labels)  # soft targets (N, K), float32
        logits = self(images) if stage == "train" else self.infer(images)
        if stage == "test":
            self.count_test_images(images.shape[0])
        # in fp32 whatever precision the logits come in (soft targets must match their dtype)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
            return loss
        mean_loss, top1, top5 = (getattr(self, f"{stage}_{name}") for name in ("loss", "top1", "top5"))
        mean_loss(loss, weight=labels.numel())
        top1(logits, labels)
        top5(logits, labels)
        self.log(f"{stage}/loss", mean_loss, prog_bar=True)
        self.log(f"{stage}/top1", top1, prog_bar=True)
        self.log(f"{stage}/top5", top5)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    # an evaluation batch is None when skip_corrupt dropped every image of it
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch is not None:
            self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if batch is not None:
            self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Optional[dict[str, Any]]:
        """``{"paths", "indices" (N, k), "scores" (N, k)}``: the top-k classes and their probabilities."""
        if batch is None:
            return None
        images, paths = batch
        scores, indices = torch.softmax(self.infer(images).float(), dim=1).topk(self.topk, dim=1)
        return {"paths": list(paths), "indices": indices.cpu(), "scores": scores.cpu()}


class ClassificationCLI(TaskCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(TopKCSVWriter, "predictions")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: Optional[list[str]] = None, run: bool = True) -> ClassificationCLI:
    return ClassificationCLI(
        ClassificationTask,
        ImageNetDataModule,
        demo_config=CONFIG_DIR / "classification" / "demo.yaml",
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
