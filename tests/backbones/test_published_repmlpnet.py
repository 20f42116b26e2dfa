"""Published RepMLPNet checkpoints, official (DingXiaoH/RepMLP) and MMPretrain's: train and deploy
files load into this project's RepMLPNet and compute the official network's function.

No file can be downloaded here, so each test writes a state dict in the published layout from the
code's key and shape listing (tests/published_repmlpnet.py), with random float64 tensors, and
compares with an independent functional forward of the official network. The published sizes are
checked key for key on the meta device; the numerics run on small configurations with the same
structure: sharesets, the (1, 3) local kernels, several units per stage, several (and non-square)
partitions per stage map.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

import backbones
from backbones.complexity import count_params
from backbones.models.repmlpnet import RepMLPNet
from backbones.weights import OFFICIAL_ARCHS, load_backbone, read_weights
from backbones.weights.formats import create_loaded
from backbones.weights.mmpretrain_repmlp import LAYOUT as MMPRETRAIN_LAYOUT
from backbones.weights.official_repmlpnet import LAYOUT
from backbones.weights.resolve import _convert
from conftest import REPO
from published_layouts import shapes
from published_replknet import official_replknet
from published_repmlpnet import (MMPRETRAIN_B, PUBLISHED_MMPRETRAIN, PUBLISHED_REPMLPNET, locality_injection,
                                 mmpretrain_repmlpnet, mmpretrain_to_official, official_repmlpnet, param_count,
                                 repmlpnet_forward)

FORMAT = "official RepMLPNet checkpoint (DingXiaoH/RepMLP)"
MMPRETRAIN = "MMPretrain RepMLPNet checkpoint (open-mmlab/mmpretrain)"


def _read(sd: dict[str, Tensor], path: str = "<published>"):
    return _convert(dict(sd), {}, path)


def _meta_model(arch: str, deploy: bool):
    with torch.device("meta"):
        return backbones.create(arch, deploy=deploy)


# --------------------------------------------------------------------------- the published sizes
@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("official", list(PUBLISHED_REPMLPNET))
def test_every_published_size_is_registered_key_for_key(official, form):
    """Each published size's keys and shapes, converted (renamed; the official deploy form with its
    BNs folded to this project's BN-free deploy form), are exactly the registered model's, on the
    meta device; the train file holds the registered model's parameters, no more, no fewer."""
    arch, size = PUBLISHED_REPMLPNET[official]
    assert OFFICIAL_ARCHS[official] == OFFICIAL_ARCHS[f"create_RepMLPNet_{official[10:]}"] == arch
    train = official_repmlpnet(**size, classes=1000, seed=None)
    sd = train if form == "train" else locality_injection(train, size["hs"])
    weights = _read(sd)
    deploy = form == "deploy"
    assert (weights.format, weights.deploy, weights.scope) == (FORMAT, deploy, "backbone")
    assert weights.kwargs == {}  # the registered sizes' kernels (1, 3) and gp_reduction 4
    model = _meta_model(arch, deploy)
    assert shapes(weights.state_dict) == shapes(model.state_dict())
    if not deploy:
        assert param_count(train) == count_params(model)
    else:  # fc3 gains its bias; every other BN (4 tensors, 2 of them parameters) is still there
        assert not any(".fc3_bn." in k or ".repconv" in k for k in sd)
        assert sd["stages.0.0.repmlp_block.fc3.bias"].shape == (size["hs"][0] ** 2,)
        assert "stages.0.0.prebn1.running_var" in sd and "head_norm.weight" in sd


