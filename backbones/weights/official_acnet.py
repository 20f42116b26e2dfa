"""Checkpoints of the official ACNet code's ImageNet ResNets (DingXiaoH/ACNet @ 748fb0c).

``acnet/do_acnet.py -a sres18|sres50 -b acb`` trains ``base_model/resnet.py:ResNet`` (``sres18``,
BasicBlock) or ``base_model/stagewise_resnet.py:SBottleneckResNet`` (``sres50``) built by
``acnet/acnet_builder.py:ACNetBuilder``: every conv with 1 < k < 7 (all 3x3 convs) is an ACBlock
(``acnet/acb.py``), the 7x7 stem and the 1x1 convs stay conv-BN. ``utils/engine.py:save_hdf5``
writes ``finish.hdf5``: one numpy array per state-dict key (``module.`` removed; ``deps``, the
config's layer widths, when set); ``save_checkpoint`` writes ``.pth`` files ``{"model": state
dict, "optimizer", "scheduler", "iteration"}``. ``acnet/acnet_fusion.py:convert_acnet_weights``
writes ``finish_deploy.hdf5``: each ACBlock fused into ``fused_conv``, every other conv-BN kept,
which this project's deploy form does not have, so reading a deploy file folds those BNs into
their convs (:func:`backbones.reparam.math.fuse_bn`, eps 1e-5 as ``builder.py:ConvBuilder``).
Files of the ``-b base`` baselines (no ACBlock) read as the plain ResNets (``conv_type="conv"``).

================================================  ==========================================
official                                          this project (``conv_type="acb"``)
================================================  ==========================================
``conv1.{conv,bn}.`` (7x7 stem)                   ``stem.0.{conv,bn}.``
``stage{s}.{j}.`` (sres18)                        ``layer{s}.{j}.``
``stage{s}.block{j}.`` (sres50)                   ``layer{s}.{j}.``
``stage{s}.projection.{conv,bn}.`` (sres50)       ``layer{s}.0.shortcut.{conv,bn}.``
``shortcut.{conv,bn}.`` (sres18)                  ``shortcut.{conv,bn}.``
``conv{1,3}.{conv,bn}.`` (sres50 1x1 convs)       ``conv{1,3}.{conv,bn}.``
``conv1.acb.`` (sres18), ``conv2.acb.`` (sres50)  ``conv1.``, ``conv2.`` (ACBlock with ReLU)
``conv2.`` (sres18: the ACBlock, no ReLU)         ``conv2.``
``square_conv.``, ``square_bn.``                  ``square.conv.``, ``square.bn.``
``ver_conv.``, ``ver_bn.`` (3x1)                  ``ver.conv.``, ``ver.bn.``
``hor_conv.``, ``hor_bn.`` (1x3)                  ``hor.conv.``, ``hor.bn.``
``fused_conv.`` (deploy)                          ``reparam_conv.``
``linear.`` (sres18), ``fc.`` (sres50)            ``fc.``
================================================  ==========================================

Same function: stem 7x7/2 conv-BN-ReLU, max-pool 3/2 (padding 1), the stride on the first 3x3 of
each stage (sres50: on the bottleneck's 3x3), a conv-BN shortcut where shape changes (sres50: on
every stage's first block), ReLU after the add; ACBlock 3x3 padding 1, its 3x1 and 1x3 branches
padded (1, 0) and (0, 1) (``padding - k // 2 = 0``: no cropping); ``use_last_bn`` is never set
(``ACNetBuilder`` fixes it False), ``gamma_init`` only initializes. One difference: the official
``GAP`` is ``AvgPool2d(7, stride=7)``, the global mean only when the c5 map is 7x7 (inputs of
193..224 pixels, the ImageNet 224 crop included); the official network fails on a smaller map and
on one of 14 or more (its ``linear`` gets several pooled cells) and averages only the top-left 7x7
of an 8x8..13x13 map, while this project's models take the global mean at any size.

Official names ``sres18``, ``sres50`` (``model_map.py``) map to the registered ``resnet18``,
``resnet50`` (:data:`OFFICIAL_ARCHS`); ``sres34`` is ``resnet18`` with ``layers=(3, 4, 6, 3)``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .folding import fold_conv_bns
from .formats import WeightFormat, Weights
from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS", "NAME"]

NAME = "official ACNet ResNet checkpoint (DingXiaoH/ACNet)"
OFFICIAL_ARCHS = {"sres18": "resnet18", "sres50": "resnet50"}

_CONV_BN = rf"(conv\.weight|bn\.{_BN})"
_ACB = rf"((square|ver|hor)_conv\.weight|(square|ver|hor)_bn\.{_BN}|fused_conv\.(weight|bias))"
LAYOUT = RenamedLayout(
    name=NAME,
    key=(rf"conv1\.{_CONV_BN}|linear\.(weight|bias)|fc\.(weight|bias)"
         # sres18: conv1 is Conv2dBNReLU (ACB inside Sequential(acb, relu)), conv2 Conv2dBN (the ACB itself)
         rf"|stage[1-4]\.\d+\.(conv1\.(acb\.{_ACB}|{_CONV_BN})|conv2\.({_ACB}|{_CONV_BN})|shortcut\.{_CONV_BN})"
         # sres50: a projection per stage, blocks named block{j}; only the 3x3 conv2 is an ACB
         rf"|stage[1-4]\.(projection\.{_CONV_BN}|block\d+\.(conv[13]\.{_CONV_BN}|conv2\.(acb\.{_ACB}|{_CONV_BN})))"),
    rules=(
        (r"^conv1\.", "stem.0."),
        (r"^stage(\d)\.projection\.", r"layer\1.0.shortcut."),
        (r"^stage(\d)\.(block)?(\d+)\.", r"layer\1.\3."),
        (r"\.acb\.", "."),
        (r"\.(square|ver|hor)_conv\.", r".\1.conv."),
        (r"\.(square|ver|hor)_bn\.", r".\1.bn."),
        (r"\.fused_conv\.", ".reparam_conv."),
        (r"^linear\.", "fc."),
    ),
    signature=r"^conv1\.conv\.weight$",  # the stem's name in ACNet's trees (DBB's and OREPA's say stage0.conv1)
)
_ACB_KEY = re.compile(r"\.(square_conv|fused_conv)\.weight$")


def _is_acnet(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> bool:
    return LAYOUT.matches(state_dict)


def _read_acnet(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    has_acb = any(_ACB_KEY.search(k) for k in state_dict)
    deploy = any(k.endswith(".fused_conv.weight") for k in state_dict)
    converted = LAYOUT.convert(state_dict, path)
    if deploy:
        converted = fold_conv_bns(converted)  # the conv-BNs it keeps: stem, shortcuts, 1x1 convs
    extra = {"deps": meta["deps"]} if "deps" in meta else {}
    return Weights(path=path, format=NAME, state_dict=converted, scope="backbone", deploy=deploy,
                   kwargs={"conv_type": "acb" if has_acb else "conv"}, extra=extra)


FORMAT = WeightFormat(NAME, _is_acnet, _read_acnet)
