"""Face-verification pair sets: .bin pickles (safely), LFW pairs.txt, the pair dataset and lookup."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from datamodules.image_folder import CorruptImageError
from datamodules.verification_pairs import (
    UnsafePickleError,
    VerificationPairs,
    find_verification_sets,
    load_verification_set,
    read_bin,
    read_pairs_txt,
    write_bin,
    write_pairs_txt,
)


def _images(n: int, seed: int = 0, size: tuple[int, int] = (12, 14)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


@pytest.fixture()
def bin_set(tmp_path) -> tuple[Path, list[np.ndarray], list[bool]]:
    images = _images(8)
    issame = [True, False, False, True]
    return write_bin(tmp_path / "lfw.bin", [_encode(im) for im in images], issame), images, issame


# --------------------------------------------------------------------------- .bin
def test_bin_round_trip_is_an_insightface_pickle(bin_set):
    path, images, issame = bin_set
    got_images, got_issame = read_bin(path)
    assert got_images == [_encode(im) for im in images]
    assert got_issame == issame and all(type(s) is bool for s in got_issame)
    with open(path, "rb") as f:  # insightface: bins, issame_list = pickle.load(f, encoding='bytes')
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert len(bins) == 8 and issame_list == issame
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temporary behind


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_with_numpy_images_and_bool_array(tmp_path, protocol):
    encoded = [_encode(im) for im in _images(4, seed=1)]
    path = tmp_path / "cfp_fp.bin"
    with open(path, "wb") as f:  # as some insightface versions store them
        pickle.dump(([np.frombuffer(b, np.uint8).copy() for b in encoded], np.array([False, True])), f, protocol=protocol)
    images, issame = read_bin(path)
    assert images == encoded and all(type(b) is bytes for b in images)
    assert issame == [False, True] and all(type(s) is bool for s in issame)


def test_bin_with_numpy_bool_scalars_and_bytearrays(tmp_path):
    encoded = [_encode(im) for im in _images(2, seed=2)]
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(((bytearray(encoded[0]), encoded[1]), [np.bool_(True)]), protocol=2))
    assert read_bin(path) == (encoded, [True])


def test_odd_image_count_names_file_and_count(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([b"x"] * 13, [True] * 6)))
    with pytest.raises(ValueError, match=rf"{path} holds 2N images paired \(2i, 2i\+1\); got 13 images"):
        read_bin(path)


def test_issame_length_mismatch(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(pickle.dumps(([b"x"] * 6, [True, False])))
    with pytest.raises(ValueError, match=rf"{path} holds 6 images \(3 pairs\) but 2 issame flags"):
        read_bin(path)
    with pytest.raises(ValueError, match="5 images for 2 pairs"):
        write_bin(tmp_path / "w.bin", [b"x"] * 5, [True, False])


def test_malformed_bins(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match=rf"{path} is not a readable verification .bin"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True], "extra")))
    with pytest.raises(ValueError, match=rf"{path}: expected a pickled 2-tuple .*tuple of length 3"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", np.zeros((2, 2), np.uint8)], [True])))
    with pytest.raises(ValueError, match=rf"{path}: image 1 is a uint8 array of shape \(2, 2\), not encoded image bytes"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", "text"], [True])))
    with pytest.raises(ValueError, match=rf"{path}: image 1 is a str"):
        read_bin(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.bin")):
        read_bin(tmp_path / "none.bin")


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_forbidden_global_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", _Evil(str(marker))], [True])))
    assert b"mkdir" in path.read_bytes()
    with pytest.raises(UnsafePickleError, match=rf"{path}: refusing to unpickle global (posix|nt|os)\.mkdir") as info:
        read_bin(path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()
    # sanity: a plain unpickler would have run it
    pickle.loads(path.read_bytes())
    assert marker.is_dir()


def test_protocol2_codecs_only_for_text_codecs(tmp_path):
    path = tmp_path / "codec.bin"
    payload = b"\x80codecs"
    # protocol <= 2 spells bytes as _codecs.encode(text, 'latin1'): allowed; another codec is not
    path.write_bytes(pickle.dumps(([payload, payload], [False]), protocol=2))
    assert read_bin(path) == ([payload, payload], [False])
    path.write_bytes(path.read_bytes().replace(b"latin1", b"rot_13"))
    with pytest.raises(UnsafePickleError, match=rf"{path}: .*codec 'rot_13'"):
        read_bin(path)


# --------------------------------------------------------------------------- pairs.txt
@pytest.fixture()
def lfw_root(tmp_path) -> Path:
    """``<tmp>/lfw/<name>/<name>_NNNN.<ext>``: Alice (jpg), Bob (png, the fallback), Carol (jpeg)."""
    root = tmp_path / "lfw"
    rng = np.random.default_rng(3)
    for name, count, ext in (("Alice", 3, ".jpg"), ("Bob", 2, ".png"), ("Carol", 1, ".jpeg")):
        (root / name).mkdir(parents=True)
        for n in range(1, count + 1):
            image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            (root / name / f"{name}_{n:04d}{ext}").write_bytes(_encode(image, ".png" if ext == ".png" else ".jpg"))
    return root


PAIRS = [("Alice", 1, "Alice", 3), ("Bob", 1, "Bob", 2), ("Alice", 2, "Bob", 1), ("Carol", 1, "Alice", 1)]


@pytest.mark.parametrize("folds", [None, 1, 2])
def test_pairs_txt_round_trip(lfw_root, folds):
    path = write_pairs_txt(lfw_root / "pairs.txt", PAIRS, folds=folds)
    lines = path.read_text().splitlines()
    body = lines[1:] if folds else lines
    if folds:
        assert lines[0] == f"{folds}\t{4 // (2 * folds)}"
    assert body == ["Alice\t1\t3", "Bob\t1\t2", "Alice\t2\tBob\t1", "Carol\t1\tAlice\t1"]
    pairs = read_pairs_txt(path)
    r = str(lfw_root)
    assert pairs == [
        (f"{r}/Alice/Alice_0001.jpg", f"{r}/Alice/Alice_0003.jpg", True),
        (f"{r}/Bob/Bob_0001.png", f"{r}/Bob/Bob_0002.png", True),
        (f"{r}/Alice/Alice_0002.jpg", f"{r}/Bob/Bob_0001.png", False),
        (f"{r}/Carol/Carol_0001.jpeg", f"{r}/Alice/Alice_0001.jpg", False),
    ]


def test_pairs_txt_space_separated_with_separate_image_root(lfw_root, tmp_path):
    path = tmp_path / "lists" / "my_pairs.txt"
    path.parent.mkdir()
    path.write_text("1 1\n\nAlice 1 2\nCarol   1  Bob 2\n")
    pairs = read_pairs_txt(path, image_root=lfw_root)
    assert [(Path(a).name, Path(b).name, s) for a, b, s in pairs] == [
        ("Alice_0001.jpg", "Alice_0002.jpg", True),
        ("Carol_0001.jpeg", "Bob_0002.png", False),
    ]


def test_missing_image_names_line_and_path(lfw_root):
    path = lfw_root / "pairs.txt"
    path.write_text("2\t1\nAlice\t1\t2\nBob\t1\t2\nAlice\t1\tBob\t7\nCarol\t1\tAlice\t2\n")
    with pytest.raises(FileNotFoundError, match=rf"{path}, line 4: image {lfw_root}/Bob/Bob_0007.jpg \(or .png/.jpeg\) does not exist"):
        read_pairs_txt(path)


def test_malformed_pairs_lines(lfw_root):
    path = lfw_root / "pairs.txt"
    path.write_text("Alice\t1\t2\nAlice\tone\t2\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: expected 'name n1 n2'.*'Alice\\tone\\t2'"):
        read_pairs_txt(path)
    path.write_text("Alice\t1\t2\nAlice\t1\t2\tBob\t1\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: expected"):
        read_pairs_txt(path)
    path.write_text("10\t300\nAlice\t1\t2\n")
    with pytest.raises(ValueError, match=r"header promises 6000 pairs .* lists 1"):
        read_pairs_txt(path)
    with pytest.raises(ValueError, match="cannot form 3 folds"):
        write_pairs_txt(path, PAIRS, folds=3)


# --------------------------------------------------------------------------- dataset
def test_pairs_from_bin_items(bin_set):
    path, images, issame = bin_set
    ds = VerificationPairs.from_bin(path)
    assert ds.name == "lfw" and len(ds) == 4 and ds.issame == issame
    for k in range(4):
        a, b, same, index = ds[k]
        assert a.shape == b.shape == (3, 12, 14) and a.dtype == torch.uint8
        assert torch.equal(a, _chw(images[2 * k])) and torch.equal(b, _chw(images[2 * k + 1]))
        assert same is issame[k] and index == k
    with pytest.raises(IndexError):
        ds[4]


def test_pairs_resize_to_image_size(bin_set):
    path, images, _ = bin_set
    small = VerificationPairs.from_bin(path, image_size=(5, 6))
    a, b, _, _ = small[1]
    assert a.shape == (3, 5, 6)
    area = cv2.resize(images[3], (6, 5), interpolation=cv2.INTER_AREA)
    assert not np.array_equal(area, cv2.resize(images[3], (6, 5), interpolation=cv2.INTER_LINEAR))
    assert torch.equal(b, _chw(area))  # shrinking averages (INTER_AREA), like insightface
    large = VerificationPairs.from_bin(path, image_size=(24, 28))
    assert torch.equal(large[0][0], _chw(cv2.resize(images[0], (28, 24), interpolation=cv2.INTER_LINEAR)))
    assert VerificationPairs.from_bin(path, image_size=9)[0][0].shape == (3, 9, 9)
    same = VerificationPairs.from_bin(path, image_size=(12, 14))
    assert torch.equal(same[0][0], _chw(images[0]))


def test_pairs_with_albumentations(bin_set):
    path, images, _ = bin_set
    ds = VerificationPairs.from_bin(path, transform=A.Compose([A.HorizontalFlip(p=1.0)]))
    a, b, _, _ = ds[0]
    assert isinstance(a, np.ndarray) and np.array_equal(a, images[0][:, ::-1]) and np.array_equal(b, images[1][:, ::-1])


def test_corrupt_bin_image_names_bin_and_index_even_with_skip_corrupt(tmp_path):
    encoded = [_encode(im) for im in _images(4, seed=5)]
    encoded[3] = b"garbage bytes"
    path = write_bin(tmp_path / "agedb_30.bin", encoded, [True, False])
    ds = VerificationPairs.from_bin(path)
    assert ds.skip_corrupt is False
    assert ds[0][3] == 0
    ds.skip_corrupt = True  # substituting an image would change the protocol: still raises
    with pytest.raises(CorruptImageError, match=rf"cannot decode image 3 \(pair 1\) of {path}"):
        ds[1]


def test_pairs_from_pairs_txt(lfw_root):
    write_pairs_txt(lfw_root / "pairs.txt", PAIRS, folds=1)
    ds = VerificationPairs.from_pairs_txt(lfw_root / "pairs.txt")
    assert ds.name == "lfw" and len(ds) == 4 and ds.issame == [True, True, False, False]
    a, b, same, index = ds[2]
    assert torch.equal(a, _chw(cv2.cvtColor(cv2.imread(str(lfw_root / "Alice/Alice_0002.jpg")), cv2.COLOR_BGR2RGB)))
    assert torch.equal(b, _chw(cv2.cvtColor(cv2.imread(str(lfw_root / "Bob/Bob_0001.png")), cv2.COLOR_BGR2RGB)))
    assert (same, index) == (False, 2) and a.shape == (3, 10, 12)
    (lfw_root / "Bob" / "Bob_0001.png").write_bytes(b"broken")
    with pytest.raises(CorruptImageError, match="Bob_0001.png"):
        ds[2]


def test_find_and_load_verification_sets(bin_set, lfw_root):
    path, _, _ = bin_set
    root = path.parent
    write_pairs_txt(lfw_root.parent / "cfp_fp" / "pairs.txt", [("x", 1, "x", 2)])  # images not needed to find it
    found = find_verification_sets(root, ["cfp_fp", "agedb_30", "lfw"])
    assert found == {"cfp_fp": str(root / "cfp_fp" / "pairs.txt"), "lfw": str(root / "lfw.bin")}
    assert list(found) == ["cfp_fp", "lfw"]
    # lfw.bin wins over lfw/pairs.txt
    write_pairs_txt(lfw_root / "pairs.txt", PAIRS)
    assert find_verification_sets(root, ["lfw"]) == {"lfw": str(root / "lfw.bin")}
    with pytest.raises(FileNotFoundError, match=rf"{root} holds none .*{root}/agedb_30.bin, {root}/agedb_30/pairs.txt"):
        find_verification_sets(root, ["agedb_30"])
    loaded = load_verification_set(root / "lfw.bin", image_size=(6, 7))
    assert loaded.name == "lfw" and loaded.source == str(root / "lfw.bin") and loaded[0][0].shape == (3, 6, 7)
    from_txt = load_verification_set(lfw_root)  # a folder holding pairs.txt
    assert from_txt.name == "lfw" and from_txt.source == str(lfw_root / "pairs.txt") and len(from_txt) == 4
    with pytest.raises(ValueError, match="is a .bin file or an LFW pairs .txt"):
        load_verification_set(root / "lfw.rec")
