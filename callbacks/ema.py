"""EMA of the weights: Lightning's :class:`~pytorch_lightning.callbacks.EMAWeightAveraging` with the
fixes a training run of this project needs.

Lightning's callback (2.6) keeps a copy of the whole LightningModule and, after every optimizer step
(``accumulate_grad_batches`` respected), updates it as ``ema = decay * ema + (1 - decay) * weights``,
the first update copying the weights. Parameters and buffers are averaged (``use_buffers``): BN's
running statistics too, as timm's ``ModelEma`` (RepLKNet) and MMPretrain's ``EMAHook(update_buffers=True)``
(MobileOne) do. ``num_batches_tracked`` is averaged as an integer (the float average truncated), so
it lags the model's count; BN reads it only with ``momentum=None``, which no model here uses.
Validation runs on the EMA weights (swapped in for the epoch); a checkpoint's ``state_dict`` holds
them, with the trained weights in ``current_model_state`` and ``n_averaged`` in ``averaging_state``,
and a resumed fit restores both; when training ends the EMA weights are copied into the model, so
:class:`callbacks.ReparamCallback` converts them (``load_best`` reloads the best checkpoint's
``state_dict``: EMA weights too) and the test after fit tests them.

What this subclass adds (each a silent failure of the plain callback):

- **Device and layout.** Lightning copies the module in ``setup``, before the strategy moves it to
  the GPU (and before the task's ``setup`` makes it channels_last): on a GPU run the EMA would stay
  on the CPU, every step copying the whole model to the host. When fit starts, the copy follows the
  module's device and memory layout (``device`` keeps it elsewhere, e.g. ``"cpu"`` to save GPU memory).
- **Before the first update** (``update_starting_at_step`` or ``update_starting_at_epoch`` not yet
  reached) the EMA is the model itself: validation, checkpoints and the end of a short fit use the
  trained weights, not the copy taken before training (random, or before ``model.weights`` loaded).
- **Checks.** ``decay`` outside [0, 1) or ``update_every_n_steps < 1`` (which would never update)
  are errors naming the argument; a ``ModelCheckpoint(save_weights_only=True)`` is refused, since
  Lightning skips the callbacks' checkpoint hook for it and the file would hold the trained weights,
  not the EMA; a model whose structure changed after the copy is refused (the swap pairs tensors by order).
- **Released after fit** (``teardown``): a test or validate run on the same trainer, after
  ``ReparamCallback`` converted the model, never swaps the train-time copy in.

DDP: every rank keeps its own copy and updates it from its replica; DDP keeps the replicas equal
(gradients all-reduced, buffers broadcast from rank 0, SyncBatchNorm in the GPU configs), so the
copies stay equal, and rank 0's is the one saved.

Configure it as a trainer callback::

    trainer:
      callbacks:
        - class_path: callbacks.ema.EMA
          init_args: {decay: 0.9999}

or on the command line: ``--trainer.callbacks+=callbacks.ema.EMA --trainer.callbacks.decay 0.9999``.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import Tensor, nn

__all__ = ["EMA"]


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters then buffers, in the order Lightning pairs them (``_swap_models``)."""
    return itertools.chain(module.named_parameters(), module.named_buffers())


def _pairs(copy: nn.Module, model: nn.Module) -> Iterator[tuple[tuple[str, Tensor], tuple[str, Tensor]]]:
    return zip(_tensors(copy), _tensors(model))


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (see the module doc).

    Args:
        decay: ``ema = decay * ema + (1 - decay) * weights`` after each update, in [0, 1). Papers:
            RepLKNet 0.9999 (timm ``ModelEma``), MobileOne 0.9995 (MMPretrain momentum 5e-4),
            timm's train.py 0.9998, Lightning 0.999. The average spans about ``1 / (1 - decay)``
            updates: pick it against the run's length.
        update_every_n_steps: update after every n-th optimizer step (the first included).
        update_starting_at_step: first optimizer step (0-based) that updates; None: the first.
        update_starting_at_epoch: also update at the end of each epoch from this one on; None: never.
        use_buffers: average the buffers (BN statistics) too; False copies them from the model.
        device: where the copy lives; None: the model's device.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        update_starting_at_epoch: Optional[int] = None,
        use_buffers: bool = True,
        device: Optional[str] = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay} (callbacks.ema.EMA init_args.decay; "
                             "e.g. 0.9999 for RepLKNet, 0.9995 for MobileOne)")
        if update_every_n_steps < 1:
            raise ValueError(f"EMA update_every_n_steps must be at least 1, got {update_every_n_steps}")
        for name, value in (("update_starting_at_step", update_starting_at_step),
                            ("update_starting_at_epoch", update_starting_at_epoch)):
            if value is not None and value < 0:
                raise ValueError(f"EMA {name} must be None or at least 0, got {value}")
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.decay = decay

    @property
    def state_key(self) -> str:
        # Lightning's class's key: a run checkpointed with either callback resumes with the other
        return "EMAWeightAveraging"

    # ------------------------------------------------------------------ fit starts
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.save_weights_only:
                    raise ValueError(
                        "EMA with ModelCheckpoint(save_weights_only=True): Lightning does not call the callbacks' "
                        "checkpoint hook for weights-only files, so they would hold the trained weights, not the "
                        "EMA weights, and ReparamCallback(load_best) would convert those; remove save_weights_only"
                    )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = self._average_model
        assert average is not None
        mine, theirs = list(_tensors(average.module)), list(_tensors(pl_module))
        for (name, a), (their_name, b) in itertools.zip_longest(mine, theirs, fillvalue=("(none)", None)):
            if name != their_name or a is None or b is None or a.shape != b.shape:
                raise RuntimeError(
                    f"EMA: the model changed structure after the EMA copy was made (at setup): {name!r} "
                    f"{tuple(a.shape) if a is not None else ''} in the copy, {their_name!r} "
                    f"{tuple(b.shape) if b is not None else ''} in the model; build every layer in __init__"
                )
        average.to(self._device or pl_module.device)
        with torch.no_grad():
            for (_, a), (_, b) in _pairs(average.module, pl_module):
                a.data = torch.empty_like(b, dtype=a.dtype, device=a.device).copy_(a)  # the model's strides

    # ------------------------------------------------------------------ before the first update
    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def _follow_model(self, pl_module: pl.LightningModule) -> None:
        """Until the first update, the EMA is the model: copy the model's tensors into it."""
        if self._average_model is None or self._started():
            return
        with torch.no_grad():
            for (_, a), (_, b) in _pairs(self._average_model.module, pl_module):
                a.copy_(b)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follow_model(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follow_model(pl_module)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._follow_model(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    # ------------------------------------------------------------------ fit ends
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = None  # its weights are in the model since on_train_end
