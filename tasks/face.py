"""Face recognition: an embedding network trained with a margin softmax, evaluated by verification.

    python -m tasks.face fit                                   # demo faces, configs/face/demo.yaml
    python -m tasks.face fit -c configs/face/repmlp_faceres.yaml --data.root /data/faces_emore
    python -m tasks.face test -c CONFIG --ckpt_path runs/.../deploy.ckpt
    python -m tasks.face predict -c CONFIG --ckpt_path runs/.../deploy.ckpt --data.predict_root FOLDER

Training classifies the training identities with a margin head (:mod:`tasks.heads.margin`) on top of
the backbone's embedding. The head is training-only: the deploy model is the backbone, and
validation/test follow insightface's verification protocol on every configured set (LFW,
CFP-FP, AgeDB-30, ...): the embedding of a face is the L2-normalized sum of the embeddings of
the image and its horizontal flip, and pairs are scored by 10-fold accuracy on the squared
distance (:mod:`tasks.metrics.verification`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks.embedding_npy import EmbeddingWriter
from datamodules.faces import FaceDataModule
from backbones.weights import Weights
from tasks.base import ReparamTask
from tasks.heads.margin import MarginHead, MarginLoss
from tasks.lightning.cli import CONFIG_DIR, TaskCLI
from tasks.metrics.verification import FaceVerification

__all__ = ["FaceTask", "FaceCLI", "main"]


class FaceTask(ReparamTask):
    """Embedding backbone + margin head; logs ``train/loss`` and, per verification set ``<name>``,
    ``{val,test}/<name>/{acc,acc_std,tar@far=...,auc}`` and their mean ``{val,test}/acc``.

    Args:
        backbone: a registered face backbone (``mobilefacenet``, ``faceresnet``, ``repmlp_faceres``, ...).
        backbone_kwargs: its arguments (``img_size``, ``embedding_size``, ...).
        num_classes: training identities (linked to ``data.num_classes``); 0 builds no head, which
            is enough to test or predict (a checkpoint's head is then rebuilt to its size).
        verification_sets: names of the evaluated sets, in dataloader order (linked to
            ``data.verification_sets``; may be empty for ``predict``).
        loss: margin softmax: ``"arcface"`` (s=64, m=0.5), ``"cosface"`` (s=64, m=0.4) or
            ``"amsoftmax"`` (s=30, m=0.35; the RepMLP-FaceRes recipe).
        scale, margin: override the loss's s and m.
        clip_grad_norm: clip the backbone's gradient norm to this value (insightface: 5); None: off.
        flip_test: embed each evaluated face with its mirror image (insightface's "Accuracy-Flip").
        n_folds: folds of the verification protocol.
        far_targets: false-accept rates at which the true-accept rate is reported.
        **kwargs: optimizer and schedule (see :class:`tasks.base.ReparamTask`).
    """

    task_name = "face"
    primary_metric = "test/acc"

    def __init__(
        self,
        backbone: str = "repmlp_faceres_tiny",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        num_classes: int = 0,
        verification_sets: Sequence[str] = ("lfw",),
        loss: MarginLoss = "arcface",
        scale: Optional[float] = None,
        margin: Optional[float] = None,
        clip_grad_norm: Optional[float] = None,
        flip_test: bool = True,
        n_folds: int = 10,
        far_targets: Sequence[float] = (1e-3,),
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, **kwargs)
        if num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.set_names = list(verification_sets)
        self.build_model(self.deploy)
        self.head: Optional[MarginHead] = self._build_head(num_classes) if num_classes else None
        # one metric per set, reused by validation and test (they never run at the same time)
        self.verification = nn.ModuleDict({
            self._key(name): FaceVerification(n_folds=n_folds, far_targets=tuple(far_targets)) for name in self.set_names
        })
        self.test_summary: Optional[dict[str, dict[str, float]]] = None

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def _build_head(self, num_classes: int) -> MarginHead:
        hp = self.hparams
        return MarginHead(self.embedding_size, num_classes, hp.loss, hp.scale, hp.margin)

    @property
    def embedding_size(self) -> int:
        return int(self.backbone.embedding_size)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` faces in [-1, 1] → ``(N, D)`` raw (unnormalized) embeddings."""
        return self.backbone(x)

    def embed(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` → ``(N, D)`` L2-normalized embeddings, summed with the mirror image's first
        when ``flip_test`` (one forward pass of ``2N`` images)."""
        if self.hparams.flip_test:
            both = self.infer(torch.cat([x, x.flip(-1)]))
            emb = both[: x.shape[0]] + both[x.shape[0]:]
        else:
            emb = self.infer(x)
        return F.normalize(emb.float(), dim=1)

    # ------------------------------------------------------------------ checkpoints
    def mismatch_hints(self, state_dict: dict[str, Tensor]) -> list[str]:
        theirs = state_dict.get("head.weight")
        if theirs is not None and self.head is not None and theirs.shape[0] != self.num_classes:
            return [f"identity-count mismatch: the checkpoint's margin head has {theirs.shape[0]} identities, this "
                    f"run has {self.num_classes} (data.num_classes, from the training set)"]
        return []

    def adapt_heads(self, weights: Weights) -> None:
        # Outside fit the head is unused: take the file's, whatever this run's data holds.
        theirs = weights.task_state_dict().get("head.weight")
        if self.trainer_stage() != "fit":
            if theirs is None:
                self.head = None
            elif self.head is None or self.head.weight.shape != theirs.shape:
                self.head = self._build_head(int(theirs.shape[0]))

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        if self.head is None:
            raise ValueError("fit needs training identities: model.num_classes is 0 (no training set found under data.root)")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f"identity label {int(labels[bad][0])} out of range [0, {self.num_classes}) (model.num_classes)")
        logits = self.head(self(images), labels)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        # insightface clips the backbone only; the trainer's own clipping options still apply on top
        if self.hparams.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.hparams.clip_grad_norm)
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ verification
    def _eval_step(self, batch: Any, dataloader_idx: int) -> None:
        images_a, images_b, issame, index = batch
        n = images_a.shape[0]
        emb = self.embed(torch.cat([images_a, images_b]))
        if self.trainer.testing:
            self.count_test_images(2 * n)
        self.verification[self._key(self.set_names[dataloader_idx])].update(emb[:n], emb[n:], issame, index)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def _log_verification(self, stage: str) -> dict[str, dict[str, float]]:
        summary: dict[str, dict[str, float]] = {}
        for name in self.set_names:
            metric = self.verification[self._key(name)]
            result = {k: float(v) for k, v in metric.compute().items()}  # gathered over ranks
            metric.reset()
            summary[name] = result
            for key, value in result.items():
                if key not in ("pairs", "folds", "threshold"):
                    self.log(f"{stage}/{name}/{key}", value, add_dataloader_idx=False, sync_dist=False)
        accs = [s["acc"] for s in summary.values() if not math.isnan(s["acc"])]
        self.log(f"{stage}/acc", sum(accs) / len(accs) if accs else float("nan"), prog_bar=True,
                 add_dataloader_idx=False)
        return summary

    def on_validation_epoch_end(self) -> None:
        self._log_verification("val")

    def on_test_epoch_end(self) -> None:
        self.test_summary = self._log_verification("test")

    # ------------------------------------------------------------------ predict and results
    def predict_step(self, batch: Any, batch_idx: int) -> Optional[dict[str, Any]]:
        """``{"paths", "embeddings" (N, D) float32}``: the evaluation embeddings (normalized, flip-summed);
        None for a batch whose every image skip_corrupt dropped."""
        if batch is None:
            return None
        images, paths = batch
        return {"paths": list(paths), "embeddings": self.embed(images).cpu()}

    def results(self) -> dict[str, Any]:
        out = super().results()
        out["verification"] = self.test_summary
        out["flip_test"] = self.hparams.flip_test
        return out


class FaceCLI(TaskCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(EmbeddingWriter, "predictions")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.verification_sets", "model.verification_sets", apply_on="instantiate")


def main(args: Optional[list[str]] = None, run: bool = True) -> FaceCLI:
    return FaceCLI(
        FaceTask,
        FaceDataModule,
        demo_config=CONFIG_DIR / "face" / "demo.yaml",
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
