"""torch.save's record of one tensor, with the data's CRC-32 computed beforehand, so the caller writes the
tensor's bytes itself: the same bytes as `torch.save(t, f)`.

DCP stores every tensor as a torch.save record (a zip archive). torch.save computes the CRC-32 of the data
on the thread that saves, after the tensor is made: at 3 GB/s it was a third of a DCP widening's
serializing thread. Here the CRC comes from the threads that make the tensor (each piece's CRC while it is
in cache, `crc32_combine` to join them), and the record around the data is torch.save's own, written with
`torch.serialization.skip_data()` (every record but the data's bytes) and completed: the data record's CRC
in its data descriptor and the central directory, and the `.data/serialization_id` record, which torch
derives from the CRCs of the records written (`PyTorchStreamWriter::writeSerializationId`).

`record` checks its reading of torch's format on the skip_data output itself (the id torch wrote there must
be the one the same rule gives for the CRCs found there) and returns None where anything differs from what
it expects (another torch, a zip64 record, an empty tensor): the caller then calls torch.save."""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import torch

MASK = (1 << 64) - 1
DESCRIPTOR = b"PK\x07\x08"
LOCAL = b"PK\x03\x04"
CENTRAL = b"PK\x01\x02"
ID_RECORD = ".data/serialization_id"


def _times(mat: list[int], vec: int) -> int:
    s, i = 0, 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


_SHIFTS: dict[int, list[int]] = {}


def _shift(nbytes: int) -> list[int]:
    """The GF(2) operator that appends `nbytes` zero bytes to a CRC-32 (zlib's crc32_combine), cached: the
    pieces of a tensor have one or two lengths."""
    m = _SHIFTS.get(nbytes)
    if m is not None:
        return m
    op = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    op = _square(_square(_square(op)))  # one zero byte
    result, n = None, nbytes
    while n:
        if n & 1:
            result = op if result is None else [_times(op, v) for v in result]
        n >>= 1
        if n:
            op = _square(op)
    m = result if result is not None else [1 << i for i in range(32)]
    if len(_SHIFTS) < 64:
        _SHIFTS[nbytes] = m
    return m


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _times(_shift(len2), crc1) ^ crc2 if len2 else crc1


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & MASK)) & MASK


class _Skipped(io.RawIOBase):
    """What torch.save writes under skip_data: the bytes before and after the one region it seeks over (the
    data's), never the region itself; read back (zipfile) as the whole archive, the region as zeros."""

    def __init__(self):
        super().__init__()
        self.head, self.tail = bytearray(), bytearray()
        self.gap: int | None = None
        self.pos = 0
        self.closed_for_writing = False  # then seeks only move the read position

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:
        b = memoryview(b).cast("B")
        (self.head if self.gap is None else self.tail).extend(b)
        self.pos += len(b)
        return len(b)

    def seek(self, off: int, whence: int = 0) -> int:
        new = off if whence == 0 else self.pos + off if whence == 1 else len(self) + off
        if self.closed_for_writing:
            self.pos = new
            return new
        if new < self.pos or (new > self.pos and self.gap is not None):
            raise ValueError("torch.save seeks where skip_data should not")
        if new > self.pos:
            self.gap = new - self.pos
        self.pos = new
        return new

    def __len__(self) -> int:
        return len(self.head) + (self.gap or 0) + len(self.tail)

    def at(self, off: int, n: int) -> bytes:
        """Bytes [off, off + n) of the archive, which must not touch the region skipped."""
        h, g = len(self.head), self.gap or 0
        if off + n <= h:
            return bytes(self.head[off:off + n])
        if off >= h + g:
            return bytes(self.tail[off - h - g:off - h - g + n])
        raise ValueError("a read of the skipped region")

    def put(self, off: int, b: bytes) -> None:
        """Replace bytes [off, off + len(b)) after the skipped region."""
        i = off - len(self.head) - (self.gap or 0)
        if i < 0 or i + len(b) > len(self.tail):
            raise ValueError("a patch outside the tail")
        self.tail[i:i + len(b)] = b

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self) - self.pos))
        h, g = len(self.head), self.gap or 0
        for i in range(n):  # zipfile reads the directory: small reads
            j = self.pos + i
            b[i] = self.head[j] if j < h else 0 if j < h + g else self.tail[j - h - g]
        self.pos += n
        return n


def _u32(a: _Skipped, off: int) -> int:
    return struct.unpack("<I", a.at(off, 4))[0]


def data_start(read, info: zipfile.ZipInfo) -> int:
    """Offset of the data of zip member `info`, from its local header (`read(offset, n)` reads the archive)."""
    o = info.header_offset
    if read(o, 4) != LOCAL:
        raise ValueError(f"no local header for {info.filename}")
    n, m = struct.unpack("<HH", read(o + 26, 4))
    return o + 30 + n + m


def _data_start(a: _Skipped, info: zipfile.ZipInfo) -> int:
    return data_start(a.at, info)


