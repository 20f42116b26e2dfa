"""Passes applied to a converted (deploy) model: the CPU fusion pass (:mod:`.cpu_fusion`) over
the fused oneDNN kernels (:mod:`.fused_conv`), and bf16 inference on CPU (:mod:`.precision`)."""
from .cpu_fusion import FusedConvAct, fuse_for_cpu
from .fused_conv import fusion, fusion_enabled
from .precision import Bf16Inference, bf16_supported, to_bf16

__all__ = ["Bf16Inference", "FusedConvAct", "bf16_supported", "fuse_for_cpu", "fusion", "fusion_enabled", "to_bf16"]
