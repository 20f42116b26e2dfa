"""The model-level walker: convert every re-parameterizable block of a model, and measure the error.

Blocks convert themselves and what they contain (``switch_to_deploy``,
:mod:`backbones.reparam.block`); the walker finds the outermost ones under any known convention
and calls each once.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["REPARAM_METHODS", "reparameterize_model", "convert_children", "find_reparam_method",
           "max_relative_error", "model_relative_error"]

# Method names of the known conversion conventions, in the order a walker tries them:
# this project and MMPretrain (switch_to_deploy), timm/MobileOne (reparameterize),
# RepMLPNet v2 (local_inject), RepLKNet (merge_kernel).
REPARAM_METHODS = ("switch_to_deploy", "reparameterize", "local_inject", "merge_kernel")


# --------------------------------------------------------------------------- model level
def find_reparam_method(module: nn.Module) -> Optional[Callable[[], Any]]:
    """The conversion method a module offers under any known convention, or None."""
    for name in REPARAM_METHODS:
        method = getattr(module, name, None)
        if callable(method):
            return method
    return None


def _sync_bn_names(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]


def reparameterize_model(model: nn.Module, inplace: bool = False, fuse: bool = True) -> nn.Module:
    """Convert every re-parameterizable block of ``model`` to its deploy form.

    Puts the model in eval mode (BN folding uses running statistics) and walks top-down from the
    root. The rule: a module that offers a conversion method (:data:`REPARAM_METHODS`) converts its
    whole subtree, so the walker calls that method once and does not descend into the module; it
    descends only into modules that offer none. This project's blocks satisfy the rule (a
    composite block's ``switch_to_deploy`` converts its children), and so do the third-party
    conventions it meets: MMPretrain's RepMLPNet root, whose ``switch_to_deploy`` calls its blocks'
    ``local_inject``, and the leaf blocks of timm (``reparameterize``) and RepLKNet
    (``merge_kernel``). Third-party methods are often not idempotent; under this rule none is
    called twice, and the walker keeps no state on the modules. Deep-copies the model unless
    ``inplace``. Raises if the model contains SyncBatchNorm, which must be reverted first
    (Lightning does so at the end of fit; ``nn.SyncBatchNorm`` is not a ``BatchNorm2d``).
    ``fuse``: then apply the CPU fusion pass (:func:`backbones.deploy.cpu_fusion.fuse_for_cpu`:
    same keys and outputs, faster CPU inference).
    """
    sync = _sync_bn_names(model)
    if sync:
        raise TypeError(
            f"cannot re-parameterize a model that contains SyncBatchNorm ({', '.join(sync[:5])}"
            f"{', ...' if len(sync) > 5 else ''}): revert it to BatchNorm first, e.g. with "
            "lightning's layer_sync.revert(model) or convert a model built without sync_batchnorm"
        )
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        _convert_tree(model)
    if fuse:
        # imported here: the deploy passes build on the layers, which import this module
        from ..deploy.cpu_fusion import fuse_for_cpu
        fuse_for_cpu(model)
    return model


def _convert_tree(module: nn.Module) -> None:
    method = find_reparam_method(module)
    if method is None:
        convert_children(module)
    else:
        method()  # converts the module's subtree (the walker's rule)


def convert_children(module: nn.Module) -> None:
    """Convert every re-parameterizable descendant of ``module`` (not ``module`` itself), top-down,
    by the rule of :func:`reparameterize_model`.

    Used by composite blocks, whose own conversion is the conversion of what they contain.
    The mode (train/eval) is left as it is.
    """
    for child in list(module.children()):
        _convert_tree(child)


def _flatten(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for key in sorted(output) for t in _flatten(output[key])]
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [t for item in output for t in _flatten(item)]
    raise TypeError(f"cannot compare model outputs of type {type(output).__name__}")


def max_relative_error(reference: Any, other: Any) -> float:
    """``max|reference - other| / max|reference|`` over tensors, or nested lists/dicts of them.

    NaN when either side has a non-finite value, so ``error <= tolerance`` fails for broken outputs.
    """
    refs, others = _flatten(reference), _flatten(other)
    if len(refs) != len(others):
        raise ValueError(f"outputs differ in structure: {len(refs)} vs {len(others)} tensors")
    worst = 0.0
    for a, b in zip(refs, others):
        if a.shape != b.shape:
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        a, b = a.detach().double(), b.detach().double()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return float("nan")
        scale = a.abs().max().item()
        diff = (a - b).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def model_relative_error(reference: nn.Module, other: nn.Module, *inputs: Any) -> float:
    """Run both models in eval mode on ``inputs`` and return :func:`max_relative_error`."""
    modes = (reference.training, other.training)
    reference.eval()
    other.eval()
    try:
        with torch.no_grad():
            return max_relative_error(reference(*inputs), other(*inputs))
    finally:
        reference.train(modes[0])
        other.train(modes[1])
