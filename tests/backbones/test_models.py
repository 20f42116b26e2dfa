"""Every registered model: whole-model equivalence, the deploy=True round trip, counts and shapes."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import backbones
from backbones import (
    ReparamBlock, RepMLP, RepMLPCfg, ResNet, StageCfg, create, list_models, max_relative_error,
    model_relative_error, reparameterize_model,
)
from backbones.layers.dbb import BNAndPad
from backbones.models.resnet import resnet_stages
from backbones.deploy.fused_conv import fusion
from conftest import perturb_params, randomize_bn

ALL = list_models()
TINY = list_models("*tiny*")


def _inputs(model, batch=1, dtype=torch.float32):
    return torch.randn(batch, 3, *model.img_size, dtype=dtype)


def test_registry_lists_the_issue_factories():
    for name in ["resnet50", "repmlp_res50_light_224", "repmlp_res50_g8_224", "repmlp_res50_g8_16_320",
                 "repmlp_res50_g8_8_320", "repmlp_res50_g4_8_320", "repmlp_res_tiny", "resnet_tiny"]:
        assert name in ALL
    assert list_models("repmlp_res50_*_320") == ["repmlp_res50_g4_8_320", "repmlp_res50_g8_16_320",
                                                  "repmlp_res50_g8_8_320"]
    with pytest.raises(KeyError, match="unknown model 'resnet51'.*resnet50"):
        create("resnet51")


@pytest.mark.parametrize("name", ALL)
def test_whole_model_equivalence_and_deploy_round_trip(name):
    torch.manual_seed(0)
    model = randomize_bn(create(name), seed=1).eval()
    x = _inputs(model)
    deploy = reparameterize_model(model)
    assert model_relative_error(model, deploy, x) <= 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in deploy.modules())
    # the walker calls the root's switch_to_deploy only: every block inside converts through it
    assert all(m.deploy for m in deploy.modules() if isinstance(m, ReparamBlock))
    built = create(name, deploy=True)
    converted = deploy.state_dict()
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in converted.items()}
    built.load_state_dict(converted, strict=True)
    assert model_relative_error(deploy, built, x) == 0.0


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_fp64_and_batch(name):
    model = randomize_bn(create(name), seed=2).double().eval()
    x = _inputs(model, batch=3, dtype=torch.float64)
    assert model_relative_error(model, reparameterize_model(model), x) <= 1e-10


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in TINY] + [("resnet18_tiny", {"conv_type": t})
                                                                     for t in ("acb", "dbb", "orepa")])
def test_repeated_conversion_and_alias_orders(name, kwargs):
    """timm's walker, MMPretrain's module loop and ours, in either order, give the same model."""
    model = perturb_params(randomize_bn(create(name, **kwargs), seed=4), seed=4).eval()
    x = _inputs(model, batch=2)
    ours = reparameterize_model(model)

    timm_style = copy.deepcopy(model)

    def timm_walk(parent):  # timm.utils.model.reparameterize_model: children only, top-down
        for child_name, child in parent.named_children():
            if hasattr(child, "fuse"):
                setattr(parent, child_name, child.fuse())
            elif hasattr(child, "reparameterize"):
                child.reparameterize()
            elif hasattr(child, "switch_to_deploy"):
                child.switch_to_deploy()
            timm_walk(child)

    def mmpretrain_loop(model):  # MMPretrain backbones: switch_to_deploy on every module that has it
        for m in list(model.modules()):
            if hasattr(m, "switch_to_deploy"):
                m.switch_to_deploy()

    timm_walk(timm_style)
    mmpretrain_style = copy.deepcopy(model)
    mmpretrain_loop(mmpretrain_style)
    timm_then_mmpretrain = copy.deepcopy(model)
    timm_walk(timm_then_mmpretrain)
    mmpretrain_loop(timm_then_mmpretrain)
    mmpretrain_then_timm = copy.deepcopy(model)
    mmpretrain_loop(mmpretrain_then_timm)
    timm_walk(mmpretrain_then_timm)
    twice = reparameterize_model(reparameterize_model(model))
    twice.switch_to_deploy()
    for other in (timm_style, mmpretrain_style, timm_then_mmpretrain, mmpretrain_then_timm, twice):
        other.eval()
        assert ours.state_dict().keys() == other.state_dict().keys()
        with fusion(False):  # the third-party walkers do not apply the CPU fusion pass: compare the plain ops
            assert model_relative_error(ours, other, x) == 0.0
    assert not hasattr(backbones.RepMLP, "fuse") and not hasattr(backbones.ConvBN, "fuse")


@pytest.mark.parametrize("name,train_m,deploy_m", [
    ("repmlp_res50_light_224", 87.04, 86.14),   # official RepMLP-Res50-light-224
    ("repmlp_res50_g8_224", 41.07, 40.87),      # official RepMLP-Res50-bottleneck-224
    ("resnet50", 25.56, 25.53),
    ("resnet18", 11.69, 11.68),                 # torchvision: 11,689,512 (deploy: BNs folded into biases)
    ("repvgg_a0", 9.11, 8.31),                  # MMPretrain's table; 8,309,384 deployed
    ("repvgg_b0", 15.82, 14.34),                # 14,339,048 deployed
    ("mobileone_s0", 5.29, 2.08),               # MMPretrain's table and Apple's README
])
def test_parameter_counts_match_official(name, train_m, deploy_m):
    model = create(name)
    count = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 2)  # noqa: E731
    assert count(model) == train_m
    assert count(create(name, deploy=True)) == deploy_m


@pytest.mark.parametrize("name,paper_m", [("repvgg_a0", 8.30), ("repvgg_b0", 14.33), ("mobileone_s0", 2.08),
                                          ("replknet_31b", 79)])
def test_deploy_parameter_counts_match_the_papers(name, paper_m):
    """Within the published precision: RepVGG-A0 has 8,309,384 parameters deployed and its paper
    truncates to 8.30M; MobileOne-S0 has 2,078,504 and its README rounds to 2.08M."""
    count = sum(p.numel() for p in create(name, deploy=True).parameters()) / 1e6
    assert abs(count - paper_m) < (1 if isinstance(paper_m, int) else 0.01)


@pytest.mark.parametrize("conv_type", ["acb", "dbb", "orepa"])
@pytest.mark.parametrize("name", ["resnet18_tiny", "resnet_tiny", "resnet18"])
def test_resnet_conv_types(name, conv_type):
    """ResNet-18 (basic blocks) and the bottleneck ResNet with their 3x3 convs as ACB, DBB or OREPA."""
    model = perturb_params(randomize_bn(create(name, conv_type=conv_type), seed=5), seed=5).eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"acb": "ACBlock", "dbb": "DiverseBranchBlock", "orepa": "OREPA"}[conv_type] in kinds
    x = _inputs(model, batch=2)
    deploy = reparameterize_model(model)
    assert model_relative_error(model, deploy, x) <= 1e-4
    model64 = copy.deepcopy(model).double()
    assert model_relative_error(model64, reparameterize_model(model64), x.double()) <= 1e-10
    built = create(name, conv_type=conv_type, deploy=True)
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0
    # the deploy model is a plain ResNet: the weights load into conv_type="conv"
    create(name, deploy=True).load_state_dict(deploy.state_dict(), strict=False)


def test_replknet_pre_logits_survive_the_conversion():
    """The final BN becomes a scale and shift of the pooled features, so features (pre_logits) match too."""
    model = randomize_bn(create("replknet_31b_tiny"), seed=6).eval()
    deploy = reparameterize_model(model)
    x = _inputs(model, batch=2)
    with torch.no_grad():
        before, after = (m.forward_head(m.forward_features(x), pre_logits=True) for m in (model, deploy))
    assert max_relative_error(before, after) <= 1e-5
    headless = randomize_bn(create("replknet_31b_tiny", num_classes=0), seed=6).eval()
    converted = reparameterize_model(headless)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert model_relative_error(headless, converted, x) <= 1e-5


def test_basic_block_resnet_ignores_bottleneck_ratio():
    assert create("resnet18_tiny", widths=(18, 36, 72, 144)).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_resnet_conv_type_rejects_dilated_dbb():
    with pytest.raises(ValueError, match="DiverseBranchBlock: dilation=2 is not supported"):
        create("resnet_tiny_d8", conv_type="dbb")
    create("resnet_tiny_d8", conv_type="acb")  # ACB and OREPA dilate exactly


def test_repmlp_placement_and_per_stage_groups():
    model = create("repmlp_res50_g8_16_320")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, RepMLP)}
    assert sorted({n.split(".")[0] for n in blocks}) == ["layer2", "layer3"]   # c3 and c4
    assert len(blocks) == 3 + 5                                                 # first block of each stage stays plain
    assert {m.groups for n, m in blocks.items() if n.startswith("layer2")} == {8}
    assert {m.groups for n, m in blocks.items() if n.startswith("layer3")} == {16}
    assert {m.input_size for n, m in blocks.items() if n.startswith("layer2")} == {(40, 40)}
    assert {m.partition for m in blocks.values()} == {(10, 10)}
    assert {m.kernels for m in blocks.values()} == {(1, 3, 5, 7)}
    assert type(model.layer2[0]).__name__ == "Bottleneck"


def test_headless_backbone_and_stage_outputs():
    model = create("repmlp_res_tiny", num_classes=0).eval()
    x = _inputs(model, batch=2)
    stages = model.forward_stages(x)
    assert [tuple(s.shape) for s in stages] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert model(x).shape == (2, 256)
    assert torch.equal(model.forward_features(x), stages[-1])
    assert create("repmlp_res_tiny", num_classes=7)(x).shape == (2, 7)


def test_dilated_deep_stem_variant_converts():
    model = create("repmlp_res_tiny", deep_stem=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                   img_size=(64, 48), partition=(4, 3), pad_input=True, num_classes=0)
    randomize_bn(model).eval()
    x = torch.randn(1, 3, 64, 48)
    assert [tuple(s.shape[-2:]) for s in model.forward_stages(x)] == [(16, 12), (8, 6), (8, 6), (8, 6)]
    assert model_relative_error(model, reparameterize_model(model), x) <= 1e-4


def test_non_square_kernels_model_and_deploy_build():
    kwargs = dict(img_size=(64, 96), partition=(4, 6), kernels=(1, (3, 5), (1, 3)))
    model = randomize_bn(create("repmlp_res_tiny", **kwargs)).eval()
    x = torch.randn(2, 3, 64, 96)
    deploy = reparameterize_model(model)
    assert model_relative_error(model, deploy, x) <= 1e-4
    built = create("repmlp_res_tiny", deploy=True, **kwargs).eval()
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0


def test_padding_mode_model():
    model = randomize_bn(create("repmlp_res_tiny", img_size=(72, 56), partition=(3, 5), pad_input=True)).eval()
    x = torch.randn(2, 3, 72, 56)
    assert model_relative_error(model, reparameterize_model(model), x) <= 1e-4
    # named in terms of what the user set: img_size, the stage, and the sizes that would fit every stage
    with pytest.raises(ValueError, match=r"img_size 72x56 gives a 9x7 feature map in RepMLP stage c3, which is not "
                                         r"a multiple of the partition 3x5.*multiple of 48 .* multiple of 80"):
        create("repmlp_res_tiny", img_size=(72, 56), partition=(3, 5))
    create("repmlp_res_tiny", img_size=(48, 80), partition=(3, 5))


def test_wrong_image_size_names_both_sizes():
    model = create("repmlp_res50_g8_224").eval()
    with pytest.raises(ValueError, match=r"built for 224x224 inputs.*\(1, 3, 256, 256\)"):
        model(torch.randn(1, 3, 256, 256))
    # A plain ResNet accepts any size.
    create("resnet_tiny").eval()(torch.randn(1, 3, 50, 70))


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=(1, 2, 2)), "layers needs one value per stage"),
    (dict(repmlp_stages=(1, 3)), "stage numbers 2..5"),
    (dict(repmlp_block="heavy"), "'bottleneck' or 'light'"),
    (dict(partition=3), "8x8 feature map in RepMLP stage c3, which is not a multiple of the partition 3x3"),
    (dict(partition=4, kernels=(1, 5)), "kernel size 5 is larger than the 4x4 partition"),
    (dict(kernels=(1, 2)), "kernel size 2 .* odd"),
    (dict(groups=(1, 3, 4, 1)), "groups=3 must divide"),
])
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create("repmlp_res_tiny", **kwargs)


def test_every_reparam_block_reports_deploy_after_conversion():
    deploy = reparameterize_model(create("repmlp_res_light_tiny"))
    blocks = [m for m in deploy.modules() if isinstance(m, ReparamBlock)]
    assert blocks and all(m.deploy for m in blocks)


# ---------------------------------------------------------------- ResNet stages from configs
def _tiny_stages(**changes):
    stages = [StageCfg(1, 32), StageCfg(2, 64, 2), StageCfg(2, 128, 2), StageCfg(1, 256, 2)]
    return [dataclasses.replace(stage, **changes) for stage in stages]


def test_resnet_factories_build_their_stage_configs():
    """A ResNet built from an explicit StageCfg list is the registered factory's model, weight for weight."""
    torch.manual_seed(0)
    listed = ResNet(_tiny_stages(), stem_width=16, num_classes=10, img_size=64)
    torch.manual_seed(0)
    registered = create("resnet_tiny")
    assert listed.state_dict().keys() == registered.state_dict().keys()
    assert all(torch.equal(v, registered.state_dict()[k]) for k, v in listed.state_dict().items())
    assert resnet_stages((1, 2, 2, 1), (32, 64, 128, 256)) == _tiny_stages()


