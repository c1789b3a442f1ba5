"""DCP data files, written and read by mupscale itself: each tensor a torch.save record whose CRC-32 the
threads that make it compute (formats/torchsave.py), read back straight from the file where the record lies
plainly in it (formats/dcp.DcpReader._pread), DCP's own reader everywhere else."""
from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from mupscale_cli.formats import dcp_save
from mupscale_cli.formats import torchsave
from mupscale_cli.formats.dcp import METADATA, DcpReader
from test_dcp import _small_dcp, same_tensors


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _quirk() -> torch.Tensor:
    """A tensor whose bytes begin with a zip data descriptor's signature: torch folds the next 4 bytes into
    the serialization id too (it takes any write that begins so for a descriptor)."""
    t = torch.zeros(4, dtype=torch.int32)
    t.view(torch.uint8)[:4] = torch.tensor(list(b"PK\x07\x08"), dtype=torch.uint8)
    t[1] = 123456789
    return t


TENSORS = {
    "float32 2-d": lambda: torch.randn(10, 37),
    "float64": lambda: torch.randn(3, 3, dtype=torch.float64),
    "0-d": lambda: torch.tensor(5.0),
    "int64": lambda: torch.arange(7),
    "bfloat16": lambda: torch.randn(4, 4).bfloat16(),
    "float16 4-d": lambda: torch.randn(1, 2, 3, 4).half(),
    "bool": lambda: torch.tensor([True, False, True]),
    "one byte": lambda: torch.tensor([7], dtype=torch.uint8),
    "1 MB": lambda: torch.randn(512, 512),
    "descriptor signature first": _quirk,
}


@pytest.mark.parametrize("name", list(TENSORS))
def test_parts_make_torch_saves_bytes(name):
    t = TENSORS[name]()
    ref = io.BytesIO()
    torch.save(t, ref)
    raw = _bytes(t)
    got = torchsave.parts(t, zlib.crc32(raw), raw[:8])
    assert got is not None
    assert got[0] + raw + got[1] == ref.getvalue()


def test_crc32_combine_is_zlibs():
    rnd = random.Random(0)
    for _ in range(300):
        a, b = rnd.randbytes(rnd.randint(0, 3000)), rnd.randbytes(rnd.choice([0, 1, 7, rnd.randint(0, 3000)]))
        assert torchsave.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    big = rnd.randbytes(9 << 20)
    crc, n = 0, 0
    for i in range(0, len(big), 1 << 20):  # pieces of one length, then a shorter last one
        piece = big[i:i + (1 << 20)]
        crc, n = (zlib.crc32(piece), len(piece)) if n == 0 else (
            torchsave.crc32_combine(crc, zlib.crc32(piece), len(piece)), n + len(piece))
    assert crc == zlib.crc32(big)


def test_parts_says_no_where_it_does_not_know(monkeypatch):
    """An empty or non-contiguous tensor: None (torch.save writes it). A torch whose serialization id follows
    another rule: the id in its own skip_data output does not match ours, so None, not a wrong id."""
    assert torchsave.parts(torch.zeros(0), 0, b"") is None
    t = torch.randn(4, 5).t()
    assert torchsave.parts(t, zlib.crc32(_bytes(t.contiguous())), b"") is None
    t = torch.randn(4, 5)
    raw = _bytes(t)
    assert torchsave.parts(t, zlib.crc32(raw), raw[:8]) is not None
    monkeypatch.setattr(torchsave, "hash_combine", lambda seed, value: seed + value)
    assert torchsave.parts(t, zlib.crc32(raw), raw[:8]) is None


# --- the widened checkpoint's data files --------------------------------------------------------------------

def _widen(src: Path, out: Path, **kw) -> None:
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    run_widen(WidenOptions(checkpoint=src, output=out, k="2", spec="mup-mlp", **kw))


def _items(out: Path):
    md = pickle.loads((out / METADATA).read_bytes())
    return md, sorted(md.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset))


