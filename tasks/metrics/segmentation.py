"""Dataset-level segmentation metrics as mmseg computes them: mIoU, aAcc and per-class IoU.

One confusion matrix is accumulated over the whole set (torchmetrics state, summed across DDP
ranks), then IoU = TP / (TP + FP + FN) per class; mIoU averages the classes that occur in the
predictions or the labels (union > 0), like mmseg's ``nanmean``; aAcc = Σ TP / Σ labelled pixels.
Pixels labelled ``ignore_index`` are not counted. This is not the per-image average that
``torchmetrics.segmentation.MeanIoU`` computes.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

__all__ = ["SegmentationIoU", "iou_from_confusion", "check_label_range"]


def check_label_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise naming the first label that is neither a class index nor ``ignore_index``."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise ValueError(
            f"label value {int(target[bad][0])} out of range: expected 0..{num_classes - 1} "
            f"or {ignore_index} (ignore_index)"
        )


def iou_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """``{"iou" (C,) with NaN where the union is 0, "miou", "aacc"}`` from a ``(C, C)`` matrix
    whose rows are labels and columns predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    labelled = confusion.sum()
    return {
        "iou": iou,
        "miou": iou.nanmean() if (union > 0).any() else torch.tensor(float("nan"), dtype=torch.float64),
        "aacc": tp.sum() / labelled if labelled > 0 else torch.tensor(float("nan"), dtype=torch.float64),
    }


class SegmentationIoU(MulticlassConfusionMatrix):
    """Accumulates ``(N, H, W)`` predicted and true class maps; ``compute()`` → mIoU, aAcc, per-class IoU.

    ``update(preds, target)`` takes class indices (``preds`` may also be ``(N, C, H, W)`` logits).
    Values of ``target`` outside ``[0, num_classes)`` other than ``ignore_index`` raise an error.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} differs from label shape {tuple(target.shape)}")
        check_label_range(target, self.num_classes, self.ignore_index)
        super().update(preds, target)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return iou_from_confusion(self.confmat)
