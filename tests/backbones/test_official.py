"""Official v1 RepMLP-ResNet checkpoints: key mapping, and equality with an independent functional
re-implementation of the official forward that runs on the official-layout state dict itself."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, randomize_bn
from torch import Tensor

from backbones import create, max_relative_error, reparameterize_model
from backbones.weights.io import load_into, load_state_dict_file
from backbones.official import main as official_main
from backbones.weights.official_repmlp import convert_official_state_dict, load_official

TINY = ["repmlp_res_tiny", "repmlp_res_light_tiny", "resnet_tiny"]
PARTITION = {"repmlp_res_tiny": 4, "repmlp_res_light_tiny": 4, "resnet_tiny": 4,
             "repmlp_res50_g8_224": 7, "repmlp_res50_light_224": 7}
BN_EPS = 1e-5  # nn.BatchNorm default, used by every BN of the official code


# ----------------------------------------------------------------- ours -> official key names
def to_official(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state dict of this project to the official v1 names (the inverse of the converter)."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", key)
        if m:
            stage, idx, rest = m.groups()
            block = f"layer{stage}.{idx}."
            if f"{block}repmlp.fc3.weight" in state_dict:
                kind = "btnk" if f"{block}conv5.conv.weight" in state_dict else "light"
                rest = re.sub(r"^conv(\d)\.", rf"{kind}_conv\1.", rest)
                rest = re.sub(r"^repmlp\.fc([12])\.", rf"{kind}_repmlp.fc1_fc2.fc\1.", rest)
                rest = re.sub(r"^repmlp\.gp_bn\.", f"{kind}_repmlp.avg.bn.", rest)
                rest = re.sub(r"^repmlp\.local\.(\d+)x\1\.", rf"{kind}_repmlp.repconv\1.", rest)
                rest = re.sub(r"^repmlp\.", f"{kind}_repmlp.", rest)
            out[f"stage{stage}.{idx}.{rest}"] = value
        elif key.startswith("stem.0."):
            out["stage0.0." + key[len("stem.0."):]] = value
        elif key.startswith("fc."):
            out["linear." + key[len("fc."):]] = value
        else:
            raise AssertionError(f"unexpected key of ours: {key}")
    return out


def make_official(arch: str, deploy: bool, seed: int = 0) -> dict[str, Tensor]:
    """An official-layout state dict (train-time or deploy) with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = randomize_bn(create(arch), seed=seed + 1).eval()
    if deploy:
        model = reparameterize_model(model)
    return to_official(model.state_dict())


# ----------------------------------------------------------------- official forward, functionally
def _bn(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, BN_EPS)


