"""Writes around the page cache (formats/direct.py): the same bytes at the same offsets as plain writes, for any
offsets and lengths, with or without O_DIRECT; an error of the writer thread reaches the caller and stops it."""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from mupscale_cli.formats import direct
from mupscale_cli.formats.direct import DirectStream
from mupscale_cli.formats.safetensors import StreamWriter, TensorInfo, _read_header


def _pieces(seed: int) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 4095, 4097, 3 << 12, 70_000, 1, 9000, 123_457]
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes() for n in sizes]


@pytest.mark.parametrize("no_direct", [False, True])
def test_stream_writes_the_bytes_it_was_given(tmp_path: Path, monkeypatch, no_direct: bool) -> None:
    if no_direct:
        monkeypatch.setenv("MUPSCALE_NO_DIRECT", "1")
    path = tmp_path / "f.bin"
    s = DirectStream(path, size=16 << 10, depth=2)
    pieces = _pieces(0)
    for p in pieces:
        assert s.write(p) == len(p)
    assert s.tell() == sum(map(len, pieces))
    os.fsync(s.fileno())  # as DCP does before close: the partial block is on disk by then
    assert path.read_bytes() == b"".join(pieces)
    s.close()
    assert path.read_bytes() == b"".join(pieces)
    assert not [t for t in threading.enumerate() if t.name.startswith("mupscale-direct")]


def _disk_full_in_writer_thread(monkeypatch) -> None:
    """Every write of the writer thread (not the caller's own) fails with ENOSPC."""
    real = direct.pwrite_all

    def failing(fd, data, position):
        if threading.current_thread().name.startswith("mupscale-direct"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, position)
    monkeypatch.setattr(direct, "pwrite_all", failing)


def test_stream_raises_the_writer_threads_error_and_stops_it(tmp_path: Path, monkeypatch) -> None:
    _disk_full_in_writer_thread(monkeypatch)
    s = DirectStream(tmp_path / "f.bin", size=16 << 10, depth=2)
    if s._pool is None:
        pytest.skip("no O_DIRECT here: no writer thread")
    with pytest.raises(OSError) as e:
        for p in _pieces(1) * 4:
            s.write(p)
        s.close()
    assert e.value.errno == errno.ENOSPC
    s.abort()
    assert s.closed and not [t for t in threading.enumerate() if t.name.startswith("mupscale-direct")]


def test_safetensors_writer_same_bytes_with_and_without_direct(tmp_path: Path, monkeypatch) -> None:
    """Odd header length, ranges at every alignment: direct and plain writes give the same file."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_001, generator=g)
    files = []
    for no_direct in (False, True):
        if no_direct:
            monkeypatch.setenv("MUPSCALE_NO_DIRECT", "1")
        out = tmp_path / f"o{int(no_direct)}.safetensors"
        with StreamWriter(out, [TensorInfo("a", torch.float32, (3,)), TensorInfo("x", torch.float32, (3_000_001,))],
                          {"k": "v" * 13}, direct=True) as w:
            w.write_chunk("a", 0, torch.ones(3))
            for a in range(0, x.numel(), 1_000_003):
                w.write_chunk("x", a, x[a:a + 1_000_003])
        files.append(out.read_bytes())
    assert files[0] == files[1]
    assert _read_header(tmp_path / "o0.safetensors")[0]["x"].shape == (3_000_001,)


def _layout(seed: int, size: int) -> list[tuple[int, bytes]]:
    """Pieces covering [0, size) exactly once, of sizes from 1 byte to several windows, shuffled."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).numpy().tobytes()
    cuts, at = [0], 0
    while at < size:
        at = min(size, at + int(torch.randint(1, 40_000, (1,), generator=g)))
        cuts.append(at)
    pieces = [(a, data[a:b]) for a, b in zip(cuts, cuts[1:])]
    order = torch.randperm(len(pieces), generator=g).tolist()
    return [pieces[i] for i in order]


