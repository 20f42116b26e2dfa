"""RecordIO framing, the insightface face-record layout and their errors (no mxnet needed)."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.image_folder import CorruptImageError
from datamodules.recordio import (
    MAGIC,
    CorruptRecordError,
    FaceRecordDataset,
    IndexedRecordIO,
    IRHeader,
    RecordIOError,
    RecordIOWriter,
    pack,
    read_property,
    unpack,
    write_face_recordio,
)

M = struct.pack("<I", MAGIC)


def _part(cflag: int, data: bytes) -> bytes:
    """One on-disk part, built by hand from the dmlc format description."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def _images(n: int, seed: int = 0, size: tuple[int, int] = (16, 20)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


@pytest.fixture()
def face_set(tmp_path) -> tuple[Path, list[np.ndarray], list[int]]:
    images = _images(6)
    labels = [0, 3, 1, 4, 2, 4]
    folder = write_face_recordio(tmp_path / "faces", [(_png(im), lb) for im, lb in zip(images, labels)], num_classes=5, image_size=(16, 20))
    return folder, images, labels


# --------------------------------------------------------------------------- pack / unpack
def test_pack_scalar_label_matches_mxnet_layout():
    raw = pack(IRHeader(5, 3.0, 7, 9), b"jpeg")
    # mxnet: struct.pack('IfQQ', ...) with flag forced to 0 for a scalar label
    assert raw == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"jpeg"
    header, payload = unpack(raw)
    assert header == IRHeader(0, 3.0, 7, 9) and isinstance(header.label, float)
    assert payload == b"jpeg"


def test_pack_array_label_stores_float32_after_header():
    raw = pack(IRHeader(0, [1.5, 2.0, 7.0], 1, 2), b"img")
    assert raw[:24] == struct.pack("<IfQQ", 3, 0.0, 1, 2)
    assert raw[24:36] == np.array([1.5, 2.0, 7.0], "<f4").tobytes()
    header, payload = unpack(raw)
    assert header == IRHeader(3, (1.5, 2.0, 7.0), 1, 2)
    assert payload == b"img"


def test_unpack_rejects_short_payloads():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="4 float32 labels"):
        unpack(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)


# --------------------------------------------------------------------------- framing
def _write(tmp_path: Path, records: dict[int, bytes]) -> tuple[Path, Path]:
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordIOWriter(rec, idx) as writer:
        for key, payload in records.items():
            writer.write(key, payload)
    return rec, idx


def test_aligned_magic_splits_records_exactly_like_dmlc(tmp_path):
    records = {
        10: b"ABCD" + M + b"EFGH" + M + b"IJ",  # two aligned magics: first, middle, last parts
        11: M + b"xyz",  # magic at 0: an empty first part
        12: b"abcd" + M,  # magic at the end: an empty last part
        13: b"X" + M + b"YZ",  # unaligned magic: kept, one whole record
        14: b"",
    }
    rec, idx = _write(tmp_path, records)
    expected = [
        _part(1, b"ABCD") + _part(2, b"EFGH") + _part(3, b"IJ"),
        _part(1, b"") + _part(3, b"xyz"),
        _part(1, b"abcd") + _part(3, b""),
        _part(0, b"X" + M + b"YZ"),
        _part(0, b""),
    ]
    assert rec.read_bytes() == b"".join(expected)
    offsets = np.cumsum([0] + [len(e) for e in expected[:-1]]).tolist()
    assert idx.read_text() == "".join(f"{k}\t{o}\n" for k, o in zip(records, offsets))
    reader = IndexedRecordIO(rec, idx)
    assert reader.keys == [10, 11, 12, 13, 14]
    for key, payload in records.items():
        assert reader.read(key) == payload


def test_writer_reader_round_trip_random_payloads(tmp_path):
    rng = np.random.default_rng(1)
    records = {}
    for key in rng.permutation(40).tolist():  # unsorted keys exercise the sorted lookup
        payload = bytearray(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):  # magics at random (aligned or not) positions
            at = int(rng.integers(0, len(payload) + 1))
            payload[at:at] = M
        records[key] = bytes(payload)
    rec, idx = _write(tmp_path, records)
    reader = IndexedRecordIO(rec, idx)
    assert reader.keys == list(records) and len(reader) == 40
    for key in rng.permutation(40).tolist():
        assert reader.read(key) == records[key]
    assert 5 in reader and 40 not in reader
    with pytest.raises(KeyError, match=f"key 40 is not in the index {idx}"):
        reader.read(40)


