"""Tests for streaming safetensors I/O."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mupscale_cli.formats.safetensors import (
    TMP_MARKER,
    LazySafetensors,
    ShardedWriter,
    StreamWriter,
    TensorInfo,
    open_sharded,
    parse_size,
)
from mupscale_cli.errors import MupscaleError


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "f32": torch.randn(7, generator=g),
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, 2, generator=g).to(torch.float16),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(513, 1027, generator=g),
    }


def infos_of(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if TMP_MARKER in p.name]


def test_round_trip_mixed_dtypes(tmp_path: Path) -> None:
    tensors = sample()
    dest = tmp_path / "out.safetensors"
    with StreamWriter(dest, infos_of(tensors), {"format": "pt", "k": "4"}) as w:
        for name in reversed(list(tensors)):
            w.write(name, tensors[name])
    assert_same(load_file(dest), tensors)
    reader = LazySafetensors(dest)
    assert reader.names() == list(tensors)
    assert reader.metadata() == {"format": "pt", "k": "4"}
    assert reader.info("bf16") == TensorInfo("bf16", torch.bfloat16, (4, 6))
    assert reader.info("big").nbytes == 513 * 1027 * 4
    assert_same({n: reader.get(n) for n in reader.names()}, tensors)
    assert leftovers(tmp_path) == []


def test_header_padded_and_matches_save_file_reader(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(3, dtype=torch.float16)}
    dest = tmp_path / "a.safetensors"
    with StreamWriter(dest, infos_of(tensors), None) as w:
        w.write("a", tensors["a"])
    (n,) = struct.unpack("<Q", dest.read_bytes()[:8])
    assert n % 8 == 0
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref)
    assert dest.read_bytes()[8 + n :] == ref.read_bytes()[-6:]


def test_chunked_and_threaded_writes(tmp_path: Path) -> None:
    big = torch.randn(300, 200).to(torch.bfloat16)
    other = torch.arange(1000, dtype=torch.int64)
    dest = tmp_path / "c.safetensors"
    w = StreamWriter(dest, infos_of({"big": big, "other": other}), None)
    flat = big.reshape(-1)
    starts = list(range(0, flat.numel(), 7001))
    threads = [
        threading.Thread(target=w.write_chunk, args=("big", s, flat[s : s + 7001]))
        for s in reversed(starts)
    ]
    threads.append(threading.Thread(target=w.write, args=("other", other)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.commit()
    assert_same(load_file(dest), {"big": big, "other": other})


def test_non_contiguous_input(tmp_path: Path) -> None:
    t = torch.randn(5, 4).t()
    dest = tmp_path / "t.safetensors"
    with StreamWriter(dest, infos_of({"t": t}), None) as w:
        w.write("t", t)
    assert torch.equal(load_file(dest)["t"], t)


def test_abort_and_exception_leave_nothing(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2)}
    dest = tmp_path / "x.safetensors"
    w = StreamWriter(dest, infos_of(tensors), None)
    assert w.temp_path.exists() and TMP_MARKER in w.temp_path.name and w.temp_path.parent == tmp_path
    w.abort()
    with pytest.raises(RuntimeError):
        with StreamWriter(dest, infos_of(tensors), None) as w:
            w.write("a", tensors["a"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_commit_fails_and_cleans_up(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2), "b": torch.ones(3), "e": torch.ones(0)}
    dest = tmp_path / "x.safetensors"
    with pytest.raises(MupscaleError, match="not \\(fully\\) written: b$"):
        with StreamWriter(dest, infos_of(tensors), None) as w:
            w.write("a", tensors["a"])
            w.write("e", tensors["e"])
    assert list(tmp_path.iterdir()) == []
    w = StreamWriter(dest, infos_of(tensors), None)
    w.write("a", tensors["a"])
    w.write("e", tensors["e"])
    w.write_chunk("b", 0, torch.ones(2))
    with pytest.raises(MupscaleError, match="not \\(fully\\) written: b$"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_write_errors(tmp_path: Path) -> None:
    dest = tmp_path / "x.safetensors"
    w = StreamWriter(dest, [TensorInfo("a", torch.float32, (2, 3))], None)
    for call, pattern in [
        (lambda: w.write("a", torch.ones(3, 2)), "shape"),
        (lambda: w.write("a", torch.ones(2, 3, dtype=torch.float64)), "dtype"),
        (lambda: w.write("zz", torch.ones(2, 3)), "'zz'"),
        (lambda: w.write_chunk("a", 5, torch.ones(2)), "outside"),
        (lambda: w.write_chunk("a", -1, torch.ones(1)), "outside"),
    ]:
        with pytest.raises(MupscaleError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)
    w.write_chunk("a", 0, torch.ones(3))
    with pytest.raises(MupscaleError, match="twice"):
        w.write_chunk("a", 2, torch.ones(2))
    w.write_chunk("a", 3, torch.ones(3))
    with pytest.raises(MupscaleError, match="twice"):
        w.write("a", torch.ones(2, 3))
    w.commit()
    with pytest.raises(MupscaleError, match="after commit"):
        w.write_chunk("a", 0, torch.ones(1))
    with pytest.raises(MupscaleError, match="metadata"):
        StreamWriter(tmp_path / "m.safetensors", [], {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(MupscaleError, match="twice"):
        StreamWriter(tmp_path / "d.safetensors", [TensorInfo("a", torch.int8, ()), TensorInfo("a", torch.int8, ())], None)
    with pytest.raises(MupscaleError, match="does not exist"):
        StreamWriter(tmp_path / "nodir" / "x.safetensors", [], None)
    assert leftovers(tmp_path) == []


def test_empty_checkpoint(tmp_path: Path) -> None:
    dest = tmp_path / "e.safetensors"
    with StreamWriter(dest, [], {"a": "b"}):
        pass
    assert load_file(dest) == {}
    assert LazySafetensors(dest).metadata() == {"a": "b"}


def test_sharded_round_trip(tmp_path: Path) -> None:
    tensors = sample()
    out = tmp_path / "sharded"
    with ShardedWriter(out, infos_of(tensors), {"format": "pt"}, shard_size=parse_size("100B")) as w:
        for name, t in tensors.items():
            w.write(name, t)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and len(files) > 3
    assert index["weight_map"]["big"] not in {index["weight_map"][n] for n in tensors if n != "big"}
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        loaded.update(load_file(out / f))
    assert_same(loaded, tensors)
    for path in (out, out / "model.safetensors.index.json"):
        reader = open_sharded(path)
        assert reader.names() == list(tensors)
        assert reader.metadata() == {"format": "pt"}
        assert reader.info("big").shape == (513, 1027)
        assert_same({n: reader.get(n) for n in reader.names()}, tensors)
    assert leftovers(out) == []


def test_sharded_abort_and_missing(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(4), "b": torch.ones(4)}
    out = tmp_path / "s"
    with pytest.raises(MupscaleError, match="not \\(fully\\) written: b$"):
        with ShardedWriter(out, infos_of(tensors), None, shard_size=16, prefix="x") as w:
            w.write("a", tensors["a"])
    assert not out.exists()


def test_open_sharded_errors(tmp_path: Path) -> None:
    out = tmp_path / "s"
    tensors = {"a": torch.ones(4), "b": torch.ones(2), "c": torch.ones(2)}
    with ShardedWriter(out, infos_of(tensors), None, shard_size=16) as w:
        for name, t in tensors.items():
            w.write(name, t)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    assert wm["a"] != wm["b"] == wm["c"]
    cases = [
        ({**index, "weight_map": {**wm, "d": wm["a"]}}, "tensor 'd' is not in shard"),
        ({**index, "weight_map": {"a": wm["a"], "b": wm["b"]}}, "holds tensor 'c'"),
        ({**index, "weight_map": {**wm, "b": wm["a"]}}, "holds tensor 'b'"),
        ({**index, "weight_map": {**wm, "b": "nope.safetensors"}}, "does not exist"),
        ({**index, "weight_map": {**wm, "b": "../x.safetensors"}}, "plain file name"),
        ([1], "weight_map"),
    ]
    for bad, pattern in cases:
        index_path.write_text(json.dumps(bad))
        with pytest.raises(MupscaleError, match=pattern) as e:
            open_sharded(out)
        assert "\n" not in str(e.value)
    index_path.write_text("{not json")
    with pytest.raises(MupscaleError, match="JSON"):
        open_sharded(index_path)
    index_path.unlink()
    with pytest.raises(MupscaleError, match="index"):
        open_sharded(out)
    with pytest.raises(MupscaleError, match="no such"):
        open_sharded(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("123", 123), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29), ("2 kib", 2048), ("7B", 7), ("1TB", 10**12)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1", "1.5", "0.1B", "1e3", "5 G B"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(MupscaleError, match="invalid size"):
        parse_size(text)


def framed(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BROKEN: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "too short"),
    "truncated length": (b"\x10\x00\x00", "too short"),
    "huge header length": (struct.pack("<Q", 10**12) + b"{}", "exceeds"),
    "header past EOF": (struct.pack("<Q", 64) + b"{}", "runs past the end"),
    "not JSON": (framed(None, raw=b"{nope"), "not valid JSON"),
    "not UTF-8": (framed(None, raw=b'{"\xff": 1}'), "not UTF-8"),
    "JSON list": (framed([1, 2]), "JSON list"),
    "entry not object": (framed({"a": 3}), "not an object"),
    "unknown dtype": (framed({"a": {**F32, "dtype": "F13"}}, b"\0" * 8), "unknown or unsupported dtype 'F13'"),
    "bad shape": (framed({"a": {**F32, "shape": [-2]}}, b"\0" * 8), "shape"),
    "bad offsets": (framed({"a": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8), "data_offsets"),
    "shape/size mismatch": (framed({"a": {**F32, "shape": [3]}}, b"\0" * 8), "needs 12 bytes"),
    "offsets past EOF": (framed({"a": F32}, b"\0" * 4), "past the 4 data bytes"),
    "overlap": (
        framed({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlaps",
    ),
    "gap": (framed({"a": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12), "gap"),
    "trailing bytes": (framed({"a": F32}, b"\0" * 9), "trailing"),
    "duplicate key": (framed(None, b"\0" * 8, raw=b'{"a":' + json.dumps(F32).encode() + b',"a":' + json.dumps(F32).encode() + b"}"), "duplicate"),
    "bad metadata": (framed({"__metadata__": {"x": 1}, "a": F32}, b"\0" * 8), "__metadata__"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files(tmp_path: Path, case: str) -> None:
    content, pattern = BROKEN[case]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(MupscaleError, match=pattern) as e:
        LazySafetensors(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MupscaleError, match="no such file"):
        LazySafetensors(tmp_path / "nope.safetensors")
    with pytest.raises(MupscaleError, match="is a directory"):
        LazySafetensors(tmp_path)


def test_reader_unknown_name(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2)}, path)
    reader = LazySafetensors(path)
    with pytest.raises(MupscaleError, match="no tensor named 'b'"):
        reader.get("b")
    with pytest.raises(MupscaleError, match="no tensor named 'b'"):
        reader.info("b")


def test_short_pwrites_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, pos: real(fd, memoryview(data)[:1000], pos))
    t = torch.randn(3000, dtype=torch.float64)
    dest = tmp_path / "p.safetensors"
    with StreamWriter(dest, infos_of({"t": t}), None) as w:
        w.write("t", t)
    assert torch.equal(load_file(dest)["t"], t)
