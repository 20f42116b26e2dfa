"""RandAugment with timm's semantics, as an albumentations transform on RGB ``uint8`` images.

timm's ``rand_augment_transform`` (``timm/data/auto_augment.py``), whose config strings recipes
quote (``rand-m9-mstd0.5-inc1``: RepLKNet, DeiT, ConvNeXt), is reproduced here:

- ``n`` ops (default 2) are drawn uniformly *with replacement* from :data:`RAND_OPS` (or
  :data:`RAND_INCREASING_OPS` with ``inc1``); each is applied with probability ``p`` (0.5);
- an applied op's magnitude is ``m`` (0–10 scale), or, with ``mstd`` > 0, a draw from
  ``N(m, mstd)`` (uniform on ``[0, m]`` when ``mstd`` > 100), clipped to ``[0, mmax]`` (``mmax``
  default 10);
- :func:`op_args` maps the magnitude to the op's argument exactly as timm's level functions do,
  negating it with probability 1/2 for the symmetric ops (:data:`SIGNED_OPS`);
- the ops are PIL's ``ImageOps`` / ``ImageEnhance`` / affine ``transform`` calls timm makes, with the
  fill colour ``round(255 * mean)`` and the configured interpolation for the geometric ones.

Randomness comes only from the transform's albumentations generator (``self.py_random``), which
:class:`~datamodules.image_folder.SeedPerStepCompose` seeds per sample from the sampler's
:class:`~datamodules.seeded_sampler.SampleKey`: a sample's augmentation is a function of its seed.
The draws differ from timm's (other generator, other order of draws); their distributions do not.

Two deliberate differences from timm's parser: ``inc0`` means the plain op list (timm's
``bool('0')`` turns ``inc0`` into ``inc1``), and what timm ignores or clips silently is an error
here (an unknown or repeated key, a section without a value, ``m`` above the cap).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Sequence

import albumentations as A
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "LEVEL_DENOM",
    "RAND_OPS",
    "RAND_INCREASING_OPS",
    "SIGNED_OPS",
    "RandAugmentConfig",
    "AppliedOp",
    "parse_rand_augment",
    "op_args",
    "apply_op",
    "fill_colour",
    "RandAugment",
]

LEVEL_DENOM = 10.0  # magnitudes are on a 0..10 scale: argument = (m / 10) * range

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in their order
RAND_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# ops whose argument timm negates with probability 1/2
SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})

_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed RandAugment string (see :func:`parse_rand_augment`)."""

    magnitude: int = 10  # m: 0..mmax
    num_ops: int = 2  # n: ops drawn per image, with replacement
    prob: float = 0.5  # p: probability that a drawn op is applied
    magnitude_std: float = 0.0  # mstd: N(m, mstd) magnitude noise; inf = uniform on [0, m]
    magnitude_max: Optional[int] = None  # mmax: clip bound (None: LEVEL_DENOM)
    increasing: bool = False  # inc: RAND_INCREASING_OPS

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS

    @property
    def cap(self) -> float:
        return float(self.magnitude_max) if self.magnitude_max is not None else LEVEL_DENOM


_KEYS = {"m": "magnitude (int)", "n": "ops per image (int)", "p": "probability per op (float)",
         "mstd": "magnitude noise std (float)", "mmax": "magnitude cap (int)", "inc": "increasing ops (0|1)"}