def test_offset_into_the_middle_of_a_split_record(tmp_path):
    rec, idx = _write(tmp_path, {0: b"ABCD" + M + b"EFGH"})
    middle = len(_part(1, b"ABCD"))
    idx.write_text(f"0\t0\n1\t{middle}\n")  # key 1 points at the last part of record 0
    reader = IndexedRecordIO(rec, idx)
    assert reader.read(0) == b"ABCD" + M + b"EFGH"
    with pytest.raises(CorruptRecordError, match=rf"{rec}: record key 1 at offset {middle}: part 0 at byte {middle} has continuation flag 3"):
        reader.read(1)


def test_writer_rejects_duplicate_keys(tmp_path):
    with RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
        writer.write(1, b"a")
        with pytest.raises(ValueError, match="key 1 is already written"):
            writer.write(1, b"b")


def test_reader_reopens_file_after_unpickling(tmp_path):
    rec, idx = _write(tmp_path, {0: b"zero", 1: b"one" + M})
    reader = IndexedRecordIO(rec, idx)
    assert reader.read(1) == b"one" + M
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._file is None
    assert clone.read(0) == b"zero" and clone.read(1) == b"one" + M


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_reader_reopens_file_in_forked_child(tmp_path):
    rec, idx = _write(tmp_path, {0: b"zero", 1: b"one"})
    reader = IndexedRecordIO(rec, idx)
    assert reader.read(0) == b"zero"
    parent_file = reader._file
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's handle (a shared file position)
        code = 1
        try:
            code = 0 if reader.read(1) == b"one" and reader._file is not parent_file and reader._pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reader._file is parent_file and reader.read(1) == b"one"


# --------------------------------------------------------------------------- insightface layout
def test_face_recordio_layout(face_set):
    folder, images, labels = face_set
    assert read_property(folder) == (5, 16, 20)
    assert (folder / "property").read_text().strip() == "5,16,20"
    assert sorted(p.name for p in folder.iterdir()) == ["property", "train.idx", "train.rec"]
    reader = IndexedRecordIO(folder / "train.rec", folder / "train.idx")
    assert reader.keys == list(range(7)) and reader.offset(0) == 0
    header, rest = unpack(reader.read(0))
    # arcface_torch: images are keys range(1, int(label[0]))
    assert header.flag == 2 and header.label == (7.0, 7.0) and rest == b""
    header, rest = unpack(reader.read(4))
    assert header == IRHeader(0, float(labels[3]), 0, 0)
    assert rest == _png(images[3])


def test_face_dataset_returns_original_images_and_labels(face_set):
    folder, images, labels = face_set
    ds = FaceRecordDataset(folder)
    assert len(ds) == 6 and ds.num_classes == 5 and ds.image_size == (16, 20)
    assert list(ds.paths) == [1, 2, 3, 4, 5, 6]
    for i in range(6):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 20)
        assert torch.equal(image, torch.from_numpy(images[i]).permute(2, 0, 1))
        assert label == labels[i] and type(label) is int


def test_face_dataset_applies_albumentations(face_set):
    folder, images, _ = face_set
    ds = FaceRecordDataset(folder, transform=A.Compose([A.HorizontalFlip(p=1.0)]))
    image, _ = ds[2]
    assert isinstance(image, np.ndarray) and np.array_equal(image, images[2][:, ::-1])


def test_flag0_record0_means_every_key_is_an_image(tmp_path):
    images = _images(3, seed=2)
    folder = tmp_path / "plain"
    folder.mkdir()
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
        for key, (image, label) in enumerate(zip(images, [2, 0, 1])):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), _png(image)))
    (folder / "property").write_text("3,16,20")
    ds = FaceRecordDataset(folder)
    assert len(ds) == 3 and ds.header0 is None
    assert [ds[i][1] for i in range(3)] == [2, 0, 1]
    assert torch.equal(ds[0][0], torch.from_numpy(images[0]).permute(2, 0, 1))


def test_array_labels_use_the_first_value(tmp_path):
    folder = tmp_path / "arr"
    folder.mkdir()
    image = _images(1, seed=3)[0]
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(0, pack(IRHeader(2, [2.0, 2.0], 0, 0), b""))  # header: image key 1 only
        writer.write(1, pack(IRHeader(0, [2.0, 9.0], 0, 0), _png(image)))
    (folder / "property").write_text("3,16,20")
    ds = FaceRecordDataset(folder)
    assert len(ds) == 1 and ds[0][1] == 2


def test_face_dataset_pickles_and_reads(face_set):
    folder, images, labels = face_set
    ds = FaceRecordDataset(folder)
    ds[0]  # opens the .rec handle, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    image, label = clone[5]
    assert torch.equal(image, torch.from_numpy(images[5]).permute(2, 0, 1)) and label == labels[5]


def test_face_dataset_in_forked_workers(face_set):
    folder, images, labels = face_set
    ds = FaceRecordDataset(folder)
    ds[0]  # the parent's open handle must not be shared by the workers
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    got = torch.cat([b[0] for b in batches])
    assert torch.equal(got, torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images]))
    assert torch.cat([b[1] for b in batches]).tolist() == labels