def _windows(path: Path, file_size: int, no_direct: bool, **kw) -> tuple[direct.Windows, int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    os.ftruncate(fd, file_size)
    return direct.Windows(fd, None if no_direct else direct.open_direct(path), file_size, **kw), fd


def _as_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


@pytest.mark.parametrize("no_direct", [False, True])
def test_windows_put_in_any_order_from_threads_give_the_file(tmp_path: Path, no_direct: bool) -> None:
    """Pieces of every size and alignment, in random order from four threads, into 16 KiB windows: the file holds
    exactly the bytes put (its last window partial), and the writer thread is gone after finish()."""
    size = 300_001
    pieces = _layout(0, size)
    w, fd = _windows(tmp_path / "f.bin", size, no_direct, size=16 << 10, depth=1)
    chunks = [pieces[i::4] for i in range(4)]
    errors = []

    def run(part):
        try:
            for pos, b in part:
                w.put(pos, _as_tensor(b))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    w.finish()
    w.close_direct()
    os.close(fd)
    expected = bytearray(size)
    for pos, b in pieces:
        expected[pos:pos + len(b)] = b
    assert (tmp_path / "f.bin").read_bytes() == bytes(expected)
    assert not [t for t in threading.enumerate() if t.name.startswith("mupscale-direct")]


def test_windows_rewrite_in_memory_and_on_disk(tmp_path: Path) -> None:
    """A header rewritten in place: into memory while its window is being filled, through the file once written."""
    path = tmp_path / "f.bin"
    w, fd = _windows(path, 40_000, False, size=16 << 10)
    w.put(0, _as_tensor(b"a" * 100))
    w.rewrite(0, b"HEAD")  # window 0 is not whole: in memory
    w.put(100, _as_tensor(b"b" * 39_900))
    w.drain()
    w.rewrite(50, b"MID")  # written by now: through the file
    w.finish()
    os.close(fd)
    assert path.read_bytes() == b"HEAD" + b"a" * 46 + b"MID" + b"a" * 47 + b"b" * 39_900


def test_windows_writer_error_reaches_the_callers_and_stops_the_thread(tmp_path: Path, monkeypatch) -> None:
    _disk_full_in_writer_thread(monkeypatch)
    w, fd = _windows(tmp_path / "f.bin", 200_000, False, size=16 << 10, depth=1)
    with pytest.raises(OSError) as e:
        for pos, b in sorted(_layout(1, 200_000)):
            w.put(pos, _as_tensor(b))
        w.finish()
    assert e.value.errno == errno.ENOSPC
    w.abort()
    w.close_direct()
    os.close(fd)
    assert not [t for t in threading.enumerate() if t.name.startswith("mupscale-direct")]


def test_windows_fall_back_to_the_page_cache_on_einval(tmp_path: Path, monkeypatch) -> None:
    """A file system that takes O_DIRECT opens but refuses its writes (EINVAL): the same bytes through the page
    cache, and no direct write is tried again."""
    real, tried = direct.pwrite_all, []

    def picky(fd, data, position):
        if fd == w._dfd:
            tried.append(position)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, position)
    monkeypatch.setattr(direct, "pwrite_all", picky)
    path = tmp_path / "f.bin"
    w, fd = _windows(path, 100_000, False, size=16 << 10)
    if w._dfd is None:
        pytest.skip("no O_DIRECT here")
    pieces = _layout(2, 100_000)
    for pos, b in pieces:
        w.put(pos, _as_tensor(b))
    w.finish()
    os.close(fd)
    expected = bytearray(100_000)
    for pos, b in pieces:
        expected[pos:pos + len(b)] = b
    assert path.read_bytes() == bytes(expected) and len(tried) == 1


def test_windows_hold_at_most_depth_whole_windows_for_the_writer(tmp_path: Path, monkeypatch) -> None:
    """Backpressure: with a slow disk, put() waits once `depth` whole windows wait for the writer, so memory is
    bounded by the windows being filled plus depth + 1, not by the file."""
    import time
    real, most = direct.pwrite_all, [0]

    def slow(fd, data, position):
        most[0] = max(most[0], len(w._queue))
        time.sleep(0.002)
        return real(fd, data, position)
    monkeypatch.setattr(direct, "pwrite_all", slow)
    w, fd = _windows(tmp_path / "f.bin", 64 * 4096, True, size=4096, depth=2)
    for i in range(64):
        w.put(i * 4096, _as_tensor(bytes([i]) * 4096))
        assert len(w._queue) <= 2
    w.finish()
    os.close(fd)
    assert 1 <= most[0] <= 2, most
