"""MergedConvBlock: the base of every block whose deploy form is one conv (ACB, RepVGG, DBB, OREPA, MobileOne, large kernel)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reparam.block import ReparamBlock, assign_parameter
from .geometry import PADDING_MODES, ConvGeometry

__all__ = ["MergedConvBlock", "PADDING_MODES"]


class MergedConvBlock(ReparamBlock):
    """Parallel (or composed) conv branches whose deploy form is one conv, ``reparam_conv``, then ``act``.

    ``(N, in_channels, H, W)`` → ``(N, out_channels, H', W')`` with the arithmetic of one conv of
    this ``geometry`` (:class:`ConvGeometry`), whose padding is "same", ``dilation * (k // 2)``.
    Its fields are also attributes of the block (``kernel_size``, ``stride``, ``padding``, ...).
    Subclasses build their branches when ``not deploy`` and implement ``forward_branches`` and
    ``merge_branches`` (pure, differentiable); conversion, the deploy conv (its geometry
    from the constructor, so ``deploy=True`` builds the same keys) and the forward live here.
    Every padding mode is exact for branches that share the centre: reflect, replicate and circular
    padding values depend on the position only, not on how wide a branch pads.
    """

    supports_dilation = True
    dilation_reason = ""  # why not, when supports_dilation is False
    any_padding = False  # True: a block that is one conv at train time accepts any padding

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry, act: bool = False, deploy: bool = False
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(geometry, ConvGeometry):
            raise TypeError(f"{name}: geometry must be a ConvGeometry, e.g. ConvGeometry(3, stride=2), "
                            f"got {geometry!r}")
        groups, dilation, padding = geometry.groups, geometry.dilation, geometry.padding
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        if dilation != 1 and not self.supports_dilation:
            raise ValueError(f"{name}: dilation={dilation} is not supported ({self.dilation_reason}); "
                             "use ConvBN, ACBlock or OREPA for dilated convs")
        same = geometry.same_padding
        if padding is not None and padding != same and not self.any_padding:
            raise ValueError(f"{name}: padding={padding} is not supported; the branches align only with "
                             f"'same' padding dilation*(kernel_size//2) = {same} (pass padding=None)")
        self.geometry = replace(geometry, padding=same if padding is None else padding)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = self.geometry.kernel_size, geometry.stride, self.geometry.padding
        self.dilation, self.groups, self.padding_mode = dilation, groups, geometry.padding_mode
        self.deploy = deploy
        if deploy:
            self.reparam_conv = self.new_conv()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def new_conv(self, device: Optional[torch.device | str] = None) -> nn.Conv2d:
        """The deploy conv: this block's geometry, with a bias."""
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True, padding_mode=self.padding_mode, device=device)

    def conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``x`` through a conv of this block's geometry with the given weights (any padding mode)."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, [padding] * 4, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def forward_branches(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        """The train-time branches as one ``(kernel, bias)``."""
        raise NotImplementedError

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """``(O, C/g, k, k)`` kernel and ``(O,)`` bias of ``reparam_conv`` (differentiable)."""
        if self.deploy:
            return self.reparam_conv.weight, self.reparam_conv.bias
        return self.merge_branches()

    # children that follow the conv and stay at deploy; the CPU fusion pass fuses ``act`` into the conv
    # only when nothing else stands between them (``fusable_act``)
    kept_modules: tuple[str, ...] = ("act",)

    @property
    def fusable_act(self) -> bool:
        """Whether the forward is ``act(conv(x))`` once converted (the CPU fusion pass relies on it):
        every other kept child is an identity."""
        return all(isinstance(getattr(self, name), nn.Identity) for name in self.kept_modules if name != "act")

    def _build_deploy(self) -> None:
        kernel, bias = self.get_equivalent_kernel_bias()
        for name in [n for n in self._modules if n not in self.kept_modules] + list(self._parameters) + list(self._buffers):
            delattr(self, name)
        conv = self.new_conv(device="meta")  # no init work: both tensors are replaced
        assign_parameter(conv, "weight", kernel)
        assign_parameter(conv, "bias", bias)
        self.reparam_conv = conv

    def forward(self, x: Tensor) -> Tensor:
        """``act(branches(x))``; deploy ``act(reparam_conv(x))``."""
        if self.deploy:
            return self.act(self.reparam_conv(x))
        return self.act(self.forward_branches(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, groups={self.groups}, padding_mode={self.padding_mode}, "
                f"deploy={self.deploy}")
