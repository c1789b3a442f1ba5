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


def test_stream_raises_the_writer_threads_error_and_stops_it(tmp_path: Path, monkeypatch) -> None:
    real = direct.pwrite_all

    def failing(fd, data, position):
        if threading.current_thread().name.startswith("mupscale-direct"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, position)
    monkeypatch.setattr(direct, "pwrite_all", failing)
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
