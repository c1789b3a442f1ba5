"""torch.distributed.checkpoint (DCP) in and out, widen under torchrun.

A 2-rank FSDP2 job (tests/dcp_job.py, gloo on CPU, float64) trains a μP MLP, saves model + AdamW state (+
scheduler, train_state) with dcp.save and records 50 more steps. mupscale widens the checkpoint in one
process and under torchrun with 2 ranks; the widened checkpoints load into FSDP2 jobs at width ×2 with 2
ranks and with 1 rank, which must follow the base trajectory to 1e-12 relative."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import mupscale
from mupscale_cli.formats.dcp import METADATA, DcpReader

JOB = Path(__file__).with_name("dcp_job.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TOL = 1e-12


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    return e


def torchrun(n: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    if check and r.returncode:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({r.returncode}): {r.stderr[-3000:]}")
    return r


def widen_cli(src: Path, out: Path, ranks: int = 1, *extra: str) -> subprocess.CompletedProcess:
    args = ["widen", str(src), "-o", str(out), "--k", "2", "--spec", "mup-mlp", *extra]
    if ranks == 1:
        return mupscale(*args, check=True)
    return torchrun(ranks, "-m", "mupscale_cli", *args)


def same_tensors(a: Path, b: Path) -> None:
    ra, rb = DcpReader(a), DcpReader(b)
    assert set(ra.paths) == set(rb.paths)
    for k in ra.paths:
        if ra.is_tensor(k):
            assert torch.equal(ra.get(k), rb.get(k)), k
        elif k != "mupscale":
            assert ra.value(k) == rb.value(k), k


def follows(base: Path, wide: Path) -> None:
    a, b = torch.load(base), torch.load(wide)
    assert len(a["loss"]) == len(b["loss"]) == 50
    rel = max(abs(x - y) / abs(x) for x, y in zip(a["loss"], b["loss"]))
    out = float((a["out"] - b["out"]).abs().max() / a["out"].abs().max())
    assert rel <= TOL and out <= TOL, (rel, out)
    assert b["lr"][0] == pytest.approx(a["lr"][0] / 2, rel=1e-15)  # the matrix group's lr × 1/k, schedule on


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("dcp")
    torchrun(2, str(JOB), "base", str(d / "base"), str(d / "base.pt"))
    return d


def test_fsdp2_resume_plain_layout(plain):
    """1-process and 2-rank widen give the same tensors; both resume exactly at 2 and at 1 rank."""
    d = plain
    widen_cli(d / "base", d / "w1")
    widen_cli(d / "base", d / "w2", 2, "--chunk-size", "16")  # DCP chunks of 1 KiB: matrices in 2 chunks
    assert sorted(p.name for p in (d / "w2").iterdir()) == [METADATA, "__0_0.distcp", "__1_0.distcp"]
    md = DcpReader(d / "w2").md
    assert len(md.state_dict_metadata["model.hidden.0.weight"].chunks) == 2
    assert {i.relative_path for i in md.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}
    same_tensors(d / "w1", d / "w2")
    torchrun(2, str(JOB), "wide", str(d / "w1"), str(d / "t2.pt"))
    follows(d / "base.pt", d / "t2.pt")
    torchrun(1, str(JOB), "wide", str(d / "w2"), str(d / "t1.pt"))
    follows(d / "base.pt", d / "t1.pt")
    assert not [p for p in d.iterdir() if ".mupscale-tmp-" in p.name]


def test_fsdp2_resume_torchtitan_layout(tmp_path):
    """Model at the top level, optimizer flattened per tensor under `optimizer.`, lr_scheduler, dataloader,
    train_state carried over."""
    torchrun(2, str(JOB), "base", str(tmp_path / "base"), str(tmp_path / "base.pt"), "--layout", "titan")
    r = widen_cli(tmp_path / "base", tmp_path / "w")
    assert "3 param groups" in r.stderr
    keys = set(DcpReader(tmp_path / "w").paths)
    assert {"input.weight", "optimizer.state.hidden.0.weight.exp_avg", "optimizer.param_groups.readout.bias.eps",
            "dataloader.sample", "train_state.step", "lr_scheduler.last_epoch"} <= keys
    torchrun(1, str(JOB), "wide", str(tmp_path / "w"), str(tmp_path / "t.pt"), "--layout", "titan")
    follows(tmp_path / "base.pt", tmp_path / "t.pt")


def test_rows_read_only_overlapping_chunks(plain):
    """A 2-rank checkpoint stores each sharded tensor in 2 chunks; a row range reads the right values."""
    r = DcpReader(plain / "base")
    key = "model.hidden.0.weight"
    assert len(r.md.state_dict_metadata[key].chunks) == 2
    full = r.get(key)
    for r0, r1 in [(0, 3), (2, 7), (5, 8), (3, 4)]:
        assert torch.equal(r.read_rows(key, r0, r1), full[r0:r1])
    sd = torch.load(plain / "base.pt")
    assert sd["world"] == 2


def test_dcp_to_safetensors_and_hf(plain, tmp_path):
    """--format safetensors / hf publish a DCP checkpoint: the same widened tensors."""
    from safetensors.torch import load_file
    widen_cli(plain / "base", tmp_path / "w.safetensors", 1, "--no-optimizer")
    widen_cli(plain / "base", tmp_path / "hf", 1, "--format", "hf", "--no-optimizer")
    st = load_file(tmp_path / "w.safetensors")
    ref = DcpReader(plain / "w1") if (plain / "w1").exists() else None
    hf = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        hf.update(load_file(f))
    assert set(st) == set(hf) == {"input.weight", "input.bias", "hidden.0.weight", "hidden.0.bias",
                                  "readout.weight", "readout.bias"}
    for n in st:
        assert torch.equal(st[n], hf[n])
        if ref is not None:
            assert torch.equal(st[n], ref.get(f"model.{n}"))


# --- killing a rank, hostile inputs -----------------------------------------------------------------------

def _small_dcp(d: Path, width: int = 8) -> Path:
    """A single-process DCP checkpoint in the plain layout (mup-mlp names, AdamW state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch import nn
    torch.manual_seed(0)
    m = nn.ModuleDict({"input": nn.Linear(6, width), "hidden": nn.ModuleList([nn.Linear(width, width)]),
                       "readout": nn.Linear(width, 4)}).double()
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randn(3, 6, dtype=torch.float64)
    m["readout"](m["hidden"][0](m["input"](x))).sum().backward()
    o.step()
    msd, osd = get_state_dict(m, o)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=d, no_dist=True)
    return d


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_pid(root: int, rank: int) -> int | None:
    for c in _children(root):
        try:
            envs = (Path("/proc") / str(c) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in envs:
            return c
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_killing_one_rank_leaves_nothing(tmp_path):
    base = _small_dcp(tmp_path / "base", width=1024)  # 8 MiB hidden matrix; widened ×2 with AdamW: ~100 MiB
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "mupscale_cli", "widen", str(base), "-o", str(out), "--k", "2", "--spec", "mup-mlp"]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.time() + 300
    while time.time() < deadline and p.poll() is None and not killed:
        tmps = [t for t in tmp_path.glob(".out.mupscale-tmp-*") if any(t.glob("__1_*.distcp"))]
        if tmps:
            pid = _rank_pid(p.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.005)
    p.communicate(timeout=300)
    assert killed, "rank 1 never started writing"
    assert p.returncode != 0
    assert not out.exists()


