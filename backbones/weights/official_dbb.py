"""Checkpoints of the official DBB code's ImageNet ResNets (DingXiaoH/DiverseBranchBlock @ 8d2b16b).

``switch_conv_bn_impl('DBB')`` + ``build_model('ResNet-18' | 'ResNet-50')`` (``convnet_utils.py``,
``resnet.py``) makes every conv with 1 < k < 7 a ``DiverseBranchBlock`` (``diversebranchblock.py``):
the 3x3 convs of the basic blocks and the bottleneck's 3x3; the 7x7 stem, the bottleneck's 1x1
convs and the shortcuts stay ``ConvBN``. Released files (``ResNet-18_DBB_7101.pth``, Google Drive /
Baidu) come in train and deploy form (``convert.py`` calls ``switch_to_deploy`` on every block, the
ConvBNs included); training runs save ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer',
'scheduler'}`` from DDP (``module.``), both unwrapped on reading. Same tensors as this project's
``resnet18`` / ``resnet50`` with ``conv_type="dbb"`` (which every file of the layout builds:
:attr:`~.renamed.RenamedLayout.model_kwargs`):

==============================================  ==============================================
official                                        this project
==============================================  ==============================================
``stage0.conv1.{conv,bn}.`` (7x7 stem)          ``stem.0.{conv,bn}.``
``stage{1..4}.{j}.``                            ``layer{1..4}.{j}.``
``conv{1,3}.``, ``shortcut.`` ``{conv,bn}.``    the same (ConvBN)
``dbb_origin.{conv,bn}.``                       ``origin.{conv,bn}.``
``dbb_1x1.{conv,bn}.``                          ``pointwise.{conv,bn}.``
``dbb_avg.conv.weight``                         ``avg_conv.weight``
``dbb_avg.bn.bn.`` (BNAndPadLayer)              ``avg_pad.bn.``
``dbb_avg.avgbn.``                              ``avg_bn.``
``dbb_1x1_kxk.idconv1.weight``                  ``kxk_idconv`` (both add the identity; the
                                                official ``id_tensor`` is not saved)
``dbb_1x1_kxk.conv1.weight`` (internal != in)   ``kxk_idconv``
``dbb_1x1_kxk.bn1.bn.`` (BNAndPadLayer)         ``kxk_pad.bn.``
``dbb_1x1_kxk.conv2.weight``                    ``kxk_conv.weight``
``dbb_1x1_kxk.bn2.``                            ``kxk_bn.``
``dbb_reparam.`` (deploy)                       ``reparam_conv.``
``linear.``                                     ``fc.``
==============================================  ==============================================

Same function: stem 7x7/2 conv-BN-ReLU, max-pool 3/2 (padding 1), the stride on each stage's first
block (the bottleneck's on its 3x3), a conv-BN shortcut where the shape changes, ReLU after the add,
global mean, ``linear``; each DBB sums its KxK conv-BN, 1x1 conv-BN (groups < out), 1x1 →
BN-and-pad (with the BN's shift) → KxK average pool → BN, and identity-based 1x1 → BN-and-pad →
KxK conv → BN (internal width = in). The official names ``ResNet-18`` / ``ResNet-50`` map to the
registered ``resnet18`` / ``resnet50`` (:data:`OFFICIAL_ARCHS`). The OREPA repository's ``-t DBB``
ResNets (JUGGHM/OREPA_CVPR2022 ``blocks.py:DBB``, the same modules and names) read the same way.
Files of the ``-t base`` and ``-t ACB`` runs and the DBB MobileNet are not read by this layout.
"""
from __future__ import annotations

from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS", "NAME"]

NAME = "official DBB ResNet checkpoint (DingXiaoH/DiverseBranchBlock)"
OFFICIAL_ARCHS = {"ResNet-18": "resnet18", "ResNet-50": "resnet50"}  # convnet_utils.py:build_model

_CONV_BN = rf"(conv\.(weight|bias)|bn\.{_BN})"  # a ConvBN, train (conv.weight, bn) or deploy (conv with bias)
_DBB = (rf"(dbb_(origin|1x1)\.(conv\.weight|bn\.{_BN})|dbb_avg\.(conv\.weight|bn\.bn\.{_BN}|avgbn\.{_BN})"
        rf"|dbb_1x1_kxk\.((idconv1|conv1|conv2)\.weight|bn1\.bn\.{_BN}|bn2\.{_BN})|dbb_reparam\.(weight|bias))")
LAYOUT = RenamedLayout(
    name=NAME,
    key=rf"stage0\.conv1\.{_CONV_BN}|stage[1-4]\.\d+\.(conv[1-3]|shortcut)\.({_CONV_BN}|{_DBB})|linear\.(weight|bias)",
    rules=(
        (r"^stage0\.conv1\.", "stem.0."),
        (r"^stage([1-4])\.", r"layer\1."),
        (r"\.dbb_origin\.", ".origin."),
        (r"\.dbb_1x1\.", ".pointwise."),
        (r"\.dbb_avg\.conv\.", ".avg_conv."),
        (r"\.dbb_avg\.bn\.bn\.", ".avg_pad.bn."),
        (r"\.dbb_avg\.avgbn\.", ".avg_bn."),
        (r"\.dbb_1x1_kxk\.(idconv1|conv1)\.weight$", ".kxk_idconv"),
        (r"\.dbb_1x1_kxk\.bn1\.bn\.", ".kxk_pad.bn."),
        (r"\.dbb_1x1_kxk\.conv2\.", ".kxk_conv."),
        (r"\.dbb_1x1_kxk\.bn2\.", ".kxk_bn."),
        (r"\.dbb_reparam\.", ".reparam_conv."),
        (r"^linear\.", "fc."),
    ),
    signature=r"\.dbb_(origin|reparam)\.",  # a DBB in either form (the other trees of the family have none)
    model_kwargs={"conv_type": "dbb"},
)
FORMAT = LAYOUT.format
