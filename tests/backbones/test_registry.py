"""The registry's default configs: what they declare is what the built models are.

Models are built on the meta device (shapes only, no memory and no initialization), which every
constructor must support: weights are also loaded into meta-initialized models.
"""
from __future__ import annotations

import math
import re

import albumentations as A
import pytest
import torch

from backbones import create, input_size, list_models
from backbones.models import registry
from backbones.models.registry import model_cfg, model_input_size
from datamodules.faces import face_transform
from datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD

ALL = list_models()


def _meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return create(name, **kwargs).eval()


def _overrides(name: str) -> list[dict]:
    """``img_size`` overrides the model accepts: a square and a non-square one."""
    h, w = model_cfg(name).input_size
    if name == "repmlp_res50_g4_8_d8_713":  # its c3/c4 maps must stay multiples of the 10x10 partition
        return [{"img_size": 633}, {"img_size": [713, 640]}]  # maps 80x80 and 90x80
    return [{"img_size": 2 * h}, {"img_size": [h, 2 * w]}]


def _stages(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs are the model's feature maps (ResNet c2..c5, stage1..4), if any."""
    model = getattr(model, "body", model)  # FaceResNet's trunk is a ResNet
    return list(model.stages) if hasattr(model, "stages") else []


def _never_build(**kwargs):
    raise AssertionError(f"a model was built (kwargs {kwargs})")


@pytest.mark.parametrize("name,base", [(n, {}) for n in ALL] + [("resnet18", {"conv_type": t})
                                                                for t in ("acb", "dbb", "orepa")])
def test_input_size_is_resolved_without_building_and_equals_the_built_model(name, base, monkeypatch):
    cases = [base] + [{**base, **kwargs} for kwargs in _overrides(name)]
    with monkeypatch.context() as patch:
        patch.setitem(registry._FACTORIES, name, _never_build)
        resolved = [input_size(name, **kwargs) for kwargs in cases]
    assert resolved[0] == model_cfg(name).input_size
    assert resolved[1][0] == resolved[1][1] and resolved[2] != resolved[1]  # the square and the pair both count
    for kwargs, size in zip(cases, resolved):
        assert model_input_size(_meta(name, **kwargs), name) == size, kwargs


@pytest.mark.parametrize("name", ALL)
def test_declared_features_are_what_a_forward_produces(name):
    """Stage maps ``(N, C_i, ceil(H / s_i), ceil(W / s_i))`` and pooled ``(N, num_features)`` outputs."""
    cfg = model_cfg(name)
    model = _meta(name, num_classes=0)
    shapes: list[torch.Size] = []
    for stage in _stages(model):
        stage.register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    h, w = cfg.input_size
    out = model(torch.empty(2, 3, h, w, device="meta"))
    assert tuple(out.shape) == (2, cfg.num_features) and model.num_features == cfg.num_features
    assert tuple(s[1] for s in shapes) == cfg.feature_channels
    assert [tuple(s[2:]) for s in shapes] == [(math.ceil(h / s), math.ceil(w / s)) for s in cfg.feature_strides]


@pytest.mark.parametrize("name", ALL)
def test_fixed_size_is_declared_for_the_models_that_need_it(name):
    """A fixed-size model (RepMLP blocks, a face head sized to the last map) refuses another input
    size; any other model runs at it (its img_size only records the training size)."""
    cfg = model_cfg(name)
    model = _meta(name, num_classes=0)
    h, w = cfg.input_size
    other = torch.empty(2, 3, h + 32, w + 64, device="meta")
    if cfg.fixed_size:
        with pytest.raises(ValueError, match=rf"{h}x{w}.*img_size"):
            model(other)
    else:
        assert tuple(model(other).shape) == (2, cfg.num_features)


def test_declared_normalization_is_what_the_datamodules_apply():
    """The datamodules normalize on their own (ImageNet and Cityscapes: ImageNet statistics; faces:
    [-1, 1]); the declared mean/std must agree with them. RepLKNet-XL's published weights expect
    mean = std = 0.5 (official README), which the ImageNet datamodule applies when given them
    (``mean``/``std``, as the faces' [-1, 1])."""
    face_norm = [t for t in face_transform((64, 64), flip=False) if isinstance(t, A.Normalize)]
    assert len(face_norm) == 1
    for name in ALL:
        face = name.startswith(("faceres", "repmlp_faceres", "mobilefacenet")) or name == "replknet_xl"
        expected = (tuple(face_norm[0].mean), tuple(face_norm[0].std)) if face else (IMAGENET_MEAN, IMAGENET_STD)
        assert (model_cfg(name).mean, model_cfg(name).std) == expected, name


def test_input_size_errors_name_the_model_and_the_value():
    with pytest.raises(KeyError, match="unknown model 'resnet51'.*resnet50"):
        input_size("resnet51", img_size=64)
    for bad in ("64", [64], [64, 0], 2.5, True):
        message = f"resnet_tiny: img_size must be a positive int or a pair [H, W] of them, got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            input_size("resnet_tiny", img_size=bad)


def test_a_model_is_registered_once_and_its_config_is_checked():
    def resnet50(**kwargs):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="a model named 'resnet50' is already registered"):
        registry.register_model(cfg=model_cfg("resnet50"))(resnet50)
    with pytest.raises(ValueError, match="one stride per feature map"):
        registry.ModelCfg(input_size=(64, 64), fixed_size=False, num_features=8, feature_channels=(4, 8),
                          feature_strides=(4,))
