"""Passes applied to a converted (deploy) model: the CPU fusion pass (:mod:`.cpu_fusion`) over
the fused oneDNN kernels (:mod:`.fused_conv`)."""
