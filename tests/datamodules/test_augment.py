"""RandAugment and random erasing (timm's semantics) and the ImageNet pipeline's augmentation options.

Expected values are written out by hand from timm's definitions (timm/data/auto_augment.py,
random_erasing.py), or computed with numpy independently of the code under test.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import get_args

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from datamodules.augment import (ERASING_MODES, RAND_INCREASING_OPS, RAND_OPS, RandAugment, RandomErasing, apply_op,
                                 fill_colour, op_args, parse_rand_augment)
from datamodules.image_folder import ImageFolder, SeedPerStepCompose, find_classes, list_samples
from datamodules.imagenet import ErasingMode, ImageNetDataModule, eval_transform, train_transform
from datamodules.seeded_sampler import SampleKey

# timm's _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, copied by hand
TIMM_RAND = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
TIMM_RAND_INC = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                 "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                 "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
IMAGENET_FILL = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406))


def _image(h: int = 24, w: int = 30, seed: int = 0) -> np.ndarray:
    """Random pixels over a gradient, so that every op changes something."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(0.5 * ramp + 0.5 * rng.integers(0, 256, (h, w, 3)), 0, 255).astype(np.uint8)


def _draws(transform: RandAugment, count: int, seed: int = 0) -> list[tuple]:
    """The ops of ``count`` parameter draws from one seeded stream."""
    transform.set_random_seed(seed)
    return [transform.get_params()["ops"] for _ in range(count)]


# --------------------------------------------------------------------------- parsing and op lists
def test_op_lists_and_order_equal_timms():
    assert list(RAND_OPS) == TIMM_RAND and list(RAND_INCREASING_OPS) == TIMM_RAND_INC
    assert list(RandAugment("rand-m9-mstd0.5").ops) == TIMM_RAND
    assert list(RandAugment("rand-m9-mstd0.5-inc1").ops) == TIMM_RAND_INC
    assert list(RandAugment("rand-m9-mstd0.5-inc0").ops) == TIMM_RAND  # timm's bool('0') quirk not copied


@pytest.mark.parametrize("config, expected", [
    ("rand-m9-mstd0.5", dict(magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5, magnitude_max=None, increasing=False)),
    ("rand-m9-mstd0.5-inc1", dict(magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5, magnitude_max=None, increasing=True)),
    ("rand-m7-mstd0.5-inc1", dict(magnitude=7, num_ops=2, prob=0.5, magnitude_std=0.5, magnitude_max=None, increasing=True)),
    ("rand", dict(magnitude=10, num_ops=2, prob=0.5, magnitude_std=0.0, magnitude_max=None, increasing=False)),
    ("rand-inc1-n3-p0.7-m12-mmax15", dict(magnitude=12, num_ops=3, prob=0.7, magnitude_std=0.0, magnitude_max=15, increasing=True)),
    ("rand-m9-mstd101", dict(magnitude=9, num_ops=2, prob=0.5, magnitude_std=math.inf, magnitude_max=None, increasing=False)),
])
def test_config_strings_parse_to_timms_settings(config, expected):
    parsed = parse_rand_augment(config)
    assert {k: getattr(parsed, k) for k in expected} == expected


@pytest.mark.parametrize("config, message", [
    ("", r"must start with 'rand'"),
    ("rnd-m9", r"must start with 'rand', not 'rnd'"),
    ("rand-x9", r"unknown key 'x'"),
    ("rand-tweights", r"unknown key 'tweights'"),
    ("rand-m", r"section 'm' has no value"),
    ("rand--m9", r"malformed section ''"),
    ("rand-m9.5", r"'9.5' is not an integer"),
    ("rand-mstd0.5.1", r"'0.5.1' is not a number"),
    ("rand-m9-m7", r"key 'm' given twice"),
    ("rand-p1.5", r"p must be in \[0, 1\]"),
    ("rand-n0", r"n must be >= 1"),
    ("rand-inc2", r"inc must be 0 or 1"),
    ("rand-m12", r"m must be in \[0, 10\], got 12 \(add mmax12"),
    ("rand-m12-mmax11", r"m must be in \[0, 11\]"),
])
def test_bad_rand_augment_strings_name_the_option(config, message):
    with pytest.raises(ValueError, match=r"data\.rand_augment: .*" + message) as info:
        parse_rand_augment(config)
    assert repr(config) in str(info.value)
    with pytest.raises(ValueError, match=r"data\.rand_augment"):
        ImageNetDataModule(rand_augment=config, num_workers=0)


