"""Deploy-time conv + bias (+ residual) + ReLU as one oneDNN kernel on CPU, on a prepacked weight.

Once its BN is folded, a conv unit is a biased conv followed by ReLU, or, at the end of a
residual block, by the shortcut add and ReLU (the pass in :mod:`.cpu_fusion` routes both here). Nothing sits between them any more, so oneDNN can
apply the add and the ReLU as post-ops while the conv's output is still in cache, instead of two
more passes over the feature map. This is kernel fusion that only the BN-free deploy form allows
(the train-time form has its BN in between), and it gives the same tensor as the separate ops.

The deploy weights are frozen, so each is reordered once into oneDNN's blocked layout and kept
(``torch.nn.Conv2d`` reorders its plain weight on every call: ~25% of a ResNet-50 stage-4 conv).
The packed copy lives outside the module (no state-dict key, nothing for ``deepcopy`` or ``.to``)
and is rebuilt when the weight changes: another tensor, or an in-place write (its version).
With a blocked weight oneDNN returns a channels_last output whatever the input's layout, so the
layers after a fused conv run in that layout too (as after ``ReparamLargeKernelConv``).

:func:`conv_act` takes the fused kernel only where it applies and pays: CPU tensors all float32, or
all bfloat16 on a CPU that runs bf16 natively (:func:`backbones.deploy.precision.bf16_supported`;
the bias too: oneDNN's fused add takes no float32 bias under a bf16 input), zero padding, outputs of ``MIN_FUSED_OUTPUT`` elements or more, nothing that needs autograd, and no
tracing, compiling or dispatch mode (``torch.export`` and ``FlopCounterMode`` must see a plain
conv). Everything else, and everything inside ``with fusion(False):``, runs the plain ops.
"""
from __future__ import annotations

import contextlib
import platform
import weakref
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["conv_act", "fusion", "fusion_enabled", "clear_packed_weights", "packed_weight_count"]

try:  # oneDNN's fused conv and weight reorder (what Inductor's CPU freezing emits); absent in some builds
    _POINTWISE = torch.ops.mkldnn._convolution_pointwise
    _REORDER_WEIGHT = torch._C._nn.mkldnn_reorder_conv2d_weight
except (AttributeError, RuntimeError):
    _POINTWISE = _REORDER_WEIGHT = None

try:  # looked up once: the checks below run for every deploy conv of every forward
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - a torch without it: treat a mode as active, stay on plain ops
    _get_current_dispatch_mode = None

_AVAILABLE = _POINTWISE is not None and torch.backends.mkldnn.is_available()


def _native_bf16() -> bool:
    # oneDNN's own check accepts any AVX-512 core, where it emulates bf16 slower than float32; a
    # native bf16 dot product (AVX512_BF16, and AMX with it) is what makes bf16 pay on x86
    if not (_AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return True  # on Arm oneDNN's check is the BF16 extension itself


# the dtypes the fused kernel takes: all of a conv's tensors in one of them
_DTYPES = (torch.float32, torch.bfloat16) if _native_bf16() else (torch.float32,)
_enabled = True
# The fused kernel has a larger fixed cost per call than the plain conv; from outputs of about this
# many elements on, the reorder and the passes it saves repay it (figures: README, Performance).
MIN_FUSED_OUTPUT = 1 << 12
# conv -> ((weight storage, version), the weight it was packed from, its weight in oneDNN's
# blocked layout). Holding that weight keeps its storage alive, so a new weight (a cast, a .data
# assignment, which keeps the version) can never reuse its address and pass for it.
_PACKED: "weakref.WeakKeyDictionary[nn.Conv2d, tuple[tuple[int, int], Tensor, Tensor]]" = (
    weakref.WeakKeyDictionary())


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Turn the fused kernels on or off inside the block (to time or test the plain ops)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def fusion_enabled() -> bool:
    """Whether :func:`conv_act` may use fused kernels at all (this switch and the torch build)."""
    return _enabled and _AVAILABLE and torch.backends.mkldnn.enabled


def packed_weight_count() -> int:
    """How many convs currently hold a packed weight (each one copy of the conv's weight)."""
    return len(_PACKED)


def clear_packed_weights(model: Optional[nn.Module] = None) -> None:
    """Drop the packed weights of ``model``'s convs, or every one (they are rebuilt on next use).
    Needed only after writing a weight through ``.data``, which bypasses the version counter that
    invalidates them; a cast frees the old ones sooner."""
    if model is None:
        _PACKED.clear()
    for module in model.modules() if model is not None else ():
        _PACKED.pop(module, None)


def _dispatch_mode_active() -> bool:
    return _get_current_dispatch_mode is None or _get_current_dispatch_mode() is not None


def _output_shape(conv: nn.Conv2d, x: Tensor) -> tuple[int, ...]:
    size = [
        (x.shape[i + 2] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
        for i in range(2)
    ]
    return (x.shape[0], conv.out_channels, *size)


def _fusable(conv: nn.Conv2d, x: Tensor, residual: Optional[Tensor]) -> bool:
    # cheapest checks first: this runs for every deploy conv of every forward (the size test
    # estimates the output from the input, so that small convs pay a few attribute reads only)
    stride, numel = conv.stride, x.numel()
    # a symbolic size (export or compile with a dynamic dim) must not reach the comparison: it would
    # become a guard on that dim (``batch < 8/3``), which torch.export rejects
    if type(numel) is not int or numel * conv.out_channels < MIN_FUSED_OUTPUT * conv.in_channels * stride[0] * stride[1]:
        return False
    dtype = x.dtype
    if not fusion_enabled() or x.device.type != "cpu" or dtype not in _DTYPES or x.dim() != 4:
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    tensors = [conv.weight] + [t for t in (conv.bias, residual) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        return False
    if conv.weight.is_inference():  # keeps no version counter: an in-place write could not be seen
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _dispatch_mode_active():
        return False
    # the fused add does not broadcast: a residual of another shape takes the plain path
    return residual is None or tuple(residual.shape) == _output_shape(conv, x)


def _packed_weight(conv: nn.Conv2d, geometry: tuple, x: Tensor) -> Tensor:
    """``conv.weight`` in oneDNN's blocked layout, reordered on first use and whenever it changed.

    The layout depends on the weight's shape and the conv's geometry, not on the input's size
    (tested): the first input only serves as the example oneDNN asks for."""
    weight = conv.weight
    key = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(conv)
    if entry is None or entry[0] != key:
        entry = key, weight.detach(), _REORDER_WEIGHT(weight.detach().to_mkldnn(), *geometry, list(x.shape))
        _PACKED[conv] = entry
    return entry[2]


def conv_act(conv: nn.Conv2d, x: Tensor, act: nn.Module, residual: Optional[Tensor] = None) -> Tensor:
    """``act(conv(x) + residual)`` (``residual`` optional, of the conv's output shape).

    ``x``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``. One fused kernel on the packed weight when
    ``act`` is ReLU or identity (its output is then channels_last); otherwise the plain ops.
    """
    relu = isinstance(act, nn.ReLU)
    if (relu or isinstance(act, nn.Identity)) and _fusable(conv, x, residual):
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = _packed_weight(conv, geometry, x)
        if residual is None:
            return _POINTWISE(x, weight, conv.bias, *geometry, "relu" if relu else "none", [], "")
        return _POINTWISE.binary(x, residual, weight, conv.bias, *geometry, "add", 1.0,
                                 "relu" if relu else None, [], "" if relu else None)
    y = nn.Conv2d.forward(conv, x)  # not conv(x): a FusedConvAct's own forward comes back here
    return act(y if residual is None else y + residual)
