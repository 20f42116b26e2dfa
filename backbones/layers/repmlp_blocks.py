"""Residual blocks built around a RepMLP block: the Bottleneck and the Light block (paper §4, App. A).

Module names follow the official v1 code without its prefixes (``btnk_conv1`` → ``conv1``),
so official checkpoints map by renaming alone. Both blocks keep their input size:
``(N, in_channels, H, W)`` → ``(N, out_channels, H, W)``. Both take their RepMLP block's
settings as one :class:`RepMLPCfg`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..reparam.block import ReparamBlock
from .convbn import ConvBN, conv_shortcut
from .repmlp import Kernels, RepMLP


@dataclass(frozen=True)
class RepMLPCfg:
    """The settings of the RepMLP block inside a residual block (see :class:`RepMLP` for each).

    Written in a YAML config as a mapping (``{partition: 7, groups: 8}``).
    """

    partition: int | tuple[int, int]
    kernels: Kernels = (1, 3, 5)
    groups: int = 1
    fc1_reduction: int = 1
    pad_input: bool = False

    def build(self, channels: int, input_size: int | tuple[int, int], deploy: bool) -> RepMLP:
        """A ``channels`` → ``channels`` RepMLP block for ``(N, channels, *input_size)`` maps."""
        return RepMLP(channels, channels, input_size, self.partition, kernels=self.kernels, groups=self.groups,
                      fc1_reduction=self.fc1_reduction, pad_input=self.pad_input, deploy=deploy)


def _check_cfg(block: str, mlp: object) -> None:
    if not isinstance(mlp, RepMLPCfg):
        raise TypeError(f"{block}: mlp must be a RepMLPCfg, e.g. RepMLPCfg(partition=7, groups=8), got {mlp!r}")


class RepMLPBottleneck(ReparamBlock):
    """1x1 → 3x3 (reduce by r) → RepMLP → ReLU → 3x3 (expand) → 1x1, plus shortcut, then ReLU.

    The RepMLP block (``mlp``, for ``input_size`` maps) works on ``mid_channels // r`` channels,
    which keeps its FC small; ``dilation`` is that of the two 3x3 convs.
    """

    last_unit = "conv5"  # the conv unit before the shortcut add (zero-initialized; fused with the add at deploy)

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, input_size: int | tuple[int, int],
        mlp: RepMLPCfg, r: int = 2, dilation: int = 1, deploy: bool = False,
    ) -> None:
        super().__init__()
        _check_cfg("RepMLPBottleneck", mlp)
        if mid_channels % r:
            raise ValueError(f"RepMLPBottleneck: r={r} must divide mid_channels={mid_channels}")
        inner = mid_channels // r
        self.deploy = deploy
        self.conv1 = ConvBN(in_channels, mid_channels, 1, act=True, deploy=deploy)
        self.conv2 = ConvBN(mid_channels, inner, 3, dilation=dilation, act=True, deploy=deploy)
        self.repmlp = mlp.build(inner, input_size, deploy)
        self.conv4 = ConvBN(inner, mid_channels, 3, dilation=dilation, act=True, deploy=deploy)
        self.conv5 = ConvBN(mid_channels, out_channels, 1, deploy=deploy)
        self.shortcut = conv_shortcut(in_channels, out_channels, deploy=deploy)
        # one module per call: a quantizer (PT2E) annotates an activation module's calls as one pattern
        self.repmlp_act = nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        out = self.repmlp_act(self.repmlp(out))
        return self.relu(self.conv5(self.conv4(out)) + self.shortcut(x))


class RepMLPLight(ReparamBlock):
    """1x1 (to ``mid_channels``, the paper uses channels // 8) → RepMLP (``mlp``, for ``input_size``
    maps) → ReLU → 1x1, plus shortcut, then ReLU."""

    last_unit = "conv3"  # the conv unit before the shortcut add (zero-initialized; fused with the add at deploy)

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, input_size: int | tuple[int, int],
        mlp: RepMLPCfg, deploy: bool = False,
    ) -> None:
        super().__init__()
        _check_cfg("RepMLPLight", mlp)
        self.deploy = deploy
        self.conv1 = ConvBN(in_channels, mid_channels, 1, act=True, deploy=deploy)
        self.repmlp = mlp.build(mid_channels, input_size, deploy)
        self.conv3 = ConvBN(mid_channels, out_channels, 1, deploy=deploy)
        self.shortcut = conv_shortcut(in_channels, out_channels, deploy=deploy)
        # one module per call: a quantizer (PT2E) annotates an activation module's calls as one pattern
        self.repmlp_act = nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.repmlp_act(self.repmlp(self.conv1(x)))
        return self.relu(self.conv3(out) + self.shortcut(x))
