"""The block protocol that every re-parameterizable module of this project follows.

- ``deploy: bool`` constructor flag; a block built with ``deploy=True`` has exactly the
  state-dict keys and shapes of a converted block, so deploy checkpoints load strictly.
- ``switch_to_deploy()`` converts in place, the block and everything it contains, and is
  idempotent (MMPretrain's name); ``reparameterize()`` is an alias only because timm's walker
  (``timm.utils.model.reparameterize_model``) calls that name.
- Pure, differentiable getters of the equivalent weights (``get_equivalent_*``) that the
  conversion itself uses, so QAT and regularizers see exactly the deployed weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .walker import convert_children


class ReparamBlock(nn.Module):
    """Base class: subclasses set ``self.deploy`` and override :meth:`_build_deploy`.

    The default conversion is that of a composite block (a bottleneck, a whole backbone):
    convert every re-parameterizable module it contains.
    """

    deploy: bool

    def _build_deploy(self) -> None:
        """Replace the train-time branches by the deploy modules (called once, under no_grad)."""
        convert_children(self)

    def switch_to_deploy(self) -> None:
        """Convert this block and every block inside it in place; a second call does nothing."""
        if self.deploy:
            return
        with torch.no_grad():
            self._build_deploy()
        self.deploy = True

    def reparameterize(self) -> None:
        """Alias of :meth:`switch_to_deploy`: the name timm's walker calls."""
        self.switch_to_deploy()

    def extra_repr(self) -> str:
        return f"deploy={self.deploy}"


def assign_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``module.<name>`` to a fresh detached Parameter holding ``value``."""
    setattr(module, name, nn.Parameter(value.detach().clone()))
