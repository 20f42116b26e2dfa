"""A foreign layout that differs from this project's only in key names: :class:`RenamedLayout`.

Most published checkpoints of the family (official RepVGG and MobileOne, timm's ``byobnet``)
hold the same tensors as this project's models under other module names, so each converts by an
ordered list of key renames. A layout module declares its key pattern (every key a file of that
layout has, after DDP's ``module.``) and its rules, and gets detection, conversion and the
:class:`~.formats.WeightFormat` that :func:`backbones.weights.read_weights` tries.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from .formats import WeightFormat, Weights, inferred_deploy
from .io import strip_prefix

__all__ = ["RenamedLayout", "BN_KEYS"]

BN_KEYS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"  # a BatchNorm's entries, for key patterns

Rule = tuple[str, str | Callable[[re.Match[str]], str]]


@dataclass(frozen=True)
class RenamedLayout:
    """A layout converted by renaming keys.

    Attributes:
        name: what the layout is, as messages and :attr:`Weights.format` show it.
        key: regular expression every key of the layout matches (after ``module.``).
        rules: ordered ``(pattern, replacement)`` renames applied to every key (``re.sub``).
        signature: regular expression that at least one key matches (what tells the layout apart
            from others whose keys ``key`` also matches; empty: none needed).
        model_kwargs: constructor arguments every file of the layout needs (``conv_type="dbb"`` for
            a DBB ResNet): :attr:`Weights.kwargs`, the defaults of :func:`~.formats.create_loaded`.
    """

    name: str
    key: str
    rules: Sequence[Rule]
    signature: str = ""
    model_kwargs: Optional[Mapping[str, Any]] = None

    def matches(self, state_dict: Mapping[str, Tensor]) -> bool:
        """Whether the file is in this layout: most of its keys (after ``module.``) are, so that a
        file with a few foreign keys is still named by its layout and the strict load lists them."""
        keys = list(strip_prefix(state_dict, ("module.",)))
        pattern = re.compile(self.key)
        if not keys or sum(bool(pattern.fullmatch(k)) for k in keys) * 2 <= len(keys):
            return False
        return not self.signature or any(re.search(self.signature, k) for k in keys)

    def rename(self, key: str) -> str:
        for pattern, repl in self.rules:
            key = re.sub(pattern, repl, key)
        return key

    def convert(self, state_dict: Mapping[str, Tensor], source: str = "<state dict>") -> dict[str, Tensor]:
        """``state_dict`` (``module.`` removed) under this project's key names; a key outside the
        layout keeps its name, so that loading it names it as the file does."""
        state_dict = strip_prefix(state_dict, ("module.",))
        pattern = re.compile(self.key)
        converted: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            new = self.rename(key) if pattern.fullmatch(key) else key
            if new in converted:
                raise ValueError(f"{source}: two keys of the {self.name} map to {new!r}")
            converted[new] = value
        return converted

    def read(self, state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
        converted = self.convert(state_dict, path)
        return Weights(path=path, format=self.name, state_dict=converted, scope="backbone",
                       deploy=inferred_deploy(converted),
                       kwargs=dict(self.model_kwargs) if self.model_kwargs is not None else None)

    @property
    def format(self) -> WeightFormat:
        return WeightFormat(self.name, lambda state_dict, meta: self.matches(state_dict), self.read)