@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("name", list(PUBLISHED_MMPRETRAIN))
def test_the_mmpretrain_zoo_files_are_registered_key_for_key(name, form):
    """MMPretrain's two RepMLP files (arch 'b' at 224 and 256): keys and shapes are the registered
    model's on the meta device in both forms, and the train file has the zoo's parameter count."""
    arch, size, params_m = PUBLISHED_MMPRETRAIN[name]
    train = mmpretrain_repmlpnet(**MMPRETRAIN_B, **size, seed=None)
    assert round(param_count(train) / 1e6, 2) == params_m
    partitions = [size["img_size"] // 4 // 2 ** i for i in range(4)]
    sd = train if form == "train" else locality_injection(train, partitions)
    weights = _read(sd, name + ".pth")
    deploy = form == "deploy"
    assert (weights.format, weights.deploy, weights.scope) == (MMPRETRAIN, deploy, "backbone")
    assert shapes(weights.state_dict) == shapes(_meta_model(arch, deploy).state_dict())


# --------------------------------------------------------------------------- numeric parity
# small structures with what the published sizes vary; "one_partition" is what every published size
# is at its own resolution (each stage map one partition); "several_partitions" cuts stages 1 and 2
# into 2x4 (non-square) and 2x2 partitions, where C == S (see test_the_official_code_moves_...)
CASES = {
    "one_partition": dict(channels=(16, 32, 64, 128), layers=(1, 2, 1, 1), sharesets=(1, 2, 4, 8),
                          partitions=(16, 8, 4, 2)),
    "several_partitions": dict(channels=(8, 8, 16, 32), layers=(1, 1, 2, 1), sharesets=(8, 8, 4, 8),
                               partitions=((8, 4), 4, 4, 2)),
}


def _hw(case: str) -> tuple[list[int], list[int]]:
    """The official ``hs``, ``ws`` of a case."""
    pairs = [p if isinstance(p, tuple) else (p, p) for p in CASES[case]["partitions"]]
    return [h for h, _ in pairs], [w for _, w in pairs]


def _official(case: str, seed: int, **kwargs) -> dict[str, Tensor]:
    size = {k: v for k, v in CASES[case].items() if k != "partitions"}
    hs, ws = _hw(case)
    return official_repmlpnet(**size, hs=hs, ws=ws, seed=seed, **kwargs)


def _ours(case: str, deploy: bool, classes: int = 10, **kwargs) -> RepMLPNet:
    return RepMLPNet(**CASES[case], num_classes=classes, img_size=64, deploy=deploy, **kwargs).double().eval()


def _float64(build):
    """``build()`` with float64 as the default dtype: a model that :func:`create_loaded` builds and
    loads keeps the float64 file exact."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return build()
    finally:
        torch.set_default_dtype(default)


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _x() -> Tensor:
    return torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))


def _check_train_converts_to(model: RepMLPNet, expected: Tensor, deploy_sd: dict[str, Tensor], rebuild) -> None:
    """The train-form ``model``, converted here, computes ``expected`` and holds the tensors of the
    converted published deploy file; ``rebuild()`` (a float64 deploy model of that structure) loads
    them back (the ``deploy=True`` state-dict round trip) and computes ``expected`` too."""
    x = _x()
    converted = backbones.reparameterize_model(model)
    assert _relative_error(converted(x), expected) <= 1e-10
    assert converted.state_dict().keys() == deploy_sd.keys()
    for key, value in converted.state_dict().items():
        assert _relative_error(value, deploy_sd[key]) <= 1e-12, key
    again = rebuild().eval()
    again.load_state_dict(converted.state_dict(), strict=True)
    assert _relative_error(again(x), expected) <= 1e-10


@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_official_file_computes_the_official_forward(tmp_path, case, form):
    """The file (train form with DDP's ``module.``; the deploy form nested under ``model`` as a
    training run saves it) loads strictly into this project's model of that form, which computes
    the official network's function in float64 to 1e-10. The train form, converted here, computes
    it too, equals the converted official deploy file, and survives a ``deploy=True`` round trip."""
    train = _official(case, seed=3)
    hs, ws = _hw(case)
    sd = train if form == "train" else locality_injection(train, hs, ws)
    path = tmp_path / "official.pth"
    if form == "train":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    else:
        torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"t": 9},
                    "max_accuracy": 80.828, "epoch": 99}, path)
    weights = read_weights(path)
    deploy = form == "deploy"
    assert (weights.format, weights.deploy) == (FORMAT, deploy)
    model = _ours(case, deploy)
    model.load_state_dict(weights.state_dict, strict=True)
    x = _x()
    expected = repmlpnet_forward(sd, x, hs, ws)
    with torch.no_grad():
        assert _relative_error(repmlpnet_forward(train, x, hs, ws), expected) <= 1e-10  # the official forms agree
        assert _relative_error(model(x), expected) <= 1e-10
        if not deploy:
            _check_train_converts_to(model, expected, _read(locality_injection(train, hs, ws)).state_dict,
                                     lambda: _ours(case, True))


MM_CASES = {  # widths whose make_divisible(C // 4, 8) is C // 4, as for the published 'b' arch
    "classifier": dict(channels=(32, 64, 64, 128), layers=(1, 2, 1, 1), sharesets=(1, 2, 4, 8), kernels=(1, 3),
                       classifier=True),
    "backbone_alone_class_default_kernels": dict(channels=(32, 32, 64, 64), layers=(2, 1, 1, 1),
                                                 sharesets=(2, 2, 4, 8), kernels=(3,), classifier=False),
}


@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("case", list(MM_CASES))
def test_an_mmpretrain_file_computes_the_official_forward(tmp_path, case, form):
    """An MMPretrain file (``{"meta", "state_dict"}``; an ImageClassifier's ``backbone.`` and
    ``head.fc``, or the backbone alone; the config's kernels (1, 3) or the class default (3,)) loads
    into this project's model of that form (the kernels read from the file), equals the official
    file of the same tensors once read, and computes the official forward (the logits, or the
    pooled features of a headless backbone) to 1e-10; its train form converts here to its deploy form."""
    spec = dict(MM_CASES[case])
    classifier = spec["classifier"]
    train = mmpretrain_repmlpnet(**spec, img_size=64, classes=10, seed=7)
    partitions = [16, 8, 4, 2]  # img_size // 4 // 2**i: one partition per stage map, as MMPretrain asserts
    sd = train if form == "train" else locality_injection(train, partitions)
    path = tmp_path / "repmlp-mmpretrain.pth"
    torch.save({"meta": {"mmcls_version": "0.21.0", "epoch": 300, "CLASSES": ["a", "b"]}, "state_dict": sd}, path)
    weights = read_weights(path)
    deploy = form == "deploy"
    assert (weights.format, weights.deploy) == (MMPRETRAIN, deploy)
    assert weights.kwargs == ({"kernels": [3]} if spec["kernels"] == (3,) and not deploy else {})
    official = _read(mmpretrain_to_official(sd)).state_dict  # the two layouts hold one network
    assert official.keys() == weights.state_dict.keys()
    assert all(torch.equal(official[k], v) for k, v in weights.state_dict.items())
    size = {k: spec[k] for k in ("channels", "layers", "sharesets")}
    # the arguments a zoo file leaves to the registered size, here those of the small structure; the
    # kernels and the class count come from the file
    model = _float64(lambda: create_loaded(weights, "repmlpnet_tiny", **size, partitions=partitions)).eval()
    assert model.num_classes == (10 if classifier else 0)
    x = _x()
    expected = repmlpnet_forward(mmpretrain_to_official(sd), x, partitions)
    with torch.no_grad():
        assert _relative_error(model(x), expected) <= 1e-10
        if deploy:
            return
        _check_train_converts_to(model, expected, _read(locality_injection(train, partitions)).state_dict,
                                 lambda: _float64(lambda: backbones.create("repmlpnet_tiny", deploy=True, **size,
                                                                           partitions=partitions,
                                                                           num_classes=model.num_classes)))


def test_the_official_code_moves_partitions_when_a_stage_has_several():
    """Where this project's RepMLPNet and the official code differ: with several partitions per
    stage map and more channels than sharesets (``repmlpnet_tiny``: 2x2 partitions, C/S = 16 in
    stage 1), the official ``partition_affine`` reassembles its output as ``(N*C/S, h_parts,
    w_parts, S, h, w)`` from rows ordered ``(N, h_parts, w_parts, C/S, S)``, which moves each
    partition's result to another partition and channel group. This project keeps each partition in
    place: it computes the functional forward with the partitions put back where they came from,
    and differs from the official code's output. (No published size meets this at its resolution.)"""
    hs = [8, 4, 2, 2]
    train = official_repmlpnet((16, 32, 64, 128), (1, 1, 1, 1), (1, 2, 4, 8), hs, seed=11)
    model = backbones.create("repmlpnet_tiny").double().eval()
    model.load_state_dict(_read(train).state_dict, strict=True)
    x = _x()
    with torch.no_grad():
        ours = model(x)
        assert _relative_error(ours, repmlpnet_forward(train, x, hs, official_order=False)) <= 1e-10
        assert _relative_error(ours, repmlpnet_forward(train, x, hs)) > 1e-3
        # one partition per map: both orders are one function (the parity tests above)
        single = _official("one_partition", seed=2)
        assert torch.equal(repmlpnet_forward(single, x, [16, 8, 4, 2]),
                           repmlpnet_forward(single, x, [16, 8, 4, 2], official_order=False))


def test_a_training_checkpoint_loads_from_its_model_entry(tmp_path):
    """``utils.save_checkpoint`` writes ``{"model", "optimizer", "lr_scheduler", "max_accuracy",
    "epoch", "config", "ema"?}`` (``config`` aside: next test): the weights come from ``model`` (as
    ``--resume`` reads them), not ``ema``, and the file's class count is taken."""
    sd = _official("one_partition", seed=5, classes=7)
    ema = _official("one_partition", seed=6, classes=7)
    path = tmp_path / "ckpt_epoch_99.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": []}]},
                "lr_scheduler": {"t_initial": 100}, "max_accuracy": 76.62, "epoch": 99, "ema": ema}, path)
    size = {k: v for k, v in CASES["one_partition"].items()}
    model, weights = load_backbone(path, "repmlpnet_tiny", **size)
    assert weights.format == FORMAT and model.num_classes == 7 and not model.deploy
    x = _x()
    with torch.no_grad():  # the float64 file went through the float32 model: float32 rounding
        assert _relative_error(model.double().eval()(x), repmlpnet_forward(sd, x, size["partitions"])) <= 1e-6


