"""FaceDataModule: both training layouts, the verification sets, the demo faces and bad input."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.faces import FaceDataModule
from datamodules.image_folder import CorruptImageError
from datamodules.demo_faces import DEMO_VERIFICATION_SETS
from datamodules.recordio import write_face_recordio
from datamodules.verification_pairs import read_bin, read_pairs_txt
from conftest import copy_root

SETS = list(DEMO_VERIFICATION_SETS)




def _to_recordio(root: Path) -> None:
    """Rewrite the identity folders of ``root/train`` as insightface RecordIO in ``root``, then drop them."""
    folders = sorted(p for p in (root / "train").iterdir())
    samples = [(f.read_bytes(), label) for label, d in enumerate(folders) for f in sorted(d.iterdir())]
    write_face_recordio(root, samples, num_classes=len(folders), image_size=64)
    shutil.rmtree(root / "train")


def _dm(root: Path, **kwargs) -> FaceDataModule:
    return FaceDataModule(root=str(root), val_sets=SETS, image_size=64, batch_size=4, num_workers=0,
                          pin_memory=False, **kwargs)


def test_demo_faces_layout_and_balance(small_face_root):
    identities = sorted((small_face_root / "train").iterdir())
    assert len(identities) == 6 and all(len(list(d.glob("*.jpg"))) == 4 for d in identities)
    images, issame = read_bin(small_face_root / "demo_verify.bin")
    assert len(images) == 40 and len(issame) == 20 and sum(issame) == 10
    pairs = read_pairs_txt(small_face_root / "demo_verify_hard" / "pairs.txt")
    assert len(pairs) == 20 and sum(s for _, _, s in pairs) == 10
    # verification identities are not training identities (open set, as LFW is for MS1M)
    assert not {Path(a).parent.name for a, _, _ in pairs} & {d.name for d in identities}


def test_identity_folders_batches_and_normalization(small_face_root):
    dm = _dm(small_face_root)
    assert dm.num_classes == 6 and dm.verification_sets == SETS and not dm.uses_recordio
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert -1.0 <= images.min() < -0.2 and 0.2 < images.max() <= 1.0  # (x/255 - 0.5)/0.5
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 6
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    a, b, issame, index = next(iter(loaders[0]))
    assert a.shape == b.shape == (4, 3, 64, 64) and issame.dtype == torch.bool and index.tolist() == [0, 1, 2, 3]


def test_recordio_training_set_gives_the_same_faces(small_face_root, tmp_path):
    folders = _dm(small_face_root, flip=False)
    folders.setup("fit")
    root = copy_root(small_face_root, tmp_path)
    _to_recordio(root)
    records = _dm(root, flip=False)
    assert records.uses_recordio and records.num_classes == 6
    records.setup("fit")
    a, b = folders.datasets["train"], records.datasets["train"]
    assert len(a) == len(b) == 24
    for i in (0, 5, 23):
        image_a, label_a = a[i]
        image_b, label_b = b[i]
        assert label_a == label_b and torch.equal(image_a, image_b)


def test_resizes_faces_stored_at_another_size(small_face_root):
    dm = FaceDataModule(root=str(small_face_root), val_sets=SETS, image_size=(48, 40), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.datasets["train"][0][0].shape == (3, 48, 40)
    assert dm.eval_sets["val"][1][0][0].shape == (3, 48, 40)


def test_absent_sets_are_skipped_and_none_is_an_error(small_face_root, tmp_path):
    dm = FaceDataModule(root=str(small_face_root), val_sets=["lfw", "demo_verify"], image_size=64, num_workers=0)
    assert dm.verification_sets == ["demo_verify"]
    empty = tmp_path / "empty"
    (empty / "train" / "someone").mkdir(parents=True)
    dm = FaceDataModule(root=str(empty), image_size=64, num_workers=0)
    assert dm.verification_sets == []  # predict needs none
    with pytest.raises(FileNotFoundError, match=r"holds none of the requested sets; looked for: .*lfw"):
        dm.setup("validate")


def test_missing_training_set_names_both_layouts(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    shutil.rmtree(root / "train")
    dm = _dm(root)
    assert dm.num_classes == 0  # enough to test a trained checkpoint
    with pytest.raises(FileNotFoundError, match=r"train\.rec.*identity folders"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"face data root .*nowhere does not exist \(data.root\)"):
        _dm(tmp_path / "nowhere").num_classes


def test_identity_folder_without_images_is_named(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    (root / "train" / "id99999").mkdir()
    (root / "train" / "id99999" / "notes.txt").write_text("no faces here")
    with pytest.raises(ValueError, match=r"empty class folder.*id99999"):
        _dm(root).setup("fit")


def test_corrupt_recordio_record_is_named(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    _to_recordio(root)
    rec = root / "train.rec"
    offsets = dict(line.split("\t") for line in (root / "train.idx").read_text().splitlines())
    last = int(offsets[max(offsets, key=int)])
    data = bytearray(rec.read_bytes())
    data[last + 8 + 24: last + 8 + 24 + 16] = b"\x00" * 16  # the JPEG's start-of-image marker and header
    rec.write_bytes(bytes(data))
    dm = _dm(root)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    with pytest.raises(CorruptImageError, match=r"train\.rec.*key 24"):
        dataset[len(dataset) - 1]
    data[last: last + 4] = b"\x00" * 4  # the record's magic number
    rec.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match=r"train\.rec.*key 24"):
        dataset[len(dataset) - 1]


def test_bin_with_an_odd_number_of_images_is_named(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    images, issame = read_bin(root / "demo_verify.bin")
    with open(root / "demo_verify.bin", "wb") as f:
        pickle.dump((images[:-1], issame), f)
    with pytest.raises(ValueError, match=r"demo_verify\.bin.*39 images"):
        _dm(root).setup("validate")


def test_pairs_file_naming_a_missing_image(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    victim = sorted((root / "demo_verify_hard").glob("person*/*.jpg"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"pairs\.txt.*line \d+.*{victim.name}"):
        _dm(root).setup("validate")


def test_predict_needs_a_folder(small_face_root):
    with pytest.raises(ValueError, match="predict_root"):
        _dm(small_face_root).setup("predict")
    dm = _dm(small_face_root, predict_root=str(small_face_root / "train" / "id00000"))
    dm.setup("predict")
    images, paths = next(iter(dm.predict_dataloader()))
    assert images.shape[1:] == (3, 64, 64) and all(p.endswith(".jpg") for p in paths)
    assert np.isfinite(images.numpy()).all()
