"""The RepMLPNet block (Ding et al., CVPR 2022, arXiv 2112.11081): shared partition FCs with
Locality Injection.

On an input ``(N, C, H, W)`` cut into ``h x w`` partitions, every channel of every partition is one
row of ``h*w`` values, and channel ``c`` goes through FC number ``c mod S`` of ``S`` "sharesets":

- Partition Perceptron: ``fc3``, ``S`` FCs from ``h*w`` to ``h*w`` (a 1x1 conv with ``groups=S``
  over ``(S*h*w)``-long rows), then a BN over the ``S`` sharesets;
- Local Perceptron (Locality Injection): for each k in ``kernels``, a k x k depthwise conv + BN
  over the ``S`` channels of each partition (zero padding inside the partition), summed into fc3's
  output;
- Global Perceptron: a squeeze-and-excitation gate of the whole input (mean → fc1 → ReLU → fc2 →
  sigmoid) that multiplies the block's output.

Deploy: the local convs and both BNs are merged into a biased fc3 (:func:`~..reparam.math.conv_to_fc`),
so the block is FCs only. Both forms compute the same function in eval mode.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import add_branches, conv_bias_to_fc, conv_to_fc, fuse_bn
from .convbn import ConvBN
from .helpers import to_pair
from .squeeze_excite import SqueezeExcite


class RepMLPNetBlock(ReparamBlock):
    """``(N, C, H, W)`` → ``(N, C, H, W)``: ``gate(x) * (fc3(x) + local(x))`` over partitions.

    Args:
        channels: C (a multiple of ``sharesets``).
        input_size: ``(H, W)`` the block is built for, a multiple of ``partition``.
        partition: ``(h, w)``; RepMLPNet uses the whole stage map at its pre-training size.
        sharesets: S, the number of distinct partition FCs.
        kernels: odd sizes of the Local Perceptron's depthwise convs.
        gp_reduction: the Global Perceptron's hidden width is ``C // gp_reduction``.
        deploy: build the converted structure.
    State dict: train ``gp.{reduce,expand}``, ``fc3.weight`` ``(S*h*w, h*w, 1, 1)``, ``fc3_bn``
    (S channels), ``local.{k}x{k}.{conv,bn}``; deploy ``gp.*``, ``fc3.weight, fc3.bias``.
    """

    def __init__(
        self,
        channels: int,
        input_size: int | tuple[int, int],
        partition: int | tuple[int, int],
        sharesets: int,
        kernels: tuple[int, ...] = (1, 3),
        gp_reduction: int = 4,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.channels, self.sharesets, self.deploy = channels, sharesets, deploy
        self.input_size, self.partition = to_pair(input_size), to_pair(partition)
        self.kernels = tuple(int(k) for k in kernels)
        self._validate()
        (H, W), (h, w) = self.input_size, self.partition
        self.num_partitions = (H // h, W // w)
        S = sharesets
        self.gp = SqueezeExcite(channels, channels // gp_reduction)
        self.fc3 = nn.Conv2d(S * h * w, S * h * w, 1, groups=S, bias=deploy)
        if not deploy:
            self.fc3_bn = nn.BatchNorm2d(S)
            self.local = nn.ModuleDict({f"{k}x{k}": ConvBN(S, S, k, groups=S) for k in self.kernels})

    def _validate(self) -> None:
        C, S = self.channels, self.sharesets
        (H, W), (h, w) = self.input_size, self.partition
        if S < 1 or C % S:
            raise ValueError(f"RepMLPNetBlock: sharesets={S} must divide channels={C}")
        if min(H, W, h, w) < 1 or H % h or W % w:
            raise ValueError(f"RepMLPNetBlock: input size {H}x{W} is not a multiple of the partition {h}x{w}; "
                             "build the model for an img_size whose stage maps the partitions divide")
        for k in self.kernels:
            if k < 1 or k % 2 == 0:  # a kernel larger than the partition is exact too (zero padding)
                raise ValueError(f"RepMLPNetBlock: kernel size {k} in kernels={self.kernels} must be a positive odd number")

    def get_equivalent_fc3(self) -> tuple[Tensor, Tensor]:
        """fc3 weight ``(S*h*w, h*w, 1, 1)`` and bias ``(S*h*w,)`` with its BN and the Local Perceptron merged."""
        if self.deploy:
            return self.fc3.weight, self.fc3.bias
        weight, bias = fuse_bn(self.fc3.weight, None, self.fc3_bn)  # each shareset's BN covers its h*w rows
        if self.kernels:
            kernel, conv_bias = add_branches(*(b.get_equivalent_kernel_bias() for b in self.local.values()))
            h, w = self.partition
            weight = weight + conv_to_fc(kernel, h, w, self.sharesets).reshape_as(weight)
            bias = bias + conv_bias_to_fc(conv_bias, h, w)
        return weight, bias

    def _build_deploy(self) -> None:
        weight, bias = self.get_equivalent_fc3()
        assign_parameter(self.fc3, "weight", weight)
        assign_parameter(self.fc3, "bias", bias)
        del self.fc3_bn, self.local

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or tuple(x.shape[-2:]) != self.input_size:
            H, W = self.input_size
            raise ValueError(f"RepMLPNetBlock was built for input (N, {self.channels}, {H}, {W}) but got "
                             f"{tuple(x.shape)}; a RepMLPNet is tied to one input size (build it for this one)")
        n, C = x.shape[:2]
        S, (h, w), (hp, wp) = self.sharesets, self.partition, self.num_partitions
        # (N, C, H, W) → (N*hp*wp*C/S, S, h, w): channel c = j*S + s of a partition is row j, shareset s
        parts = x.reshape(n, C, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, S, h, w)
        out = self.fc3(parts.reshape(-1, S * h * w, 1, 1))
        out = out.reshape(-1, S, h, w)
        if not self.deploy:
            out = self.fc3_bn(out) + sum(branch(parts) for branch in self.local.values())
        out = out.reshape(n, hp, wp, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape_as(x)
        return out * self.gp.gate(x)

    def extra_repr(self) -> str:
        (H, W), (h, w) = self.input_size, self.partition
        return (f"{self.channels}, input_size=({H}, {W}), partition=({h}, {w}), sharesets={self.sharesets}, "
                f"kernels={self.kernels}, deploy={self.deploy}")