def test_stage_configs_set_what_per_stage_lists_cannot():
    """Per-stage RepMLP settings: a Light stage with 4x4 partitions next to a Bottleneck stage with 2x2."""
    stages = _tiny_stages()
    stages[1] = dataclasses.replace(stages[1], repmlp=RepMLPCfg(4, kernels=(1, 3)), repmlp_block="light")
    stages[2] = dataclasses.replace(stages[2], repmlp=RepMLPCfg(2, kernels=(1,), groups=2), repmlp_r=2)
    model = randomize_bn(ResNet(stages, stem_width=16, num_classes=0, img_size=64)).eval()
    assert [type(b).__name__ for b in model.layer2] == ["Bottleneck", "RepMLPLight"]
    assert [type(b).__name__ for b in model.layer3] == ["Bottleneck", "RepMLPBottleneck"]
    assert (model.layer2[1].repmlp.partition, model.layer3[1].repmlp.partition) == ((4, 4), (2, 2))
    x = torch.randn(2, 3, 64, 64)
    assert model_relative_error(model, reparameterize_model(model), x) <= 1e-4


@pytest.mark.parametrize("make,message", [
    (lambda: StageCfg(2, 64, block="basic", repmlp=RepMLPCfg(4)), "RepMLP stages are built from bottlenecks"),
    (lambda: StageCfg(2, 66), "bottleneck_ratio=4 must divide the stage width 66"),
    (lambda: ResNet(_tiny_stages()[:3]), "stages needs one StageCfg per stage c2..c5, got 3"),
])
def test_bad_stage_configs_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_resnet_factory_names_an_unknown_argument():
    with pytest.raises(TypeError, match=r"ResNet: unknown argument\(s\) stage_depths; a ResNet factory takes layers, "
                                        r"widths, .*, img_size, zero_init_last, deploy"):
        create("resnet_tiny", stage_depths=(1, 1, 1, 1))


