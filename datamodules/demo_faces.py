"""Embedded demo faces: synthetic identities in insightface's layouts, generated once into the cache.

Each identity is a drawn, aligned face with its own geometry and colours (head shape, skin, hair
style and colour, eye spacing, size and colour, brows, nose, mouth, glasses, beard, a mole); each
image of it varies the nuisances a real aligned set varies: small alignment error (shift, scale,
roll), expression (smile, open mouth), lighting, background, blur, noise and JPEG compression.
Because faces are aligned, positions carry identity: the setting in which RepMLP's FC layers help.

:func:`face_demo` writes, under ``$REPMLP_DEMO_ROOT`` (or ``~/.cache/repmlp-lightning/demo``):

- ``train/<identity>/<identity>_<NNNN>.jpg``: training identities as identity folders;
- ``demo_verify.bin``: an insightface verification ``.bin`` of pairs of *other* identities
  (open-set, as LFW is for MS1M), half same-identity, half different, in 10 balanced folds;
- ``demo_verify_hard/pairs.txt`` + ``demo_verify_hard/<name>/<name>_<NNNN>.jpg``: an LFW-style
  pairs file over an image folder, with stronger pose and lighting changes (the CFP-FP role).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from .demo import _build_once, default_demo_root

__all__ = ["face_demo", "FaceIdentity", "render_face", "DEMO_VERIFICATION_SETS", "FACE_DEMO_VERSION"]

FACE_DEMO_VERSION = 1
DEMO_VERIFICATION_SETS = ("demo_verify", "demo_verify_hard")


class FaceIdentity:
    """The fixed traits of one synthetic person, drawn from ``rng``."""

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        tone = u(0, 1)  # dark to light skin, BGR
        self.skin = np.array([60, 85, 130]) * (1 - tone) + np.array([185, 205, 240]) * tone + rng.normal(0, 8, 3)
        self.head = (u(0.33, 0.40), u(0.40, 0.47), u(-0.02, 0.02))  # half-width, half-height, centre dx
        self.hair = np.array([u(10, 120), u(10, 110), u(10, 130)]) * u(0.4, 1.2)
        self.hair_style = int(rng.integers(0, 4))  # short, fringe, long sides, bald
        self.hairline = u(0.20, 0.30)
        self.eye_dx, self.eye_y = u(0.15, 0.21), u(0.40, 0.46)
        self.eye_size = (u(0.035, 0.065), u(0.018, 0.035))
        self.iris = np.array([u(20, 160), u(20, 140), u(10, 120)])
        self.brow = (u(0.05, 0.10), u(-0.35, 0.35), int(rng.integers(1, 4)))  # gap above the eye, tilt, thickness
        self.nose = (u(0.10, 0.18), u(0.03, 0.07))  # length, half-width
        self.mouth_y, self.mouth_w = u(0.68, 0.76), u(0.09, 0.16)
        self.lips = self.skin * np.array([u(0.6, 0.8), u(0.5, 0.7), u(0.9, 1.1)])
        self.glasses = rng.random() < 0.25
        self.beard = rng.random() < 0.25
        self.mole = (u(-0.25, 0.25), u(0.45, 0.75)) if rng.random() < 0.4 else None


def _pt(x: float, y: float, size: int) -> tuple[int, int]:
    """Fractional coordinates to fixed-point pixels (shift 4) for anti-aliased drawing."""
    return int(round(x * size * 16)), int(round(y * size * 16))


def _len(v: float, size: int) -> int:
    return max(1, int(round(v * size * 16)))


def _colour(c: np.ndarray) -> tuple[int, int, int]:
    c = np.clip(c, 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def render_face(person: FaceIdentity, rng: np.random.Generator, size: int = 64, hard: bool = False) -> np.ndarray:
    """One BGR ``(size, size, 3)`` uint8 image of ``person``; ``hard`` widens pose and lighting changes."""
    u = rng.uniform
    big = size * 2  # draw at twice the size, then downsample: smooth edges
    bg = np.array([u(0, 255), u(0, 255), u(0, 255)])
    ramp = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
    img = (bg * (1 - ramp) + (bg * u(0.5, 1.2)) * ramp) * np.ones((big, big, 1), np.float32)
    img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    aa, sh = cv2.LINE_AA, 4
    cx = 0.5 + person.head[2]
    hw, hh = person.head[0], person.head[1]
    if person.hair_style == 2:  # long hair behind the head
        cv2.ellipse(img, _pt(cx, 0.55, big), (_len(hw + 0.06, big), _len(hh + 0.02, big)), 0, 0, 360,
                    _colour(person.hair), -1, aa, sh)
    cv2.ellipse(img, _pt(cx, 0.52, big), (_len(hw, big), _len(hh, big)), 0, 0, 360, _colour(person.skin), -1, aa, sh)
    if person.hair_style != 3:
        top = 0.52 - hh
        cv2.ellipse(img, _pt(cx, top + person.hairline * 0.5, big), (_len(hw * 1.02, big), _len(person.hairline * 0.75, big)),
                    0, 180, 360, _colour(person.hair), -1, aa, sh)
        if person.hair_style == 1:  # fringe
            cv2.rectangle(img, _pt(cx - hw * 0.8, top + 0.02, big), _pt(cx + hw * 0.2, top + person.hairline, big),
                          _colour(person.hair), -1, aa, sh)
    if person.beard:
        cv2.ellipse(img, _pt(cx, 0.74, big), (_len(hw * 0.8, big), _len(0.16, big)), 0, 0, 180,
                    _colour(person.hair * 0.9 + person.skin * 0.1), -1, aa, sh)
    for side in (-1, 1):
        ex, ey = cx + side * person.eye_dx, person.eye_y
        ew, eh = person.eye_size
        cv2.ellipse(img, _pt(ex, ey, big), (_len(ew, big), _len(eh, big)), 0, 0, 360, (235, 235, 235), -1, aa, sh)
        cv2.circle(img, _pt(ex, ey, big), _len(eh * 0.9, big), _colour(person.iris), -1, aa, sh)
        gap, tilt, thick = person.brow
        by = ey - eh - gap
        cv2.line(img, _pt(ex - ew * 1.1, by + side * tilt * 0.03, big), _pt(ex + ew * 1.1, by - side * tilt * 0.03, big),
                 _colour(person.hair * 0.7), thick * 2, aa, sh)
        if person.glasses:
            cv2.circle(img, _pt(ex, ey, big), _len(ew * 1.6, big), (30, 30, 30), 2, aa, sh)
    length, half = person.nose
    ny = person.eye_y + 0.04
    nose = np.array([_pt(cx, ny, big), _pt(cx - half, ny + length, big), _pt(cx + half, ny + length, big)], np.int32)
    cv2.fillConvexPoly(img, nose, _colour(person.skin * 0.8), aa, sh)
    smile = u(-0.3, 1.0)  # expression: per image
    my, mw = person.mouth_y, person.mouth_w
    if rng.random() < 0.3:  # open mouth
        cv2.ellipse(img, _pt(cx, my, big), (_len(mw * 0.8, big), _len(0.03, big)), 0, 0, 360, (40, 30, 60), -1, aa, sh)
    cv2.ellipse(img, _pt(cx, my - 0.02 * smile, big), (_len(mw, big), _len(0.01 + 0.03 * abs(smile), big)), 0,
                0 if smile >= 0 else 180, 180 if smile >= 0 else 360, _colour(person.lips), 3, aa, sh)
    if person.mole is not None:
        cv2.circle(img, _pt(cx + person.mole[0], person.mole[1], big), _len(0.012, big), (40, 40, 60), -1, aa, sh)

    # alignment error, lighting, blur, noise: the per-image nuisances
    spread = 2.0 if hard else 1.0
    angle, scale = u(-5, 5) * spread, 1 + u(-0.04, 0.04) * spread
    shift = u(-0.025, 0.025, 2) * spread * big
    m = cv2.getRotationMatrix2D((big / 2, big / 2), angle, scale)
    m[:, 2] += shift
    img = cv2.warpAffine(img, m, (big, big), borderMode=cv2.BORDER_REFLECT)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    side_light = u(-0.25, 0.25) * spread * (np.linspace(-1, 1, size, dtype=np.float32)[None, :, None])
    img = img * (u(0.75, 1.2) + side_light) + u(-15, 15)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=u(0.4, 1.0))
    img = img + rng.normal(0, u(1, 6), img.shape)
    if rng.random() < 0.1:  # some sets mix in grey photos
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, rng: np.random.Generator) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))])
    if not ok:
        raise OSError("cannot encode a demo face")
    return buf.tobytes()


def _pairs(rng: np.random.Generator, identities: int, per_identity: int, count: int,
           folds: int = 10) -> list[tuple[int, int, int, int]]:
    """``(id_a, image_a, id_b, image_b)`` pairs, each fold half same and half different (as LFW)."""
    out = []
    per_fold = count // folds
    for _ in range(folds):
        for k in range(per_fold):
            if k < per_fold // 2:
                a = int(rng.integers(identities))
                i, j = rng.choice(per_identity, 2, replace=False)
                out.append((a, int(i), a, int(j)))
            else:
                a, b = rng.choice(identities, 2, replace=False)
                out.append((int(a), int(rng.integers(per_identity)), int(b), int(rng.integers(per_identity))))
    return out


def face_demo(
    root: Optional[str | os.PathLike] = None,
    train_identities: int = 100,
    images_per_identity: int = 20,
    verify_identities: int = 40,
    verify_images_per_identity: int = 8,
    verify_pairs: int = 400,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """The face demo set (see the module doc); generated on the first call, then reused.

    Returns its root: ``train/`` identity folders, ``demo_verify.bin`` and ``demo_verify_hard/pairs.txt``.
    """
    from .verification_pairs import write_bin, write_pairs_txt  # the real formats' writers

    if train_identities < 2 or verify_identities < 2 or verify_pairs < 20 or image_size < 32:
        raise ValueError("face_demo needs >= 2 identities per split, >= 20 pairs and >= 32 pixels")
    base = Path(root) if root is not None else default_demo_root()
    name = (f"faces-v{FACE_DEMO_VERSION}-{train_identities}x{images_per_identity}-{verify_identities}x"
            f"{verify_images_per_identity}-{verify_pairs}-{image_size}px-s{seed}")

    def build(folder: Path) -> None:
        rng = np.random.default_rng(seed)
        for k in range(train_identities):
            person, ident = FaceIdentity(rng), f"id{k:05d}"
            out = folder / "train" / ident
            out.mkdir(parents=True)
            for i in range(images_per_identity):
                (out / f"{ident}_{i:04d}.jpg").write_bytes(_encode(render_face(person, rng, image_size), rng))

        people = [FaceIdentity(rng) for _ in range(verify_identities)]
        bins: list[bytes] = []
        issame: list[bool] = []
        for a, i, b, j in _pairs(rng, verify_identities, verify_images_per_identity, verify_pairs):
            # every image of a .bin is stored with its pair, so each is rendered anew: seeded, distinct
            bins += [_encode(render_face(people[a], rng, image_size), rng), _encode(render_face(people[b], rng, image_size), rng)]
            issame.append(a == b)
        write_bin(folder / "demo_verify.bin", bins, issame)

        hard_people = [FaceIdentity(rng) for _ in range(verify_identities)]
        hard = folder / "demo_verify_hard"
        for k, person in enumerate(hard_people):
            out = hard / f"person{k:03d}"
            out.mkdir(parents=True)
            for i in range(verify_images_per_identity):
                image = render_face(person, rng, image_size, hard=True)
                (out / f"person{k:03d}_{i + 1:04d}.jpg").write_bytes(_encode(image, rng))
        pairs: list[tuple[Any, ...]] = [
            (f"person{a:03d}", i + 1, f"person{b:03d}", j + 1)
            for a, i, b, j in _pairs(rng, verify_identities, verify_images_per_identity, verify_pairs)
        ]
        write_pairs_txt(hard / "pairs.txt", pairs, folds=10)

    return _build_once(base / name, build)
