"""The base of the classification backbones: features → global average pool → ``fc``.

Subclasses build ``stem``, ``stage1..stage4`` (or override :meth:`forward_features`), then call
:meth:`add_classifier`. ``num_classes=0`` builds a headless backbone whose ``forward`` returns the
pooled features.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..reparam.block import ReparamBlock
from .helpers import to_pair


class PooledClassifier(ReparamBlock):
    """``(N, C, H, W)`` → logits ``(N, num_classes)``, or pooled ``(N, num_features)`` when headless.

    ``img_size`` records the training input size (``(H, W)``); tasks and tools read it.
    """

    def __init__(self, num_features: int, num_classes: int, img_size: int | tuple[int, int], deploy: bool) -> None:
        super().__init__()
        self.deploy = deploy
        self.img_size = to_pair(img_size)
        self.num_classes = num_classes
        self.num_features = num_features

    def add_classifier(self) -> None:
        self.fc = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self, f"stage{i}") for i in range(1, 5)]

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map ``(N, num_features, H/32, W/32)``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
