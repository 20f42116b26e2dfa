"""The CPU fusion pass: a converted model's conv units and residual blocks run as oneDNN kernels.

``fuse_for_cpu(model)`` changes how a deploy model runs, not what it computes or holds:

- every deploy conv unit (``ConvBN``, every ``MergedConvBlock``: ``act(conv(x))`` once converted)
  gets its conv replaced by a :class:`FusedConvAct` that holds the same weight and bias
  Parameters and the unit's activation, and runs conv + bias + ReLU as one kernel on a prepacked
  weight (:func:`backbones.deploy.fused_conv.conv_act`); the unit's ``act`` becomes an identity;
- every known residual block in deploy form (``relu(last(out) + shortcut(x))``) is given its fused
  counterpart class, whose forward runs the last conv, the shortcut add and the ReLU as one kernel.
  Only the class changes (the counterpart overrides ``forward`` and nothing else), as
  ``torch.nn.utils.parametrize`` does: the module keeps its children, parameters and hooks.

State-dict keys and shapes stay those of the plain deploy model, so deploy checkpoints load into a
fused model strictly. The fused kernels are taken only where they apply (float32 CPU inference,
no tracing, export or dispatch mode; see :mod:`.fused_conv`); everywhere else, and inside
``with fusion(False):``, the fused modules run exactly the plain ops. The pass is idempotent, and
:func:`unfuse_for_cpu` undoes it (for passes that match plain ``nn.Conv2d`` modules, such as PT2E
quantization).

``backbones.reparameterize_model`` and ``backbones.create(name, deploy=True)`` apply it; a model
built from its class with ``deploy=True`` runs the plain ops until ``fuse_for_cpu(model)``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..layers.convbn import ConvBN
from ..layers.merged_conv import MergedConvBlock
from ..layers.repmlp_blocks import RepMLPBottleneck, RepMLPLight
from ..models.resnet import BasicBlock, Bottleneck
from .fused_conv import conv_act

__all__ = ["FusedConvAct", "fuse_for_cpu", "unfuse_for_cpu", "FusedBottleneck", "FusedBasicBlock", "FusedRepMLPBottleneck",
           "FusedRepMLPLight"]


class FusedConvAct(nn.Conv2d):
    """``act(conv(x))`` as one oneDNN kernel where it applies: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    Built from a deploy conv, whose ``weight`` and ``bias`` Parameters it takes over (same objects,
    same state-dict keys), and the activation that followed it (ReLU or identity; it has no state).
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        # built on the meta device: its own weight and bias are replaced by the conv's at once
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.act = act
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return conv_act(self, x, self.act)


def _deploy_conv(unit: nn.Module) -> Optional[nn.Conv2d]:
    """The conv of a deploy conv unit whose forward is ``act(conv(x))``, or None for anything else."""
    if isinstance(unit, ConvBN) and unit.deploy:
        return unit.conv
    if isinstance(unit, MergedConvBlock) and unit.deploy and unit.fusable_act:
        return unit.reparam_conv
    return None


def _fuse_unit(unit: nn.Module) -> None:
    conv = _deploy_conv(unit)
    if conv is None or isinstance(conv, FusedConvAct) or not isinstance(unit.act, (nn.ReLU, nn.Identity)):
        return
    setattr(unit, "conv" if isinstance(unit, ConvBN) else "reparam_conv", FusedConvAct(conv, unit.act))
    unit.act = nn.Identity()


def _tail(unit: nn.Module, out: Tensor, relu: nn.Module, residual: Tensor) -> Tensor:
    """``relu(unit(out) + residual)`` for a deploy unit without activation: one kernel where it applies."""
    return conv_act(_deploy_conv(unit), out, relu, residual)


class FusedBottleneck(Bottleneck):
    """A deploy :class:`Bottleneck` whose conv3, shortcut add and ReLU run as one kernel."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return _tail(self.conv3, out, self.relu, self.shortcut(x))


class FusedBasicBlock(BasicBlock):
    """A deploy :class:`BasicBlock` whose conv2, shortcut add and ReLU run as one kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return _tail(self.conv2, self.conv1(x), self.relu, self.shortcut(x))


class FusedRepMLPBottleneck(RepMLPBottleneck):
    """A deploy :class:`RepMLPBottleneck` whose conv5, shortcut add and ReLU run as one kernel."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        out = self.repmlp_act(self.repmlp(out))
        return _tail(self.conv5, self.conv4(out), self.relu, self.shortcut(x))


class FusedRepMLPLight(RepMLPLight):
    """A deploy :class:`RepMLPLight` whose conv3, shortcut add and ReLU run as one kernel."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.repmlp_act(self.repmlp(self.conv1(x)))
        return _tail(self.conv3, out, self.relu, self.shortcut(x))


# residual block class → its fused counterpart (the block names its last conv unit: ``last_unit``)
FUSED_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    Bottleneck: FusedBottleneck,
    BasicBlock: FusedBasicBlock,
    RepMLPBottleneck: FusedRepMLPBottleneck,
    RepMLPLight: FusedRepMLPLight,
}


def fuse_for_cpu(model: nn.Module) -> nn.Module:
    """Fuse every deploy conv unit and known deploy residual block of ``model``, in place; returns it.

    Train-time modules are left alone, so a partly converted model is fused where it is converted.
    Keys, shapes and Parameters are unchanged; a second call changes nothing.
    """
    for module in list(model.modules()):
        _fuse_unit(module)
        counterpart = FUSED_BLOCKS.get(type(module))  # exact type: a subclass may have its own forward
        if counterpart is None or not getattr(module, "deploy", False):
            continue
        tail = getattr(module, module.last_unit)
        if _deploy_conv(tail) is not None and isinstance(tail.act, nn.Identity):
            module.__class__ = counterpart
    return model


def unfuse_for_cpu(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_for_cpu` in place (returns ``model``): plain ``nn.Conv2d`` convs, each unit's
    activation back in its ``act``, the residual blocks' own classes. Keys, shapes and Parameters
    are unchanged. A pass that matches modules by type (PT2E's quantizers look for ``nn.Conv2d``
    calls) needs the plain form."""
    fused_to_plain = {fused: plain for plain, fused in FUSED_BLOCKS.items()}
    for module in list(model.modules()):
        if type(module) in fused_to_plain:
            module.__class__ = fused_to_plain[type(module)]
        conv = _deploy_conv(module)
        if isinstance(conv, FusedConvAct):
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
            plain.weight, plain.bias = conv.weight, conv.bias
            plain.train(conv.training)
            setattr(module, "conv" if isinstance(module, ConvBN) else "reparam_conv", plain)
            module.act = conv.act
    return model
