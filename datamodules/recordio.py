"""MXNet / insightface RecordIO (``.rec`` + ``.idx``) read and written without mxnet.

**Record framing** (dmlc-core ``src/recordio.cc``). A ``.rec`` file is a sequence of records;
each part of a record is::

    uint32 magic = 0xced7230a (little endian)
    uint32 lrec  = (cflag << 29) | length
    length payload bytes, zero-padded to a multiple of 4

``cflag`` 0 is a whole record. A payload that contains the magic value at a 4-byte-aligned
position is split there and the magic dropped, so that a reader scanning for magic numbers can
resynchronise: cflag 1 is the first part, 2 a middle part, 3 the last part, and the reader joins
the parts re-inserting the magic bytes between them. Magic values at unaligned positions are
written as they are. A record's payload is shorter than ``2**29`` bytes.

**Index** (``.idx``): one text line ``key<TAB>offset`` per record, ``offset`` the byte offset of
the record's first part in the ``.rec`` file; keys are integers.

**Payload** (mxnet ``recordio.pack``): a 24-byte header ``struct.pack("<IfQQ", flag, label, id,
id2)``; if ``flag > 0``, ``flag`` float32 labels follow and replace the header's scalar label;
then the encoded image bytes.

**insightface training set**: a folder with ``train.rec``, ``train.idx`` and ``property``
(``"<num_classes>,<H>,<W>"``). Record 0 is a header with ``flag > 0`` and label
``(end_of_images, end_of_identities)``: images are keys ``1 .. label[0] - 1`` (MS1M:
``(5822654, 5908396)`` for 5,822,653 images; the keys after the images, when present, are
per-identity records that arcface_torch ignores). If record 0 has ``flag == 0``, every key is an
image. An image's class is its header label (a float, or ``label[0]`` of an array) cast to int.
"""
from __future__ import annotations

import math
import numbers
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from .image_folder import CorruptImageError, _ImageDataset, decode_image, image_hw
from .seeded_sampler import SampleKey

__all__ = [
    "MAGIC",
    "RecordIOError",
    "CorruptRecordError",
    "IRHeader",
    "pack",
    "unpack",
    "IndexedRecordIO",
    "RecordIOWriter",
    "write_face_recordio",
    "read_property",
    "FaceRecordDataset",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_IR_FORMAT = "<IfQQ"  # mxnet packs native 'IfQQ': the same 24 bytes on little-endian machines
_IR_SIZE = struct.calcsize(_IR_FORMAT)

Label = Union[float, tuple[float, ...]]


class RecordIOError(ValueError):
    """A malformed ``.idx``/``property`` file or an inconsistent record set."""


class CorruptRecordError(CorruptImageError):
    """A record that cannot be read (bad magic, truncated) or whose image cannot be decoded.

    A :class:`CorruptImageError`, so ``skip_corrupt=True`` datasets replace the sample.
    """


class IRHeader(NamedTuple):
    """mxnet's image-record header; ``label`` is a float, or a tuple of floats when ``flag > 0``."""

    flag: int
    label: Label
    id: int
    id2: int


# --------------------------------------------------------------------------- payload header
def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """``header`` + ``payload`` as one record payload, like mxnet's ``recordio.pack``.

    As in mxnet, ``header.flag`` is ignored: a scalar label gives ``flag = 0``; a sequence label
    gives ``flag = len(label)`` and the labels are stored as float32 after the header.
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Real):
        return struct.pack(_IR_FORMAT, 0, float(header.label), header.id, header.id2) + bytes(payload)
    labels = np.asarray(header.label, dtype="<f4").reshape(-1)
    if labels.size == 0:
        raise ValueError("pack: an array label needs at least one value (flag 0 means a scalar label)")
    return struct.pack(_IR_FORMAT, labels.size, 0.0, header.id, header.id2) + labels.tobytes() + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the remaining (image) bytes.

    Raises :class:`RecordIOError` when the payload is shorter than its header says.
    """
    if len(record) < _IR_SIZE:
        raise RecordIOError(f"record payload of {len(record)} bytes is shorter than the {_IR_SIZE}-byte image-record header")
    flag, label, id_, id2 = struct.unpack_from(_IR_FORMAT, record)
    rest = record[_IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"record header says {flag} float32 labels follow but only {len(rest)} bytes do")
        labels = tuple(float(x) for x in np.frombuffer(rest, dtype="<f4", count=flag))
        return IRHeader(flag, labels, id_, id2), rest[4 * flag:]
    return IRHeader(flag, float(label), id_, id2), rest


# --------------------------------------------------------------------------- framing
def _encode_record(payload: bytes) -> bytes:
    """The on-disk parts of one record (dmlc ``RecordIOWriter::WriteRecord``)."""
    length = len(payload)
    if length > _MAX_LENGTH:
        raise ValueError(f"RecordIO records must be shorter than 2**29 bytes; got {length}")
    # aligned magic positions: only they are split (the reader never scans unaligned bytes)
    words = np.frombuffer(payload, dtype="<u4", count=length // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out = bytearray()
    start = 0
    for cut in cuts:
        out += struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << _LENGTH_BITS) | (cut - start))
        out += payload[start:cut]  # cut - start is a multiple of 4: no padding needed
        start = cut + 4
    out += struct.pack("<II", MAGIC, ((3 if cuts else 0) << _LENGTH_BITS) | (length - start))
    out += payload[start:]
    out += b"\0" * (-(length - start) % 4)
    return bytes(out)


