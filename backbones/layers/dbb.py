"""DBB, the Diverse Branch Block (Ding et al., CVPR 2021).

Train time, four branches summed: KxK conv-BN; 1x1 conv-BN; 1x1 conv → BN-and-pad → KxK average
pool → BN; 1x1 conv → BN-and-pad → KxK conv → BN. Deploy: one KxK conv.

The sequential branches merge exactly only if the KxK stage sees, at the border, what the whole
branch would compute on the padded input: a 1x1 conv gives 0 there and its BN gives its shift, so
``BNAndPad`` pads with that shift (zero padding); for reflect/replicate/circular padding it pads
with the same mode, which commutes with per-pixel ops. Dilation is rejected: the average-pool
branch has no dilated form.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reparam.math import add_branches, avg_kernel, bn_scale_shift, fuse_bn, identity_kernel, merge_1x1_kxk
from .convbn import ConvBN
from .geometry import ConvGeometry
from .merged_conv import MergedConvBlock


class BNAndPad(nn.Module):
    """BatchNorm ``bn``, then padding by ``pad`` on every side: with the BN's output for a zero input
    (``padding_mode="zeros"``; the running statistics also in training, as the official layer, but
    not detached: the border passes gradients to the BN's affine parameters) or with the given
    mode. ``(N, C, H, W)`` → ``(N, C, H+2p, W+2p)``.

    It holds its BN rather than being one, so that converting a model to SyncBatchNorm (DDP with
    ``sync_batchnorm``) swaps the BN and keeps the padding.
    """

    def __init__(self, num_features: int, pad: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad, self.padding_mode = pad, padding_mode

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x)
        p = self.pad
        if p == 0:
            return x
        if self.padding_mode != "zeros":
            return F.pad(x, [p] * 4, mode=self.padding_mode)
        border = bn_scale_shift(self.bn)[1].reshape(1, -1, 1, 1).to(x.dtype)
        x = F.pad(x, [p] * 4)
        x[:, :, :p, :] = border
        x[:, :, -p:, :] = border
        x[:, :, p:-p, :p] = border
        x[:, :, p:-p, -p:] = border
        return x

    def extra_repr(self) -> str:
        return f"pad={self.pad}, padding_mode={self.padding_mode}"


class DiverseBranchBlock(MergedConvBlock):
    """``act(origin(x) + pointwise(x) + avg(x) + kxk(x))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    Args:
        internal_channels: width between the 1x1 and the KxK conv of the fourth branch; default
            ``in_channels`` (its 1x1 then starts as the identity), ``2 * in_channels`` when depthwise.
    Branches as in the official block: the 1x1 branch exists only if ``groups < out_channels``;
    when depthwise, the average branch is the pool alone. State dict: train ``origin.*``,
    ``pointwise.*``, ``avg_conv``, ``avg_pad.bn``, ``avg_bn``, ``kxk_idconv``, ``kxk_pad.bn``,
    ``kxk_conv``, ``kxk_bn``; deploy ``reparam_conv.weight, reparam_conv.bias``.
    """

    supports_dilation = False
    dilation_reason = "its average-pool branch has no dilated form"

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry = ConvGeometry(), act: bool = False,
        internal_channels: Optional[int] = None, deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, geometry, act, deploy)
        stride, groups, padding_mode = self.stride, self.groups, self.padding_mode
        depthwise = groups >= out_channels
        if depthwise and in_channels != out_channels:
            raise ValueError(f"DiverseBranchBlock: a depthwise block (groups={groups} >= out_channels) needs "
                             f"in_channels == out_channels, got {in_channels} and {out_channels}: its average "
                             "branch is a pool of the input")
        internal = internal_channels or (2 * in_channels if depthwise else in_channels)
        if internal % groups:
            raise ValueError(f"DiverseBranchBlock: groups={groups} must divide internal_channels={internal}")
        self.internal_channels = internal
        self.identity_based = internal == in_channels
        if deploy:
            return
        k, p = self.kernel_size, self.padding
        self.origin = ConvBN(in_channels, out_channels, k, stride, p, groups=groups, padding_mode=padding_mode)
        if not depthwise:
            self.pointwise = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
            self.avg_conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
            self.avg_pad = BNAndPad(out_channels, p, padding_mode)
        self.avg_bn = nn.BatchNorm2d(out_channels)
        # The 1x1 of the fourth branch: a learned residual on the identity when widths allow.
        self.kxk_idconv = nn.Parameter(torch.zeros(internal, in_channels // groups, 1, 1))
        if not self.identity_based:
            nn.init.kaiming_uniform_(self.kxk_idconv, a=5 ** 0.5)
        self.kxk_pad = BNAndPad(internal, p, padding_mode)
        self.kxk_conv = nn.Conv2d(internal, out_channels, k, stride, 0, groups=groups, bias=False)
        self.kxk_bn = nn.BatchNorm2d(out_channels)

    def _kxk_1x1(self) -> Tensor:
        # the identity is made on the fly, not kept as a buffer: meta-device init + load_state_dict
        # (to_empty) would leave a non-persistent buffer uninitialized
        if not self.identity_based:
            return self.kxk_idconv
        return self.kxk_idconv + identity_kernel(*self.kxk_idconv.shape[:2], like=self.kxk_idconv)

    def _pad(self, x: Tensor) -> Tensor:
        """The input of the pool-only (depthwise) average branch, padded as the merged conv pads."""
        return F.pad(x, [self.padding] * 4, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)

    def forward_branches(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size, self.stride
        out = self.origin(x)
        if hasattr(self, "pointwise"):
            out = out + self.pointwise(x)
            avg = self.avg_pad(self.avg_conv(x))
        else:
            avg = self._pad(x)
        out = out + self.avg_bn(F.avg_pool2d(avg, k, s))
        mid = self.kxk_pad(F.conv2d(x, self._kxk_1x1(), groups=self.groups))
        return out + self.kxk_bn(self.kxk_conv(mid))

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        g, k = self.groups, self.kernel_size
        origin = self.origin.get_equivalent_kernel_bias()
        branches = [origin]
        if hasattr(self, "pointwise"):
            branches.append(self.pointwise.get_equivalent_kernel_bias())
            k1, b1 = fuse_bn(self.avg_conv.weight, None, self.avg_pad.bn)
            pool = avg_kernel(self.out_channels, self.out_channels // g, k, like=k1)
            avg = merge_1x1_kxk(k1, b1, pool, None, g)
        else:
            avg = (avg_kernel(self.out_channels, self.in_channels // g, k, like=origin[0]), None)
        branches.append(fuse_bn(*avg, self.avg_bn))
        k1, b1 = fuse_bn(self._kxk_1x1(), None, self.kxk_pad.bn)
        branches.append(fuse_bn(*merge_1x1_kxk(k1, b1, self.kxk_conv.weight, None, g), self.kxk_bn))
        return add_branches(*branches)
