"""Face-verification pair sets: insightface ``.bin`` files and LFW-style ``pairs.txt``.

**``.bin``** (insightface ``eval/verification.py``): a pickle of ``(bins, issame_list)``.
``bins`` holds ``2N`` encoded images (``bytes``; some versions store 1-D ``uint8`` numpy arrays of
the encoded bytes), paired as ``(2i, 2i + 1)``; ``issame_list`` holds ``N`` bools (a list or a
numpy bool array). Files written by Python 2 are read with ``encoding="bytes"``. Unpickling
runs code named by the file, so :func:`read_bin` uses an unpickler that only admits the numpy
array/scalar reconstructors and refuses every other global.

**``pairs.txt``** (the official LFW format): an optional first line ``<folds>\\t<pairs_per_fold>``
(LFW: ``10\\t300``, each fold holding that many matched then that many mismatched pairs; the
dev files have a single count), then one pair per line, fields separated by tabs or spaces::

    name   n1  n2        same person:      <root>/name/name_<n1:04d>.jpg, <root>/name/name_<n2:04d>.jpg
    name1  n1  name2 n2  different people: <root>/name1/name1_<n1:04d>.jpg, <root>/name2/name2_<n2:04d>.jpg

``<root>`` (``image_root``) defaults to the folder of ``pairs.txt``; a missing ``.jpg`` may be a
``.png`` or ``.jpeg``.

A root holds a set either as ``<root>/<name>.bin`` or as ``<root>/<name>/pairs.txt``
(:func:`find_verification_sets`).
"""
from __future__ import annotations

import codecs
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from .image_folder import CorruptImageError, _ImageDataset, decode_image, image_hw, read_image

__all__ = [
    "UnsafePickleError",
    "read_bin",
    "write_bin",
    "read_pairs_txt",
    "write_pairs_txt",
    "VerificationPairs",
    "find_verification_sets",
    "load_verification_set",
]

_PAIR_EXTENSIONS = (".jpg", ".png", ".jpeg")


class UnsafePickleError(pickle.UnpicklingError):
    """A ``.bin`` pickle names a global outside the numpy-array allow-list (never executed)."""