# --------------------------------------------------------------------------- magnitude → argument
# hand-computed from timm's level functions at m = 0, 3, 5, 9, 10 (sign +)
MAGNITUDES = (0, 3, 5, 9, 10)
EXPECTED_ARGS = {
    "Rotate": (0.0, 9.0, 15.0, 27.0, 30.0),  # 30 m / 10 degrees
    "Posterize": (0, 1, 2, 3, 4),  # int(4 m / 10) bits
    "PosterizeIncreasing": (4, 3, 2, 1, 0),  # 4 - int(4 m / 10)
    "Solarize": (0, 76, 128, 230, 256),  # int(256 m / 10)
    "SolarizeIncreasing": (256, 180, 128, 26, 0),  # 256 - int(256 m / 10)
    "SolarizeAdd": (0, 33, 55, 99, 110),  # int(110 m / 10)
    "Color": (0.1, 0.64, 1.0, 1.72, 1.9),  # 0.1 + 1.8 m / 10
    "ColorIncreasing": (1.0, 1.27, 1.45, 1.81, 1.9),  # 1 + 0.9 m / 10
    "ShearX": (0.0, 0.09, 0.15, 0.27, 0.3),  # 0.3 m / 10
    "TranslateYRel": (0.0, 0.135, 0.225, 0.405, 0.45),  # 0.45 m / 10
}
NEGATED = {  # the same with timm's random sign drawn negative
    "Rotate": (-0.0, -9.0, -15.0, -27.0, -30.0),
    "ColorIncreasing": (1.0, 0.73, 0.55, 0.19, 0.1),  # max(0.1, 1 - 0.9 m / 10)
    "ShearX": (-0.0, -0.09, -0.15, -0.27, -0.3),
    "TranslateYRel": (-0.0, -0.135, -0.225, -0.405, -0.45),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ARGS))
def test_magnitude_to_argument_matches_timms_level_functions(name):
    for m, expected in zip(MAGNITUDES, EXPECTED_ARGS[name]):
        (arg,) = op_args(name, m)
        assert arg == pytest.approx(expected, abs=1e-12) and type(arg) is type(expected), (name, m)
    for m, expected in zip(MAGNITUDES, NEGATED.get(name, EXPECTED_ARGS[name])):  # unsigned ops ignore the sign
        assert op_args(name, m, negate=True)[0] == pytest.approx(expected, abs=1e-12), (name, m)


def test_other_ops_share_the_rules():
    for base in ("Contrast", "Brightness", "Sharpness"):
        assert op_args(base, 9) == op_args("Color", 9)
        assert op_args(base + "Increasing", 9, negate=True) == op_args("ColorIncreasing", 9, negate=True)
    assert op_args("ShearY", 7, negate=True) == op_args("ShearX", 7, negate=True) == (pytest.approx(-0.21),)
    assert op_args("TranslateXRel", 9) == op_args("TranslateYRel", 9)
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert op_args(name, 9) == ()
    assert op_args("ColorIncreasing", 12, negate=True) == (0.1,)  # m > 10 (mmax): timm floors the factor at 0.1
    assert op_args("SolarizeAdd", 12) == (128,)  # and caps SolarizeAdd at 128
    with pytest.raises(ValueError, match="unknown RandAugment op 'Cutout'"):
        op_args("Cutout", 5)


def test_signed_ops_draw_their_sign_evenly_and_keep_the_magnitude():
    draws = _draws(RandAugment("rand-m9-n1-p1-inc1"), 3000)
    by_name: dict[str, list[float]] = {}
    for (op,) in draws:
        by_name.setdefault(op.name, []).append(op.args[0] if op.args else None)
    assert set(by_name) == set(TIMM_RAND_INC)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        values = np.array(by_name[name])
        assert set(np.round(np.abs(values), 9)) == {round(op_args(name, 9)[0], 9)}
        assert 0.35 < (values < 0).mean() < 0.65, name
    contrast = np.array(by_name["ContrastIncreasing"])
    assert set(np.round(contrast, 9)) == {1.81, 0.19} and 0.35 < (contrast < 1).mean() < 0.65
    assert set(by_name["SolarizeIncreasing"]) == {26} and set(by_name["PosterizeIncreasing"]) == {1}


# --------------------------------------------------------------------------- op images
def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image, "RGB")