class IndexedRecordIO:
    """Random access to the records of a ``.rec`` file through its ``.idx`` index.

    The index is held in numpy arrays (MS1M has 5.8M keys); the ``.rec`` file is opened on first
    read and reopened in a forked child (DataLoader workers must not share a file position). The
    object pickles without its file handle.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` file (``key<TAB>offset`` lines).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path)
        for kind, path in (("record", self.rec_path), ("index", self.idx_path)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"RecordIO {kind} file {path} does not exist")
        self._keys, self._offsets = self._read_index()
        # lookup by binary search over the sorted keys (usually already sorted: no copy)
        if len(self._keys) > 1 and not bool(np.all(self._keys[1:] > self._keys[:-1])):
            order = np.argsort(self._keys, kind="stable")
            self._sorted_keys = self._keys[order]
            self._sorted_offsets = self._offsets[order]
            duplicate = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
            if duplicate.size:
                key = int(self._sorted_keys[duplicate[0]])
                raise RecordIOError(f"index file {self.idx_path} lists key {key} more than once (lines {self._lines_of(key)})")
        else:
            self._sorted_keys, self._sorted_offsets = self._keys, self._offsets
        self._file: Any = None
        self._pid: Optional[int] = None

    def _read_index(self) -> tuple[np.ndarray, np.ndarray]:
        keys: list[int] = []
        offsets: list[int] = []
        with open(self.idx_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    if len(fields) != 2:
                        raise ValueError
                    key, offset = int(fields[0]), int(fields[1])
                    if offset < 0:
                        raise ValueError
                except ValueError:
                    shown = line.decode("utf-8", "replace").rstrip("\r\n")
                    raise RecordIOError(
                        f"index file {self.idx_path}, line {lineno}: expected '<int key>\\t<byte offset>', got {shown!r}"
                    ) from None
                keys.append(key)
                offsets.append(offset)
        if not keys:
            raise RecordIOError(f"index file {self.idx_path} lists no records")
        return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    def _lines_of(self, key: int) -> str:
        with open(self.idx_path, "rb") as f:
            lines = [str(n) for n, line in enumerate(f, 1) if line.split()[:1] == [str(key).encode()]]
        return ", ".join(lines)

    @property
    def keys(self) -> list[int]:
        """Every key, in index-file order."""
        return self._keys.tolist()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        try:
            self.offset(int(key))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec`` file; :class:`KeyError` if not indexed."""
        pos = int(np.searchsorted(self._sorted_keys, key))
        if pos == len(self._sorted_keys) or int(self._sorted_keys[pos]) != key:
            raise KeyError(f"key {key} is not in the index {self.idx_path} ({len(self)} records)")
        return int(self._sorted_offsets[pos])

    def _handle(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")  # a forked child drops the parent's (shared-position) handle
            self._pid = os.getpid()
        return self._file

    def read(self, key: int) -> bytes:
        """The payload of record ``key``, its parts joined.

        Raises :class:`KeyError` for an unknown key, :class:`CorruptRecordError` for a bad magic
        number, a bad continuation flag or a record that runs past the end of the file.
        """
        offset = self.offset(key)
        where = f"{self.rec_path}: record key {key} at offset {offset}"
        f = self._handle()
        parts: list[bytes] = []
        pos = offset
        try:
            while True:
                f.seek(pos)
                head = f.read(8)
                if len(head) < 8:
                    raise CorruptRecordError(
                        f"{where}: truncated: the part header at byte {pos} runs past the end of the file "
                        f"({os.fstat(f.fileno()).st_size} bytes)"
                    )
                magic, lrec = struct.unpack("<II", head)
                if magic != MAGIC:
                    raise CorruptRecordError(
                        f"{where}: bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x}): "
                        "corrupt file or an index that does not belong to it"
                    )
                cflag, length = lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH
                if cflag not in ((0, 1) if not parts else (2, 3)):
                    raise CorruptRecordError(f"{where}: part {len(parts)} at byte {pos} has continuation flag {cflag}")
                data = f.read(length)
                if len(data) < length:
                    raise CorruptRecordError(
                        f"{where}: truncated: the part at byte {pos} needs {length} bytes, the file holds {len(data)}"
                    )
                parts.append(data)
                if cflag in (0, 3):
                    return _MAGIC_BYTES.join(parts)
                pos += 8 + length + (-length % 4)
        except CorruptRecordError:
            raise
        except OSError as exc:
            raise CorruptRecordError(f"{where}: cannot read: {exc}") from exc

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._pid = None

    def __enter__(self) -> IndexedRecordIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None  # a file handle neither pickles nor survives a process change
        return state

    def __repr__(self) -> str:
        return f"IndexedRecordIO({self.rec_path!r}, {self.idx_path!r}, {len(self)} records)"


class RecordIOWriter:
    """Writes records to ``rec_path`` and their ``key<TAB>offset`` lines to ``idx_path``.

    Use as a context manager (or call :meth:`close`); files are truncated on open.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path)
        self._rec = open(self.rec_path, "wb")
        try:
            self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        except BaseException:
            self._rec.close()
            raise
        self._records: dict[int, tuple[int, int]] = {}  # key -> (offset, on-disk size)

    def write(self, key: int, payload: bytes) -> None:
        """Append ``payload`` as record ``key`` (split around aligned magic values)."""
        key = int(key)
        if key in self._records:
            raise ValueError(f"{self.rec_path}: key {key} is already written")
        record = _encode_record(payload)
        offset = self._rec.tell()
        self._rec.write(record)
        self._idx.write(f"{key}\t{offset}\n")
        self._records[key] = (offset, len(record))

    def _overwrite(self, key: int, payload: bytes) -> None:
        """Replace already written record ``key`` by a payload of the same on-disk size."""
        record = _encode_record(payload)
        offset, size = self._records[key]
        if len(record) != size:
            raise ValueError(f"{self.rec_path}: record {key} ({size} bytes) cannot be replaced by one of {len(record)} bytes")
        end = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(record)
        self._rec.seek(end)

    def close(self) -> None:
        try:
            self._rec.close()
        finally:
            self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()


# --------------------------------------------------------------------------- insightface layout
def write_face_recordio(
    folder: str | os.PathLike,
    samples: Iterable[tuple[bytes, int]],
    num_classes: int,
    image_size: int | tuple[int, int],
) -> Path:
    """Write an insightface training set: ``folder/{train.rec,train.idx,property}``.

    ``samples`` yields ``(encoded image bytes, class index)``; image ``j`` (0-based) becomes key
    ``j + 1`` with a scalar label, and record 0 is the header ``flag 2, label (n + 1, n + 1)``
    (images ``1..n``, no per-identity records). ``.rec``/``.idx`` are written under temporary
    names and renamed when complete; ``property`` (``"<num_classes>,<H>,<W>"``) is written last.
    The images are not decoded: their size is the caller's promise.
    """
    folder = Path(folder)
    height, width = image_hw(image_size)
    if num_classes < 1 or height < 1 or width < 1:
        raise ValueError(f"write_face_recordio: need num_classes, H, W >= 1; got {num_classes}, {height}, {width}")
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = folder / "train.rec", folder / "train.idx"
    tmp_rec, tmp_idx = folder / f".train.rec.{os.getpid()}.tmp", folder / f".train.idx.{os.getpid()}.tmp"
    try:
        with RecordIOWriter(tmp_rec, tmp_idx) as writer:
            # a same-sized placeholder keeps record 0 first in the file (labels are float32: exact to 2**24)
            writer.write(0, pack(IRHeader(2, (1.0, 1.0), 0, 0), b""))
            n = 0
            for n, (image, label) in enumerate(samples, 1):
                if not isinstance(image, (bytes, bytearray, memoryview)) or len(image) == 0:
                    raise ValueError(f"write_face_recordio: sample {n - 1} is not non-empty encoded image bytes ({type(image).__name__})")
                if not 0 <= int(label) < num_classes:
                    raise ValueError(f"write_face_recordio: sample {n - 1} has label {label} outside [0, {num_classes})")
                writer.write(n, pack(IRHeader(0, float(label), 0, 0), bytes(image)))
            if n == 0:
                raise ValueError("write_face_recordio: no samples")
            writer._overwrite(0, pack(IRHeader(2, (float(n + 1), float(n + 1)), 0, 0), b""))
        os.replace(tmp_rec, rec)
        os.replace(tmp_idx, idx)
    finally:
        for tmp in (tmp_rec, tmp_idx):
            tmp.unlink(missing_ok=True)
    (folder / "property").write_text(f"{num_classes},{height},{width}\n")
    return folder


def read_property(folder: str | os.PathLike) -> tuple[int, int, int]:
    """``(num_classes, H, W)`` from ``folder/property`` (text ``"num_classes,H,W"``)."""
    path = Path(folder) / "property"
    if not path.is_file():
        raise FileNotFoundError(f"insightface property file {path} does not exist (expected text '<num_classes>,<H>,<W>')")
    text = path.read_text(errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) < 1:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"property file {path}: expected '<num_classes>,<H>,<W>' (positive integers), got {text!r}") from None
    return values  # type: ignore[return-value]


class FaceRecordDataset(_ImageDataset):
    """``(image, label)`` samples of an insightface RecordIO training folder.

    Labels are read with their image in ``__getitem__`` (nothing is scanned at construction, so
    MS1M's 5.8M records open instantly); ``num_classes`` comes from ``property``. ``paths`` holds
    the image *keys* (a ``range`` or an int64 array, not 5.8M strings).

    Args:
        folder: holds ``train.rec``, ``train.idx`` and ``property``.
        transform: albumentations pipeline, called as ``transform(image=rgb_uint8)["image"]``; when
            None, images are CHW ``uint8`` tensors.
        skip_corrupt: replace unreadable records/undecodable images by the next readable one.

    ``__getitem__`` returns ``(image, label)``: the transformed ``(H, W, 3)`` RGB image (or a
    ``(3, H, W)`` uint8 tensor) and an int in ``[0, num_classes)``; a label outside it raises
    :class:`ValueError` (never skipped: it means a wrong ``property`` file).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        transform: Optional[Callable[..., dict]] = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__([], transform, skip_corrupt)
        self.folder = Path(folder)
        self.num_classes, height, width = read_property(self.folder)
        self.image_size = (height, width)
        self.record = IndexedRecordIO(self.folder / "train.rec", self.folder / "train.idx")
        self.rec_path = self.record.rec_path
        self.header0: Optional[IRHeader] = None
        if 0 in self.record:
            header, _ = self._unpack(0, self.record.read(0))
            if header.flag > 0:
                self.header0 = header
        if self.header0 is not None:
            end = int(self.header0.label[0])  # type: ignore[index]
            if end < 2 or end - 1 not in self.record:
                raise RecordIOError(
                    f"{self.rec_path}: header record 0 has label {self.header0.label} (images are keys 1..label[0]-1), "
                    f"but the index {self.record.idx_path} does not list key {end - 1}"
                )
            self.paths = range(1, end)  # type: ignore[assignment]
        else:
            self.paths = self.record._keys  # type: ignore[assignment]
        self._label: tuple[int, int] = (-1, -1)  # (sample index, label) of the last _read

    def _unpack(self, key: int, payload: bytes) -> tuple[IRHeader, bytes]:
        try:
            return unpack(payload)
        except RecordIOError as exc:
            raise CorruptRecordError(f"{self.rec_path}: record key {key}: {exc}") from None

    def key(self, index: int) -> int:
        """The record key of sample ``index``."""
        return int(self.paths[index])

    def _read(self, i: int) -> np.ndarray:
        key = self.key(i)
        header, image_bytes = self._unpack(key, self.record.read(key))
        value = header.label[0] if isinstance(header.label, tuple) else header.label
        if not math.isfinite(value) or value < 0 or int(value) >= self.num_classes:
            raise ValueError(
                f"{self.rec_path}: record key {key} has label {value:g} outside [0, {self.num_classes}) "
                f"(num_classes from {self.folder / 'property'})"
            )
        image = decode_image(image_bytes)
        if image is None:
            raise CorruptRecordError(
                f"{self.rec_path}: record key {key}: cannot decode its {len(image_bytes)} image bytes: corrupt or not an image"
            )
        # _load returns only the image: keep the label of the sample it actually read (it may skip)
        self._label = (i, int(value))
        return image

    def __getitem__(self, key: Union[int, SampleKey]) -> tuple[Any, int]:
        i, image = self._load(self._index(key))
        read_index, label = self._label
        assert read_index == i, "label bookkeeping out of step with _load"
        return self._transform(image), label