def parse_rand_augment(config: str, option: str = "data.rand_augment") -> RandAugmentConfig:
    """Parse timm's RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``.

    Sections after ``rand`` (any order, each at most once): ``m<int>`` magnitude (default 10),
    ``n<int>`` ops per image (2), ``p<float>`` probability per op (0.5), ``mstd<float>`` magnitude
    noise (0; > 100: uniform on ``[0, m]``), ``mmax<int>`` magnitude cap (10), ``inc<0|1>``
    increasing ops (0). A malformed string raises ValueError naming ``option`` and the string.
    """
    def fail(why: str) -> ValueError:
        return ValueError(f"{option}: {why} in {config!r} (expected e.g. 'rand-m9-mstd0.5-inc1'; "
                          f"keys: {', '.join(f'{k} {v}' for k, v in _KEYS.items())})")

    if not isinstance(config, str):
        raise ValueError(f"{option}: expected a RandAugment string such as 'rand-m9-mstd0.5-inc1', got {config!r}")
    sections = config.split("-")
    if sections[0] != "rand":
        raise fail(f"it must start with 'rand', not {sections[0]!r}")
    values: dict[str, Any] = {}
    for section in sections[1:]:
        match = re.fullmatch(r"([a-z]+)(.*)", section)
        if match is None:
            raise fail(f"malformed section {section!r}")
        key, text = match.groups()
        if key not in _KEYS:
            raise fail(f"unknown key {key!r} (section {section!r})")
        if key in values:
            raise fail(f"key {key!r} given twice")
        if not text:
            raise fail(f"section {section!r} has no value")
        try:
            value: Any = float(text) if key in ("p", "mstd") else int(text)
        except ValueError:
            raise fail(f"section {section!r}: {text!r} is not {'a number' if key in ('p', 'mstd') else 'an integer'}") from None
        values[key] = value
    magnitude = values.get("m", int(LEVEL_DENOM))
    num_ops = values.get("n", 2)
    prob = values.get("p", 0.5)
    mstd = values.get("mstd", 0.0)
    mmax = values.get("mmax")
    inc = values.get("inc", 0)
    if not math.isfinite(prob) or not 0.0 <= prob <= 1.0:
        raise fail(f"p must be in [0, 1], got {prob}")
    if num_ops < 1:
        raise fail(f"n must be >= 1, got {num_ops}")
    if not mstd >= 0.0:
        raise fail(f"mstd must be >= 0, got {mstd}")
    if mmax is not None and mmax < 1:
        raise fail(f"mmax must be >= 1, got {mmax}")
    if inc not in (0, 1):
        raise fail(f"inc must be 0 or 1, got {inc}")
    cap = mmax if mmax is not None else int(LEVEL_DENOM)
    if not 0 <= magnitude <= cap:
        raise fail(f"m must be in [0, {cap}], got {magnitude}" + ("" if mmax is not None else f" (add mmax{magnitude} to raise the cap)"))
    return RandAugmentConfig(
        magnitude=magnitude, num_ops=num_ops, prob=prob,
        magnitude_std=math.inf if mstd > 100 else mstd,  # timm: mstd > 100 means uniform sampling
        magnitude_max=mmax, increasing=bool(inc),
    )