def test_point_ops_are_pixel_exact():
    """Checked against numpy formulas, not against PIL."""
    x = _image()
    pil = _pil(x)
    run = lambda name, m: np.asarray(apply_op(pil, name, op_args(name, m), IMAGENET_FILL)).astype(int)
    xi = x.astype(int)
    assert np.array_equal(run("Invert", 9), 255 - xi)
    assert np.array_equal(run("Solarize", 5), np.where(xi >= 128, 255 - xi, xi))  # threshold 128
    assert np.array_equal(run("SolarizeIncreasing", 9), np.where(xi >= 26, 255 - xi, xi))
    assert np.array_equal(run("SolarizeAdd", 9), np.where(xi < 128, np.minimum(255, xi + 99), xi))
    assert np.array_equal(run("Posterize", 7), xi & 0b11000000)  # int(2.8) = 2 bits
    assert np.array_equal(run("PosterizeIncreasing", 9), xi & 0b10000000)  # 4 - 3 = 1 bit
    assert np.array_equal(run("PosterizeIncreasing", 10), np.zeros_like(xi))  # 0 bits (recent Pillow refuses it)
    lo, hi = xi.min(axis=(0, 1)), xi.max(axis=(0, 1))  # AutoContrast: each channel stretched to 0..255
    stretched = run("AutoContrast", 0)
    assert np.array_equal(stretched.min(axis=(0, 1)), [0, 0, 0]) and np.array_equal(stretched.max(axis=(0, 1)), [255] * 3)
    assert np.abs(stretched - (xi - lo) * 255.0 / (hi - lo)).max() <= 1
    gray = np.full_like(x, 100)
    assert np.array_equal(np.asarray(apply_op(_pil(gray), "Brightness", (1.5,), IMAGENET_FILL)), np.full_like(x, 150))


def test_geometric_ops_fill_and_shift():
    x = _image(24, 30)
    # TranslateXRel at m=10: 0.45 * 30 = 13.5 px; at an integer shift the resampling is an exact copy
    shift = np.asarray(apply_op(_pil(x), "TranslateXRel", (10 / 30,), IMAGENET_FILL, Image.Resampling.BICUBIC))
    assert np.array_equal(shift[:, :20], x[:, 10:]) and (shift[:, 20:] == IMAGENET_FILL).all()
    down = np.asarray(apply_op(_pil(x), "TranslateYRel", (-6 / 24,), IMAGENET_FILL))  # negative: content moves down
    assert np.array_equal(down[6:], x[:-6]) and (down[:6] == IMAGENET_FILL).all()
    # Rotate 45 degrees: the corners come from outside the image, the centre stays
    rotated = np.asarray(apply_op(_pil(x), "Rotate", (45.0,), IMAGENET_FILL, Image.Resampling.BICUBIC))
    for corner in (rotated[0, 0], rotated[0, -1], rotated[-1, 0], rotated[-1, -1]):
        assert tuple(corner) == IMAGENET_FILL
    expected = _pil(x).rotate(45.0, resample=Image.Resampling.BICUBIC, fillcolor=IMAGENET_FILL)
    assert np.array_equal(rotated, np.asarray(expected))
    # ShearX 0.3: output (x, y) samples input (x + 0.3 y, y); row 0 is unchanged
    shear = np.asarray(apply_op(_pil(x), "ShearX", (0.3,), IMAGENET_FILL, Image.Resampling.BILINEAR))
    expected = _pil(x).transform((30, 24), Image.Transform.AFFINE, (1, 0.3, 0, 0, 1, 0),
                                 resample=Image.Resampling.BILINEAR, fillcolor=IMAGENET_FILL)
    assert np.array_equal(shear, np.asarray(expected))
    assert (shear[-1, -3:] == IMAGENET_FILL).all() and not (shear[0, -3:] == IMAGENET_FILL).all()
    assert fill_colour((0.485, 0.456, 0.406)) == IMAGENET_FILL


def test_transform_output_is_the_recorded_ops_applied_in_order():
    x = _image()
    transform = RandAugment("rand-m9-mstd0.5-n3-p1-inc1", fill=IMAGENET_FILL, interpolation="bicubic")
    transform.set_random_seed(5)
    for _ in range(20):
        out = transform(image=x)["image"]
        ops = transform.get_applied_params()["ops"]
        expected = _pil(x)
        for op in ops:
            expected = apply_op(expected, op.name, op.args, IMAGENET_FILL, Image.Resampling.BICUBIC)
        assert len(ops) == 3 and out.dtype == np.uint8 and out.shape == x.shape
        assert np.array_equal(out, np.asarray(expected))
    with pytest.raises(TypeError, match=r"RGB uint8 image .*before Normalize"):
        transform(image=x.astype(np.float32))