@pytest.mark.parametrize("threads", [1, 2])
def test_each_item_is_torch_save_of_its_chunk(tmp_path, threads):
    """What FileSystemWriter writes, byte for byte: one file per rank, byte items first, then each tensor
    chunk as torch.save of it, back to back; here with several blocks per tensor and several pieces per
    block (each piece's CRC joined to the block's)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    src = _small_dcp(tmp_path / "base", width=64)
    out = tmp_path / "out"
    _widen(src, out, threads=threads, chunk_bytes=512)
    md, items = _items(out)
    data = {f.name: f.read_bytes() for f in out.glob("*.distcp")}
    assert list(data) == ["__0_0.distcp"]
    blob = data["__0_0.distcp"]
    end, kinds, chunks = 0, [], 0
    for idx, info in items:
        assert info.offset == end
        end = info.offset + info.length
        record = blob[info.offset:end]
        is_bytes = isinstance(md.state_dict_metadata[idx.fqn], BytesStorageMetadata)
        kinds.append(is_bytes)
        if not is_bytes:
            t = torch.load(io.BytesIO(record), weights_only=True)
            again = io.BytesIO()
            torch.save(t, again)
            assert again.getvalue() == record, idx
            chunks += 1
    assert end == len(blob)
    assert kinds == sorted(kinds, reverse=True)  # byte items, then tensors
    assert chunks > len([k for k, m in md.state_dict_metadata.items() if not isinstance(m, BytesStorageMetadata)])


def test_a_torch_with_another_id_rule_gets_torch_saves_own_records(tmp_path, monkeypatch):
    src = _small_dcp(tmp_path / "base", width=64)
    _widen(src, tmp_path / "ref", chunk_bytes=512)
    monkeypatch.setattr(torchsave, "hash_combine", lambda seed, value: seed + value)
    _widen(src, tmp_path / "out", chunk_bytes=512)
    assert (tmp_path / "ref" / "__0_0.distcp").read_bytes() == (tmp_path / "out" / "__0_0.distcp").read_bytes()


def test_a_writer_asking_ahead_is_refused(tmp_path, monkeypatch):
    """One memory slot holds the block being made and written: a writer that asked for a block before writing
    the previous one would have it overwritten. Refused, and nothing at the output."""
    from mupscale_cli.errors import MupscaleError
    src = _small_dcp(tmp_path / "base", width=64)

    def ahead(items, planner):
        got = [(i, planner.resolve_data(i)) for i in items]
        yield from got
    monkeypatch.setattr(dcp_save, "_resolved_in_order", ahead)
    out = tmp_path / "out"
    with pytest.raises(MupscaleError, match="asked for a block before writing the previous one"):
        _widen(src, out, chunk_bytes=512)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "mupscale-tmp" in p.name]


def test_a_writer_losing_bytes_is_caught_before_the_commit(tmp_path, monkeypatch):
    from mupscale_cli.errors import MupscaleError
    src = _small_dcp(tmp_path / "base", width=64)
    monkeypatch.setattr(dcp_save, "_write_tensor", lambda stream, t, crc: torch.save(t.reshape(-1)[:0].clone(), stream))
    out = tmp_path / "out"
    with pytest.raises(MupscaleError, match="came out short"):
        _widen(src, out, chunk_bytes=512)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "mupscale-tmp" in p.name]


def test_a_writer_asking_in_another_order_gets_the_same_tensors(tmp_path, monkeypatch):
    """Blocks are made when the writer asks for them: a writer asking in another order gets the same
    tensors."""
    src = _small_dcp(tmp_path / "base", width=64)
    _widen(src, tmp_path / "ref", chunk_bytes=512)
    from torch.distributed.checkpoint.planner import WriteItemType
    seen = []

    def backwards(items, planner):
        order = [i for i in items if i.type == WriteItemType.BYTE_IO] + [
            i for i in items if i.type != WriteItemType.BYTE_IO][::-1]
        for item in order:
            seen.append(item.index.fqn)
            yield item, planner.resolve_data(item)
    monkeypatch.setattr(dcp_save, "_resolved_in_order", backwards)
    _widen(src, tmp_path / "out", chunk_bytes=512)
    assert len(seen) > 10
    same_tensors(tmp_path / "ref", tmp_path / "out")


# --- reading rows straight from the file ----------------------------------------------------------------------

def _reference(d: Path) -> dict[str, torch.Tensor]:
    """Every stored chunk as torch.load reads its record: (key, offsets) -> tensor."""
    md = pickle.loads((d / METADATA).read_bytes())
    out = {}
    for idx, info in md.storage_data.items():
        with open(d / info.relative_path, "rb") as f:
            f.seek(info.offset)
            rec = f.read(info.length)
        v = torch.load(io.BytesIO(rec), weights_only=True)
        if isinstance(v, torch.Tensor):
            out[(idx.fqn, tuple(idx.offset or ()))] = v
    return out


def test_rows_are_read_straight_from_the_file(tmp_path, monkeypatch):
    """A plain checkpoint's rows come from the file with one pread per stored chunk they touch, never through
    DCP's reader (which loads the whole stored chunk for any rows of it): the same values."""
    src = _small_dcp(tmp_path / "base", width=16)
    ref = _reference(src)

    def refuse(*a, **k):
        raise AssertionError("read through DCP's reader")
    monkeypatch.setattr(DcpReader, "_read", refuse)
    r = DcpReader(src)
    n = 0
    for (key, off), whole in ref.items():
        shape = tuple(whole.shape)
        if not shape:
            assert torch.equal(r.read_rows(key, 0, 1), whole)
            continue
        for a in range(shape[0]):
            for b in range(a + 1, min(shape[0], a + 3) + 1):
                assert torch.equal(r.read_rows(key, a, b), whole[a:b]), (key, a, b)
                n += 1
    assert n > 100