def _hostile(tmp_path: Path, name: str) -> Path:
    d = _small_dcp(tmp_path / name)
    data = sorted(d.glob("*.distcp"))[0]
    if name == "truncated":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size - 100)
    elif name == "missing-file":
        data.unlink()
    elif name == "garbled":
        raw = bytearray(data.read_bytes())
        raw[:64] = b"\xff" * 64  # the first stored item's torch.save header
        data.write_bytes(bytes(raw))
    else:
        md = pickle.loads((d / METADATA).read_bytes())
        if name == "chunk-shape":
            m = md.state_dict_metadata["model.hidden.0.weight"]
            c = m.chunks[0]
            m.chunks[0] = type(c)(offsets=c.offsets, sizes=torch.Size([c.sizes[0], c.sizes[1] + 1]))
        elif name == "tensor-shape":
            m = md.state_dict_metadata["optim.state.hidden.0.weight.exp_avg"]
            m.size = torch.Size([m.size[0] * 2, m.size[1]])
        elif name == "pickle-code":
            md = _Evil()
        (d / METADATA).write_bytes(pickle.dumps(md))
    return d


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mupscale-dcp-pwned",))


HOSTILE = ["truncated", "missing-file", "chunk-shape", "tensor-shape", "garbled", "pickle-code"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_dcp(tmp_path, name):
    """In process (the command's own error path): one line, nothing at -o, no temporaries."""
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    from mupscale_cli.errors import MupscaleError
    src = _hostile(tmp_path, name)
    out = tmp_path / "out"
    with pytest.raises(MupscaleError) as e:
        run_widen(WidenOptions(checkpoint=src, output=out, k="2", spec="mup-mlp"))
    assert "\n" not in str(e.value) and str(src.name) in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert not Path("/tmp/mupscale-dcp-pwned").exists()


@pytest.mark.parametrize("name", ["truncated", "pickle-code"])
def test_hostile_dcp_cli(tmp_path, name):
    """Through the command: exit 2, one line on stderr, no traceback, nothing at -o."""
    src = _hostile(tmp_path, name)
    out = tmp_path / "out"
    r = mupscale("widen", str(src), "-o", str(out), "--k", "2", "--spec", "mup-mlp")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: "), r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert not Path("/tmp/mupscale-dcp-pwned").exists()


# --- verify under torchrun ------------------------------------------------------------------------------

def test_verify_under_torchrun_same_figures(tmp_path):
    """2 ranks, both models sharded with FSDP2 (gloo): an exact widening passes and one whose eps was not
    rescaled fails at step 1, with every per-step figure equal to the single-process verify's."""
    import json
    from test_verify import edit_pt, make_ck, widen_to
    src = make_ck(tmp_path, "mlp", "adamw")
    wide = widen_to(src, tmp_path / "wide.pt")

    def unscale(ck):
        for g in ck["optimizer"]["param_groups"]:
            g["eps"] = 1e-6
    bad = edit_pt(wide, tmp_path / "bad.pt", unscale)
    for w, rc in [(wide, 0), (bad, 1)]:
        one, two = tmp_path / f"{w.stem}-1.json", tmp_path / f"{w.stem}-2.json"
        args = ["verify", str(src), str(w), "--steps", "12", "-q"]
        r1 = mupscale(*args, "--json", str(one))
        r2 = torchrun(2, "-m", "mupscale_cli", *args, "--json", str(two), check=False)
        assert r1.returncode == rc and (r2.returncode != 0) == bool(rc), (r1.stderr, r2.stderr[-2000:])
        a, b = json.loads(one.read_text()), json.loads(two.read_text())
        assert b["ranks"] == 2 and "ranks" not in a
        assert a["result"] == b["result"] == ("pass" if rc == 0 else "fail")
        assert a["rows"] == b["rows"] and len(a["rows"]) == (13 if rc == 0 else 2)
        assert a.get("first_failure") == b.get("first_failure")
        if rc:
            assert b["first_failure"]["step"] == 1
        assert r2.stdout.count("PASS" if rc == 0 else "FAIL") == 1  # rank 0 speaks


def test_verify_dcp_checkpoints_given_their_model_args(tmp_path):
    """DCP stores no model_args: verify names --model-arg when the model cannot be built without them; with
    them, a DCP base and its DCP widening pass in float64 (1 process and 2 ranks, the same rows); the output
    records them, so widening it again and verifying that pair needs no flag."""
    import json
    base = _small_dcp(tmp_path / "base")
    args = ["--model-arg", "d_in=6", "--model-arg", "d_out=4", "--model-arg", "width=8", "--model-arg", "depth=3"]
    wide = tmp_path / "wide"
    widen_cli(base, wide, 1, *args)
    r = mupscale("verify", str(base), str(wide), "--steps", "5", "-q")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "stores no model_args" in r.stderr and "--model-arg KEY=VALUE" in r.stderr, r.stderr
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    v = ["verify", str(base), str(wide), "--steps", "50", "-q", *args]
    r1 = mupscale(*v, "--json", str(one))
    r2 = torchrun(2, "-m", "mupscale_cli", *v, "--json", str(two), check=False)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr[-2000:])
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["result"] == b["result"] == "pass" and b["ranks"] == 2 and a["rows"] == b["rows"]
    assert a["model_args"] == {"base": {"d_in": 6, "d_out": 4, "width": 8, "depth": 3},
                               "wide": {"d_in": 6, "d_out": 4, "width": 16, "depth": 3}}
    assert a["steps_run"] == 50 and a["max"]["out_rel"] <= TOL and a["max"]["loss_rel"] <= TOL, a["max"]
    assert not any("records no model_args" in n for n in a["notes"]), a["notes"]
    r = mupscale("widen", str(wide), "-o", str(tmp_path / "wide2"), "--k", "2", "--json", check=True)
    assert json.loads(r.stdout)["model_args"]["width"] == 32
    r = mupscale("verify", str(wide), str(tmp_path / "wide2"), "--steps", "10", "-q")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr


def test_pt_to_dcp_matches_pt_output(tmp_path):
    """--format dcp from a nanoGPT-style .pt: the same tensors and optimizer state as the .pt output."""
    from test_verify import make_ck
    src = make_ck(tmp_path, "mlp", "adamw")
    mupscale("widen", str(src), "-o", str(tmp_path / "w.pt"), check=True)
    mupscale("widen", str(src), "-o", str(tmp_path / "w"), "--format", "dcp", check=True)
    ref = torch.load(tmp_path / "w.pt", weights_only=True)
    r = DcpReader(tmp_path / "w")
    assert {k for k in r.paths if k.startswith("model.")} == {f"model.{n}" for n in ref["model"]}
    for n, t in ref["model"].items():
        assert torch.equal(r.get(f"model.{n}"), t)
    names = [n for g in ref["optimizer"]["param_groups"] for n in g["param_names"]]
    ids = [i for g in ref["optimizer"]["param_groups"] for i in g["params"]]
    for n, i in zip(names, ids):
        for key, v in ref["optimizer"]["state"][i].items():
            assert torch.equal(r.get(f"optim.state.{n}.{key}"), v), (n, key)
    assert len(ref["optimizer"]["param_groups"]) == len({k.split(".")[2] for k in r.paths
                                                           if k.startswith("optim.param_groups.")})