# --------------------------------------------------------------------------- sampling
def test_magnitude_noise_mean_std_and_clipping():
    mags = np.array([op.magnitude for (op,) in _draws(RandAugment("rand-m9-mstd0.5-n1-p1"), 4000)])
    assert mags.min() >= 0 and mags.max() <= 10
    assert abs(mags.mean() - 9) < 0.04 and abs(mags.std() - 0.5) < 0.04  # N(9, 0.5); 2% clipped at 10
    assert 0.01 < (mags == 10).mean() < 0.04  # P(N(9, 0.5) > 10) = 2.3%
    exact = {op.magnitude for (op,) in _draws(RandAugment("rand-m9-n1-p1"), 200)}
    assert exact == {9.0}
    top = np.array([op.magnitude for (op,) in _draws(RandAugment("rand-m10-mstd0.5-n1-p1"), 2000)])
    assert top.max() == 10 and 0.45 < (top == 10).mean() < 0.55  # half the draws above 10 are clipped
    raised = np.array([op.magnitude for (op,) in _draws(RandAugment("rand-m10-mstd0.5-mmax12-n1-p1"), 2000)])
    assert raised.max() <= 12 and 0.45 < (raised > 10).mean() < 0.55
    uniform = np.array([op.magnitude for (op,) in _draws(RandAugment("rand-m9-mstd101-n1-p1"), 4000)])
    assert uniform.min() >= 0 and uniform.max() <= 9 and abs(uniform.mean() - 4.5) < 0.15 and abs(uniform.std() - 9 / 12 ** 0.5) < 0.1


def test_each_op_applies_with_probability_p_and_ops_are_drawn_with_replacement():
    counts = np.array([len(ops) for ops in _draws(RandAugment("rand-m9-mstd0.5"), 4000)])
    assert counts.max() <= 2 and abs(counts.mean() - 1.0) < 0.05  # n=2, p=0.5: Binomial(2, 0.5)
    assert all(abs((counts == k).mean() - f) < 0.03 for k, f in ((0, 0.25), (1, 0.5), (2, 0.25)))
    assert {len(ops) for ops in _draws(RandAugment("rand-m9-n3-p1"), 200)} == {3}
    assert abs(np.mean([len(ops) for ops in _draws(RandAugment("rand-m9-n4-p0.2"), 2000)]) - 0.8) < 0.06
    pairs = _draws(RandAugment("rand-m9-n2-p1"), 3000)
    names = [op.name for ops in pairs for op in ops]
    frequencies = np.array([names.count(n) for n in TIMM_RAND]) / len(names)
    assert np.abs(frequencies - 1 / 15).max() < 0.02  # uniform over the 15 ops
    assert abs(np.mean([a.name == b.name for a, b in pairs]) - 1 / 15) < 0.02  # with replacement


def test_randomness_is_only_the_transforms_own_seeded_generator():
    x = _image()
    transform = RandAugment("rand-m9-mstd0.5-n2-p1")
    outputs = []
    for seed, global_seed in ((7, 0), (7, 1), (8, 0)):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        transform.set_random_seed(seed)
        outputs.append(transform(image=x)["image"])
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])


# --------------------------------------------------------------------------- random erasing
def _erase(transform: RandomErasing, image: np.ndarray, seed: int) -> tuple[np.ndarray, tuple]:
    transform.set_random_seed(seed)
    out = transform(image=image)["image"]
    return out, transform.get_applied_params().get("boxes", ())


