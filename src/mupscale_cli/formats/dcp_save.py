"""Writing a DCP checkpoint (torch.distributed.checkpoint) lazily: `save_lazy` is `dcp.save` of a tree whose
tensors are placeholders, with a planner that makes each row block when the writer asks for it and a
FileSystemWriter whose data file is written here: the same file DCP's own writer makes, byte for byte, each
tensor torch.save's record (formats/torchsave.py) written piece by piece as the threads make them, its
CRC-32 theirs. Under torch.distributed each rank saves its share and DCP's coordinator writes the one
`.metadata` (the collective commit)."""
from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.direct import DirectStream
from mupscale_cli.formats.torchsave import crc32_combine, record


def set_path(tree: dict, path: tuple, value) -> None:
    """tree[path[0]][path[1]]... = value, making dicts (str keys) and lists (int keys) on the way."""
    node = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        fresh = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            while len(node) <= part:
                node.append(None)
            if node[part] is None:
                node[part] = fresh
            node = node[part]
        else:
            node = node.setdefault(part, fresh)
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def row_blocks(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of about `max_bytes` each (at least one row) covering a tensor; [(0, 1)] if 0-d."""
    if not shape:
        return [(0, 1)]
    row = max(1, math.prod(shape[1:])) * itemsize
    step = max(1, max_bytes // row)
    return [(r0, min(shape[0], r0 + step)) for r0 in range(0, max(shape[0], 1), step)] if shape[0] else [(0, 0)]


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous tensor `t` (held by the caller), any dtype, as one memoryview."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def _resolved_in_order(items, planner):
    """(item, its data) in FileSystemWriter's order for one file: byte items, then tensors, each as planned;
    each resolved when the previous one is written."""
    from torch.distributed.checkpoint.planner import WriteItemType
    for item in [i for i in items if i.type == WriteItemType.BYTE_IO] + [
            i for i in items if i.type != WriteItemType.BYTE_IO]:
        yield item, planner.resolve_data(item)


def _write_tensor(stream, t: torch.Tensor, made: tuple | None) -> None:
    """torch.save(t, stream), written piece by piece as the threads make them: torch.save's record
    (formats.torchsave) around the pieces' bytes, its tail from their CRC-32s joined; `made` is ([(future or
    None, piece)], [(crc, nbytes)]) in row order. torch.save itself where the record says no (once every
    piece is made)."""
    rec = record(t) if made is not None else None
    if rec is None:
        for f, _ in made[0] if made is not None else ():
            if f is not None:
                f.result()
        torch.save(t, stream)
        return
    pieces, crcs = made
    stream.write(rec.head)
    for f, piece in pieces:
        if f is not None:
            f.result()
        stream.write(_bytes_of(piece))
    crc, n = crcs[0]
    for c, m in crcs[1:]:
        crc, n = crc32_combine(crc, c, m), n + m
    raw = _bytes_of(t)
    if n != len(raw):
        raise MupscaleError(f"internal: the pieces of a block hold {n} bytes of its {len(raw)}")
    stream.write(rec.tail(crc, bytes(raw[:8])))


def save_lazy(tree: dict, mine: dict[str, list[tuple[int, int]]], make: Callable[..., torch.Tensor],
              out_dir: Path, distributed: bool, rank: int = 0,
              on_tensor: Callable[[str, torch.Tensor], None] = lambda k, t: None, threads: int = 1,
              piece_bytes: int = 8 << 20,
              on_piece: Callable[[str, torch.Tensor], None] = lambda k, t: None) -> str | None:
    """dcp.save of `tree` into `out_dir`. Its tensors are meta placeholders: this rank writes the row blocks
    `mine[key]` of each (one DCP chunk per block; a key absent from `mine` is written by another rank), each
    made by `make(key, r0, r1)` when the writer reaches it, shown to `on_tensor(key, block)` (this thread)
    and each piece of it to `on_piece(key, piece)` (the thread that made it). Non-tensor entries are written
    by rank 0. distributed=True: a collective save over the default process group; DCP's coordinator (rank
    0) writes `.metadata` once every rank has written, listing every rank's chunks.

    Memory holds one block, in one buffer reused block after block, made by `threads` threads in pieces of
    about `piece_bytes` in row order and written piece by piece as they come (`make(key, r0, r1, alloc)` of
    any row range gives the same bytes; its large buffers come from `alloc`, reused by each thread piece
    after piece); a writer asking for a block before writing the previous one is refused. Returns None, or
    why this rank's files hold fewer bytes than it made (then the output must not be committed)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        """DCP's FileSystemWriter with one file per rank (thread_count=1), its data file written here: the same
        name, items, order and bytes as FileSystemWriter.write_data (byte items, then tensors, each a
        torch.save record), as a formats.direct.DirectStream, each tensor's record written piece by piece
        as the threads make them (`_write_tensor`). Each item is resolved once the previous one is
        written."""

        def write_data(self, plan, planner):
            from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
            from torch.distributed.checkpoint.storage import WriteResult
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            results = []
            stream = DirectStream(Path(self.fs.concat_path(self.path, name)))
            try:
                for item, data in _resolved_in_order(plan.items, planner):
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        _write_tensor(stream, data, planner.made(data))
                        planner.written(item.index.fqn, data)
                    length = stream.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(name, offset, length)))
                if self.sync_files:
                    os.fsync(stream.fileno())
            except BaseException:
                stream.abort()
                raise
            stream.close()
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(results)
            return fut

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    class Lazy(DefaultSavePlanner):
        """Each block is made when the writer asks for it, its pieces by the pool in row order, and written
        piece by piece as they come (`_write_tensor`): the threads make later pieces while the main thread
        writes earlier ones and the disk works. One block in memory, in one slot reused block after block."""
        _last = None
        _written = None
        _made: tuple = (None, None)

        def create_local_plan(self):
            plan = super().create_local_plan()
            items = []
            for it in plan.items:
                if it.type == WriteItemType.BYTE_IO:
                    if rank == 0:
                        items.append(it)
                    continue
                size = it.tensor_data.size
                for r0, r1 in mine.get(it.index.fqn, []):
                    off = torch.Size([r0] + [0] * (len(size) - 1)) if len(size) else torch.Size([])
                    sizes = torch.Size([r1 - r0, *size[1:]]) if len(size) else torch.Size([])
                    items.append(WriteItem(index=MetadataIndex(it.index.fqn, off), type=WriteItemType.SHARD,
                                           tensor_data=TensorWriteData(ChunkStorageMetadata(off, sizes),
                                                                       it.tensor_data.properties, size)))
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            if self._last is not None and self._written is not self._last:  # its slot is about to be reused
                raise MupscaleError("internal: the DCP writer asked for a block before writing the previous "
                                    "one")
            for f, _ in self._made[1][0] if self._made[1] is not None else ():  # made (written, normally):
                if f is not None:  # none may still be writing into the slot the next block takes
                    f.result()
            t, pieces, crcs = _start(write_item)
            self._made = (t, (pieces, crcs))
            self._last = t
            nbytes[0] += t.numel() * t.element_size()
            return t

        def made(self, t: torch.Tensor) -> tuple | None:
            """Block `t`'s pieces as (future or None, piece) and their (CRC-32, bytes), in row order."""
            return self._made[1] if self._made[0] is t else None

        def written(self, key: str, t: torch.Tensor) -> None:
            """The writer has written block `t` of `key` (its slot may take another block)."""
            self._written = t
            on_tensor(key, t)

    slot: list = [None]

    def _block(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor whose storage is exactly its bytes (what torch.save writes), in one buffer reused block
        after block (fresh pages cost the kernel's faults and zeroing every time), grown to the largest."""
        n = math.prod(shape) * dtype.itemsize
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        if slot[0] is None or slot[0].numel() < n:
            slot[0] = None
            slot[0] = torch.empty(n, dtype=torch.uint8)
        mem = (ctypes.c_char * n).from_address(slot[0].data_ptr())
        return torch.frombuffer(mem, dtype=torch.uint8).view(dtype).view(shape)

    def _start(write_item) -> tuple:
        """The block of `write_item` (`make` may return the input's memory: copied into the block), its pieces
        made by the pool in row order (futures) or here (no pool): (block, [(future or None, piece)], [(CRC-32,
        bytes) of each piece, filled in as they are made])."""
        key, chunk = write_item.index.fqn, write_item.tensor_data.chunk
        r0 = chunk.offsets[0] if len(chunk.offsets) else 0
        r1 = r0 + chunk.sizes[0] if len(chunk.sizes) else 1
        t = _block(tuple(chunk.sizes), write_item.tensor_data.properties.dtype)
        if len(chunk.sizes) == 0:
            rows = [(0, 1)]
        else:
            row = max(1, math.prod(chunk.sizes[1:])) * t.element_size()
            step = max(1, piece_bytes // row)
            rows = [(a, min(r1, a + step)) for a in range(r0, r1, step)]
        crcs: list = [(0, 0)] * max(1, len(rows))
        pieces = []
        for i, (a, b) in enumerate(rows):
            piece = t if t.dim() == 0 else t[a - r0:b - r0]
            if pool is None:
                fill(t, key, r0, r1, a, b, crcs, i)
                pieces.append((None, piece))
            else:
                pieces.append((pool.submit(fill, t, key, r0, r1, a, b, crcs, i), piece))
        return t, pieces, crcs

    local = threading.local()

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """This thread's buffers for one piece, reused piece after piece (fresh pages cost the kernel's
        faults and zeroing every time)."""
        n = dtype.itemsize * math.prod(shape)
        if n < (1 << 20):
            return torch.empty(shape, dtype=dtype)
        free, used = local.__dict__.setdefault("free", []), local.__dict__.setdefault("used", [])
        fits = [i for i, x in enumerate(free) if x.numel() >= n]
        buf = free.pop(min(fits, key=lambda i: free[i].numel())) if fits else torch.empty(n, dtype=torch.uint8)
        used.append(buf)
        return buf[:n].view(dtype).view(shape)

    def fill(t: torch.Tensor, key: str, r0: int, r1: int, a: int, b: int, crcs: list, i: int) -> None:
        """Rows [a, b) of block `t` (rows [r0, r1) of `key`) made and copied in; crcs[i] = (their CRC-32,
        their bytes), computed here while they are in this core's cache; shown to `on_piece`."""
        try:
            piece = t if t.dim() == 0 else t[a - r0:b - r0]
            spare = [piece]

            def into(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
                """`alloc`, but the first buffer of the piece's size and dtype is the piece itself: where the
                widening writes its result there (the usual case), there is no copy to make."""
                if spare and dtype == piece.dtype and math.prod(shape) == piece.numel():
                    return spare.pop().view(shape)
                return alloc(shape, dtype)
            made = make(key, a, b, into)
            if made.dtype != t.dtype or made.numel() != piece.numel():
                raise MupscaleError(f"internal: rows [{a}, {b}) of {key!r} came out as {made.dtype}, "
                                    f"{made.numel()}")
            if not (made.data_ptr() == piece.data_ptr() and made.is_contiguous()):
                piece.copy_(made.reshape(piece.shape))
            del made
            raw = _bytes_of(piece)
            crcs[i] = (zlib.crc32(raw), len(raw))
            on_piece(key, piece)
        finally:
            free, used = local.__dict__.setdefault("free", []), local.__dict__.setdefault("used", [])
            free.extend(used)
            used.clear()
            if len(free) > 6:  # keep the largest
                free.sort(key=lambda x: x.numel())
                del free[:len(free) - 6]

    # "torch.distributed is disabled ... single process": a filter for the whole process, as catch_warnings
    # is not thread-safe (another thread's leaving it restores the filters this save relies on)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    nbytes = [0]
    writer = Writer(out_dir, thread_count=1, sync_files=True)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="mupscale-dcp") if threads > 1 else None
    saved = torch.get_num_threads()
    try:
        if pool is not None:
            torch.set_num_threads(1)  # our threads do the parallel work
        dcp.save(tree, storage_writer=writer, planner=Lazy(), no_dist=not distributed)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(saved)
    files = sorted(out_dir.glob(f"__{rank}_*.distcp"))
    held = sum(f.stat().st_size for f in files)
    if held < nbytes[0]:  # a block released before it was written (torch's writer resolved items ahead)
        return (f"rank {rank}'s files hold {held} bytes for {nbytes[0]} bytes of tensors: this torch's DCP "
                f"writer resolved items before writing the previous ones")
    return None


def placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")