# --------------------------------------------------------------------------- .bin
def _numpy_attr(module: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; pickles from either resolve to the installed one
    import numpy as numpy_module

    core = getattr(numpy_module, "_core", None) or numpy_module.core
    return getattr(getattr(core, module), name)


def _encode_latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocols <= 2 use it for ``bytes``: plain text codecs only."""
    if codecs.lookup(encoding).name not in ("iso8859-1", "latin-1", "utf-8", "ascii"):
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, encoding, errors)


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _encode_latin1,
    # protocol <= 2 names builtins as Python 2's __builtin__ (the default find_class would remap it)
    ("builtins", "bytes"): lambda: bytes,
    ("builtins", "bytearray"): lambda: bytearray,
    ("__builtin__", "bytearray"): lambda: bytearray,
}
for _prefix in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_prefix}.multiarray", "_reconstruct")] = lambda: _numpy_attr("multiarray", "_reconstruct")
    _ALLOWED_GLOBALS[(f"{_prefix}.multiarray", "scalar")] = lambda: _numpy_attr("multiarray", "scalar")
    _ALLOWED_GLOBALS[(f"{_prefix}.numeric", "_frombuffer")] = lambda: _numpy_attr("numeric", "_frombuffer")  # protocol 5
del _prefix


class _BinUnpickler(pickle.Unpickler):
    """Admits only what ``(images, issame)`` pickles need; names the file and global otherwise."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 pickles: str -> bytes
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"{self.path}: refusing to unpickle global {module}.{name}: a verification .bin holds only "
                "images (bytes / uint8 arrays) and bools; this file may be malicious"
            )
        return resolve()


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Encoded images (``2N`` bytes objects) and ``issame`` (``N`` bools) of a ``.bin`` file.

    Raises :class:`FileNotFoundError`, :class:`UnsafePickleError` (a forbidden global, not
    executed) or :class:`ValueError` naming the file for anything else that is wrong.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin file {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = _BinUnpickler(f, path).load()
    except UnsafePickleError as exc:
        if not str(exc).startswith(path):
            raise UnsafePickleError(f"{path}: {exc}") from None
        raise
    except Exception as exc:  # truncated or foreign files fail in many ways inside pickle
        raise ValueError(f"{path} is not a readable verification .bin (a pickle of (images, issame)): {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{path}: expected a pickled 2-tuple (images, issame), got {type(data).__name__}"
                         + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else ""))
    bins, issame = data
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: the images must be a list of encoded images, got {type(bins).__name__}")
    if len(bins) == 0 or len(bins) % 2:
        raise ValueError(f"{path} holds 2N images paired (2i, 2i+1); got {len(bins)} images")
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1:
            raise ValueError(f"{path}: issame must be 1-D, got shape {issame.shape}")
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: issame must be a list of bools, got {type(issame).__name__}")
    if len(issame) != len(bins) // 2:
        raise ValueError(f"{path} holds {len(bins)} images ({len(bins) // 2} pairs) but {len(issame)} issame flags")
    flags: list[bool] = []
    for k, flag in enumerate(issame):
        if isinstance(flag, (bool, np.bool_)) or (isinstance(flag, (int, np.integer)) and flag in (0, 1)):
            flags.append(bool(flag))
        else:
            raise ValueError(f"{path}: issame[{k}] is {flag!r}, not a bool")
    images: list[bytes] = []
    for i, image in enumerate(bins):
        if isinstance(image, (bytes, bytearray)):
            images.append(bytes(image))
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1:
            images.append(image.tobytes())
        else:
            kind = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"{path}: image {i} is a {kind}, not encoded image bytes (bytes or a 1-D uint8 array)")
    return images, flags


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write ``(images, issame)`` as an insightface ``.bin`` (to a temporary file, then renamed)."""
    path = Path(path)
    if len(images) != 2 * len(issame):
        raise ValueError(f"write_bin {path}: {len(images)} images for {len(issame)} pairs (need 2 per pair)")
    for i, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)) or not image:
            raise ValueError(f"write_bin {path}: image {i} is not non-empty encoded image bytes ({type(image).__name__})")
    data = ([bytes(b) for b in images], [bool(s) for s in issame])
    _atomic_write(path, lambda f: pickle.dump(data, f, protocol=4), "wb")
    return path


# --------------------------------------------------------------------------- pairs.txt
def _pair_image(root: Path, name: str, number: int) -> Optional[Path]:
    stem = root / name / f"{name}_{number:04d}"
    for ext in _PAIR_EXTENSIONS:
        candidate = stem.with_name(stem.name + ext)
        if candidate.is_file():
            return candidate
    return None


def read_pairs_txt(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[tuple[str, str, bool]]:
    """``(image_a, image_b, issame)`` for every pair of an LFW-format ``pairs.txt``.

    Every image must exist (``.jpg``, else ``.png``/``.jpeg``); errors name the pairs file, the
    line number and, for a missing image, the path looked for. A header line
    ``<folds> <pairs_per_fold>`` must agree with the number of pairs (``2 * folds * per_fold``:
    matched and mismatched pairs per fold).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    pairs: list[tuple[str, str, bool]] = []
    expected: Optional[int] = None
    first = True
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if first and 1 <= len(fields) <= 2 and all(v.isdigit() for v in fields):
                first = False
                expected = 2 * int(fields[0]) * (int(fields[1]) if len(fields) == 2 else 1)
                continue
            first = False
            if len(fields) == 3:
                names, same = (fields[0], fields[0]), True
                numbers = (fields[1], fields[2])
            elif len(fields) == 4:
                names, same = (fields[0], fields[2]), False
                numbers = (fields[1], fields[3])
            else:
                numbers = ()
            if not numbers or not all(n.isdigit() for n in numbers):
                raise ValueError(
                    f"{path}, line {lineno}: expected 'name n1 n2' (same person) or 'name1 n1 name2 n2' "
                    f"(different people), got {line.rstrip()!r}"
                )
            found = []
            for name, number in zip(names, numbers):
                image = _pair_image(root, name, int(number))
                if image is None:
                    missing = root / name / f"{name}_{int(number):04d}.jpg"
                    raise FileNotFoundError(f"{path}, line {lineno}: image {missing} (or .png/.jpeg) does not exist")
                found.append(str(image))
            pairs.append((found[0], found[1], same))
    if not pairs:
        raise ValueError(f"pairs file {path} lists no pairs")
    if expected is not None and expected != len(pairs):
        raise ValueError(
            f"{path}: the header promises {expected} pairs (matched + mismatched per fold) but the file lists {len(pairs)}"
        )
    return pairs