def test_erasing_probability_area_aspect_and_untouched_pixels():
    h, w = 128, 128
    image = np.random.default_rng(0).standard_normal((h, w, 3)).astype(np.float32)
    transform = RandomErasing(0.25, mode="const")
    erased, areas, aspects = 0, [], []
    for seed in range(1500):
        out, boxes = _erase(transform, image, seed)
        changed = (out != image).any(axis=2)
        assert len(boxes) <= 1
        if not boxes:
            assert out is image or np.array_equal(out, image)
            continue
        erased += 1
        (box,) = boxes
        mask = np.zeros((h, w), bool)
        mask[box.top:box.top + box.height, box.left:box.left + box.width] = True
        assert np.array_equal(changed, mask)  # exactly the box is erased, to 0; the rest is untouched
        assert (out[mask] == 0).all() and np.array_equal(out[~mask], image[~mask])
        assert box.top + box.height <= h and box.left + box.width <= w
        areas.append(box.height * box.width / (h * w))
        aspects.append(box.height / box.width)
    assert abs(erased / 1500 - 0.25) < 0.035
    areas, aspects = np.array(areas), np.array(aspects)
    # h, w are rounded to pixels: allow that much around [0.02, 1/3] and [0.3, 3.33]
    assert areas.min() > 0.02 * 0.8 and areas.max() < 1 / 3 * 1.1
    assert areas.min() < 0.03 and areas.max() > 0.3  # the whole range is used
    assert aspects.min() > 0.3 * 0.8 and aspects.max() < 1 / 0.3 * 1.2 and aspects.min() < 0.4 and aspects.max() > 2.5
    assert 0.4 < (aspects < 1).mean() < 0.6  # log-uniform: symmetric about 1 (a uniform ratio would give 26%)
    assert abs(np.mean(areas) - np.mean([0.02, 1 / 3])) < 0.03  # area uniform on [0.02, 1/3]


def test_erasing_modes_fill_values():
    image = np.full((64, 64, 3), 5.0, np.float32)
    pixel = RandomErasing(1.0, mode="pixel")
    values = []
    for seed in range(40):
        out, (box,) = _erase(pixel, image, seed)
        patch = out[box.top:box.top + box.height, box.left:box.left + box.width]
        assert np.array_equal(patch, box.fill) and patch.shape == (box.height, box.width, 3)
        values.append(patch.reshape(-1))
    values = np.concatenate(values)
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02  # per-pixel, per-channel N(0, 1)
    rand = RandomErasing(1.0, mode="rand")
    colours = []
    for seed in range(600):
        out, (box,) = _erase(rand, image, seed)
        patch = out[box.top:box.top + box.height, box.left:box.left + box.width].reshape(-1, 3)
        assert (patch == patch[0]).all()  # one colour per box
        colours.append(patch[0])
    colours = np.array(colours)
    assert np.abs(colours.mean(0)).max() < 0.15 and np.abs(colours.std(0) - 1).max() < 0.1
    assert np.abs(np.corrcoef(colours.T) - np.eye(3)).max() < 0.15  # channels drawn independently
    out, (box,) = _erase(RandomErasing(1.0, mode="const"), image, 0)
    assert (out[box.top:box.top + box.height, box.left:box.left + box.width] == 0).all()
    with pytest.raises(TypeError, match="after Normalize on a float image"):
        RandomErasing(1.0)(image=np.zeros((8, 8, 3), np.uint8))


def test_erasing_count_boxes_and_their_area():
    image = np.zeros((128, 128, 3), np.float32)
    transform = RandomErasing(1.0, mode="pixel", max_count=3)
    counts, areas = [], {1: [], 3: []}
    for seed in range(900):
        _, boxes = _erase(transform, image, seed)
        counts.append(len(boxes))
        if len(boxes) in areas:
            areas[len(boxes)] += [b.height * b.width / 128 ** 2 for b in boxes]
    counts = np.array(counts)
    assert set(counts) == {1, 2, 3} and all(abs((counts == k).mean() - 1 / 3) < 0.06 for k in (1, 2, 3))
    # the area range is divided by the count: [0.02, 1/3] / 3
    assert max(areas[3]) < 1 / 9 * 1.1 and abs(np.mean(areas[3]) * 3 - np.mean(areas[1])) < 0.03


@pytest.mark.parametrize("kwargs, message", [
    (dict(probability=1.5), r"probability must be in \[0, 1\], got 1.5"),
    (dict(mode="noise"), r"mode must be one of .*got 'noise'"),
    (dict(min_count=0), r"min_count=0"),
    (dict(min_count=3, max_count=2), r"min_count=3, max_count=2"),
    (dict(area=(0.5, 0.2)), r"area must satisfy"),
    (dict(min_aspect=0.0), r"aspect range"),
])
def test_bad_erasing_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomErasing(**kwargs)


# --------------------------------------------------------------------------- the ImageNet pipeline
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aug_data")
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(root / split / name / f"{i}.png"), _image(40, 52, seed=10 * c + i))
    return root


