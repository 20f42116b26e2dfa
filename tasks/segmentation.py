"""Semantic segmentation: PSPNet or UPerNet (mmseg layouts) on a ResNet, RepMLP-ResNet or RepMLPNet backbone.

    python -m tasks.segmentation fit                        # demo city, configs/segmentation/demo.yaml
    python -m tasks.segmentation fit -c configs/segmentation/demo_upernet_repmlpnet.yaml  # UPerNet, RepMLPNet
    python -m tasks.segmentation fit -c configs/segmentation/pspnet_repmlp_res50_713.yaml --data.root /data/cityscapes
    python -m tasks.segmentation test -c CONFIG --ckpt_path runs/.../deploy.ckpt
    python -m tasks.segmentation test -c configs/segmentation/pspnet_r50_d8_512x1024.yaml --model.weights mmseg.pth

Module names follow mmseg's ``EncoderDecoder`` (``backbone``, ``decode_head``, ``auxiliary_head``),
so an mmseg PSPNet or UPerNet checkpoint loads after renaming only the backbone's keys
(:mod:`backbones.weights.mmseg`).

A RepMLP backbone (RepMLP-ResNet or RepMLPNet) is built for one input size: the training crop.
Inference therefore defaults to a sliding window of exactly that size (``inference="slide"``);
windows that overrun the image are padded and the padding is cut from the logits, which are
averaged where windows overlap.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.deploy.cpu_fusion import fuse_for_cpu
from callbacks.segmentation_png import SegmentationPNGWriter
from datamodules.cityscapes import CityscapesDataModule
from tasks.base import ReparamTask
from tasks.runtime import RuntimeSpec
from tasks.heads.decode import FCNHead, PSPHead, UPerHead
from tasks.lightning.cli import CONFIG_DIR, TaskCLI
from tasks.metrics.segmentation import SegmentationIoU, check_label_range

__all__ = ["SegmentationTask", "SegmentationCLI", "main"]


class SegmentationTask(ReparamTask):
    """PSPNet or UPerNet: backbone stages → decode head, stage index 2 (c4) → auxiliary FCNHead
    (training only); logits upsampled to the label size.

    Any registered backbone with ``forward_stages`` (four maps) and ``widths`` works: the dilated
    ResNets for PSPNet, the plain ResNets (``resnet50_v1c``) and RepMLPNet for UPerNet.

    Args:
        backbone: a registered backbone (``resnet50_v1c_d8``, ``repmlp_res50_g4_8_d8_713``,
            ``resnet50_v1c``, ``repmlpnet_b256``, ...).
        backbone_kwargs: its arguments; ``img_size`` is the training crop and the sliding window.
        num_classes: classes (linked to ``data.num_classes``).
        class_names: names for the per-class IoU table (linked to ``data.classes``).
        decode_head: ``"psp"``: :class:`~tasks.heads.decode.PSPHead` on the last stage map (PSPNet,
            meant for output-stride-8 backbones); ``"uper"``: :class:`~tasks.heads.decode.UPerHead`
            on all four stage maps (UPerNet: pyramid pooling on the last, FPN, logits at stride 4).
        head_channels: the decode head's width (mmseg's ``channels``, 512 in its configs).
        pool_scales, aux_channels, dropout, align_corners: decode head / FCNHead settings.
        aux_weight: weight of the auxiliary loss (0 removes the auxiliary head).
        ignore_index: label value excluded from the loss and the metrics.
        loss_average: ``"all"`` (default, mmseg's ``avg_non_ignore=False``): the loss is averaged
            over all pixels, ignored ones adding 0; ``"non_ignored"``: over labelled pixels only.
        inference: ``"slide"`` (windows of the backbone's input size) or ``"whole"`` (one forward).
        slide_stride: window stride ``(h, w)``; default two thirds of the window.
        flip: also predict the mirrored image and average the probabilities.
        scales: image scales for multi-scale inference (probabilities averaged).
        mmseg_heads: build the decode head (PSPHead or UPerHead) and FCNHead from mmsegmentation
            itself (``pip install -e .[mmseg]``) instead of the project's heads; same state-dict
            keys, same outputs (tested). Their BNs are not folded at deploy (mmcv's ConvModule has
            no deploy form).
        **kwargs: weights, optimizer and schedule (see :class:`tasks.base.ReparamTask`); an ImageNet
            backbone starts a fit with ``--model.weights FILE --model.weights_match matching`` (the
            classifier and size-dependent RepMLP layers are named and left initialized), an mmseg
            PSPNet or UPerNet checkpoint is tested with ``--model.weights mmseg.pth``.

    The backbone's own classification head (``head``: RepMLPNet's final BN) never runs here: it
    is frozen, so that DDP does not wait for its gradients.
    """

    task_name = "segmentation"
    primary_metric = "test/mIoU"

    def __init__(
        self,
        backbone: str = "repmlp_res_tiny_d8",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        num_classes: int = 19,
        class_names: Optional[list[str]] = None,
        decode_head: Literal["psp", "uper"] = "psp",
        head_channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        align_corners: bool = False,
        ignore_index: int = 255,
        loss_average: Literal["all", "non_ignored"] = "all",
        inference: Literal["slide", "whole"] = "slide",
        slide_stride: Optional[tuple[int, int]] = None,
        flip: bool = False,
        scales: tuple[float, ...] = (1.0,),
        mmseg_heads: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, **kwargs)
        if decode_head not in ("psp", "uper"):
            raise ValueError(f"model.decode_head must be 'psp' or 'uper', got {decode_head!r}")
        if loss_average not in ("all", "non_ignored"):
            raise ValueError(f"model.loss_average must be 'all' or 'non_ignored', got {loss_average!r}")
        if inference not in ("slide", "whole"):
            raise ValueError(f"model.inference must be 'slide' or 'whole', got {inference!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.build_model(self.deploy)
        if slide_stride is not None and not all(1 <= s <= w for s, w in zip(slide_stride, self.window)):
            raise ValueError(
                f"model.slide_stride {tuple(slide_stride)} must be between 1 and the window {self.window} "
                "(a larger stride leaves pixels that no window covers)"
            )
        for stage in ("val", "test"):
            setattr(self, f"{stage}_iou", SegmentationIoU(num_classes, ignore_index))
        self.test_summary: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ model
    def backbone_args(self) -> dict[str, Any]:
        return {**self.backbone_kwargs, "num_classes": 0}

    def build_model(self, deploy: bool) -> None:
        super().build_model(deploy)
        hp = self.hparams
        widths = getattr(self.backbone, "widths", None)
        if not callable(getattr(self.backbone, "forward_stages", None)) or widths is None or len(widths) != 4:
            raise ValueError(f"model.backbone {self.backbone_name!r} gives no four stage maps (forward_stages and "
                             "widths): the segmentation heads need them; use a ResNet, RepMLP-ResNet or RepMLPNet")
        # the pooled classifier head of a headless backbone (RepMLPNet's final BN) is not part of the
        # segmentation model: without gradients DDP would wait for it at every step
        head = getattr(self.backbone, "head", None)
        if isinstance(head, torch.nn.Module):
            head.requires_grad_(False)
        if hp.mmseg_heads:
            self._build_mmseg_heads(widths)
            return
        if hp.decode_head == "uper":
            self.decode_head = UPerHead(widths, self.num_classes, hp.head_channels, hp.pool_scales, hp.dropout,
                                        hp.align_corners, deploy=deploy)
        else:
            self.decode_head = PSPHead(widths[3], self.num_classes, hp.head_channels, hp.pool_scales, hp.dropout,
                                       hp.align_corners, deploy=deploy)
        self.auxiliary_head = (
            FCNHead(widths[2], self.num_classes, hp.aux_channels, dropout=hp.dropout, deploy=deploy)
            if hp.aux_weight > 0 else None
        )
        if deploy:  # deploy heads run fused like the deploy backbone (backbones.create applied the pass to it)
            fuse_for_cpu(self)

    def _build_mmseg_heads(self, widths: Sequence[int]) -> None:
        try:
            from mmseg.models.decode_heads import FCNHead as MMSegFCNHead
            from mmseg.models.decode_heads import PSPHead as MMSegPSPHead
            from mmseg.models.decode_heads import UPerHead as MMSegUPerHead
        except ImportError as exc:
            raise ImportError(
                f"model.mmseg_heads=true needs mmsegmentation with a compiled mmcv ({exc}); "
                "install the mmcv wheel, then pip install -e .[mmseg]"
            ) from exc
        hp = self.hparams
        norm = dict(type="BN", requires_grad=True)
        # in_index picks c5 / c4 (all four stages for UPerHead) from the list of stage outputs
        common = dict(channels=hp.head_channels, pool_scales=tuple(hp.pool_scales), dropout_ratio=hp.dropout,
                      num_classes=self.num_classes, norm_cfg=norm, align_corners=hp.align_corners)
        if hp.decode_head == "uper":
            self.decode_head = MMSegUPerHead(in_channels=list(widths), in_index=[0, 1, 2, 3], **common)
        else:
            self.decode_head = MMSegPSPHead(in_channels=widths[3], in_index=3, **common)
        self.auxiliary_head = MMSegFCNHead(
            in_channels=widths[2], in_index=2, channels=hp.aux_channels, num_convs=1, concat_input=False,
            dropout_ratio=hp.dropout, num_classes=self.num_classes, norm_cfg=norm,
            align_corners=hp.align_corners) if hp.aux_weight > 0 else None

    def _heads(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        stages = self.backbone.forward_stages(x)
        # mmseg's heads take the list of stages and pick their in_index; the project's PSP and FCN
        # heads take one map, its UPerHead all four
        if self.hparams.mmseg_heads:
            decode_in, aux_in = stages, stages
        else:
            decode_in, aux_in = (stages if self.hparams.decode_head == "uper" else stages[3]), stages[2]
        aux = self.auxiliary_head(aux_in) if self.auxiliary_head is not None and self.training else None
        return self.decode_head(decode_in), aux

    def _resize(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=self.hparams.align_corners)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` → decode-head logits ``(N, num_classes, H, W)`` (one forward, no windows)."""
        return self._resize(self._heads(x)[0], x.shape[-2:])

    # ------------------------------------------------------------------ inference
    @property
    def window(self) -> tuple[int, int]:
        return self.input_size

    def batch_inputs(self, batch: Any) -> Tensor:
        """A batch's images cut (or zero-padded) to one window, the only size a RepMLP backbone takes."""
        images = batch[0]
        hc, wc = self.window
        h, w = images.shape[-2:]
        images = images[..., :hc, :wc]
        return F.pad(images, (0, max(0, wc - w), 0, max(0, hc - h)))

    def _windows(self, images: Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """``images`` zero-padded to at least one window, and the top-left corners of the sliding windows."""
        hc, wc = self.window
        hs, ws = self.hparams.slide_stride or (max(1, 2 * hc // 3), max(1, 2 * wc // 3))
        h, w = images.shape[-2:]
        ph, pw = max(h, hc), max(w, wc)  # images smaller than a window are padded, then cropped back
        padded = F.pad(images, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else images
        rows = max(ph - hc + hs - 1, 0) // hs + 1
        cols = max(pw - wc + ws - 1, 0) // ws + 1
        return padded, [(min(r * hs, ph - hc), min(c * ws, pw - wc)) for r in range(rows) for c in range(cols)]

    def slide_logits(self, images: Tensor) -> Tensor:
        """Sliding-window logits ``(N, C, H, W)``: windows of the backbone's input size, logits averaged."""
        hc, wc = self.window
        n, _, h, w = images.shape
        padded, corners = self._windows(images)
        logits = images.new_zeros((n, self.num_classes, *padded.shape[-2:]))
        count = images.new_zeros((1, 1, *padded.shape[-2:]))
        for y1, x1 in corners:
            logits[:, :, y1:y1 + hc, x1:x1 + wc] += self.infer(padded[:, :, y1:y1 + hc, x1:x1 + wc])
            count[:, :, y1:y1 + hc, x1:x1 + wc] += 1
        return (logits / count)[:, :, :h, :w]

    def use_runtime(self, spec: RuntimeSpec, calibration: Optional[list[Tensor]] = None) -> None:
        if spec.needs_calibration and self.hparams.inference != "slide":  # an exported or compiled model
            raise ValueError(f"--runtime {spec.runtime} --precision {spec.precision} runs a model built for windows of "
                             f"{self.window[0]}x{self.window[1]}: it needs model.inference slide, got {self.hparams.inference!r}")
        super().use_runtime(spec, calibration)

    def calibration_inputs(self, images: Tensor) -> Tensor:
        """The sliding windows of ``images`` ``(M, 3, h, w)``: what the exported model (one window) sees."""
        hc, wc = self.window
        padded, corners = self._windows(images)
        return torch.cat([padded[:, :, y1:y1 + hc, x1:x1 + wc] for y1, x1 in corners])

    def predict_probs(self, images: Tensor) -> Tensor:
        """Class probabilities ``(N, C, H, W)`` at the input resolution, over scales and flips."""
        hp = self.hparams
        size = images.shape[-2:]
        total, n = None, 0
        for scale in hp.scales:
            scaled = images if scale == 1 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=hp.align_corners)
            for flip in ((False, True) if hp.flip else (False,)):
                x = scaled.flip(-1) if flip else scaled
                logits = self.slide_logits(x) if hp.inference == "slide" else self.infer(x)
                logits = self._resize(logits.flip(-1) if flip else logits, size)
                probs = logits.softmax(1)
                total = probs if total is None else total + probs
                n += 1
        return total / n

    # ------------------------------------------------------------------ steps
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of ``(N, C, h, w)`` logits resized to the ``(N, H, W)`` labels."""
        logits = self._resize(logits, labels.shape[-2:])
        if self.hparams.loss_average == "non_ignored":
            return F.cross_entropy(logits, labels, ignore_index=self.hparams.ignore_index)
        return F.cross_entropy(logits, labels, ignore_index=self.hparams.ignore_index, reduction="none").mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        check_label_range(labels, self.num_classes, self.hparams.ignore_index)
        decode, aux = self._heads(images)
        loss_decode = self.loss(decode, labels)
        loss = loss_decode
        if aux is not None:
            loss_aux = self.loss(aux, labels)
            loss = loss + self.hparams.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, on_step=True, on_epoch=False)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        images, labels = batch  # the metric checks the label range
        probs = self.predict_probs(images)
        if stage == "test":
            self.count_test_images(images.shape[0])
        getattr(self, f"{stage}_iou").update(probs.argmax(1), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_iou(self, stage: str) -> dict[str, Any]:
        metric = getattr(self, f"{stage}_iou")
        result = metric.compute()  # summed over ranks
        metric.reset()
        self.log(f"{stage}/mIoU", result["miou"].float(), prog_bar=True)
        self.log(f"{stage}/aAcc", result["aacc"].float())
        return {
            "mIoU": float(result["miou"]),
            "aAcc": float(result["aacc"]),
            "per_class_iou": {name: (None if math.isnan(v) else v) for name, v in zip(self.class_names, result["iou"].tolist())},
        }

    def on_validation_epoch_end(self) -> None:
        self._log_iou("val")

    def on_test_epoch_end(self) -> None:
        self.test_summary = self._log_iou("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``{"paths", "labels" (N, H, W) uint8 trainIds}``."""
        images, paths = batch
        return {"paths": list(paths), "labels": self.predict_probs(images).argmax(1).to(torch.uint8).cpu()}

    def results(self) -> dict[str, Any]:
        out = super().results()
        if self.test_summary is not None:
            out["per_class_iou"] = self.test_summary["per_class_iou"]
        out["inference"] = {k: self.hparams[k] for k in ("inference", "slide_stride", "flip", "scales")}
        out["window"] = list(self.window)
        return out


class SegmentationCLI(TaskCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(SegmentationPNGWriter, "predictions")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.class_names", apply_on="instantiate")

def main(args: Optional[list[str]] = None, run: bool = True) -> SegmentationCLI:
    return SegmentationCLI(
        SegmentationTask,
        CityscapesDataModule,
        demo_config=CONFIG_DIR / "segmentation" / "demo.yaml",
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