class CfgNode(dict):
    """Stands for yacs' ``CfgNode``, the ``config`` entry of the official training checkpoints."""


def test_a_training_checkpoint_with_its_config_is_refused_by_name(tmp_path):
    """The official ``config`` entry is an object the safe loader refuses; the message names the
    file, the class and the way out (save the state dict alone)."""
    path = tmp_path / "best_ckpt.pth"
    torch.save({"model": _official("one_partition", seed=0), "epoch": 3, "config": CfgNode(MODEL="x")}, path)
    with pytest.raises(ValueError, match=r"(?s)best_ckpt\.pth holds Python objects.*CfgNode.*state_dict\(\)"):
        read_weights(path)


def test_the_global_perceptron_reduction_is_read_from_the_file():
    """An official model built with ``globalperceptron_reduce=2`` loads with ``gp_reduction=2``; a
    file whose widths no single reduction gives (MMPretrain's make_divisible(C // 4, 8): 8 for a
    16-wide stage, 24 for D256's 80) is refused with the widths named."""
    sd = _official("one_partition", seed=0, gp_reduce=2)
    weights = _read(sd)
    assert weights.kwargs == {"gp_reduction": 2}
    model = create_loaded(weights, "repmlpnet_tiny", layers=(1, 2, 1, 1), partitions=(16, 8, 4, 2))
    assert model.stage1[0].mlp.gp.reduce.out_channels == 8
    tiny = mmpretrain_repmlpnet(**{k: CASES["one_partition"][k] for k in ("channels", "layers", "sharesets")},
                                img_size=64, seed=None)
    with pytest.raises(ValueError, match=r"tiny\.pth: the Global Perceptron widths of this MMPretrain RepMLPNet "
                                         r"checkpoint .* are not C // r for one r.*backbone\.stages\.0\.0\.repmlp_block"
                                         r"\.gp\.conv1\.conv\.weight \(8 of 16 channels\).*make_divisible"):
        _read(tiny, "tiny.pth")
    d256 = mmpretrain_repmlpnet((80, 160, 320, 640), (2, 2, 18, 2), (1, 4, 16, 128), img_size=256, seed=None)
    with pytest.raises(ValueError, match=r"\(24 of 80 channels\)"):
        _read(d256, "d256.pth")


