"""Writing around the page cache (O_DIRECT): the kernel's copy of every byte written into the page cache was
the largest CPU cost of a widening (a third of all CPU time at k = 2, more than the widening itself); with
O_DIRECT the disk reads our buffers. Only whole aligned blocks go that way, the ragged ends through the
page cache, so every offset and length works; a file system without O_DIRECT (tmpfs on older kernels,
other systems) gets plain writes, as does MUPSCALE_NO_DIRECT=1. The fsync before each commit stays: it
still flushes the file's metadata, the ragged ends and the device's cache.

`open_direct` and `bounce` serve the safetensors writer (formats/safetensors.py); `DirectStream` is a file
written front to back for DCP's writer (torch.save's stream: formats/dcp.py `save_lazy`)."""
from __future__ import annotations

import errno
import io
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

ALIGN = 4096  # offsets, lengths and memory of O_DIRECT writes: a multiple of every usual block size
_bounces = threading.local()


def open_direct(path: Path) -> int | None:
    """`path` opened for writing with O_DIRECT, or None where there is no such thing."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get("MUPSCALE_NO_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def aligned(nbytes: int) -> torch.Tensor:
    """A new byte buffer of `nbytes` whose memory starts on an ALIGN boundary."""
    buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = -buf.data_ptr() % ALIGN
    return buf[skip:skip + nbytes]


def bounce(nbytes: int) -> torch.Tensor:
    """This thread's aligned buffer of `nbytes` (reused; grown when needed) for a direct write."""
    buf = getattr(_bounces, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _bounces.buf = aligned(nbytes)
    return buf[:nbytes]


def pwrite_all(fd: int, data: bytes | memoryview, position: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


class DirectStream(io.RawIOBase):
    """A new file at `path` written front to back: the bytes gather in aligned buffers of `size`, each
    written with O_DIRECT by a writer thread while the caller goes on making the next ones (at most `depth`
    buffers in flight: memory stays bounded). The last, partial buffer goes through the page cache when the
    stream is drained: by `fileno()` (DCP fsyncs the file next) and by `close()`. An error of the writer
    thread is raised by the next write, fileno() or close(); `abort()` stops it without raising."""

    def __init__(self, path: Path, size: int = 8 << 20, depth: int = 2):
        super().__init__()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._dfd = open_direct(path)
        self._size, self._depth = size, depth
        self._pos = 0  # bytes written (tell)
        self._base = 0  # file offset of the buffer being filled
        self._cur: memoryview | None = None
        self._fill = 0
        self._drained = -1  # _fill when the partial buffer was last written through the page cache
        self._spare: list[tuple[torch.Tensor, memoryview]] = []
        self._pending: deque[tuple[Future, tuple[torch.Tensor, memoryview]]] = deque()
        self._held: tuple[torch.Tensor, memoryview] | None = None
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="mupscale-direct") if self._dfd is not None
                      else None)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv)
        if self._pool is None:
            pwrite_all(self._fd, mv, self._pos)
            self._pos += n
            return n
        i = 0
        while i < n:
            if self._cur is None:
                self._held = self._take()
                self._cur, self._fill = self._held[1], 0
            k = min(n - i, self._size - self._fill)
            self._cur[self._fill:self._fill + k] = mv[i:i + k]
            self._fill += k
            i += k
            if self._fill == self._size:
                self._pending.append((self._pool.submit(self._write_block, self._cur, self._base), self._held))
                self._base += self._size
                self._cur, self._held, self._fill, self._drained = None, None, 0, -1
        self._pos += n
        return n

    def flush(self) -> None:
        pass  # a partial block waits in its buffer; fileno() and close() write it

    def fileno(self) -> int:
        self._drain()
        return self._fd

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._drain()
        finally:
            self._shut()
            super().close()

    def abort(self) -> None:
        """Stop the writer thread and close the file, raising nothing (the caller is failing already)."""
        if self.closed:
            return
        for f, _ in self._pending:
            f.cancel()
        self._shut()
        super().close()

    def _take(self) -> tuple[torch.Tensor, memoryview]:
        if self._spare:
            return self._spare.pop()
        if len(self._pending) < self._depth:
            t = aligned(self._size)
            return t, memoryview(t.numpy())
        f, buf = self._pending.popleft()
        f.result()
        return buf

    def _write_block(self, data: memoryview, offset: int) -> None:
        dfd = self._dfd
        if dfd is not None:
            try:
                pwrite_all(dfd, data, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._dfd = None  # no direct writes of this alignment here: the page cache from now on
                os.close(dfd)
        pwrite_all(self._fd, data, offset)

    def _drain(self) -> None:
        while self._pending:
            f, buf = self._pending.popleft()
            f.result()
            self._spare.append(buf)
        if self._cur is not None and self._fill and self._drained != self._fill:
            pwrite_all(self._fd, self._cur[:self._fill], self._base)
            self._drained = self._fill

    def _shut(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in (self._dfd, self._fd):
            if fd is not None:
                os.close(fd)
        self._dfd = None
        self._pending.clear()
        self._spare.clear()
        self._cur = self._held = None