def _convbn(x: Tensor, sd: dict[str, Tensor], p: str, stride: int = 1, relu: bool = True) -> Tensor:
    """Official ConvBN / ConvBNReLU: padding = k // 2 for every kernel the official model uses."""
    weight = sd[p + "conv.weight"]
    y = F.conv2d(x, weight, sd.get(p + "conv.bias"), stride, weight.shape[-1] // 2)
    if p + "bn.weight" in sd:
        y = _bn(y, sd, p + "bn.")
    return F.relu(y) if relu else y


def _repmlp(x: Tensor, sd: dict[str, Tensor], p: str, h: int, w: int) -> Tensor:
    """Official RepMLP.forward on the official keys (train-time or deploy)."""
    n, C, H, W = x.shape
    hp, wp = H // h, W // w
    if p + "fc1_fc2.fc1.weight" in sd:  # Global Perceptron
        v = F.avg_pool2d(x, (h, w))
        if p + "avg.bn.weight" in sd:
            v = _bn(v, sd, p + "avg.bn.")
        v = v.reshape(-1, C * hp * wp)
        v = F.relu(F.linear(v, sd[p + "fc1_fc2.fc1.weight"], sd[p + "fc1_fc2.fc1.bias"]))
        v = F.linear(v, sd[p + "fc1_fc2.fc2.weight"], sd[p + "fc1_fc2.fc2.bias"])
        x6 = x.reshape(-1, C, hp, h, wp, w) + v.reshape(-1, C, hp, 1, wp, 1)
    else:
        x6 = x.reshape(-1, C, hp, h, wp, w)
    parts = x6.permute(0, 2, 4, 1, 3, 5)
    fc3_w = sd[p + "fc3.weight"]
    groups = C * h * w // fc3_w.shape[1]
    O = fc3_w.shape[0] // (h * w)
    out = F.conv2d(parts.reshape(-1, C * h * w, 1, 1), fc3_w, sd.get(p + "fc3.bias"), groups=groups)
    out = out.reshape(-1, O * h * w)
    if p + "fc3_bn.weight" in sd:  # BatchNorm1d
        out = _bn(out, sd, p + "fc3_bn.")
    out = out.reshape(-1, hp, wp, O, h, w)
    ks = sorted({int(m.group(1)) for k in sd for m in [re.match(re.escape(p) + r"repconv(\d+)\.conv\.weight$", k)] if m})
    if ks:
        conv_in = parts.reshape(-1, C, h, w)
        conv_out = 0
        for k in ks:
            y = F.conv2d(conv_in, sd[f"{p}repconv{k}.conv.weight"], None, 1, k // 2, 1, groups)
            conv_out = conv_out + _bn(y, sd, f"{p}repconv{k}.bn.")
        out = out + conv_out.reshape(-1, hp, wp, O, h, w)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(-1, O, H, W)


def _shortcut(x: Tensor, sd: dict[str, Tensor], p: str, stride: int) -> Tensor:
    return _convbn(x, sd, p + "shortcut.", stride, relu=False) if p + "shortcut.conv.weight" in sd else x


def official_forward(sd: dict[str, Tensor], x: Tensor, h: int, w: int) -> Tensor:
    """RepMLPResNet.forward of the official v1 code, from its state dict alone."""
    x = _convbn(x, sd, "stage0.0.", stride=2)
    x = F.max_pool2d(x, 3, 2, 1)
    for s in range(1, 5):
        j = 0
        while any(k.startswith(f"stage{s}.{j}.") for k in sd):
            p = f"stage{s}.{j}."
            stride = 2 if s > 1 and j == 0 else 1
            if p + "btnk_repmlp.fc3.weight" in sd:
                out = _convbn(_convbn(x, sd, p + "btnk_conv1."), sd, p + "btnk_conv2.")
                out = F.relu(_repmlp(out, sd, p + "btnk_repmlp.", h, w))
                out = _convbn(_convbn(out, sd, p + "btnk_conv4."), sd, p + "btnk_conv5.", relu=False)
            elif p + "light_repmlp.fc3.weight" in sd:
                out = F.relu(_repmlp(_convbn(x, sd, p + "light_conv1."), sd, p + "light_repmlp.", h, w))
                out = _convbn(out, sd, p + "light_conv3.", relu=False)
            else:  # BaseBlock: stride on the 3x3
                out = _convbn(_convbn(x, sd, p + "conv1."), sd, p + "conv2.", stride)
                out = _convbn(out, sd, p + "conv3.", relu=False)
            x = F.relu(out + _shortcut(x, sd, p, stride))
            j += 1
    return F.linear(x.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


def _input(arch: str, batch: int = 2) -> Tensor:
    size = 224 if "224" in arch else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def _check_against_reference(model, official_sd: dict[str, Tensor], arch: str, batch: int = 2) -> float:
    x = _input(arch, batch)
    h = PARTITION[arch]
    with torch.no_grad():
        reference = official_forward(official_sd, x, h, h)
        ours = model.eval()(x)
    return max_relative_error(reference, ours)


# ----------------------------------------------------------------- key names from repmlp.md
@pytest.mark.parametrize("arch, expected", [
    ("repmlp_res50_g8_224", {
        "stage0.0.conv.weight": (64, 3, 7, 7),
        "stage3.1.btnk_repmlp.fc3.weight": (3136, 392, 1, 1),
        "stage3.1.btnk_repmlp.fc3_bn.running_var": (3136,),
        "stage3.1.btnk_repmlp.fc1_fc2.fc1.weight": (256, 256),
        "stage3.1.btnk_repmlp.fc1_fc2.fc2.bias": (256,),
        "stage3.1.btnk_repmlp.avg.bn.weight": (64,),
        "stage3.1.btnk_repmlp.repconv1.conv.weight": (64, 8, 1, 1),
        "stage3.1.btnk_repmlp.repconv5.conv.weight": (64, 8, 5, 5),
        "stage3.1.btnk_conv2.conv.weight": (64, 256, 3, 3),
        "stage2.1.btnk_repmlp.fc3.weight": (3136, 392, 1, 1),
        "stage2.1.btnk_repmlp.fc1_fc2.fc1.weight": (1024, 1024),
        "stage3.0.shortcut.conv.weight": (1024, 512, 1, 1),
        "stage4.2.conv3.bn.num_batches_tracked": (),
        "linear.weight": (1000, 2048),
    }),
    ("repmlp_res50_light_224", {
        "stage2.1.light_repmlp.fc3.weight": (3136, 784, 1, 1),
        "stage2.1.light_repmlp.fc1_fc2.fc1.weight": (1024, 1024),
        "stage3.5.light_conv1.conv.weight": (128, 1024, 1, 1),
        "stage3.5.light_repmlp.repconv3.conv.weight": (128, 32, 3, 3),
        "stage3.5.light_conv3.bn.weight": (1024,),
    }),
])
def test_official_key_names_and_shapes_round_trip(arch, expected):
    torch.manual_seed(0)
    ours = create(arch).state_dict()
    official = to_official(ours)
    for key, shape in expected.items():
        assert tuple(official[key].shape) == shape, key
    kind = "btnk" if "g8" in arch else "light"
    assert len({k.split(f".{kind}_repmlp.")[0] for k in official if f".{kind}_repmlp." in k}) == 8
    converted = convert_official_state_dict(official, arch)
    assert list(converted) == list(ours)
    assert all(converted[k] is ours[k] for k in ours)


# ----------------------------------------------------------------- equality with the official forward
WRAPPINGS = {
    "bare": lambda sd: sd,
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "lightning": lambda sd: {"state_dict": sd, "epoch": 3},
    "lightning_ddp": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("arch", TINY)
def test_load_official_matches_official_forward(tmp_path, arch, deploy):
    official = make_official(arch, deploy)
    assert any(".bn." in k for k in official) != deploy
    for name, wrap in WRAPPINGS.items():
        path = tmp_path / f"{name}.pth"
        torch.save(wrap(official), path)
        model = load_official(path, arch)
        assert model.deploy is deploy and model.num_classes == 10
        assert _check_against_reference(model, official, arch) <= 1e-5, name


def test_train_and_deploy_official_checkpoints_agree(tmp_path):
    """An official train checkpoint and its deploy form give the same outputs through load_official."""
    arch = "repmlp_res_tiny"
    torch.save(make_official(arch, False, seed=3), tmp_path / "train.pth")
    torch.save(make_official(arch, True, seed=3), tmp_path / "deploy.pth")
    x = _input(arch)
    train, deploy = load_official(tmp_path / "train.pth", arch).eval(), load_official(tmp_path / "deploy.pth", arch)
    with torch.no_grad():
        assert max_relative_error(train(x), deploy.eval()(x)) <= 1e-5


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_res50_bottleneck_224_matches_official_forward(tmp_path, deploy):
    arch = "repmlp_res50_g8_224"
    official = make_official(arch, deploy, seed=5)
    path = tmp_path / "official.pth"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    model = load_official(path, arch)
    assert model.deploy is deploy and model.num_classes == 1000
    assert _check_against_reference(model, official, arch, batch=1) <= 1e-5


# ----------------------------------------------------------------- errors
def test_checkpoint_of_another_arch_names_arch_and_file(tmp_path):
    path = tmp_path / "bottleneck.pth"
    torch.save(make_official("repmlp_res_tiny", False), path)
    with pytest.raises(ValueError) as err:
        load_official(path, "repmlp_res_light_tiny")
    message = str(err.value)
    assert str(path) in message and "repmlp_res_light_tiny" in message
    assert "missing key" in message and "unexpected key" in message


def test_mode_mismatch_is_explained(tmp_path):
    path = tmp_path / "deploy.pth"
    torch.save(make_official("repmlp_res_tiny", True), path)
    with pytest.raises(ValueError, match="checkpoint is in deploy form; build the model with deploy=True"):
        load_official(path, "repmlp_res_tiny", deploy=False)
    torch.save(make_official("repmlp_res_tiny", False), path)
    with pytest.raises(ValueError, match="checkpoint is in train-time form; build the model with deploy=False"):
        load_official(path, "repmlp_res_tiny", deploy=True)


def test_unmapped_and_foreign_keys(tmp_path):
    official = make_official("resnet_tiny", False)
    with pytest.raises(ValueError, match=r"not an official.*head\.weight"):
        convert_official_state_dict({**official, "head.weight": torch.zeros(1)}, "resnet_tiny")
    ours = create("resnet_tiny").state_dict()
    with pytest.raises(ValueError, match="already in this project's layout"):
        convert_official_state_dict(ours, "resnet_tiny")
    # A key inside a known stage that the official model never has: strict load names it.
    path = tmp_path / "extra.pth"
    torch.save({**official, "stage1.0.conv9.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected key\(s\): layer1\.0\.conv9\.conv\.weight"):
        load_official(path, "resnet_tiny")


def test_official_cli_round_trip(tmp_path):
    arch = "repmlp_res_tiny"
    official = make_official(arch, False, seed=9)
    src, dst = tmp_path / "official.pth", tmp_path / "ours.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}}, src)
    proc = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", arch, str(src), str(dst)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train-time" in proc.stdout and str(dst) in proc.stdout
    state_dict, meta = load_state_dict_file(dst)
    assert meta["arch"] == arch and meta["deploy"] is False and meta["model_kwargs"]["num_classes"] == 10
    model = load_into(create(arch, deploy=meta["deploy"], **meta["model_kwargs"]), state_dict, str(dst), arch)
    assert _check_against_reference(model, official, arch) <= 1e-5

    bad = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", "resnet_tiny", str(src), str(dst), "--overwrite"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "resnet_tiny" in bad.stderr and str(src) in bad.stderr


def test_official_cli_destination(tmp_path, capsys):
    """The source is never the destination; an existing destination needs --overwrite."""
    arch = "repmlp_res_tiny"
    src, dst = tmp_path / "official.pth", tmp_path / "ours.safetensors"
    torch.save(make_official(arch, False), src)
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    for same in (src, tmp_path / "link.pth"):
        assert official_main(["--arch", arch, str(src), str(same), "--overwrite"]) == 1
        assert f"the destination {same} is the source {src}" in capsys.readouterr().err
    assert src.read_bytes() == before
    dst.write_bytes(b"keep me")
    assert official_main(["--arch", arch, str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"the destination {dst} already exists" in err and "--overwrite" in err
    assert dst.read_bytes() == b"keep me"
    assert official_main(["--arch", arch, str(src), str(dst), "--overwrite"]) == 0
    state_dict, meta = load_state_dict_file(dst)
    assert meta["arch"] == arch and set(state_dict) == set(create(arch).state_dict())