def test_a_checkpoint_that_does_not_fit_is_named_with_the_keys_that_differ(tmp_path):
    # published sizes for others: the same check as on a file (load_backbone = read + create_loaded), on meta
    b224 = _read(official_repmlpnet(**PUBLISHED_REPMLPNET["RepMLPNet-B224"][1], classes=1000, seed=None),
                 "RepMLPNet-B224-train-acc80.32.pth")
    with torch.device("meta"), pytest.raises(ValueError) as err:
        create_loaded(b224, OFFICIAL_ARCHS["RepMLPNet-T224"])
    text = str(err.value)
    assert "RepMLPNet-B224-train-acc80.32.pth does not fit model 'repmlpnet_t224'" in text and "shape mismatch" in text
    assert "stem.conv.weight: checkpoint (96, 3, 4, 4) vs model (64, 3, 4, 4)" in text
    assert f"the file was read as: {FORMAT}" in text
    t224 = _read(official_repmlpnet(**PUBLISHED_REPMLPNET["RepMLPNet-T224"][1], classes=1000, seed=None), "t224.pth")
    with torch.device("meta"), pytest.raises(ValueError, match=r"stage1\.0\.mlp\.fc3\.weight: checkpoint \(3136, 3136, "
                                                               r"1, 1\) vs model \(4096, 4096, 1, 1\)"):
        create_loaded(t224, "repmlpnet_t256")  # the partitions are the pre-training resolution's

    size = CASES["one_partition"]
    sd = _official("one_partition", seed=0)
    load_backbone(_save(sd, tmp_path / "tiny.pth"), "repmlpnet_tiny", **size)  # fits
    partial = _save({k: v for k, v in sd.items() if not k.startswith("stages.3.")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"(?s)partial\.pth does not fit model 'repmlpnet_tiny'.*"
                                         r"missing key\(s\): stage4\.0\.pre_bn"):
        load_backbone(partial, "repmlpnet_tiny", **size)
    unknown = _save({**sd, "stages.0.0.repmlp_block.fc4.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match=r"(?s)unexpected key\(s\): stages\.0\.0\.repmlp_block\.fc4\.weight"):
        load_backbone(unknown, "repmlpnet_tiny", **size)
    replknet = _save(official_replknet((5, 5, 3, 3), (16, 32, 64, 128), 3, layers=(1, 1, 1, 1), seed=0),
                     tmp_path / "RepLKNet-31B.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit model 'repmlpnet_tiny'.*read as: official RepLKNet.*"
                                         r"missing key\(s\): stem\.conv\.weight"):
        load_backbone(replknet, "repmlpnet_tiny")  # another family's layout
    deploy = _save(locality_injection(sd, size["partitions"]), tmp_path / "deploy.pth")
    with pytest.raises(ValueError, match="checkpoint is in deploy form; build the model with deploy=True"):
        load_backbone(deploy, "repmlpnet_tiny", deploy=False, **size)


def _save(sd: dict[str, Tensor], path):
    torch.save(sd, path)
    return path


def test_the_layouts_are_told_apart_from_this_projects_own_and_each_other():
    """This project's RepMLPNet keys (``stage1.0.``, ``head.norm``; bare or a task's ``backbone.``) are
    read as neither layout; the official and MMPretrain files as their own."""
    with torch.device("meta"):
        ours = backbones.create("repmlpnet_tiny").state_dict()
    task = {"backbone." + k: v for k, v in ours.items()}
    for sd in (ours, task):
        assert not LAYOUT.matches(sd) and not MMPRETRAIN_LAYOUT.matches(sd)
        assert _read(sd).format == "state dict"
    official = _official("one_partition", seed=None)
    assert LAYOUT.matches(official) and not MMPRETRAIN_LAYOUT.matches(official)
    for case in MM_CASES:  # a backbone alone shares most of its keys with the official layout
        mm = mmpretrain_repmlpnet(**MM_CASES[case], img_size=64, seed=None)
        assert MMPRETRAIN_LAYOUT.matches(mm) and not LAYOUT.matches(mm)


def test_the_command_converts_an_official_file(tmp_path):
    """``python -m backbones.official --arch repmlpnet_tiny IN OUT --model-kwargs ...`` on an official
    deploy file (nested under ``model``, DDP's ``module.``): the output is this project's deploy
    backbone file, with the arguments it was built with."""
    size = CASES["one_partition"]
    sd = locality_injection(_official("one_partition", seed=1), size["partitions"])
    src = tmp_path / "RepMLPNet-tiny-deploy.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, src)
    kwargs = '{"layers": [1, 2, 1, 1], "partitions": [16, 8, 4, 2]}'
    proc = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", "repmlpnet_tiny", str(src),
                           str(tmp_path / "tiny.safetensors"), "--model-kwargs", kwargs],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"converted {FORMAT}" in proc.stdout and "arch=repmlpnet_tiny, deploy" in proc.stdout
    weights = read_weights(tmp_path / "tiny.safetensors")
    assert (weights.arch, weights.deploy) == ("repmlpnet_tiny", True)
    assert weights.kwargs == {"layers": [1, 2, 1, 1], "partitions": [16, 8, 4, 2], "num_classes": 10}
    model = backbones.create("repmlpnet_tiny", deploy=True, **weights.kwargs).double().eval()
    model.load_state_dict(weights.state_dict)
    x = _x()
    with torch.no_grad():  # written from a float32 model: float32 rounding
        assert _relative_error(model(x), repmlpnet_forward(sd, x, size["partitions"])) <= 1e-6