def _with_record(d: Path, key: str, record: bytes, junk: int = 0) -> Path:
    """d with the stored item of tensor `key` replaced by `record` (+ `junk` bytes after it), appended to its
    file."""
    md = pickle.loads((d / METADATA).read_bytes())
    idx = next(i for i in md.storage_data if i.fqn == key)
    info = md.storage_data[idx]
    f = d / info.relative_path
    info.offset = f.stat().st_size
    info.length = len(record) + junk
    with open(f, "ab") as fh:
        fh.write(record + os.urandom(junk))
    (d / METADATA).write_bytes(pickle.dumps(md))
    return d


def _rezip(t: torch.Tensor, change) -> bytes:
    """torch.save(t) rewritten member by member through Python's zipfile, each member's bytes through
    change(name, bytes)."""
    src = io.BytesIO()
    torch.save(t, src)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src.getvalue())) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename.split("/", 1)[1], zin.read(info)))
    return out.getvalue()


def test_records_read_through_dcps_reader(tmp_path, monkeypatch):
    """Where the bytes do not lie plainly in the file, DCP's reader reads them (and its values are right):
    a transposed stored tensor, a record in a zip with the data compressed; a stored
    tensor that starts inside its storage is read from the file, from its first element."""
    key = "model.hidden.0.weight"
    w = DcpReader(_small_dcp(tmp_path / "w")).get(key)  # 8 x 8 float64
    used = []
    real = DcpReader._read
    monkeypatch.setattr(DcpReader, "_read", lambda self, *a: (used.append(1), real(self, *a))[1])

    def read(d: Path) -> torch.Tensor:
        used.clear()
        return DcpReader(d).get(key)

    buf = io.BytesIO()
    torch.save(w.t().contiguous().t(), buf)  # the same values, column-major storage
    assert torch.equal(read(_with_record(_small_dcp(tmp_path / "a"), key, buf.getvalue())), w) and used

    src = io.BytesIO()
    torch.save(w, src)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src.getvalue())) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED
                          if info.filename.endswith("data/0") else zipfile.ZIP_STORED)
    try:
        got = read(_with_record(_small_dcp(tmp_path / "c"), key, out.getvalue()))
    except Exception:  # noqa: BLE001 - torch's reader may refuse a compressed record: not read from the file
        got = None
    assert used and (got is None or torch.equal(got, w))

    base = torch.cat([torch.full((3, 8), 7.0, dtype=torch.float64), w])
    buf = io.BytesIO()
    torch.save(base[3:], buf)  # storage of 11 rows, the tensor its last 8
    assert torch.equal(read(_with_record(_small_dcp(tmp_path / "d"), key, buf.getvalue())), w) and not used


def test_a_record_shorter_than_its_tensor_is_not_read_past(tmp_path, monkeypatch):
    """data.pkl says 64 elements but the data record holds 2, the item padded to its chunk's size: reading
    64 elements from the record's data would read the zip's directory and the padding as values. Not read
    from the file: DCP's reader reads the record, and refuses it."""
    from mupscale_cli.errors import MupscaleError
    key = "model.hidden.0.weight"
    w = DcpReader(_small_dcp(tmp_path / "w")).get(key)
    short = _rezip(w, lambda name, b: b[:16] if name == "data/0" else b)
    d = _with_record(_small_dcp(tmp_path / "a"), key, short, junk=1024)
    with pytest.raises(MupscaleError, match="cannot read") as e:
        DcpReader(d).get(key)
    assert "\n" not in str(e.value)


def test_a_record_whose_directory_overstates_its_data_is_not_read_past_its_item(tmp_path):
    """The data record's local header and directory entry claim the tensor's 8192 bytes, but the record holds
    16 and the item ends 8192 bytes after its start: read from the file, the tensor would run past the item.
    Not read from the file: DCP's reader reads the record, and refuses it."""
    from mupscale_cli.errors import MupscaleError
    key = "model.hidden.0.weight"
    w = DcpReader(_small_dcp(tmp_path / "w", width=32)).get(key)  # 32 x 32 float64: 8192 bytes
    src = io.BytesIO()
    torch.save(w, src)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src.getvalue())) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in sorted(zin.infolist(), key=lambda i: i.filename.endswith("data/0")):  # the data record last
            b = zin.read(info)
            zout.writestr(info.filename, b[:16] if info.filename.endswith("data/0") else b)
    raw = bytearray(out.getvalue())
    for sig, at in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):  # its sizes, where the last entry keeps them
        i = raw.rfind(sig)
        raw[i + at:i + at + 8] = (8192).to_bytes(4, "little") * 2
    assert len(raw) < 8192
    d = _with_record(_small_dcp(tmp_path / "a", width=32), key, bytes(raw), junk=8192 - len(raw))
    with pytest.raises(MupscaleError, match="cannot read") as e:
        DcpReader(d).get(key)
    assert "\n" not in str(e.value)


