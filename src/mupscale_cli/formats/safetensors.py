"""Streaming safetensors I/O: validated lazy readers and atomic writers, single-file and HF-sharded.

Writers compute the header from precomputed shapes, so tensors can be produced one at a time (or in
chunks, from several threads) and never need to be in memory together. Output appears atomically.

Over 500 lines: the format's reader, single-file writer and sharded writer share the header code and its
validation, which must agree byte for byte.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from mupscale_cli.formats import digest
from mupscale_cli.formats.direct import Windows, open_direct, pread_all
from mupscale_cli.bounded import loads_json
from mupscale_cli.formats.target import TMP_MARKER, check_inside, commit_path, fsync_dir, temp_name, track, untrack  # noqa: F401
from mupscale_cli.errors import MupscaleError, check_cancelled
from mupscale_cli.libc import libc as c_library

MAX_HEADER_BYTES = 100_000_000
"""The safetensors limit on the JSON header."""

INDEX_SUFFIX = ".safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of a tensor, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------------
# Writing


def _temp_path(dest: Path) -> Path:
    return temp_name(dest)


def _check_metadata(metadata: dict[str, str] | None, where: Path) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MupscaleError(
                f"{where}: safetensors metadata must map strings to strings, got {key!r}: {value!r}; "
                "convert the value with str() or json.dumps()"
            )
    return metadata


def _build_header(
    infos: list[TensorInfo], metadata: dict[str, str], where: Path, reserve: int = 0
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included, padded to 8, plus `reserve` spaces for later metadata)
    and each tensor's absolute byte range."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for info in infos:
        if info.name == "__metadata__" or info.name in ranges:
            raise MupscaleError(f"{where}: tensor name {info.name!r} is reserved or used twice; rename it")
        if info.dtype not in DTYPE_NAMES:
            raise MupscaleError(f"{where}: tensor {info.name!r} has dtype {info.dtype}, which safetensors cannot store; cast it")
        if any(d < 0 for d in info.shape):
            raise MupscaleError(f"{where}: tensor {info.name!r} has a negative dimension in shape {list(info.shape)}")
        header[info.name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        ranges[info.name] = (offset, offset + info.nbytes)
        offset += info.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (reserve + (-(len(text) + reserve) % 8))
    if len(text) > MAX_HEADER_BYTES:
        raise MupscaleError(
            f"{where}: safetensors header would be {len(text)} bytes, over the {MAX_HEADER_BYTES} byte limit; "
            "shorten tensor names or metadata, or shard the checkpoint"
        )
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {k: (a + start, b + start) for k, (a, b) in ranges.items()}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A view of the tensor's bytes in C order (copies only if not CPU-contiguous)."""
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pread_tensor(fd: int, position: int, count: int, dtype: torch.dtype, where: Path,
                  alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
    """`count` elements of `dtype` read with pread from byte `position` into a new 1-d tensor (from
    `alloc(shape, dtype)` if given; no mmap: the bytes read stay page cache, never resident in this process
    beyond the returned tensor)."""
    out = alloc((count,), dtype) if alloc is not None else torch.empty(count, dtype=dtype)
    if count == 0:
        return out
    if not pread_all(fd, memoryview(out.view(torch.uint8).numpy()), position):
        raise MupscaleError(f"{where}: file ended while reading tensor data (truncated or changed since "
                            f"it was opened)")
    return out


def tensor_digest(tensor: torch.Tensor) -> str:
    """Checksum (formats/digest.py) of the bytes safetensors stores for `tensor` (little-endian, C order)."""
    return digest.of_bytes(_tensor_bytes(tensor))


class _Coverage:
    """Disjoint element intervals written so far for one tensor."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> bool:
        """Record [start, end); False if it overlaps an earlier interval."""
        i = bisect.bisect_right(self.starts, start)
        if (i > 0 and self.ends[i - 1] > start) or (i < len(self.starts) and self.starts[i] < end):
            return False
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.total += end - start
        return True


class StreamWriter:
    """Writes one safetensors file tensor by tensor (any order, thread-safe), then commits it atomically.

    The header is fixed by `infos` (offsets in that order). Data goes to `temp_path` next to the
    destination; `commit()` checks every tensor is complete, fsyncs and renames onto `path`.
    With `direct=True` every byte goes through `formats.direct.Windows` (aligned buffers written whole by one
    writer thread, O_DIRECT where the file system takes it); otherwise through positional page cache writes.
    As a context manager: commit on clean exit, abort on exception.
    `update_metadata()` rewrites the header in place before commit (e.g. digests computed while
    writing): the new header must fit in the old one's length, so reserve room with
    `reserve_metadata_bytes` or write same-length placeholders first.
    """

    def __init__(self, path: str | os.PathLike[str], infos: list[TensorInfo], metadata: dict[str, str] | None = None,
                 reserve_metadata_bytes: int = 0, writeback: bool = False, replace: bool = True,
                 direct: bool = False):
        self.path = Path(path)
        self.replace = replace  # False: commit fails if the destination appeared meanwhile
        self._writeback = writeback and _sync_file_range is not None
        if sys.byteorder != "little":
            raise MupscaleError("safetensors writing needs a little-endian machine")
        if not self.path.parent.is_dir():
            raise MupscaleError(f"{self.path}: directory {self.path.parent} does not exist; create it first")
        if self.path.is_dir():
            raise MupscaleError(f"{self.path}: is a directory; give a file name for the output")
        self._metadata = _check_metadata(metadata, self.path)
        header, self._ranges = _build_header(infos, self._metadata, self.path, max(0, reserve_metadata_bytes))
        self._header_len = len(header)
        self._infos = {info.name: info for info in infos}
        self._coverage: dict[str, _Coverage] = {}
        self._lock = threading.Condition()
        self._active = 0
        self.temp_path = _temp_path(self.path)
        self._fd: int | None = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        track(self.temp_path)
        self._windows: Windows | None = None  # direct=True: every byte through aligned windows (formats/direct.py)
        try:
            size = max((end for _, end in self._ranges.values()), default=len(header))
            os.ftruncate(self._fd, size)
            if direct:
                self._windows = Windows(self._fd, open_direct(self.temp_path), size,
                                        after_write=_start_writeback if self._writeback else None)
                self._windows.put(0, torch.frombuffer(bytearray(header), dtype=torch.uint8))
            else:
                self._pwrite(self._fd, header, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor; dtype and shape must match its TensorInfo."""
        info = self._info(name)
        if tuple(tensor.shape) != info.shape:
            raise MupscaleError(f"{self.path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(info.shape)}")
        self._put(info, 0, tensor)

    def write_chunk(self, name: str, flat_element_offset: int, tensor_chunk: torch.Tensor) -> None:
        """Write `tensor_chunk` (flattened, C order) at element `flat_element_offset` of tensor `name`."""
        self._put(self._info(name), flat_element_offset, tensor_chunk)

    def update_metadata(self, metadata: dict[str, str]) -> None:
        """Merge `metadata` into the header's `__metadata__` and rewrite the header in place (before commit)."""
        merged = {**self._metadata, **_check_metadata(metadata, self.path)}
        header, _ = _build_header(list(self._infos.values()), merged, self.path)
        if len(header) > self._header_len:
            raise MupscaleError(f"{self.path}: new metadata needs {len(header) - self._header_len} more header bytes "
                                "than were reserved; pass a larger reserve_metadata_bytes")
        body = header[8:] + b" " * (self._header_len - len(header))
        with self._lock:
            fd = self._fd
            if fd is None:
                raise MupscaleError(f"{self.path}: metadata update after commit or abort")
            self._active += 1
        try:
            if self._windows is not None:
                self._windows.rewrite(0, struct.pack("<Q", len(body)) + body)
            else:
                self._pwrite(fd, struct.pack("<Q", len(body)) + body, 0)
            self._metadata = merged
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    def commit(self) -> None:
        """Check completeness, fsync, rename onto the destination and fsync the directory; abort on failure."""
        try:
            self._check_complete()
            if self._windows is not None:
                self._windows.finish()
            fd = self._take_fd()
            if fd is None:
                raise MupscaleError(f"{self.path}: commit after commit or abort")
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            commit_path(self.temp_path, self.path, self.replace)
            untrack(self.temp_path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporary file (idempotent; no-op after commit)."""
        fd = self._take_fd()
        if fd is not None:
            os.close(fd)
        self.temp_path.unlink(missing_ok=True)
        untrack(self.temp_path)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise MupscaleError(f"{self.path}: tensor {name!r} is not in the header this file was opened with")
        return self._infos[name]

    def _put(self, info: TensorInfo, offset: int, tensor: torch.Tensor) -> None:
        if tensor.dtype != info.dtype:
            raise MupscaleError(f"{self.path}: tensor {info.name!r} has dtype {tensor.dtype}, expected {info.dtype}")
        end = offset + tensor.numel()
        if offset < 0 or end > info.numel:
            raise MupscaleError(
                f"{self.path}: chunk [{offset}, {end}) of tensor {info.name!r} is outside its {info.numel} elements"
            )
        data = _tensor_bytes(tensor)
        with self._lock:
            fd = self._fd
            if fd is None:
                raise MupscaleError(f"{self.path}: write to tensor {info.name!r} after commit or abort")
            if not self._coverage.setdefault(info.name, _Coverage()).add(offset, end):
                raise MupscaleError(f"{self.path}: elements [{offset}, {end}) of tensor {info.name!r} written twice")
            self._active += 1
        try:
            position = self._ranges[info.name][0] + offset * info.dtype.itemsize
            if self._windows is not None:
                self._windows.put(position, torch.frombuffer(data, dtype=torch.uint8) if len(data) else
                                  torch.empty(0, dtype=torch.uint8))
                return
            self._pwrite(fd, data, position)
            if self._writeback and len(data) >= WRITEBACK_MIN_BYTES:
                _start_writeback(fd, position, len(data))
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    @staticmethod
    def _pwrite(fd: int, data: bytes | memoryview, position: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written

    def _check_complete(self) -> None:
        missing = [
            n for n, info in self._infos.items()
            if n not in self._coverage or self._coverage[n].total != info.numel
        ]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise MupscaleError(f"{self.path}: tensors not (fully) written: {', '.join(missing[:5])}{more}")

    def _take_fd(self) -> int | None:
        """Stop new writes, wait for those in flight, and hand over the descriptor (None if already closed)."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._lock.wait_for(lambda: self._active == 0)
            if self._windows is not None:
                self._windows.abort()  # after finish(): nothing left to stop
                self._windows.close_direct()
        return fd


WRITEBACK_MIN_BYTES = 1 << 20


def _load_sync_file_range():
    """Linux's sync_file_range(2) through ctypes, or None. With `writeback=True` a writer asks the kernel to
    start writing each range to disk as soon as it is written, so the disk works while the next ranges are
    computed and the final fsync has little left to do (as it would for a plain sequential writer)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = c_library()
        f = libc.sync_file_range
        f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        f.restype = ctypes.c_int
        return f
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, position: int, length: int) -> None:
    _sync_file_range(fd, position, length, 2)  # SYNC_FILE_RANGE_WRITE: start writing, no wait


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temp = _temp_path(path)
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class ShardedWriter:
    """Writes a Hugging Face sharded checkpoint: `{prefix}-0000i-of-0000N.safetensors` + index.

    Tensors fill shards in the given order up to `shard_size` bytes of data (a larger tensor gets a
    shard of its own). Same `write`/`write_chunk`/`commit`/`abort` interface as StreamWriter;
    `commit()` renames all shards, then writes `{prefix}.safetensors.index.json` last.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        infos: list[TensorInfo],
        metadata: dict[str, str] | None,
        shard_size: int,
        prefix: str = "model",
        shard_metadata: Callable[[list[TensorInfo]], dict[str, str]] | None = None,
        writeback: bool = False,
        direct: bool = False,
    ):
        self.directory = Path(directory)
        if shard_size <= 0:
            raise MupscaleError(f"{self.directory}: shard size must be positive, got {shard_size}")
        if self.directory.exists() and not self.directory.is_dir():
            raise MupscaleError(f"{self.directory}: exists and is not a directory; choose a directory for sharded output")
        metadata = _check_metadata(metadata, self.directory)
        groups: list[list[TensorInfo]] = [[]]
        used = 0
        for info in infos:
            if groups[-1] and used + info.nbytes > shard_size:
                groups.append([])
                used = 0
            groups[-1].append(info)
            used += info.nbytes
        self.index_path = self.directory / f"{prefix}{INDEX_SUFFIX}"
        self._index = {
            "metadata": {**metadata, "total_size": sum(i.nbytes for i in infos)},
            "weight_map": {},
        }
        self._created_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[StreamWriter] = []
        self._by_name: dict[str, StreamWriter] = {}
        self.groups = groups
        try:
            for i, group in enumerate(groups, 1):
                file = f"{prefix}-{i:05d}-of-{len(groups):05d}.safetensors"
                extra = _check_metadata(shard_metadata(group), self.directory) if shard_metadata else {}
                shard = StreamWriter(self.directory / file, group, {**metadata, **extra}, writeback=writeback,
                                     direct=direct)
                self.shards.append(shard)
                for info in group:
                    if info.name in self._by_name:
                        raise MupscaleError(f"{self.directory}: tensor name {info.name!r} is used twice; rename it")
                    self._by_name[info.name] = shard
                    self._index["weight_map"][info.name] = file
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor into its shard."""
        self._shard(name).write(name, tensor)

    def write_chunk(self, name: str, flat_element_offset: int, tensor_chunk: torch.Tensor) -> None:
        """Write a flat chunk of a tensor into its shard."""
        self._shard(name).write_chunk(name, flat_element_offset, tensor_chunk)

    @property
    def files(self) -> list[Path]:
        """Final paths of the shards, then the index."""
        return [s.path for s in self.shards] + [self.index_path]

    def update_metadata(self, metadata: dict[str, str],
                        shard_metadata: Callable[[list[TensorInfo]], dict[str, str]] | None = None) -> None:
        """Merge `metadata` into every shard's header and the index's metadata, and `shard_metadata(infos)`
        into each shard's header only (rewritten in place: the same rules as StreamWriter.update_metadata)."""
        metadata = _check_metadata(metadata, self.directory)
        for group, shard in zip(self.groups, self.shards):
            extra = shard_metadata(group) if shard_metadata else {}
            shard.update_metadata({**metadata, **extra})
        self._index["metadata"].update(metadata)

    def commit(self) -> None:
        """Check every shard is complete, commit them all, then write the index; abort on failure."""
        try:
            for shard in self.shards:
                shard._check_complete()
            for shard in self.shards:
                shard.commit()
            text = json.dumps(self._index, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            _atomic_write_bytes(self.index_path, text.encode())
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove every uncommitted shard's temporary file (and the directory if this writer made it and it is empty)."""
        for shard in self.shards:
            shard.abort()
        if self._created_dir:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _shard(self, name: str) -> StreamWriter:
        if name not in self._by_name:
            raise MupscaleError(f"{self.directory}: tensor {name!r} is not in the header this checkpoint was opened with")
        return self._by_name[name]


# ---------------------------------------------------------------------------------------------------
# Reading


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors file's framing and header; return infos in file order and metadata."""
    if not path.exists():
        raise MupscaleError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise MupscaleError(f"{path}: is a directory, not a .safetensors file; pass the file (or open it as a sharded checkpoint)")
    size = path.stat().st_size
    # a link (a Hugging Face cache links shards to its blobs) is followed; messages name its target too
    bad = f"{path}{f' (a symbolic link to {path.resolve()})' if path.is_symlink() else ''}: not a valid safetensors file"
    with open(path, "rb") as f:
        if size < 8:
            raise MupscaleError(f"{bad}: {size} bytes, too short for the 8-byte header length; the file is empty or truncated")
        (n,) = struct.unpack("<Q", f.read(8))
        # the first 8 bytes of another format are no useful number to show
        if n > MAX_HEADER_BYTES:
            raise MupscaleError(f"{bad}: its 8-byte header length exceeds the {MAX_HEADER_BYTES} byte limit (another "
                                f"format, or corrupted)")
        if 8 + n > size:
            raise MupscaleError(f"{bad}: its header runs past the end of the {size}-byte file (truncated, or "
                                f"another format)")
        raw = f.read(n)
    try:
        header = loads_json(raw.decode("utf-8"), f"{bad}: header", object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise MupscaleError(f"{bad}: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise MupscaleError(f"{bad}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise MupscaleError(f"{bad}: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MupscaleError(f"{bad}: __metadata__ must map strings to strings")
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{bad}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise MupscaleError(f"{where}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise MupscaleError(f"{where}: unknown or unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise MupscaleError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise MupscaleError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        info = TensorInfo(name, DTYPES[dtype], tuple(shape))
        if offsets[1] - offsets[0] != info.nbytes:
            raise MupscaleError(
                f"{where}: shape {shape} of {dtype} needs {info.nbytes} bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        infos[name] = info
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    data_size = size - 8 - n
    end, prev = 0, None
    for begin, stop, name in spans:
        if begin < end:
            raise MupscaleError(f"{bad}: data of tensor {name!r} overlaps tensor {prev!r}")
        if begin > end:
            raise MupscaleError(f"{bad}: {begin - end}-byte gap before tensor {name!r} (data must be contiguous)")
        if stop > data_size:
            raise MupscaleError(f"{bad}: data of tensor {name!r} ends at byte {stop} past the {data_size} data bytes; the file is truncated")
        end, prev = stop, name
    if end != data_size:
        raise MupscaleError(f"{bad}: {data_size - end} trailing bytes after the last tensor")
    return {name: infos[name] for _, _, name in spans}, metadata


class LazySafetensors:
    """A validated, lazily loading reader of one .safetensors file (names in file order)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._infos, self._metadata = _read_header(self.path)
        with open(self.path, "rb") as f:
            position = 8 + struct.unpack("<Q", f.read(8))[0]
        self._offsets: dict[str, int] = {}
        for name, info in self._infos.items():  # file order, contiguous (checked by _read_header)
            self._offsets[name] = position
            position += info.nbytes
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._closed = False
        try:
            self._handle: Any = safe_open(str(self.path), framework="pt")
        except Exception as e:
            raise MupscaleError(f"{self.path}: safetensors could not open it: {_one_line(e)}") from None

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise MupscaleError(f"{self.path}: no tensor named {name!r}")
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        if self._handle is None:
            raise MupscaleError(f"{self.path}: reader used after close()")
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise MupscaleError(f"{self.path}: cannot read tensor {name!r}: {_one_line(e)}") from None

    def read(self, name: str, start: int = 0, count: int | None = None, alloc=None) -> torch.Tensor:
        """Flat elements [start, start + count) of tensor `name` (all by default) as a new 1-d tensor (from
        `alloc(shape, dtype)` if given), read with pread: nothing is memory-mapped, so only the returned
        tensor counts in this process's memory."""
        info = self.info(name)
        count = info.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > info.numel:
            raise MupscaleError(f"{self.path}: read [{start}, {start + count}) of tensor {name!r} is outside its "
                                f"{info.numel} elements")
        fd = self._open_fd()
        return _pread_tensor(fd, self._offsets[name] + start * info.dtype.itemsize, count, info.dtype, self.path,
                             alloc)

    def location(self, name: str) -> tuple[Path, str]:
        """(file, name in the file) of tensor `name`."""
        self.info(name)
        return self.path, name

    def _open_fd(self) -> int:
        """The reader's file descriptor for pread, opened on first use (shared by all threads)."""
        with self._fd_lock:
            if self._closed:
                raise MupscaleError(f"{self.path}: reader used after close()")
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def scan(self, on_piece: Callable[[str, torch.Tensor], None] | None = None,
             piece_bytes: int = 8 << 20, hashing: bool = True) -> str:
        """sha256 of the whole file, read once in file order; `on_piece(name, values)` sees every tensor's
        data as it goes by, in pieces of at most `piece_bytes` (a view of a reused buffer: do not keep it).
        hashing=False: only the pieces, returns ""."""
        h = hashlib.sha256()
        fd = self._open_fd()
        start = min(self._offsets.values(), default=None)
        if start is None:
            with open(self.path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        buf = torch.empty(max(piece_bytes, 64), dtype=torch.uint8)
        if hashing:
            h.update(_pread_tensor(fd, 0, start, torch.uint8, self.path).numpy())
        for name, info in self._infos.items():
            size = info.dtype.itemsize
            step = max(size, piece_bytes // size * size)
            for a in range(0, info.nbytes, step):
                check_cancelled()
                n = min(step, info.nbytes - a)
                view = memoryview(buf[:n].numpy()).cast("B")
                if not pread_all(fd, view, self._offsets[name] + a):
                    raise MupscaleError(f"{self.path}: file ended while reading tensor data (truncated or "
                                        f"changed since it was opened)")
                if hashing:
                    h.update(view)
                if on_piece is not None:
                    on_piece(name, buf[:n].view(info.dtype))
        return h.hexdigest() if hashing else ""

    def read_rows(self, name: str, r0: int, r1: int, alloc=None) -> torch.Tensor:
        """Rows [r0, r1) of tensor `name` (first dimension; C order makes them one contiguous byte range)."""
        info = self.info(name)
        if not info.shape:
            return self.read(name).reshape(())
        row = math.prod(info.shape[1:])
        return self.read(name, r0 * row, (r1 - r0) * row, alloc).reshape(r1 - r0, *info.shape[1:])

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        self._handle = None
        with self._fd_lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> LazySafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class ShardedSafetensors:
    """A reader over a Hugging Face sharded checkpoint, with LazySafetensors' interface.

    `metadata()` is the first shard's `__metadata__`; `index_metadata` is the index's `metadata`.
    """

    def __init__(self, index_path: Path, weight_map: dict[str, str], index_metadata: dict[str, Any]):
        self.path = index_path
        self.index_metadata = index_metadata
        self.shards: dict[str, LazySafetensors] = {}
        self._where: dict[str, LazySafetensors] = {}
        directory = index_path.parent
        files = sorted(set(weight_map.values()))
        for file in files:
            if Path(file).name != file:
                raise MupscaleError(f"{index_path}: weight_map file {file!r} is not a plain file name in {directory}; fix the index")
            if not (directory / file).is_file():
                raise MupscaleError(f"{index_path}: shard {file} listed in weight_map does not exist in {directory}")
            check_inside(directory, directory / file)
        for file in files:
            shard = LazySafetensors(directory / file)
            self.shards[file] = shard
            for name in shard.names():
                if weight_map.get(name) != file:
                    raise MupscaleError(f"{directory / file}: holds tensor {name!r}, which the index maps to {weight_map.get(name)!r}; fix the index")
                self._where[name] = shard
        missing = [n for n in weight_map if n not in self._where]
        if missing:
            raise MupscaleError(f"{index_path}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]} ({len(missing)} missing); fix the index")

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(name)

    def read(self, name: str, start: int = 0, count: int | None = None, alloc=None) -> torch.Tensor:
        return self._shard(name).read(name, start, count, alloc)

    def read_rows(self, name: str, r0: int, r1: int, alloc=None) -> torch.Tensor:
        return self._shard(name).read_rows(name, r0, r1, alloc)

    def location(self, name: str) -> tuple[Path, str]:
        return self._shard(name).location(name)

    def metadata(self) -> dict[str, str]:
        return next(iter(self.shards.values())).metadata() if self.shards else {}

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self) -> ShardedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shard(self, name: str) -> LazySafetensors:
        if name not in self._where:
            raise MupscaleError(f"{self.path}: no tensor named {name!r}")
        return self._where[name]


def find_index(directory: Path) -> Path | None:
    """`model.safetensors.index.json` in `directory`, else its only `*.safetensors.index.json`, else None."""
    default = directory / f"model{INDEX_SUFFIX}"
    if default.is_file():
        return default
    found = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    return found[0] if len(found) == 1 else None


def open_sharded(path: str | os.PathLike[str]) -> ShardedSafetensors:
    """Open a sharded checkpoint from its directory or its `*.safetensors.index.json` file."""
    path = Path(path)
    if path.is_dir():
        index = find_index(path)
        if index is None:
            raise MupscaleError(f"{path}: no single *{INDEX_SUFFIX} in this directory; pass the index file itself")
    elif path.is_file():
        index = path
    else:
        raise MupscaleError(f"{path}: no such file or directory; check the path")
    try:
        data = loads_json(index.read_text(encoding="utf-8"), str(index), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, OSError) as e:
        raise MupscaleError(f"{index}: not a valid JSON index ({_one_line(e)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MupscaleError(f"{index}: expected a JSON object with a \"weight_map\" of tensor name -> shard file")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise MupscaleError(f"{index}: \"metadata\" must be a JSON object")
    return ShardedSafetensors(index, weight_map, metadata)


# ---------------------------------------------------------------------------------------------------
# Sizes

_UNITS = {"": 1, "B": 1}
_UNITS.update({p + "B": 1000 ** (i + 1) for i, p in enumerate("KMGTP")})
_UNITS.update({p + "IB": 1024 ** (i + 1) for i, p in enumerate("KMGTP")})
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in "123", "500MB", "5GB" (SI, 1000^n) or "1.5GiB" (IEC, 1024^n); units are case-insensitive."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise MupscaleError(f"invalid size {text!r}; use a number with an optional unit, e.g. 123, 500MB, 5GB, 1.5GiB")
    value = Fraction(m.group(1)) * _UNITS[unit]
    if value.denominator != 1:
        raise MupscaleError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def fmt_bytes(n: int) -> str:
    """A byte count for people: 512 B, 1.5 MiB, 3.0 TiB, ... (EiB at most; beyond that in powers of ten)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    if n >= 1 << 1000:
        return f"about 2^{n.bit_length() - 1} B"
    x, i = float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x, i = x / 1024, i + 1
    if x >= 1024:
        return f"{x:.1e} EiB"
    return f"{n} B" if i == 0 else f"{x:.1f} {units[i]}"