# --------------------------------------------------------------------------- errors
def test_truncated_rec_names_file_and_key(face_set):
    folder, images, _ = face_set
    rec = folder / "train.rec"
    reader = IndexedRecordIO(rec, folder / "train.idx")
    last = reader.offset(6)
    rec.write_bytes(rec.read_bytes()[: last + (rec.stat().st_size - last) // 2])
    ds = FaceRecordDataset(folder)
    with pytest.raises(CorruptRecordError, match=rf"{rec}: record key 6 at offset {last}: truncated") as info:
        ds[5]
    assert isinstance(info.value, CorruptImageError)
    assert torch.equal(ds[4][0], torch.from_numpy(images[4]).permute(2, 0, 1))  # earlier records still read


def test_offset_past_end_of_file(face_set):
    folder, _, _ = face_set
    idx = folder / "train.idx"
    size = (folder / "train.rec").stat().st_size
    idx.write_text(idx.read_text().replace(f"3\t{IndexedRecordIO(folder / 'train.rec', idx).offset(3)}", f"3\t{size + 100}"))
    with pytest.raises(CorruptRecordError, match=rf"record key 3 at offset {size + 100}: truncated.*\({size} bytes\)"):
        FaceRecordDataset(folder)[2]


def test_bad_magic_names_key(face_set):
    folder, _, _ = face_set
    rec = folder / "train.rec"
    offset = IndexedRecordIO(rec, folder / "train.idx").offset(2)
    data = bytearray(rec.read_bytes())
    data[offset:offset + 4] = b"\xde\xad\xbe\xef"
    rec.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=rf"{rec}: record key 2 at offset {offset}: bad magic 0xefbeadde"):
        FaceRecordDataset(folder)[1]


def test_undecodable_image_raises_or_is_skipped(tmp_path):
    images = _images(3, seed=4)
    samples = [(_png(images[0]), 0), (b"not an image at all", 1), (_png(images[2]), 2)]
    folder = write_face_recordio(tmp_path / "bad", samples, num_classes=3, image_size=(16, 20))
    with pytest.raises(CorruptRecordError, match=rf"{folder / 'train.rec'}: record key 2: cannot decode its 19 image bytes"):
        FaceRecordDataset(folder)[1]
    ds = FaceRecordDataset(folder, skip_corrupt=True)
    image, label = ds[1]  # replaced by the next readable sample, with its own label
    assert torch.equal(image, torch.from_numpy(images[2]).permute(2, 0, 1)) and label == 2
    assert ds.skipped == 1


def test_missing_files_are_named(face_set):
    folder, _, _ = face_set
    (folder / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=f"index file {folder / 'train.idx'} does not exist"):
        FaceRecordDataset(folder)
    (folder / "property").unlink()
    with pytest.raises(FileNotFoundError, match=f"property file {folder / 'property'} does not exist"):
        FaceRecordDataset(folder)


def test_malformed_index_line_is_named(face_set):
    folder, _, _ = face_set
    idx = folder / "train.idx"
    lines = idx.read_text().splitlines()
    lines[3] = "3\tnot-an-offset"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=rf"index file {idx}, line 4: expected .*'3\\tnot-an-offset'"):
        FaceRecordDataset(folder)


def test_duplicate_index_key_is_named(face_set):
    folder, _, _ = face_set
    idx = folder / "train.idx"
    idx.write_text(idx.read_text() + "2\t0\n")
    with pytest.raises(RecordIOError, match=r"lists key 2 more than once \(lines 3, 8\)"):
        IndexedRecordIO(folder / "train.rec", idx)


def test_label_outside_num_classes(face_set):
    folder, _, _ = face_set
    (folder / "property").write_text("4,16,20")  # the set holds label 4
    ds = FaceRecordDataset(folder, skip_corrupt=True)  # a wrong class count is never skipped
    assert ds[0][1] == 0
    with pytest.raises(ValueError, match=rf"{folder / 'train.rec'}: record key 4 has label 4 outside \[0, 4\)"):
        ds[3]
    with pytest.raises(ValueError, match=r"sample 1 has label 7 outside \[0, 3\)"):
        write_face_recordio(folder.parent / "other", [(b"x", 0), (b"y", 7)], num_classes=3, image_size=16)


def test_bad_property_and_header(face_set):
    folder, _, _ = face_set
    (folder / "property").write_text("5,112")
    with pytest.raises(RecordIOError, match=rf"property file {folder / 'property'}: expected .*'5,112'"):
        read_property(folder)
    (folder / "property").write_text("5,16,20")
    # drop the last image from the index: the header's image range no longer matches it
    idx = folder / "train.idx"
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(RecordIOError, match=r"header record 0 has label \(7.0, 7.0\).*does not list key 6"):
        FaceRecordDataset(folder)
