"""The RepMLP block (Ding et al., arXiv 2105.01883), exact for any C, O, groups and partition.

Train time, on an input ``(N, C, H, W)`` cut into ``hp x wp`` partitions of ``h x w``:

- Global Perceptron (only when there is more than one partition): average-pool each
  partition → BN → fc1 → ReLU → fc2, and add the resulting ``(C, hp, wp)`` vector to every
  pixel of the matching partition;
- Partition Perceptron: a grouped FC (``fc3``) from each flattened ``(C, h, w)`` partition to
  ``(O, h, w)``, then BN;
- Local Perceptron: for each k in ``kernels``, a k x k grouped conv + BN applied to each
  partition separately (zero padding inside the partition), summed into the FC output; a
  ``(kh, kw)`` pair gives a non-square kernel (e.g. to fit a partition with h != w).

Deploy time: the GP's BN is folded into fc1 and every local conv and BN into a biased fc3,
so the block is pure FC layers. Both forms compute the same function in eval mode.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import add_branches, conv_bias_to_fc, conv_to_fc, fuse_bn, fuse_bn_before_linear
from .convbn import ConvBN
from .helpers import to_pair

# Local Perceptron kernels: k (k x k) or (kh, kw)
Kernels = tuple[int | tuple[int, int], ...]


def _kernel_entry(k: object, kernels: object) -> int | tuple[int, int]:
    """One ``kernels`` entry as given (``k`` or ``(kh, kw)``), with ints checked."""
    try:
        if isinstance(k, (tuple, list)):
            if len(k) != 2:
                raise ValueError
            return int(k[0]), int(k[1])
        return int(k)
    except (TypeError, ValueError):
        raise ValueError(f"RepMLP: kernel size {k!r} in kernels={kernels!r} must be an int k or a pair (kh, kw)") from None


class RepMLP(ReparamBlock):
    """RepMLP block mapping ``(N, C, H, W)`` → ``(N, O, H, W)``.

    Args:
        in_channels: C.
        out_channels: O (may differ from C).
        input_size: ``(H, W)`` the block is built for; other sizes raise an error.
        partition: ``(h, w)`` partition size.
        kernels: odd kernel sizes of the Local Perceptron, ``k`` or ``(kh, kw)``, with
            ``kh <= h`` and ``kw <= w``; ``()`` for none.
        groups: groups of fc3 and of the local convs; must divide C and O.
        fc1_reduction: the GP's hidden width is ``C * hp * wp // fc1_reduction``.
        pad_input: accept ``H, W`` that are not multiples of ``(h, w)`` by zero-padding the
            input to the next multiple and cropping the output (exact through conversion).
        deploy: build the deploy structure directly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_size: int | tuple[int, int],
        partition: int | tuple[int, int],
        kernels: Kernels = (1, 3, 5),
        groups: int = 1,
        fc1_reduction: int = 1,
        pad_input: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size = to_pair(input_size)
        self.partition = to_pair(partition)
        self.kernels = tuple(_kernel_entry(k, kernels) for k in kernels)
        self.groups = groups
        self.pad_input = pad_input
        self.deploy = deploy
        H, W = self.input_size
        h, w = self.partition
        self._validate()
        self.num_partitions = (math.ceil(H / h), math.ceil(W / w))
        hp, wp = self.num_partitions
        self.padded_size = (hp * h, wp * w)

        self.has_global_perceptron = hp * wp > 1
        if self.has_global_perceptron:
            gp_dim = in_channels * hp * wp
            hidden = gp_dim // fc1_reduction
            if hidden < 1:
                raise ValueError(f"RepMLP: fc1_reduction={fc1_reduction} leaves no hidden unit for {gp_dim} inputs")
            if not deploy:
                self.gp_bn = nn.BatchNorm2d(in_channels)
            self.fc1 = nn.Linear(gp_dim, hidden)
            self.fc2 = nn.Linear(hidden, gp_dim)

        self.fc3 = nn.Conv2d(in_channels * h * w, out_channels * h * w, 1, groups=groups, bias=deploy)
        if not deploy:
            self.fc3_bn = nn.BatchNorm1d(out_channels * h * w)
            self.local = nn.ModuleDict(
                {
                    f"{kh}x{kw}": ConvBN(in_channels, out_channels, (kh, kw), groups=groups)
                    for kh, kw in map(to_pair, self.kernels)
                }
            )

    def _validate(self) -> None:
        C, O, g = self.in_channels, self.out_channels, self.groups
        (H, W), (h, w) = self.input_size, self.partition
        if g < 1 or C % g or O % g:
            raise ValueError(f"RepMLP: groups={g} must divide in_channels={C} and out_channels={O}")
        if min(H, W, h, w) < 1:
            raise ValueError(f"RepMLP: input_size {H}x{W} and partition {h}x{w} must be positive")
        for k in self.kernels:
            kh, kw = to_pair(k)
            if min(kh, kw) < 1 or kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"RepMLP: kernel size {k} in kernels={self.kernels} must be a positive odd number")
            if kh > h or kw > w:
                raise ValueError(
                    f"RepMLP: kernel size {k} is larger than the {h}x{w} partition; "
                    "the Local Perceptron needs kh <= h and kw <= w"
                )
        if (H % h or W % w) and not self.pad_input:
            raise ValueError(
                f"RepMLP: input size {H}x{W} is not a multiple of the partition {h}x{w}; "
                "choose a partition that divides it or pass pad_input=True"
            )

    # ------------------------------------------------------------------ equivalent weights
    def get_equivalent_fc1(self) -> Optional[tuple[Tensor, Tensor]]:
        """fc1 ``(hidden, C*hp*wp)`` weight and bias with the GP's BN folded in; None without GP."""
        if not self.has_global_perceptron:
            return None
        if self.deploy:
            return self.fc1.weight, self.fc1.bias
        return fuse_bn_before_linear(self.fc1.weight, self.fc1.bias, self.gp_bn)

    def get_equivalent_fc3(self) -> tuple[Tensor, Tensor]:
        """fc3 weight ``(O*h*w, C*h*w/g, 1, 1)`` and bias ``(O*h*w,)`` with BN and Local Perceptron merged."""
        if self.deploy:
            return self.fc3.weight, self.fc3.bias
        weight, bias = fuse_bn(self.fc3.weight, None, self.fc3_bn)
        if self.kernels:
            kernel, conv_bias = add_branches(*(b.get_equivalent_kernel_bias() for b in self.local.values()))
            h, w = self.partition
            weight = weight + conv_to_fc(kernel, h, w, self.groups).reshape_as(weight)
            bias = bias + conv_bias_to_fc(conv_bias, h, w)
        return weight, bias

    def _build_deploy(self) -> None:
        fc1 = self.get_equivalent_fc1()
        fc3_weight, fc3_bias = self.get_equivalent_fc3()
        if fc1 is not None:
            assign_parameter(self.fc1, "weight", fc1[0])
            assign_parameter(self.fc1, "bias", fc1[1])
            del self.gp_bn
        assign_parameter(self.fc3, "weight", fc3_weight)
        assign_parameter(self.fc3, "bias", fc3_bias)
        del self.fc3_bn, self.local

    # ------------------------------------------------------------------ forward
    def _partition_fc(self, parts: Tensor) -> Tensor:
        """The train-time fc3 (no bias: its BN follows) on ``(M, C*h*w)`` flattened partitions → ``(M, O*h*w)``."""
        weight, g = self.fc3.weight, self.groups
        if g == 1:
            return F.linear(parts, weight.flatten(1))
        m = parts.shape[0]
        out_per_group = weight.shape[0] // g
        # (g, M, Chw/g) @ (g, Chw/g, Ohw/g) → (g, M, Ohw/g)
        out = torch.bmm(parts.reshape(m, g, -1).transpose(0, 1), weight.reshape(g, out_per_group, -1).transpose(1, 2))
        return out.transpose(0, 1).reshape(m, -1)

    def _padded_input(self, x: Tensor) -> Tensor:
        """``x`` checked against the built size and zero-padded to whole partitions."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.input_size:
            H, W = self.input_size
            raise ValueError(
                f"RepMLP block was built for input (N, {self.in_channels}, {H}, {W}) but got {tuple(x.shape)}; "
                "a RepMLP block is tied to one feature-map size (build the model for this input size)"
            )
        (H, W), (Hp, Wp) = self.input_size, self.padded_size
        return F.pad(x, [0, Wp - W, 0, Hp - H]) if (Hp, Wp) != (H, W) else x

    def _global_vector(self, x: Tensor) -> Tensor:
        """The Global Perceptron's ``(N, C*hp*wp)`` output for a padded input."""
        v = F.avg_pool2d(x, self.partition)  # (N, C, hp, wp)
        if not self.deploy:
            v = self.gp_bn(v)
        return self.fc2(F.relu(self.fc1(v.flatten(1))))

    def split_partitions(self, x: Tensor) -> Tensor:
        """Everything before fc3: check the size, pad, add the Global Perceptron and flatten the
        partitions, ``(N, C, H, W)`` → ``(N*hp*wp, C*h*w)``."""
        x = self._padded_input(x)
        n, C = x.shape[0], self.in_channels
        (h, w), (hp, wp) = self.partition, self.num_partitions
        x6 = x.reshape(n, C, hp, h, wp, w)
        if self.has_global_perceptron:
            x6 = x6 + self._global_vector(x).reshape(n, C, hp, 1, wp, 1)
        return x6.permute(0, 2, 4, 1, 3, 5).reshape(n * hp * wp, C * h * w)

    def _deploy_forward(self, x: Tensor) -> Tensor:
        """The deploy block in two passes over the data (bench/reparam.py measured it 7-17% faster
        than split → bmm → merge, which makes five): the GP add and the partition gather are one
        write into the group-major ``(g, M, Chw/g)`` layout, fc3 is one ``baddbmm`` (bias fused),
        and its ``(g, M, Ohw/g)`` result is permuted straight back to ``(N, O, H, W)``."""
        x = self._padded_input(x)
        g, n = self.groups, x.shape[0]
        cg, og = self.in_channels // g, self.out_channels // g
        (H, W), (h, w), (hp, wp) = self.input_size, self.partition, self.num_partitions
        Hp, Wp = self.padded_size
        src = x.reshape(n, g, cg, hp, h, wp, w).permute(1, 0, 3, 5, 2, 4, 6)  # (g, n, hp, wp, cg, h, w)
        parts = x.new_empty(g, n, hp, wp, cg, h, w)
        if self.has_global_perceptron:
            v = self._global_vector(x).reshape(n, g, cg, hp, 1, wp, 1).permute(1, 0, 3, 5, 2, 4, 6)
            # autograd takes no out= argument; export and compile functionalize out= into an add that
            # keeps src's permuted strides, which the view below cannot take (the ONNX export failed)
            if (torch.is_grad_enabled() and (src.requires_grad or v.requires_grad)) or torch.compiler.is_compiling():
                parts.copy_(src).add_(v)
            else:
                torch.add(src, v, out=parts)
        else:
            parts.copy_(src)
        out = torch.baddbmm(self.fc3.bias.reshape(g, 1, og * h * w), parts.view(g, n * hp * wp, cg * h * w),
                            self.fc3.weight.reshape(g, og * h * w, cg * h * w).transpose(1, 2))
        out = out.view(g, n, hp, wp, og, h, w).permute(1, 0, 4, 2, 5, 3, 6).reshape(n, self.out_channels, Hp, Wp)
        return out[:, :, :H, :W] if (Hp, Wp) != (H, W) else out

    def merge_partitions(self, out: Tensor) -> Tensor:
        """Everything after fc3: ``(N*hp*wp, O*h*w)`` → ``(N, O, H, W)``, cropping any padding."""
        (H, W), (h, w), (hp, wp) = self.input_size, self.partition, self.num_partitions
        Hp, Wp = self.padded_size
        O = self.out_channels
        out = out.reshape(-1, hp, wp, O, h, w).permute(0, 3, 1, 4, 2, 5).reshape(-1, O, Hp, Wp)
        if (Hp, Wp) != (H, W):
            out = out[:, :, :H, :W]
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` → ``(N, O, H, W)``: GP, then fc3 + BN plus the Local Perceptron (train), or
        the merged fc3 alone (deploy)."""
        if self.deploy:
            return self._deploy_forward(x)
        parts = self.split_partitions(x)
        out = self.fc3_bn(self._partition_fc(parts))
        if self.kernels:
            h, w = self.partition
            local_in = parts.reshape(-1, self.in_channels, h, w)
            out = out + sum(branch(local_in) for branch in self.local.values()).flatten(1)
        return self.merge_partitions(out)

    def extra_repr(self) -> str:
        (H, W), (h, w) = self.input_size, self.partition
        return (
            f"{self.in_channels}, {self.out_channels}, input_size=({H}, {W}), partition=({h}, {w}), "
            f"kernels={self.kernels}, groups={self.groups}, pad_input={self.pad_input}, deploy={self.deploy}"
        )
