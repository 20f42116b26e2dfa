"""Passes applied to a converted (deploy) model: CPU kernel fusion (:mod:`.fused_conv`)."""
