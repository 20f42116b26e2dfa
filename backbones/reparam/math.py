"""The re-parameterization math: pure, small tensor functions every block derives its deploy weights from.

Every block in this project derives its deploy weights from the small functions
below, so the fusion math exists once. All functions are differentiable (no
in-place ops, no ``.data``), which lets QAT and regularizers use the equivalent
weights of a train-time block directly.

Shape conventions: a conv kernel is ``(O, C/g, kh, kw)``; a linear weight is
``(O, I)``; "FC weight of a partition" is ``(O*h*w, C*h*w/g)``, the weight of a
grouped 1x1 conv (or batched matmul) acting on a flattened ``(C, h, w)`` partition.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BNStats",
    "bn_scale_shift",
    "fuse_bn",
    "fuse_bn_before_linear",
    "pad_kernel",
    "add_branches",
    "identity_kernel",
    "avg_kernel",
    "merge_1x1_kxk",
    "merge_depthwise_pointwise",
    "scaled_sum",
    "chain_kernels",
    "conv_to_fc",
    "conv_bias_to_fc",
]


# --------------------------------------------------------------------------- BN fusion
@dataclass(frozen=True)
class BNStats:
    """A BatchNorm's eval-mode tensors without the module: what a checkpoint holds under ``bn.*``.

    Accepted wherever the functions below take a BN, so that a foreign file's BNs fold from its
    tensors (and on the meta device) without building modules. Shapes ``(C,)``; ``weight`` and
    ``bias`` None for ``affine=False``.
    """

    running_mean: Tensor
    running_var: Tensor
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1e-5

    @classmethod
    def of(cls, state_dict: Mapping[str, Tensor], prefix: str, eps: float = 1e-5) -> "BNStats":
        """The BN saved under ``prefix`` (``"stem.0.bn."``) in ``state_dict``; ``eps`` is not saved
        in a state dict (PyTorch's default 1e-5)."""
        return cls(state_dict[prefix + "running_mean"], state_dict[prefix + "running_var"],
                   state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias"), eps)


def bn_scale_shift(bn: _BatchNorm | BNStats) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` such that ``bn(x) == x * scale + shift`` in eval mode.

    Works for any eps and for ``affine=False``. Shapes: ``(C,)`` each.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__}(track_running_stats=False) has no running statistics: "
            "its eval-mode output depends on the batch, so it cannot be folded into a fixed weight"
        )
    std = torch.sqrt(bn.running_var + bn.eps)
    if bn.weight is None:  # affine=False
        scale = 1.0 / std
        shift = -bn.running_mean / std
    else:
        scale = bn.weight / std
        shift = bn.bias - bn.running_mean * scale
    return scale, shift


def _per_row(vector: Tensor, rows: int, what: str) -> Tensor:
    """Expand a per-channel vector to ``rows`` entries; each channel covers a contiguous run of rows."""
    if rows % vector.numel():
        raise ValueError(f"{what}: {rows} rows do not split evenly over {vector.numel()} BN channels")
    return vector.repeat_interleave(rows // vector.numel())


def fuse_bn(weight: Tensor, bias: Optional[Tensor], bn: _BatchNorm | BNStats) -> tuple[Tensor, Tensor]:
    """Fold a BN that *follows* a conv/linear into its weight and bias.

    ``weight``: ``(O, ...)``; ``bias``: ``(O,)`` or None. The BN may have ``O`` channels or a
    divisor of ``O`` (each BN channel then covers a contiguous run of rows, as for a BN over
    ``(S, h, w)``-flattened FC outputs). Returns ``(weight', bias')`` with the shapes of ``weight``/``(O,)``.
    """
    scale, shift = bn_scale_shift(bn)
    rows = weight.shape[0]
    scale = _per_row(scale, rows, "fuse_bn")
    shift = _per_row(shift, rows, "fuse_bn")
    fused_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_b = shift if bias is None else bias * scale + shift
    return fused_w, fused_b


def fuse_bn_before_linear(weight: Tensor, bias: Optional[Tensor], bn: _BatchNorm | BNStats) -> tuple[Tensor, Tensor]:
    """Fold a BN that *precedes* a linear layer into that layer.

    ``weight``: ``(O, I)`` where the linear's input is the BN output flattened channel-major, so
    ``I`` is a multiple of the BN's channel count (e.g. ``C*hp*wp`` for a pooled ``(C, hp, wp)``
    map). Returns ``(weight', bias')`` with ``linear'(x) == linear(bn(x))``.
    """
    scale, shift = bn_scale_shift(bn)
    cols = weight.shape[1]
    scale = _per_row(scale, cols, "fuse_bn_before_linear")
    shift = _per_row(shift, cols, "fuse_bn_before_linear")
    fused_b = weight @ shift
    if bias is not None:
        fused_b = fused_b + bias
    return weight * scale.unsqueeze(0), fused_b


# --------------------------------------------------------------------------- kernels
def _check_odd(kernel: Tensor, what: str) -> None:
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"{what}: kernel size {kh}x{kw} is even; only odd sizes have a centre to align on")


def pad_kernel(kernel: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Zero-pad a ``(..., kh, kw)`` kernel symmetrically to ``(..., H, W)``; all sizes odd.

    Exact for convs whose padding grows by the same amount (``p = k // 2`` convention).
    """
    target_h, target_w = (size, size) if isinstance(size, int) else size
    _check_odd(kernel, "pad_kernel")
    if target_h % 2 == 0 or target_w % 2 == 0:
        raise ValueError(f"pad_kernel: target size {target_h}x{target_w} must be odd")
    kh, kw = kernel.shape[-2:]
    if kh > target_h or kw > target_w:
        raise ValueError(f"pad_kernel: kernel {kh}x{kw} does not fit in {target_h}x{target_w}")
    ph, pw = (target_h - kh) // 2, (target_w - kw) // 2
    return F.pad(kernel, [pw, pw, ph, ph])


def add_branches(*branches: tuple[Tensor, Optional[Tensor]]) -> tuple[Tensor, Tensor]:
    """Sum parallel ``(kernel, bias)`` branches, padding kernels to the largest size.

    Kernels: ``(O, C/g, kh_i, kw_i)`` with odd sizes; biases ``(O,)`` or None.
    Returns ``(kernel, bias)`` with the largest (kh, kw) of the branches.
    """
    if not branches:
        raise ValueError("add_branches needs at least one (kernel, bias) pair")
    size = (max(k.shape[-2] for k, _ in branches), max(k.shape[-1] for k, _ in branches))
    kernel = sum(pad_kernel(k, size) for k, _ in branches)
    out_channels = branches[0][0].shape[0]
    zero = branches[0][0].new_zeros(out_channels)
    bias = sum((b if b is not None else zero) for _, b in branches)
    return kernel, bias


def identity_kernel(channels: int, in_per_group: int, kernel_size: int = 1, like: Optional[Tensor] = None) -> Tensor:
    """The ``(C, C/g, k, k)`` kernel of a grouped conv that returns its input: 1 at the centre of
    ``[i, i mod (C/g)]``. Turns an identity (or BN-only) branch into a conv branch; needs in == out."""
    if kernel_size % 2 == 0:
        raise ValueError(f"identity_kernel: kernel size {kernel_size} is even; only odd sizes have a centre")
    opts = {} if like is None else {"dtype": like.dtype, "device": like.device}
    kernel = torch.zeros(channels, in_per_group, kernel_size, kernel_size, **opts)
    rows = torch.arange(channels, device=kernel.device)
    kernel[rows, rows % in_per_group, kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def avg_kernel(channels: int, in_per_group: int, kernel_size: int, like: Optional[Tensor] = None) -> Tensor:
    """The ``(C, C/g, k, k)`` kernel of a ``k x k`` average pool as a grouped conv: ``1/k^2`` on
    ``[i, i mod (C/g)]``. Equal to ``AvgPool2d`` with ``count_include_pad=True`` (its default)."""
    eye = identity_kernel(channels, in_per_group, 1, like)
    return eye.expand(-1, -1, kernel_size, kernel_size) / (kernel_size * kernel_size)


def merge_1x1_kxk(
    k1: Tensor, b1: Optional[Tensor], k2: Tensor, b2: Optional[Tensor], groups: int = 1
) -> tuple[Tensor, Tensor]:
    """One conv equal to a grouped 1x1 conv ``(k1, b1)`` followed by a grouped KxK conv ``(k2, b2)``.

    ``k1``: ``(D, C/g, 1, 1)``, ``k2``: ``(O, D/g, kh, kw)``, both with ``groups`` groups. Returns
    ``(O, C/g, kh, kw)`` and ``(O,)``. Exact only if the KxK conv's padded border equals what the
    1x1 conv gives on padding (``b1`` for zero padding: DBB's BN-and-pad layer).
    """
    d, o = k1.shape[0], k2.shape[0]
    if k1.shape[-2:] != (1, 1) or d % groups or o % groups or k2.shape[1] * groups != d:
        raise ValueError(f"merge_1x1_kxk: kernels {tuple(k1.shape)} and {tuple(k2.shape)} "
                         f"do not chain with groups={groups}")
    k1g = k1.reshape(groups, d // groups, k1.shape[1])                   # (g, D/g, C/g)
    k2g = k2.reshape(groups, o // groups, d // groups, *k2.shape[-2:])   # (g, O/g, D/g, kh, kw)
    kernel = torch.einsum("gdc,godhw->gochw", k1g, k2g).reshape(o, k1.shape[1], *k2.shape[-2:])
    bias = k2.new_zeros(o) if b2 is None else b2
    if b1 is not None:
        bias = bias + torch.einsum("godhw,gd->go", k2g, b1.reshape(groups, d // groups)).reshape(o)
    return kernel, bias


def merge_depthwise_pointwise(dw: Tensor, pw: Tensor, in_channels: int, groups: int = 1) -> Tensor:
    """One grouped KxK kernel equal to a depthwise KxK conv followed by a grouped 1x1 conv (no biases).

    ``dw``: ``(C*t, 1, kh, kw)``, a conv with ``C = in_channels`` groups (``t`` filters per input
    channel, rows ``c*t + j``); ``pw``: ``(O, C*t/g, 1, 1)`` with ``groups`` groups.
    Returns ``(O, C/g, kh, kw)``.
    """
    o = pw.shape[0]
    ct = dw.shape[0]
    if (ct % in_channels or in_channels % groups or o % groups or dw.shape[1] != 1
            or pw.shape[1] * groups != ct or pw.shape[-2:] != (1, 1)):
        raise ValueError(f"merge_depthwise_pointwise: kernels {tuple(dw.shape)} and {tuple(pw.shape)} "
                         f"do not chain with in_channels={in_channels}, groups={groups}")
    t, cg = ct // in_channels, in_channels // groups
    pwg = pw.reshape(groups, o // groups, cg, t)
    dwg = dw.reshape(groups, cg, t, *dw.shape[-2:])
    return torch.einsum("gocj,gcjhw->gochw", pwg, dwg).reshape(o, cg, *dw.shape[-2:])


def scaled_sum(kernels: Sequence[Tensor], scales: Tensor) -> Tensor:
    """``sum_b kernels[b] * scales[b]`` with one scale per output row: OREPA's linear branch scaling
    (its ``vector``, a BN replaced by a per-channel factor).

    ``kernels``: ``B`` tensors ``(O, ...)`` of one shape; ``scales``: ``(B, O)``. Returns ``(O, ...)``.
    """
    if scales.dim() != 2 or scales.shape[0] != len(kernels):
        raise ValueError(f"scaled_sum: scales {tuple(scales.shape)} must be (number of kernels = {len(kernels)}, O)")
    total = None
    for kernel, scale in zip(kernels, scales):
        term = kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1)))
        total = term if total is None else total + term
    return total


def chain_kernels(kernels: Sequence[Tensor]) -> Tensor:
    """One ``(O, C, K, K)`` kernel from dense kernels ``(C1, C, k1, k1), (C2, C1, k2, k2), ...``,
    ``K = k1 + k2 + ... - (n - 1)``: OREPA's large-kernel composition (``OREPA_LargeConv.weight_gen``).

    Each next kernel slides over the running one (cross-correlation, padded ``k_i - 1``), as the
    official code composes them with ``F.conv2d``. That is the kernel of stacked unpadded convs
    whose kernels after the first are flipped 180 degrees, not of the given stack (stacking
    convolves kernels, OREPA issue #9): a parameterization of one KxK conv, which its checkpoints
    hold. ``groups`` 1 only (the ResNet stem's).
    """
    if not kernels:
        raise ValueError("chain_kernels needs at least one kernel")
    kernel = kernels[0].transpose(0, 1)  # (C, C1, k, k): the input channels as a batch
    for nxt in kernels[1:]:
        if nxt.dim() != 4 or nxt.shape[1] != kernel.shape[1]:
            raise ValueError(f"chain_kernels: a kernel {tuple(nxt.shape)} does not take the "
                             f"{kernel.shape[1]} channels of the one before")
        kernel = F.conv2d(kernel, nxt, padding=nxt.shape[-1] - 1)
    return kernel.transpose(0, 1)


def conv_to_fc(kernel: Tensor, h: int, w: int, groups: int = 1) -> Tensor:
    """The FC weight equal to a stride-1 ``k//2``-padded grouped conv on one ``h x w`` partition.

    The identity-matrix trick (RepMLP eq. 15): feeding the basis of the flattened
    ``(C/g, h, w)`` input space through the conv yields the columns of the FC matrix.
    Exact for any C != O (the official code transposes with the wrong shape there).

    Args:
        kernel: ``(O, C/g, kh, kw)``, kh and kw odd (need not be equal, may exceed h or w).
        h, w: partition size.
        groups: conv groups ``g``.
    Returns:
        ``(O*h*w, C*h*w/g)``: row ``(o, y, x)``, column ``(c mod C/g, y', x')`` within group ``o // (O/g)``.
    """
    _check_odd(kernel, "conv_to_fc")
    out_channels, in_per_group, kh, kw = kernel.shape
    if out_channels % groups:
        raise ValueError(f"conv_to_fc: {out_channels} output channels are not divisible by groups={groups}")
    n = in_per_group * h * w
    # Basis of one group's input, repeated so every group sees the same basis vector.
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device).reshape(n, in_per_group, h, w)
    basis = eye.repeat(1, groups, 1, 1)  # (n, C, h, w)
    response = F.conv2d(basis, kernel, padding=(kh // 2, kw // 2), groups=groups)  # (n, O, h, w)
    return response.reshape(n, out_channels * h * w).t()


def conv_bias_to_fc(bias: Tensor, h: int, w: int) -> Tensor:
    """A per-channel conv bias ``(O,)`` as the bias ``(O*h*w,)`` of the partition FC."""
    return bias.repeat_interleave(h * w)