def test_column_chunks_are_read_by_dcps_reader(tmp_path, monkeypatch):
    """A tensor stored as column chunks (tensor parallelism): rows of it are columns of each chunk, not one
    region of the output: DCP's reader places them. A single row is one region: read from the file."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    key = "model.hidden.0.weight"
    d = _small_dcp(tmp_path / "a")
    w = DcpReader(d).get(key)  # 8 x 8
    md = pickle.loads((d / METADATA).read_bytes())
    old = md.storage_data.pop(MetadataIndex(key, torch.Size([0, 0])))
    f = d / old.relative_path
    m = md.state_dict_metadata[key]
    m.chunks = []
    for c0 in (0, 4):
        buf = io.BytesIO()
        torch.save(w[:, c0:c0 + 4].contiguous(), buf)
        off = f.stat().st_size
        with open(f, "ab") as fh:
            fh.write(buf.getvalue())
        m.chunks.append(ChunkStorageMetadata(torch.Size([0, c0]), torch.Size([8, 4])))
        md.storage_data[MetadataIndex(key, torch.Size([0, c0]))] = type(old)(old.relative_path, off,
                                                                              len(buf.getvalue()))
    (d / METADATA).write_bytes(pickle.dumps(md))
    used = []
    real = DcpReader._read
    monkeypatch.setattr(DcpReader, "_read", lambda self, *a: (used.append(1), real(self, *a))[1])
    r = DcpReader(d)
    assert torch.equal(r.read_rows(key, 2, 5), w[2:5]) and used
    used.clear()
    assert torch.equal(r.read_rows(key, 6, 7), w[6:7]) and not used


def test_a_big_endian_record_is_read_by_dcps_reader_without_a_crash(tmp_path):
    """A record of the other byte order: its bytes are not this machine's values (torch.load byteswaps them),
    and torch.load onto the meta device, which finds where a record's data lies, crashes the process on it
    (torch 2.13). Read by DCP's reader, in a child process so that a crash is a failure, not the suite's end."""
    import subprocess
    import sys
    key = "model.hidden.0.weight"
    w = DcpReader(_small_dcp(tmp_path / "w")).get(key)
    big = _rezip(w, lambda name, b: b"big" if name == "byteorder" else
                 w.numpy().byteswap().tobytes() if name == "data/0" else b)
    d = _with_record(_small_dcp(tmp_path / "b"), key, big)
    torch.save(w, tmp_path / "w.pt")
    code = ("import sys, torch; from mupscale_cli.formats.dcp import DcpReader; "
            "got = DcpReader(sys.argv[1]).get(sys.argv[2]); sys.exit(0 if torch.equal(got, torch.load(sys.argv[3])) "
            "else 3)")
    r = subprocess.run([sys.executable, "-c", code, str(d), key, str(tmp_path / "w.pt")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def _short(tmp_path: Path, name: str) -> Path:
    key = "model.hidden.0.weight"
    w = DcpReader(_small_dcp(tmp_path / f"{name}-w")).get(key)
    if name == "record-short":
        return _with_record(_small_dcp(tmp_path / name), key, _rezip(w, lambda n, b: b[:16] if n == "data/0" else b),
                            junk=1024)
    return _with_record(_small_dcp(tmp_path / name), key, _rezip(
        w, lambda n, b: b"big" if n == "byteorder" else w.numpy().byteswap().tobytes() if n == "data/0" else b))


@pytest.mark.parametrize("name", ["record-short", "record-big-endian"])
def test_hostile_records_through_the_command(tmp_path, name):
    """The hostile corpus's records, through `mupscale widen`: a record shorter than its tensor is exit 2 and
    one line, nothing at -o; a big-endian record widens like its little-endian twin (no crash)."""
    from conftest import mupscale
    src = _short(tmp_path, name)
    out = tmp_path / "out"
    r = mupscale("widen", str(src), "-o", str(out), "--k", "2", "--spec", "mup-mlp")
    if name == "record-short":
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mupscale: error: ") and "cannot read" in lines[0], r.stderr
        assert not out.exists() and not list(tmp_path.glob(".out*"))
        return
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    mupscale("widen", str(_small_dcp(tmp_path / "plain")), "-o", str(ref), "--k", "2", "--spec", "mup-mlp",
             check=True)
    same_tensors(ref, out)