def op_args(name: str, magnitude: float, negate: bool = False, translate_pct: float = 0.45) -> tuple[Any, ...]:
    """The argument of op ``name`` at ``magnitude`` (timm's level functions); ``negate`` flips the
    sign of the ops in :data:`SIGNED_OPS` (drawn with probability 1/2 by :class:`RandAugment`)."""
    level = magnitude / LEVEL_DENOM
    sign = -1.0 if negate and name in SIGNED_OPS else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * level * 30.0,)  # degrees, counter-clockwise
    if name == "Posterize":
        return (int(level * 4),)  # bits kept, 0..4: the change *shrinks* as m grows (timm keeps TF EfficientNet's rule)
    if name == "PosterizeIncreasing":
        return (4 - int(level * 4),)
    if name == "Solarize":
        return (min(256, int(level * 256)),)  # threshold: pixels >= it are inverted
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(level * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(level * 110)),)  # added to pixels below 128
    if name in _ENHANCE:
        return (level * 1.8 + 0.1,)  # enhance factor in [0.1, 1.9]; 1 = unchanged
    if name.endswith("Increasing") and name[: -len("Increasing")] in _ENHANCE:
        return (max(0.1, 1.0 + sign * level * 0.9),)
    if name in ("ShearX", "ShearY"):
        return (sign * level * 0.3,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * level * translate_pct,)  # fraction of the image width / height
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_op(image: Image.Image, name: str, args: Sequence[Any], fill: tuple[int, ...],
             resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Apply op ``name`` with ``args`` (from :func:`op_args`) to a PIL RGB image; ``fill`` colours
    the area a geometric op uncovers, ``resample`` is its interpolation."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(args[0], resample=resample, fillcolor=fill)
    if name in ("Posterize", "PosterizeIncreasing"):
        if args[0] >= 8:
            return image
        # keep the top bits: ImageOps.posterize's table, which recent Pillow refuses for 0 bits
        # (timm's level functions give 0 at Posterize m < 2.5 and PosterizeIncreasing m = 10: black)
        mask = ~(2 ** (8 - args[0]) - 1)
        return image.point([i & mask for i in range(256)] * len(image.getbands()))
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(image, args[0])
    if name == "SolarizeAdd":
        lut = [min(255, i + args[0]) if i < 128 else i for i in range(256)]
        return image.point(lut * len(image.getbands()))
    base = name[: -len("Increasing")] if name.endswith("Increasing") else name
    if base in _ENHANCE:
        return _ENHANCE[base](image).enhance(args[0])
    # PIL's affine data (a, b, c, d, e, f) maps an output pixel (x, y) to the input (ax+by+c, dx+ey+f)
    width, height = image.size
    matrix = {
        "ShearX": lambda v: (1, v, 0, 0, 1, 0),
        "ShearY": lambda v: (1, 0, 0, v, 1, 0),
        "TranslateXRel": lambda v: (1, 0, v * width, 0, 1, 0),
        "TranslateYRel": lambda v: (1, 0, 0, 0, 1, v * height),
    }.get(name)
    if matrix is None:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return image.transform(image.size, Image.Transform.AFFINE, matrix(args[0]), resample=resample, fillcolor=fill)


def fill_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """timm's fill colour of the geometric ops: the normalization mean in ``uint8``, ``round(255 * mean)``."""
    return tuple(min(255, round(255 * m)) for m in mean)


class AppliedOp(NamedTuple):
    """One op that :class:`RandAugment` applied: its name, sampled magnitude and argument."""

    name: str
    magnitude: float
    args: tuple[Any, ...]


class RandAugment(A.ImageOnlyTransform):
    """timm's RandAugment on an RGB ``uint8`` image ``(H, W, 3)`` → the same shape and dtype.

    Args:
        config: timm's RandAugment string (:func:`parse_rand_augment`), e.g. ``rand-m9-mstd0.5-inc1``.
        fill: colour of the area uncovered by Rotate / Shear / Translate (timm: :func:`fill_colour`
            of the normalization mean, ``(124, 116, 104)`` for ImageNet's).
        interpolation: resampling of the geometric ops (timm: the training interpolation).
        translate_pct: TranslateXRel/YRel range at magnitude 10, a fraction of the image size.
        option: the config option named in error messages.

    The ops applied by the last call, with their sampled magnitudes and arguments, are
    ``get_applied_params()["ops"]`` (a tuple of :class:`AppliedOp`).
    """

    def __init__(
        self,
        config: str = "rand-m9-mstd0.5",
        fill: tuple[int, int, int] = (128, 128, 128),
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        translate_pct: float = 0.45,
        option: str = "data.rand_augment",
    ) -> None:
        super().__init__(p=1.0)  # the per-op probability is the config's p
        self.config = config
        self.parsed = parse_rand_augment(config, option)
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        if len(fill) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in fill):
            raise ValueError(f"RandAugment fill must be 3 integers in [0, 255], got {fill!r}")
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = interpolation
        self.translate_pct = translate_pct
        self.option = option

    @property
    def ops(self) -> tuple[str, ...]:
        """The op list drawn from (timm's order)."""
        return self.parsed.ops

    def sample_magnitude(self) -> float:
        """One magnitude: ``m``, or its noisy draw with ``mstd``, clipped to ``[0, cap]``."""
        cfg = self.parsed
        magnitude = float(cfg.magnitude)
        if cfg.magnitude_std == math.inf:
            magnitude = self.py_random.uniform(0.0, magnitude)
        elif cfg.magnitude_std > 0:
            magnitude = self.py_random.gauss(magnitude, cfg.magnitude_std)
        return max(0.0, min(magnitude, cfg.cap))

    def get_params(self) -> dict[str, Any]:
        cfg, ops = self.parsed, self.parsed.ops
        applied = []
        for _ in range(cfg.num_ops):
            name = ops[self.py_random.randrange(len(ops))]
            if cfg.prob < 1.0 and self.py_random.random() > cfg.prob:  # timm's test: applied with probability p
                continue
            magnitude = self.sample_magnitude()
            negate = name in SIGNED_OPS and self.py_random.random() > 0.5
            applied.append(AppliedOp(name, magnitude, op_args(name, magnitude, negate, self.translate_pct)))
        return {"ops": tuple(applied)}

    def apply(self, img: np.ndarray, ops: tuple[AppliedOp, ...] = (), **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise TypeError(f"RandAugment needs an RGB uint8 image (H, W, 3) (it runs before Normalize), "
                            f"got {img.dtype} {img.shape}")
        if not ops:
            return img
        image = Image.fromarray(img, "RGB")
        resample = _INTERPOLATION[self.interpolation]
        for op in ops:
            image = apply_op(image, op.name, op.args, self.fill, resample)
        return np.asarray(image).copy()  # a writable array: later steps may modify in place

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("config", "fill", "interpolation", "translate_pct")