def test_resnet_stages_read_from_yaml():
    """LightningCLI's parser (jsonargparse) builds a ResNet from a YAML list of stages."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ResNet, "net", instantiate=True)
    stages = "[{depth: 1, width: 32}, {depth: 2, width: 64, stride: 2, repmlp: {partition: 4, kernels: [1, 3]}}, " \
             "{depth: 1, width: 128, stride: 2, conv_type: acb}, {depth: 1, width: 256, stride: 2}]"
    cfg = parser.parse_string(f"net: {{stages: {stages}, stem_width: 16, img_size: 64, num_classes: 5}}")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    model = instantiate(cfg).net
    assert isinstance(model.layer2[1], backbones.RepMLPBottleneck) and model.layer2[1].repmlp.kernels == (1, 3)
    assert type(model.layer3[0].conv2).__name__ == "ACBlock"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("name,kwargs", [("resnet_tiny", {}), ("resnet18_tiny", {"conv_type": "dbb"}),
                                         ("repmlp_res_tiny", {}), ("repmlp_res_light_tiny", {})])
def test_zero_init_last_starts_each_block_as_its_shortcut(name, kwargs):
    """Every branch of each block's last conv ends in a zeroed BN (not the BN inside DBB's
    BN-and-pad, which a conv follows), so each residual block computes relu(shortcut(x))."""
    model = create(name, zero_init_last=True, **kwargs).eval()
    blocks = [b for stage in model.stages for b in stage]
    x = model.maxpool(model.stem(torch.randn(2, 3, *model.img_size)))
    with torch.no_grad():
        for block in blocks:
            out = block(x)
            assert torch.equal(out, torch.relu(block.shortcut(x)))
            x = out
    if kwargs:
        pads = [m.bn for m in model.modules() if isinstance(m, BNAndPad)]
        assert pads and all(bool((bn.weight == 1).all()) for bn in pads)