def write_pairs_txt(
    path: str | os.PathLike,
    pairs: Sequence[tuple[str, int, str, int]],
    folds: Optional[int] = None,
) -> Path:
    """Write ``(name_a, n_a, name_b, n_b)`` pairs in the LFW ``pairs.txt`` format.

    Same-name pairs are written as ``name n1 n2``. With ``folds``, a ``<folds>\\t<per_fold>``
    header is written; ``len(pairs)`` must then be ``2 * folds * per_fold`` (LFW's layout).
    """
    path = Path(path)
    lines = []
    if folds is not None:
        if folds < 1 or len(pairs) % (2 * folds):
            raise ValueError(f"write_pairs_txt {path}: {len(pairs)} pairs cannot form {folds} folds of matched + mismatched halves")
        lines.append(f"{folds}\t{len(pairs) // (2 * folds)}")
    for k, (name_a, n_a, name_b, n_b) in enumerate(pairs):
        for name in (name_a, name_b):
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"write_pairs_txt {path}: pair {k} has name {name!r} (empty or with whitespace)")
        lines.append(f"{name_a}\t{int(n_a)}\t{int(n_b)}" if name_a == name_b else f"{name_a}\t{int(n_a)}\t{name_b}\t{int(n_b)}")
    text = "\n".join(lines) + "\n"
    _atomic_write(path, lambda f: f.write(text), "w")
    return path