def test_noise_is_the_same_in_any_block_split(tmp_path):
    """σ̄ > 0: DCP output in 1 KiB blocks (what ranks share) holds the same noised tensors as the streamed
    .safetensors output (noise depends only on seed, name, shape)."""
    from safetensors.torch import load_file
    src = _small_dcp(tmp_path / "base", width=64)
    widen_cli(src, tmp_path / "w", 1, "--sigma", "0.5", "--seed", "3", "--chunk-size", "16")
    widen_cli(src, tmp_path / "w.safetensors", 1, "--sigma", "0.5", "--seed", "3")
    r, st = DcpReader(tmp_path / "w"), load_file(tmp_path / "w.safetensors")
    assert len(r.md.state_dict_metadata["model.hidden.0.weight"].chunks) == 128  # one 1 KiB row each
    model = [n for n in st if not n.startswith("__")]
    assert len(model) == 6
    for n in model:
        assert torch.equal(r.get(f"model.{n}"), st[n]), n
    base = DcpReader(src).get("model.hidden.0.weight")
    assert not torch.equal(st["hidden.0.weight"][::2, ::2] * 2, base)  # noised indeed


def test_writer_on_a_cuda_machine_writes_every_block(tmp_path, monkeypatch):
    """Where CUDA is available, DCP's own FileSystemWriter picks its copy-ahead loader, which asks for items
    before writing the previous ones (widen once freed blocks not yet written: exit 0 and a checkpoint that
    did not load). mupscale's writer asks in order whatever the machine; on this CPU machine, CUDA is
    pretended. (A writer asking ahead: tests/test_dcp_records.py.)"""
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    base = _small_dcp(tmp_path / "base", width=256)
    ref = tmp_path / "ref"
    run_widen(WidenOptions(base, ref, k="2", spec="mup-mlp"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "out"
    run_widen(WidenOptions(base, out, k="2", spec="mup-mlp"))
    monkeypatch.undo()
    same_tensors(ref, out)


# --- the tiling check, whatever the chunk count -----------------------------------------------------------

def _many_chunks(tmp_path: Path, n: int = 300):
    """A saved DCP checkpoint whose metadata says tensor `model.hidden.0.weight` (8 x 8, float64) is n row
    chunks of a (n, 8) tensor, each stored item a 64-byte range of the same file: (dir, metadata)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    d = _small_dcp(tmp_path / "many")
    md = pickle.loads((d / METADATA).read_bytes())
    fqn = "model.hidden.0.weight"
    m = md.state_dict_metadata[fqn]
    old = md.storage_data.pop(MetadataIndex(fqn, m.chunks[0].offsets))
    m.size = torch.Size([n, 8])
    m.chunks = [ChunkStorageMetadata(offsets=torch.Size([i, 0]), sizes=torch.Size([1, 8])) for i in range(n)]
    for i in range(n):
        md.storage_data[MetadataIndex(fqn, torch.Size([i, 0]))] = _StorageInfo(old.relative_path, 0, 64)
    return d, md


def test_tiling_checked_for_any_chunk_count(tmp_path):
    """300 chunks (more than the 256 the old pairwise check stopped at): a relabelled chunk (two at the same
    rows, one row in none) is refused; the exact tiling passes; in time linear in the chunks."""
    from mupscale_cli.errors import MupscaleError
    from mupscale_cli.formats.dcp import check_metadata
    d, md = _many_chunks(tmp_path)
    check_metadata(d, md)  # the exact tiling
    c = md.state_dict_metadata["model.hidden.0.weight"].chunks
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    info = md.storage_data.pop(MetadataIndex("model.hidden.0.weight", c[7].offsets))
    c[7] = ChunkStorageMetadata(offsets=torch.Size([8, 0]), sizes=torch.Size([1, 8]))  # row 7 now in no chunk
    md.storage_data[MetadataIndex("model.hidden.0.weight", torch.Size([8, 0]))] = info
    with pytest.raises(MupscaleError, match="do not tile.*overlap"):
        check_metadata(d, md)
    (d / METADATA).write_bytes(pickle.dumps(md))
    r = mupscale("widen", str(d), "-o", str(tmp_path / "out"), "--k", "2", "--spec", "mup-mlp")
    assert r.returncode == 2 and "do not tile" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_tiling_of_grids_and_irregular_layouts():
    from mupscale_cli.formats.dcp import _tiling_error
    grid = [((2 * i, 3 * j), (2, 3)) for i in range(40) for j in range(4)]  # FSDP rows x TP columns
    assert _tiling_error((80, 12), grid, 80 * 12) is None
    assert "overlap" in _tiling_error((80, 12), grid[:-1] + [((0, 0), (2, 3))], 80 * 12)
    assert _tiling_error((), [((), ())], 1) is None  # a scalar
    brick = [((i, i % 2), (1, 5)) for i in range(3000)] + [((i, 5 * (1 - i % 2)), (1, 1)) for i in range(3000)]
    assert _tiling_error((3000, 6), brick, 3000 * 6) is None  # exact, and still a small grid
    stairs = [((i, 0), (1, i + 1)) for i in range(200)] + [((i, i + 1), (1, 200 - i)) for i in range(200)]
    assert "not a grid" in _tiling_error((200, 201), stairs, 200 * 201)  # refused, not checked in n^2


# --- issue 17: the metadata unpickler beyond find_class, planner paths, metadata vs data, guards ------------

def _edit_md(d: Path, change) -> Path:
    """Rewrite d/.metadata after change(md) (our own file: plain pickle is fine here)."""
    md = pickle.loads((d / METADATA).read_bytes())
    change(md)
    (d / METADATA).write_bytes(pickle.dumps(md))
    return d


def _s(text: str) -> bytes:
    b = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _one_line_refusal(src: Path, match: str) -> None:
    from mupscale_cli.errors import MupscaleError
    with pytest.raises(MupscaleError) as e:
        DcpReader(src)
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


def test_extension_cache_is_refused(tmp_path):
    """EXT1/2/4 name a registered (module, name) by a number, and copyreg caches what a code resolved once: the
    C unpickler hands the cached object out without asking find_class, so an allow-list in find_class alone
    is bypassed once anything in the process registered and used an extension. Refused, whatever the registry."""
    import copyreg
    src = _small_dcp(tmp_path / "base")
    marker = tmp_path / "PWNED"
    copyreg.add_extension("os", "system", 0xF3)
    try:
        assert pickle.loads(b"\x80\x04\x82\xf3.") is os.system  # the cache now holds os.system
        (src / METADATA).write_bytes(b"\x80\x04\x82\xf3" + _s(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE
                                     + pickle.STOP)
        _one_line_refusal(src, "extension registry")
    finally:
        copyreg.remove_extension("os", "system", 0xF3)
    assert not marker.exists()


def test_build_changes_no_class_or_function(tmp_path):
    """BUILD sets attributes; on an allowed class or function (what find_class returns) it would change it for
    the whole process: DCP's `_get_layout.cache` (the layout every later metadata names), a metadata class.
    BUILD is allowed on instances of DCP's dataclasses only, with their own fields; `__class__` is no field."""
    import torch.serialization as ser
    from torch.distributed.checkpoint import metadata as m
    src = _small_dcp(tmp_path / "base")
    ser._get_layout("torch.strided")  # fill the cache
    cache = dict(ser._get_layout.cache)
    slot = pickle.NONE + pickle.EMPTY_DICT + pickle.MARK
    cases = {
        "function": _s("torch.serialization") + _s("_get_layout") + pickle.STACK_GLOBAL + slot + _s("cache")
        + pickle.EMPTY_DICT + _s("torch.strided") + _s("pwned") + pickle.SETITEM + pickle.SETITEMS + pickle.TUPLE2
        + pickle.BUILD,
        "class": _s("torch.distributed.checkpoint.metadata") + _s("Metadata") + pickle.STACK_GLOBAL + slot
        + _s("pwned") + pickle.NEWTRUE + pickle.SETITEMS + pickle.TUPLE2 + pickle.BUILD,
        "dunder-class": _s("torch.distributed.checkpoint.metadata") + _s("ChunkStorageMetadata") + pickle.STACK_GLOBAL
        + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK + _s("__class__")
        + _s("torch.distributed.checkpoint.metadata") + _s("Metadata") + pickle.STACK_GLOBAL + pickle.SETITEMS
        + pickle.BUILD,
    }
    try:
        for name, body in cases.items():
            (src / METADATA).write_bytes(b"\x80\x04" + body + pickle.STOP)
            _one_line_refusal(src, "refusing to unpickle")
            assert ser._get_layout.cache == cache, name
            assert "pwned" not in vars(m.Metadata), name
    finally:
        ser._get_layout.cache.clear()
        ser._get_layout.cache.update(cache)
        if "pwned" in vars(m.Metadata):
            delattr(m.Metadata, "pwned")


def _extra_entry(md, key: str, path) -> None:
    """A bytes entry `key` (stored as the first param group's lr) at `path` in planner_data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    lr = "optim.param_groups.0.lr"
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(key)] = md.storage_data[MetadataIndex(lr)]
    md.planner_data[key] = path


PATHS = {
    "huge-index": (lambda md: _extra_entry(md, "ls.10000000", ("ls", 10_000_000)), "list indices"),
    "negative-index": (lambda md: _extra_entry(md, "ls.-1", ("ls", -1)), "list indices"),
    "bool-index": (lambda md: _extra_entry(md, "ls.True", ("ls", True)), "list indices"),
    "float-index": (lambda md: _extra_entry(md, "ls.1.5", ("ls", 1.5)), "list indices"),
    "int-path": (lambda md: md.planner_data.__setitem__("model.input.weight", 5), "list indices"),
    "string-path": (lambda md: md.planner_data.__setitem__("model.input.weight", "model.input.weight"),
                    "list indices"),
    "list-path": (lambda md: md.planner_data.__setitem__("model.input.weight", ["model", "input.weight"]),
                  "list indices"),
    "empty-path": (lambda md: md.planner_data.__setitem__("model.input.weight", ()), "list indices"),
    "bytes-part": (lambda md: md.planner_data.__setitem__("model.input.weight", (b"model", "input.weight")),
                   "list indices"),
    "other-key": (lambda md: md.planner_data.__setitem__("model.input.weight", ("optim", "state", "x", "y")),
                  "names another key"),
    "leaf-and-dict": (lambda md: _extra_entry(md, "model.input.weight.x", ("model", "input.weight", "x")),
                      "clashes"),
    "list-and-dict": (lambda md: (_extra_entry(md, "ls.0", ("ls", 0)), _extra_entry(md, "ls.a", ("ls", "a"))),
                      "clashes"),
    "planner-data-list": (lambda md: setattr(md, "planner_data", [1, 2]), "planner_data is a list"),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_planner_paths_checked(tmp_path, name):
    """planner_data maps each key to its path in the saved state dict; widen rebuilds that tree (lists
    filled up to each index). A path must be a tuple of names and list indices below the entry count whose
    dotted form is its key, and the paths one consistent tree. An index of 10^9 appended 10^9 entries
    (8 GB, or exit 3 MemoryError under a cap); paths of other types were exit 3 or read silently."""
    change, match = PATHS[name]
    src = _edit_md(_small_dcp(tmp_path / "base"), change)
    _one_line_refusal(src, match)


def test_planner_huge_index_through_the_command(tmp_path):
    src = _edit_md(_small_dcp(tmp_path / "base"), PATHS["huge-index"][0])
    for argv in (["widen", str(src), "-o", str(tmp_path / "out"), "--k", "2", "--spec", "mup-mlp"],
                 ["inspect", str(src), "--spec", "mup-mlp"]):
        r = mupscale(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "list indices" in lines[0], (argv[0], r.stderr[-2000:])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def _retype(md, key: str, dtype) -> None:
    md.state_dict_metadata[key].properties.dtype = dtype


def test_data_must_match_the_metadata(tmp_path):
    """DCP's reader converts a stored chunk of another dtype to the metadata's silently (float64 bytes read as
    float32: rounded, exit 0) and reads part of a larger stored chunk: each chunk read is checked against
    the metadata's dtype and size. An item shorter than its chunk's elements, stored through transforms
    (compression), or described by other types is refused before anything is read."""
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    from mupscale_cli.errors import MupscaleError
    from torch.distributed.checkpoint.metadata import MetadataIndex
    w = "model.hidden.0.weight"
    src = _edit_md(_small_dcp(tmp_path / "a"), lambda md: _retype(md, w, torch.float32))
    out = tmp_path / "out"
    with pytest.raises(MupscaleError, match="holds a torch.float64 tensor of shape") as e:
        run_widen(WidenOptions(checkpoint=src, output=out, k="2", spec="mup-mlp"))
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.glob(".out*"))

    def halve(md):  # the metadata says 4 rows of 8, the data holds 8 rows
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        m = md.state_dict_metadata[w]
        m.size = torch.Size([4, 8])
        m.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 8]))]
    src = _edit_md(_small_dcp(tmp_path / "b"), halve)
    with pytest.raises(MupscaleError, match="of shape \\[8, 8\\] where the metadata names"):
        DcpReader(src).get(w)

    def short(md):
        info = md.storage_data[MetadataIndex(w, torch.Size([0, 0]))]
        info.length = 100
    _one_line_refusal(_edit_md(_small_dcp(tmp_path / "c"), short), "too few for 64 torch.float64 elements")

    def zstd(md):
        md.storage_data[MetadataIndex(w, torch.Size([0, 0]))].transform_descriptors = ["zstd"]
    _one_line_refusal(_edit_md(_small_dcp(tmp_path / "d"), zstd), "transforms")

    def str_key(md):
        md.storage_data["x"] = next(iter(md.storage_data.values()))
    _one_line_refusal(_edit_md(_small_dcp(tmp_path / "e"), str_key), "a storage key is a str")

    def chunk_tuple(md):
        md.state_dict_metadata[w].chunks[0] = ((0, 0), (8, 8))
    _one_line_refusal(_edit_md(_small_dcp(tmp_path / "f"), chunk_tuple), "not DCP's chunk metadata")


def test_one_writer_per_dcp_output(tmp_path):
    """The single-writer claim on a DCP output: while a first widen holds it (stopped there), a second to the
    same -o is refused naming it; the first still completes."""
    from mupscale_cli.formats.target import lock_path
    base = _small_dcp(tmp_path / "base", width=512)
    out = tmp_path / "out"
    argv = [*__import__("conftest").MUPSCALE, "widen", str(base), "-o", str(out), "--k", "2", "--spec", "mup-mlp",
            "--force"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = lock_path(out)
    try:
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline, "the first widen never claimed the output"
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"being written by pid {first.pid}" in lines[0], lines[0]
    assert DcpReader(out).info("model.hidden.0.weight").shape == (1024, 1024)


def _wd_dcp(d: Path, flat: bool) -> Path:
    """mup-mlp with AdamW groups of one lr that differ only in weight_decay (input 0.1, hidden 0, readout 0.1)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch import nn
    torch.manual_seed(0)
    m = nn.ModuleDict({"input": nn.Linear(6, 8), "hidden": nn.ModuleList([nn.Linear(8, 8)]),
                       "readout": nn.Linear(8, 4)}).double()
    o = torch.optim.AdamW([{"params": m["input"].parameters(), "weight_decay": 0.1},
                           {"params": m["hidden"].parameters(), "weight_decay": 0.0},
                           {"params": m["readout"].parameters(), "weight_decay": 0.1}], lr=1e-2)
    m["readout"](m["hidden"][0](m["input"](torch.randn(3, 6, dtype=torch.float64)))).sum().backward()
    o.step()
    msd, osd = get_state_dict(m, o, options=StateDictOptions(flatten_optimizer_state_dict=flat))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=d, no_dist=True)
    return d


def test_flattened_groups_split_on_weight_decay(tmp_path):
    """Flattened (per-tensor) param groups are regrouped by runs of equal hyper-parameters: tensors that differ
    only in weight_decay stay in different groups, so each keeps its own, as in the nested layout."""
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    outs = {}
    for flat in (True, False):
        src = _wd_dcp(tmp_path / f"b{flat}", flat)
        outs[flat] = tmp_path / f"w{flat}"
        run_widen(WidenOptions(checkpoint=src, output=outs[flat], k="2", spec="mup-mlp"))
    fr, nr = DcpReader(outs[True]), DcpReader(outs[False])
    nested = {}
    for k, p in nr.paths.items():
        if p[:2] == ("optim", "param_groups") and p[3] == "params":
            for fqn in nr.value(k):
                nested[fqn] = {h: nr.value(kk) for kk, pp in nr.paths.items()
                               if pp[:3] == p[:3] and (h := pp[3]) not in ("params", "param_names")}
    assert set(nested) == {"input.weight", "input.bias", "hidden.0.weight", "hidden.0.bias", "readout.weight",
                           "readout.bias"}
    for fqn, hps in nested.items():
        for h, v in hps.items():
            assert fr.value(f"optim.param_groups.{fqn}.{h}") == v, (fqn, h)
    assert fr.value("optim.param_groups.hidden.0.bias.weight_decay") == 0.0
    assert fr.value("optim.param_groups.input.bias.weight_decay") == 0.1


def test_pt_storage_probe_refuses_ext_cache_and_build(tmp_path):
    """The .pt storage probe (`formats.checkpoint._SizeProbe`, run before torch.load(mmap=True)): an EXT code
    whose object copyreg has cached is never handed out (the C unpickler skipped find_class for it: the
    payload ran), and BUILD never sets attributes on its stand-in class."""
    import copyreg
    import io

    from mupscale_cli.formats import checkpoint as ck
    marker = tmp_path / "PWNED"
    copyreg.add_extension("os", "system", 0xF4)
    try:
        assert pickle.loads(b"\x80\x04\x82\xf4.") is os.system
        with pytest.raises(pickle.UnpicklingError, match="extension registry"):
            ck._SizeProbe(io.BytesIO(b"\x80\x04\x82\xf4" + _s(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE
                                     + pickle.STOP)).load()
    finally:
        copyreg.remove_extension("os", "system", 0xF4)
    assert not marker.exists()
    body = (b"\x80\x04" + _s("x") + _s("y") + pickle.STACK_GLOBAL + pickle.NONE + pickle.EMPTY_DICT + _s("pwned")
            + pickle.NEWTRUE + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)
    try:
        with pytest.raises(pickle.UnpicklingError, match="sets the state"):
            ck._SizeProbe(io.BytesIO(body)).load()
        assert "pwned" not in vars(ck._Any)
    finally:
        if "pwned" in vars(ck._Any):
            delattr(ck._Any, "pwned")