def test_default_pipeline_is_unchanged():
    """Defaults give exactly the tensors of the pipeline before these options existed."""
    x = _image(60, 80)
    before = SeedPerStepCompose([
        A.RandomResizedCrop(size=(32, 32), scale=(0.5, 1.0)), A.HorizontalFlip(p=0.5),
        A.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), ToTensorV2(),
    ])
    now = train_transform(32, scale=(0.5, 1.0))
    assert [type(t) for t in now.transforms] == [type(t) for t in before.transforms]
    for seed in range(5):
        before.set_random_seed(seed)
        now.set_random_seed(seed)
        assert torch.equal(before(image=x)["image"], now(image=x)["image"])


def test_pipeline_order_interpolation_and_fill():
    pipeline = train_transform(32, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, erasing_mode="rand",
                               erasing_count=2, interpolation="bicubic")
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "RandAugment", "Normalize", "RandomErasing", "ToTensorV2"]
    crop, _, ra, _, erasing, _ = pipeline.transforms
    assert crop.interpolation == cv2.INTER_CUBIC and ra.interpolation == "bicubic" and ra.fill == IMAGENET_FILL
    assert (erasing.probability, erasing.mode, erasing.min_count, erasing.max_count) == (0.25, "rand", 1, 2)
    assert train_transform(32).transforms[0].interpolation == cv2.INTER_LINEAR
    assert eval_transform(32, interpolation="bicubic").transforms[0].interpolation == cv2.INTER_CUBIC
    assert eval_transform(32).transforms[0].interpolation == cv2.INTER_LINEAR
    assert set(get_args(ErasingMode)) == set(ERASING_MODES)
    out = pipeline(image=_image(60, 80))["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_augmented_samples_are_a_function_of_the_sample_seed(folder):
    def dataset() -> ImageFolder:
        samples = list_samples(folder / "train", find_classes(folder / "train"))
        return ImageFolder(samples, train_transform(32, scale=(0.3, 1.0), rand_augment="rand-m9-mstd0.5-n3-p1-inc1",
                                                    random_erasing=0.5, interpolation="bicubic"))

    keys = [SampleKey(i % 6, 1000 + i) for i in range(12)]
    first = dataset()
    a = [first[k][0] for k in keys]
    other = dataset()  # another worker: fresh transforms, keys in another order, global RNGs moved
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    b = {k: other[k][0] for k in reversed(keys)}
    assert all(torch.equal(a[i], b[k]) for i, k in enumerate(keys))
    assert torch.equal(first[keys[3]][0], a[3])  # repeated in the same worker
    changed = first[SampleKey(keys[3].index, 7)][0]
    assert not torch.equal(changed, a[3])
    # RandAugment (p=1) and erasing both act: samples of one image differ beyond the crop
    assert len({tuple(first[SampleKey(0, s)][0].flatten()[:50].tolist()) for s in range(8)}) == 8


def test_datamodule_arguments_and_batches(folder):
    kwargs = dict(root=str(folder), image_size=32, batch_size=4, num_workers=0, pin_memory=False)
    dm = ImageNetDataModule(**kwargs, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                            erasing_mode="pixel", erasing_count=1, interpolation="bicubic")
    assert dm.hparams.rand_augment == "rand-m9-mstd0.5-inc1" and dm.hparams.interpolation == "bicubic"
    dm.setup("fit")
    names = [type(t).__name__ for t in dm.datasets["train"].transform.transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "RandAugment", "Normalize", "RandomErasing", "ToTensorV2"]
    assert dm.datasets["val"].transform.transforms[0].interpolation == cv2.INTER_CUBIC
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    plain = ImageNetDataModule(**kwargs)
    plain.setup("fit")
    assert [type(t).__name__ for t in plain.datasets["train"].transform.transforms] == [
        "RandomResizedCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(random_erasing=1.5), r"data\.random_erasing must be a probability in \[0, 1\], got 1\.5"),
    (dict(random_erasing=-0.1), r"data\.random_erasing .*got -0\.1"),
    (dict(erasing_mode="noise"), r"data\.erasing_mode must be one of \['const', 'rand', 'pixel'\], got 'noise'"),
    (dict(erasing_count=0), r"data\.erasing_count must be an integer >= 1, got 0"),
    (dict(interpolation="nearest"), r"data\.interpolation must be one of \['bilinear', 'bicubic'\], got 'nearest'"),
    (dict(rand_augment="rand-m9-foo1"), r"data\.rand_augment: unknown key 'foo'"),
])
def test_bad_datamodule_arguments_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageNetDataModule(num_workers=0, **kwargs)