# --------------------------------------------------------------------------- dataset
class VerificationPairs(_ImageDataset):
    """One item per pair: ``(image_a, image_b, issame, pair_index)``.

    Images are RGB ``(H, W, 3)`` uint8 arrays resized to ``image_size`` (``(H, W)`` or an int)
    when given (``INTER_AREA`` when shrinking, else ``INTER_LINEAR``; insightface resizes its
    bins to 112), then passed to
    ``transform`` (albumentations, ``transform(image=rgb)["image"]``) or, when it is None,
    converted to ``(3, H, W)`` uint8 tensors. Pair ``k`` is images ``2k`` and ``2k + 1``.

    A corrupt image always raises :class:`CorruptImageError` naming the source (the ``.bin`` and
    the image index, or the image file): substituting another image, as ``skip_corrupt`` does for
    training sets, would silently change the verification protocol, so ``skip_corrupt`` is off.

    Build with :meth:`from_bin` or :meth:`from_pairs_txt`. ``paths`` names the ``2N`` images
    (used in messages); ``len()`` is the number of pairs.
    """

    def __init__(
        self,
        name: str,
        issame: Sequence[bool],
        *,
        encoded: Optional[Sequence[bytes]] = None,
        files: Optional[Sequence[str]] = None,
        source: str = "",
        transform: Optional[Callable[..., dict]] = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        if (encoded is None) == (files is None):
            raise ValueError("VerificationPairs: give exactly one of encoded (image bytes) or files (image paths)")
        count = len(encoded if encoded is not None else files)  # type: ignore[arg-type]
        if count != 2 * len(issame) or count == 0:
            raise ValueError(f"{source or name}: {count} images for {len(issame)} pairs (need 2 per pair)")
        names = list(files) if files is not None else [f"{source}[image {i}]" for i in range(count)]
        super().__init__(names, transform, skip_corrupt=False)
        self.name = name
        self.source = source
        self.issame = [bool(s) for s in issame]
        self.image_size = None if image_size is None else image_hw(image_size)
        self._encoded = list(encoded) if encoded is not None else None

    @classmethod
    def from_bin(
        cls,
        path: str | os.PathLike,
        transform: Optional[Callable[..., dict]] = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> VerificationPairs:
        """The pairs of an insightface ``.bin``; ``name`` is the file stem (``lfw`` for ``lfw.bin``)."""
        images, issame = read_bin(path)
        return cls(Path(path).stem, issame, encoded=images, source=str(path), transform=transform, image_size=image_size)

    @classmethod
    def from_pairs_txt(
        cls,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        transform: Optional[Callable[..., dict]] = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> VerificationPairs:
        """The pairs of an LFW ``pairs.txt``; ``name`` is its folder's name (``<root>/<name>/pairs.txt``),
        or the file stem when the file is not called ``pairs.txt``."""
        path = Path(path)
        pairs = read_pairs_txt(path, image_root)
        name = path.parent.resolve().name if path.name == "pairs.txt" else path.stem
        files = [p for a, b, _ in pairs for p in (a, b)]
        return cls(name, [s for _, _, s in pairs], files=files, source=str(path), transform=transform, image_size=image_size)

    def __len__(self) -> int:
        return len(self.issame)

    def _read(self, i: int) -> np.ndarray:
        """Image ``i`` (of ``2N``) as RGB uint8 ``(H, W, 3)``, resized to ``image_size``."""
        if self._encoded is None:
            image = read_image(self.paths[i])
        else:
            data = self._encoded[i]
            image = decode_image(data)
            if image is None:
                raise CorruptImageError(
                    f"cannot decode image {i} (pair {i // 2}) of {self.source} ({len(data)} bytes): corrupt or not an image"
                )
        if self.image_size is not None and image.shape[:2] != self.image_size:
            height, width = self.image_size
            shrink = height <= image.shape[0] and width <= image.shape[1]
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return image

    def __getitem__(self, index: int) -> tuple[Any, Any, bool, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs of {self.name}")
        # never _load: it would substitute another image under skip_corrupt
        image_a = self._transform(self._read(2 * index))
        image_b = self._transform(self._read(2 * index + 1))
        return image_a, image_b, self.issame[index], index

    def __repr__(self) -> str:
        return f"VerificationPairs({self.name!r}, {len(self)} pairs from {self.source})"


def find_verification_sets(root: str | os.PathLike, names: Sequence[str]) -> dict[str, str]:
    """``name -> path`` for every set of ``names`` present in ``root``, in the given order.

    A set is ``root/<name>.bin`` (preferred) or ``root/<name>/pairs.txt``. Raises
    :class:`FileNotFoundError` naming ``root`` and the paths looked for when none is present.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"verification folder {root} does not exist")
    found: dict[str, str] = {}
    looked: list[str] = []
    for name in names:
        candidates = (root / f"{name}.bin", root / name / "pairs.txt")
        looked.extend(str(c) for c in candidates)
        for candidate in candidates:
            if candidate.is_file():
                found[name] = str(candidate)
                break
    if not found:
        raise FileNotFoundError(f"verification folder {root} holds none of the requested sets; looked for: {', '.join(looked)}")
    return found


def load_verification_set(
    path: str | os.PathLike,
    transform: Optional[Callable[..., dict]] = None,
    image_size: int | tuple[int, int] | None = None,
) -> VerificationPairs:
    """A ``.bin`` file, a ``pairs.txt`` (any ``.txt``) or a folder holding ``pairs.txt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "pairs.txt"
    if path.suffix == ".bin":
        return VerificationPairs.from_bin(path, transform=transform, image_size=image_size)
    if path.suffix == ".txt":
        return VerificationPairs.from_pairs_txt(path, transform=transform, image_size=image_size)
    raise ValueError(f"{path}: a verification set is a .bin file or an LFW pairs .txt file")
