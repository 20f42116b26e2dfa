"""Passes applied to a converted (deploy) model: the CPU fusion pass (:mod:`.cpu_fusion`) over
the fused oneDNN kernels (:mod:`.fused_conv`)."""
from .cpu_fusion import FusedConvAct, fuse_for_cpu
from .fused_conv import fusion, fusion_enabled

__all__ = ["FusedConvAct", "fuse_for_cpu", "fusion", "fusion_enabled"]