def _folded(a: _Skipped, infos: list[zipfile.ZipInfo], data_name: str, first8: bytes) -> list[int]:
    """The values torch folds into the serialization id, in the order written: each record's data-descriptor
    CRC, preceded by bytes 4..8 of a record whose data (written in one piece) begins with the descriptor's
    signature (torch takes any write that begins so for a descriptor). The data record's first bytes are
    `first8` (its bytes are not in `a`)."""
    out = []
    for info in infos:
        start = _data_start(a, info)
        head = first8 if info.filename == data_name else a.at(start, min(8, info.file_size))
        if info.file_size >= 8 and head[:4] == DESCRIPTOR:
            out.append(struct.unpack_from("<I", head, 4)[0])
        end = start + info.compress_size
        if a.at(end, 4) != DESCRIPTOR:
            raise ValueError(f"no data descriptor after {info.filename}")
        out.append(_u32(a, end + 4))
    return out


def _central(a: _Skipped, start: int, count: int) -> dict[str, int]:
    """Record name -> offset of its central directory entry."""
    out, o = {}, start
    for _ in range(count):
        if a.at(o, 4) != CENTRAL:
            raise ValueError("not a central directory entry")
        n, m, k = struct.unpack("<HHH", a.at(o + 28, 6))
        out[a.at(o + 46, n).decode("utf-8")] = o
        o += 46 + n + m + k
    return out


def _serialization_id(names_part: bytes, crcs: list[int]) -> bytes:
    """The id torch writes: 20 digits for the records' names (as found), then 20 for the fold of the CRCs."""
    h = 0
    for c in crcs:
        h = hash_combine(h, c)
    return names_part + b"%020d" % h


class Record:
    """torch.save's record of one tensor, but for the data's bytes: `head` goes before them, `tail(crc,
    first8)` after (it holds the data's CRC-32 and the serialization id derived from it)."""

    def __init__(self, a: _Skipped, infos: list[zipfile.ZipInfo], data: zipfile.ZipInfo, start_dir: int):
        self._a, self._infos, self._data, self._start_dir = a, infos, data, start_dir
        self.head = bytes(a.head)
        self.nbytes = data.file_size

    def tail(self, crc: int, first8: bytes) -> bytes:
        a, infos, d = self._a, self._infos, self._data
        idi = infos[-1]
        at = _data_start(a, idi)
        cd = _central(a, self._start_dir, len(infos))
        a.put(len(a.head) + self.nbytes + 4, struct.pack("<I", crc))
        a.put(cd[d.filename] + 16, struct.pack("<I", crc))
        new_id = _serialization_id(a.at(at, 20), _folded(a, infos[:-1], d.filename, first8))
        a.put(at, new_id)
        id_crc = struct.pack("<I", zlib.crc32(new_id))
        a.put(at + 40 + 4, id_crc)
        a.put(cd[idi.filename] + 16, id_crc)
        return bytes(a.tail)


def record(t: torch.Tensor) -> Record | None:
    """torch.save(t)'s record around t's bytes, for a contiguous CPU tensor `t` whose storage is exactly its
    bytes. None where this torch writes something this reading of its format does not expect (then call
    torch.save)."""
    nbytes = t.untyped_storage().nbytes()
    if nbytes == 0 or nbytes != t.numel() * t.element_size() or nbytes >= 0xFFFFFFFF or not t.is_contiguous():
        return None
    a = _Skipped()
    try:
        with torch.serialization.skip_data():
            torch.save(t, a)
        a.closed_for_writing = True
        if a.gap != nbytes or len(a) >= 0xFFFFFFFF:
            return None
        zf = zipfile.ZipFile(a)
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        data = [i for i in infos if i.filename.split("/", 1)[-1].startswith("data/")]
        idi = infos[-1]
        if (len(data) != 1 or not idi.filename.endswith("/" + ID_RECORD) or idi.file_size != 40
                or data[0].file_size != nbytes or any(i.compress_type != zipfile.ZIP_STORED for i in infos)):
            return None
        d = data[0]
        at = _data_start(a, idi)
        old_id = a.at(at, 40)
        # torch's own id for the skip_data output (its data record: nothing written, CRC 0) must come out of
        # the same rule, else this is not the rule this torch follows
        if _serialization_id(old_id[:20], _folded(a, infos[:-1], d.filename, b"\0" * 8)) != old_id:
            return None
        if _data_start(a, d) != len(a.head):
            return None
        _central(a, zf.start_dir, len(infos))  # readable, before any byte is written
        return Record(a, infos, d, zf.start_dir)
    except (ValueError, KeyError, struct.error, zipfile.BadZipFile, RuntimeError):
        return None


def parts(t: torch.Tensor, crc: int, first8: bytes) -> tuple[bytes, bytes] | None:
    """(head, tail): torch.save(t) is head + t's bytes + tail, given the CRC-32 of those bytes and their first
    8 bytes (`record`, in one call); None where `record` says no."""
    r = record(t)
    if r is None:
        return None
    try:
        return r.head, r.tail(crc, first8)
    except (ValueError, KeyError, struct.error):
        return None
