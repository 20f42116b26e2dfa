"""Checkpoints of the official MobileOne code (apple/ml-mobileone @ b7f4e6d, ``mobileone.py``).

Released files are bare state dicts: ``mobileone_sN_unfused.pth.tar`` (train form) and
``mobileone_sN.pth.tar`` (re-parameterized); DDP's ``module.`` is removed. Same tensors as
:class:`backbones.models.mobileone.MobileOne` (a stage holds its depthwise blocks at even and its
pointwise blocks at odd indices in both):

=====================================  =====================================
official                               this project
=====================================  =====================================
``stage0.``                            ``stem.``
``stage{1..4}.{j}.``                   ``stage{1..4}.{j}.``
``rbr_conv.{i}.{conv,bn}.``            ``convs.{i}.{conv,bn}.``
``rbr_scale.{conv,bn}.``               ``scale.{conv,bn}.``
``rbr_skip.`` (a BatchNorm)            ``skip_bn.``
``reparam_conv.`` (deploy)             ``reparam_conv.``
``se.reduce.``, ``se.expand.`` (S4)    ``se.reduce.``, ``se.expand.``
``linear.``                            ``fc.``
=====================================  =====================================

The official variants ``s0`` ... ``s4`` are the registered ``mobileone_s0`` ... ``mobileone_s4``.
"""
from __future__ import annotations

from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS"]

OFFICIAL_ARCHS = {f"mobileone-{v}": f"mobileone_{v}" for v in ("s0", "s1", "s2", "s3", "s4")}

LAYOUT = RenamedLayout(
    name="official MobileOne checkpoint (apple/ml-mobileone)",
    key=(rf"(stage0|stage[1-4]\.\d+)\.(rbr_conv\.\d+\.(conv\.weight|bn\.{_BN})|rbr_scale\.(conv\.weight|bn\.{_BN})"
         rf"|rbr_skip\.{_BN}|reparam_conv\.(weight|bias)|se\.(reduce|expand)\.(weight|bias))|linear\.(weight|bias)"),
    rules=(
        (r"^stage0\.", "stem."),
        (r"\.rbr_conv\.", ".convs."),
        (r"\.rbr_scale\.", ".scale."),
        (r"\.rbr_skip\.", ".skip_bn."),
        (r"^linear\.", "fc."),
    ),
)
FORMAT = LAYOUT.format
