"""Writing around the page cache (O_DIRECT), from one writer thread per file.

The kernel's copy of every byte written into the page cache was the largest CPU cost of a widening (a third
of all CPU time at k = 2, more than the widening itself); with O_DIRECT the disk reads our buffers. Direct
writes need aligned offsets, lengths and memory, so the bytes gather in aligned buffers first and each
whole buffer is written by one writer thread while the callers make the next bytes: the disk never waits
for the CPU, nor the CPU for the disk, and there are no small writes. Only a file's last, partial block goes
through the page cache. A file system without O_DIRECT (tmpfs on older kernels, other systems), or one that
refuses a direct write with EINVAL, gets the same buffers as plain writes, as does MUPSCALE_NO_DIRECT=1.
The fsync before each commit stays: it flushes the file's metadata, its tail and the device's cache.

`Windows` is a file of known size written at known positions in any order (the safetensors writer,
formats/safetensors.py); `DirectStream` is a file written front to back (DCP's data files, torch.save's
stream: formats/dcp_save.py `save_lazy`)."""
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


def pwrite_all(fd: int, data: bytes | memoryview, position: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


def pread_all(fd: int, data: memoryview, position: int) -> bool:
    """Fill `data` with the file's bytes from `position`; False if the file ends first."""
    view = memoryview(data).cast("B")
    while view:
        n = os.preadv(fd, [view], position)
        if n <= 0:
            return False
        view, position = view[n:], position + n
    return True


WINDOW = 4 << 20  # bytes of a window: large enough for the disk's full speed, small enough for flat memory


class Windows:
    """A file of `file_size` bytes written at known positions, in any order and from any thread, through
    aligned in-memory windows: window i holds the file's bytes [i * size, (i + 1) * size).

    `put` copies bytes into the windows they fall in; a window whose every byte has arrived goes to one writer
    thread, which writes it whole, at an aligned offset from aligned memory (O_DIRECT through `dfd` where the
    file system takes it, else through `fd` and the page cache; the file's last, partial window's ragged tail
    always through `fd`), window after window, while the callers make the next ranges. No block is written
    both ways, none twice, and there are no small writes. At most `depth` whole windows wait for the writer
    (then `put` waits: memory stays bounded). `finish()` waits until every
    window is written and raises the writer's error, if any (as the next `put` does); `abort()` stops the writer
    without raising. Each byte of the file must be put exactly once (the caller checks that)."""

    def __init__(self, fd: int, dfd: int | None, file_size: int, size: int = WINDOW, depth: int = 3,
                 after_write=None):
        if size <= 0 or size % ALIGN:
            raise ValueError(f"window size {size} is not a positive multiple of {ALIGN}")
        self._fd, self._dfd = fd, dfd
        self._file_size, self._size, self._depth = file_size, size, depth
        self._after_write = after_write  # called (fd, offset, length) after a window goes through the page cache
        self._open: dict[int, list] = {}  # window -> [buffer, bytes arrived]: filling, waiting or being written
        self._queue: deque[int] = deque()  # whole windows waiting for the writer
        self._writing: int | None = None
        self._spare: list[torch.Tensor] = []
        self._error: BaseException | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mupscale-direct", daemon=True)
        self._thread.start()

    def put(self, position: int, data: torch.Tensor) -> None:
        """Copy the bytes of `data` (1-d uint8) to file offset `position`."""
        n, i = data.numel(), 0
        if position < 0 or position + n > self._file_size:
            raise ValueError(f"bytes [{position}, {position + n}) outside the file's {self._file_size}")
        while i < n:
            w, off = divmod(position + i, self._size)
            k = min(n - i, self._size - off)
            with self._cond:
                self._check()
                win = self._open.get(w)
                if win is None:
                    win = self._open[w] = [self._spare.pop() if self._spare else aligned(self._size), 0]
            win[0][off:off + k].copy_(data[i:i + k])  # outside the lock: other ranges of the window side by side
            with self._cond:
                win[1] += k
                if win[1] == self._expected(w):
                    self._queue.append(w)
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: len(self._queue) <= self._depth or self._error is not None
                                        or self._stopping)
                    self._check()
            i += k

    def drain(self) -> None:
        """Wait until every whole window is written; raise the writer's error, if any."""
        with self._cond:
            self._cond.wait_for(lambda: (not self._queue and self._writing is None) or self._error is not None)
            self._check()

    def rewrite(self, position: int, data: bytes) -> None:
        """Replace bytes already put (a header rewritten in place): in memory where their window is still
        being filled, else through the page cache."""
        with self._cond:
            self._cond.wait_for(lambda: (not self._queue and self._writing is None) or self._error is not None)
            self._check()
            i = 0
            while i < len(data):
                w, off = divmod(position + i, self._size)
                k = min(len(data) - i, self._size - off)
                win = self._open.get(w)
                if win is not None:
                    win[0][off:off + k].copy_(torch.frombuffer(bytearray(data[i:i + k]), dtype=torch.uint8))
                else:
                    pwrite_all(self._fd, data[i:i + k], position + i)
                i += k

    def finish(self) -> None:
        """Write everything (every byte must have been put), stop the writer; raise its error, if any."""
        try:
            self.drain()
            with self._cond:
                left = sorted(self._open)
            if left:
                raise RuntimeError(f"internal: bytes of window {left[0]} never written")
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the writer thread (after the write it is in, if any) and drop the windows; raises nothing."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            self._open.clear()
            self._spare.clear()

    def _expected(self, w: int) -> int:
        return min(self._size, self._file_size - w * self._size)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopping:
            raise RuntimeError("internal: write after the file was finished or aborted")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                w = self._writing = self._queue.popleft()
                buf = self._open[w][0]
                self._cond.notify_all()  # a put waiting for room in the queue
            try:
                self._write(buf, w * self._size, self._expected(w))
            except BaseException as e:  # raised to the callers by their next put, drain or finish
                with self._cond:
                    self._error, self._writing = e, None
                    self._cond.notify_all()
                return
            with self._cond:
                del self._open[w]
                self._spare.append(buf)
                self._writing = None
                self._cond.notify_all()

    def _write(self, buf: torch.Tensor, offset: int, n: int) -> None:
        view = memoryview(buf.numpy())
        body = n // ALIGN * ALIGN
        dfd = self._dfd
        if dfd is not None and body:
            try:
                pwrite_all(dfd, view[:body], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._dfd = None  # no direct writes of this alignment here: the page cache from now on
                os.close(dfd)
                body = 0
        else:
            body = 0
        if body < n:
            pwrite_all(self._fd, view[body:n], offset + body)
            if self._after_write is not None:
                self._after_write(self._fd, offset + body, n - body)

    def close_direct(self) -> None:
        """Close the O_DIRECT descriptor (after finish or abort)."""
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None


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
