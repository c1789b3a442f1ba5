"""Widening at disk speed with bounded memory: lazy inputs, range-by-range production on threads,
Hugging Face shards, --dtype. The same seed gives the same bytes whatever the chunk size, thread
count, shard size or input format; memory does not grow with k."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_base, mupscale
from mupscale_cli.api import load
from mupscale_cli.commands.inspect import run_inspect
from mupscale_cli.commands.widen import WidenOptions, prepare, run_widen
from mupscale_cli.formats import safetensors as safetensors_io
from mupscale_cli.formats import load_checkpoint
from mupscale_cli.formats.checkpoint import LazyTensors
from mupscale_cli.core.noise import CHUNK
from mupscale_cli.formats.write import DEFAULT_CHUNK_BYTES
from mupscale_cli.formats.safetensors import ShardedWriter, TensorInfo
from mupscale_cli.core.widen import widen_noised
from mupscale_cli.errors import MupscaleError
from mupscale_cli.zoo import gpt

GPT = {**gpt.DEFAULT_ARGS, "n_embd": 32, "vocab_size": 64}
SPEC = "nanogpt-mup"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A nanoGPT-style checkpoint (float32, AdamW state, tied lm_head) after a few steps."""
    d = tmp_path_factory.mktemp("base")
    return make_base(d, gpt, GPT, "adamw", "named", steps=3, dtype=torch.float32)[0]


@pytest.fixture(scope="module")
def big_mlp(tmp_path_factory) -> Path:
    """An MLP state dict whose input layer spans several noise generator chunks (2^20 elements) once widened."""
    d = tmp_path_factory.mktemp("bigmlp")
    g = torch.Generator().manual_seed(0)
    sd = {"input.weight": torch.randn(96, 8000, generator=g), "input.bias": torch.randn(96, generator=g),
          "hidden.0.weight": torch.randn(96, 96, generator=g), "hidden.0.bias": torch.randn(96, generator=g),
          "readout.weight": torch.randn(5, 96, generator=g), "readout.bias": torch.randn(5, generator=g)}
    save_file(sd, d / "mlp.safetensors")
    return d / "mlp.safetensors"


def widen_to(src: Path, out: Path, **kw) -> dict:
    kw.setdefault("k", "2")
    return run_widen(WidenOptions(checkpoint=src, output=out, force=True, **kw))


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    w = load(path)
    out = dict(w.model)
    if w.optimizer is not None:
        for g in w.optimizer["param_groups"]:
            for pid, n in zip(g["params"], g["param_names"]):
                for key, v in w.optimizer["state"].get(pid, {}).items():
                    out[f"{n}/{key}"] = v
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8)), n


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_chunked_equals_unchunked_bytes(big_mlp, tmp, sigma):
    ref = tmp / "ref.safetensors"
    widen_to(big_mlp, ref, k="3", sigma=sigma, seed=5, spec="mup-mlp", threads=0, chunk_bytes=1 << 40)
    expected = {n: t for n, t in load_file(ref).items()}
    assert expected["input.weight"].numel() > 2 * CHUNK  # several generator chunks
    # in memory, the whole tensor at once
    prep = prepare(WidenOptions(big_mlp, k="3", sigma=sigma, spec="mup-mlp"))
    for n, p in prep.plan.tensors.items():
        assert torch.equal(widen_noised(prep.ckpt.tensors[n], p, sigma, 5), expected[n]), n
    # ranges not aligned to generator chunks (rows split anywhere), aligned ones (one generator chunk)
    for chunk in (4000,) if sigma == 0 else ((1 << 20) + 12, 4 * CHUNK):
        out = tmp / f"c{chunk}.safetensors"
        widen_to(big_mlp, out, k="3", sigma=sigma, seed=5, spec="mup-mlp", chunk_bytes=chunk)
        assert out.read_bytes() == ref.read_bytes(), chunk  # the whole file, digests included


def test_thread_count_does_not_change_a_byte(base, tmp):
    files = []
    for threads in (0, 1, 2, 3):
        out = tmp / f"t{threads}.safetensors"
        widen_to(base, out, k="2", sigma=1.0, seed=2, threads=threads, chunk_bytes=2048)
        files.append(out.read_bytes())
    assert all(f == files[0] for f in files)


@pytest.mark.parametrize("shard_size", ["1GB", "3000B", "100B"], ids=["one-shard", "many", "smaller-than-tensors"])
def test_shards_hold_the_same_tensors_and_load_both_ways(base, tmp, shard_size):
    single = tmp / "single.safetensors"
    widen_to(base, single, sigma=0.5, seed=1)
    out = tmp / "sharded"
    res = widen_to(base, out, sigma=0.5, seed=1, shard_size=shard_size, chunk_bytes=4096)
    index = out / "model.safetensors.index.json"
    assert res["output"] == str(index)
    # Hugging Face conventions, read by hand: the index maps every model tensor to its shard
    idx = json.loads(index.read_text())
    files = sorted(set(idx["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert (n == 1) == (shard_size == "1GB")
    plain = {}
    for f in files:
        plain.update(load_file(out / f))
    assert set(plain) == set(idx["weight_map"]) and not any(k.startswith("__optim__") for k in plain)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in plain.values())
    ref = load_file(single)
    for k, v in plain.items():
        assert torch.equal(v, ref[k]), k
    # optimizer state in its own shards, beside them
    opt_idx = json.loads((out / "optimizer.safetensors.index.json").read_text())
    opt = {}
    for f in sorted(set(opt_idx["weight_map"].values())):
        assert f.startswith("optimizer-")
        opt.update(load_file(out / f))
    assert opt.keys() == {k for k in ref if k.startswith("__optim__")}
    # the Python API, from the directory or the index
    for path in (out, index):
        assert_same_tensors(tensors_of(path), tensors_of(single))
    w = load(out)
    assert w.provenance["source_sha256"] == load(single).provenance["source_sha256"]
    assert w.optimizer["param_groups"] == load(single).optimizer["param_groups"]
    # per-shard digests, checked by inspect
    rep = run_inspect(WidenOptions(out))
    assert rep["digests"]["bad"] == [] and rep["digests"]["checked"] == len(ref)


def test_sharded_output_is_replaced_cleanly_and_needs_force(base, tmp):
    out = tmp / "s"
    widen_to(base, out, shard_size="2000B")
    many = sorted(p.name for p in out.iterdir())
    with pytest.raises(MupscaleError, match="--force"):
        run_widen(WidenOptions(base, out, k="2", shard_size="2000B"))
    res = widen_to(base, out, shard_size="10GB")  # the whole directory is replaced: no shard of the old one
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors",
                                                      "model.safetensors.index.json",
                                                      "optimizer-00001-of-00001.safetensors",
                                                      "optimizer.safetensors.index.json"]
    assert len(many) > 4
    # DIR/NAME.safetensors names the shards NAME-0000i-of-0000N
    (tmp / "t").mkdir()  # an existing empty directory needs no --force
    res = run_widen(WidenOptions(base, tmp / "t" / "wide.safetensors", k="2", shard_size="10GB"))
    assert res["output"] == str(tmp / "t" / "wide.safetensors.index.json")
    assert (tmp / "t" / "wide-00001-of-00001.safetensors").is_file()
    assert (tmp / "t" / "wide-optimizer.safetensors.index.json").is_file()
    assert_same_tensors(tensors_of(tmp / "t" / "wide.safetensors.index.json"), tensors_of(out))
    with pytest.raises(MupscaleError, match="shard"):
        run_widen(WidenOptions(base, tmp / "x.pt", k="2", shard_size="1GB"))
    with pytest.raises(MupscaleError, match="shard-size"):
        run_widen(WidenOptions(base, tmp / "y", k="2", shard_size="0"))
    # the directory is the output: one holding other files is refused, whatever the prefix form
    (tmp / "t" / "notes.txt").write_text("mine")
    for o in (tmp / "t", tmp / "t" / "wide.safetensors"):
        with pytest.raises(MupscaleError, match=r"notes\.txt.*new or empty directory"):
            run_widen(WidenOptions(base, o, k="2", shard_size="1GB", force=True))
    assert (tmp / "t" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp.iterdir() if ".mupscale-" in p.name] == []
    # a directory holding only an old run's temporaries is empty for a sharded output (no --force needed);
    # this path once named an unimported TMP_MARKER: exit 3
    (tmp / "u").mkdir()
    (tmp / "u" / ".model-00001-of-00001.safetensors.mupscale-tmp-1-x").write_bytes(b"old")
    res = run_widen(WidenOptions(base, tmp / "u", k="2", shard_size="10GB"))
    assert sorted(p.name for p in (tmp / "u").iterdir()) == sorted(p.name for p in out.iterdir())


def test_input_formats_give_identical_output(base, tmp):
    """.pt, our .safetensors, a plain .safetensors state dict and a Hugging Face sharded directory."""
    k1 = tmp / "k1.safetensors"
    widen_to(base, k1, k="1")  # bit-exact copy with optimizer state, as .safetensors
    k1s = tmp / "k1s"
    widen_to(base, k1s, k="1", shard_size="5000B")  # ... as shards
    sd = {n: t.clone() for n, t in torch.load(base, weights_only=True)["model"].items()}
    plain = tmp / "plain.safetensors"
    save_file(sd, plain, metadata={"format": "pt"})
    hf = tmp / "hf"
    with ShardedWriter(hf, [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in sd.items()], {"format": "pt"},
                       shard_size=4000) as w:
        for n, t in sd.items():
            w.write(n, t)
    outs = {}
    for name, src in {"pt": base, "st": k1, "shards": k1s, "index": k1s / "model.safetensors.index.json",
                      "plain": plain, "hf": hf}.items():
        out = tmp / f"from-{name}.safetensors"
        widen_to(src, out, k="2", sigma=0.5, seed=4, spec=SPEC, sizes={})
        outs[name] = tensors_of(out)
    with_opt = {n: t for n, t in outs["pt"].items()}
    model_only = {n: t for n, t in with_opt.items() if "/" not in n}
    for name, got in outs.items():
        assert_same_tensors(got, with_opt if name in ("pt", "st", "shards", "index") else model_only)


def test_sharded_input_round_trip(base, tmp):
    """pt -> shards (k=2) -> widen the shards (k=2) == pt -> k=4, weights and optimizer state."""
    mid = tmp / "mid"
    widen_to(base, mid, k="2", shard_size="3000B")
    twice = tmp / "twice"
    widen_to(mid, twice, k="2", shard_size="7000B")
    once = tmp / "once.safetensors"
    widen_to(base, once, k="4")
    assert_same_tensors(tensors_of(twice), tensors_of(once))
    a, b = load(twice), load(once)
    assert a.extra["model_args"] == b.extra["model_args"]
    assert [{k: v for k, v in g.items() if k != "params"} for g in a.optimizer["param_groups"]] == \
           [{k: v for k, v in g.items() if k != "params"} for g in b.optimizer["param_groups"]]
    assert run_inspect(WidenOptions(twice))["digests"]["bad"] == []


def test_dtype_casts_the_model_after_the_noise(base, tmp):
    f32, bf16 = tmp / "f32.safetensors", tmp / "bf16.safetensors"
    widen_to(base, f32, sigma=0.5, seed=3)
    widen_to(base, bf16, sigma=0.5, seed=3, dtype="bfloat16", chunk_bytes=1000)
    a, b = load(f32), load(bf16)
    for n, t in a.model.items():
        assert b.model[n].dtype == torch.bfloat16 and torch.equal(b.model[n], t.to(torch.bfloat16)), n
    for pid, st in a.optimizer["state"].items():  # optimizer state keeps its dtype (fp16 would underflow)
        for key, v in st.items():
            assert b.optimizer["state"][pid][key].dtype == v.dtype and torch.equal(b.optimizer["state"][pid][key], v)
    assert b.provenance["dtype"] == "bfloat16" and a.provenance["dtype"] is None
    pt = tmp / "f16.pt"
    widen_to(base, pt, sigma=0.5, seed=3, dtype="float16")
    m = torch.load(pt, weights_only=True)["model"]
    assert all(torch.equal(v, a.model[n].to(torch.float16)) for n, v in m.items())
    with pytest.raises(MupscaleError, match="--dtype"):
        widen_to(base, tmp / "x.safetensors", dtype="int8")


def test_lazy_input_reads_in_bounded_pieces(big_mlp, tmp, monkeypatch):
    """No tensor data is read to plan; then every read is a range of rows, never held all at once."""
    ck = load_checkpoint(big_mlp, lazy=True)
    assert isinstance(ck.tensors, LazyTensors)
    prepare_reads = ck.tensors.reads
    assert prepare_reads == 0 and ck.shapes()["input.weight"][0] == (96, 8000)
    live, peak, sizes = [0], [0], []

    def gone(n):
        live[0] -= n

    real = safetensors_io.LazySafetensors.read

    def read(self, name, start=0, count=None, alloc=None):
        t = real(self, name, start, count, alloc)
        live[0] += t.nbytes
        peak[0] = max(peak[0], live[0])
        sizes.append(t.nbytes)
        weakref.finalize(t, gone, t.nbytes)
        return t

    def no_get(self, name):
        raise AssertionError("widen must not read whole tensors through safe_open")

    monkeypatch.setattr(safetensors_io.LazySafetensors, "read", read)
    monkeypatch.setattr(safetensors_io.LazySafetensors, "get", no_get)
    chunk = 64 << 10
    widen_to(big_mlp, tmp / "w.safetensors", k="4", sigma=0.5, spec="mup-mlp", chunk_bytes=chunk, threads=2)
    tensor = 96 * 8000 * 4
    assert max(sizes) <= chunk and peak[0] <= 8 * chunk < tensor, (max(sizes), peak[0])


def test_value_checks_run_while_writing_and_stop_the_output(base, tmp):
    """NaN/Inf and tied-tensor checks read a safetensors input once, with its digest, during the write:
    a warning in the notes, or (--strict, tied tensors that differ) an error and no output, no temporaries."""
    sd = {n: t.clone() for n, t in torch.load(base, weights_only=True)["model"].items()}
    sd["transformer.h.0.mlp.c_fc.weight"][1, 2] = float("nan")
    sd["transformer.h.1.attn.c_attn.bias"][0] = float("inf")
    src = tmp / "nan.safetensors"
    save_file(sd, src)
    res = widen_to(src, tmp / "w.safetensors", spec=SPEC)
    warned = [n for n in res["notes"] if n.startswith("warning:")]
    assert len(warned) == 2 and "'transformer.h.0.mlp.c_fc.weight' holds 1 NaN/Inf" in warned[0]
    assert "'transformer.h.1.attn.c_attn.bias'" in warned[1]
    assert load(tmp / "w.safetensors").provenance["source_sha256"] == hashlib.sha256(
        src.read_bytes()).hexdigest()
    for bad, words in ((sd, "--strict"), ({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, "tied tensors")):
        save_file(bad, src)
        for out in (tmp / "x.safetensors", tmp / "xs"):
            with pytest.raises(MupscaleError, match=words):
                widen_to(src, out, spec=SPEC, strict=True, shard_size=None if out.suffix else "2000B",
                         chunk_bytes=4096)
            assert not out.exists() and not [p for p in tmp.iterdir() if "mupscale-tmp" in p.name]


def test_noise_device_is_checked_and_recorded(base, tmp):
    if not torch.cuda.is_available():
        with pytest.raises(MupscaleError, match="CUDA"):
            widen_to(base, tmp / "x.safetensors", sigma=1.0, noise_device="cuda")
    with pytest.raises(MupscaleError, match="noise-device"):
        widen_to(base, tmp / "x.safetensors", sigma=1.0, noise_device="tpu")
    widen_to(base, tmp / "c.safetensors", sigma=1.0)
    assert load(tmp / "c.safetensors").provenance["noise_device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_is_reproducible_and_recorded(big_mlp, tmp):
    a, b, c = tmp / "a.safetensors", tmp / "b.safetensors", tmp / "c.safetensors"
    widen_to(big_mlp, a, k="3", sigma=0.5, seed=5, spec="mup-mlp", noise_device="cuda")
    widen_to(big_mlp, b, k="3", sigma=0.5, seed=5, spec="mup-mlp", noise_device="cuda", chunk_bytes=12345 * 4,
             threads=0)
    widen_to(big_mlp, c, k="3", sigma=0.5, seed=5, spec="mup-mlp")
    assert a.read_bytes() == b.read_bytes()
    assert not torch.equal(load_file(a)["input.weight"], load_file(c)["input.weight"])
    assert load(a).provenance["noise_device"] == "cuda"
    prep = prepare(WidenOptions(big_mlp, k="3", sigma=0.5, spec="mup-mlp"))
    p = prep.plan.tensors["input.weight"]
    assert torch.equal(widen_noised(prep.ckpt.tensors["input.weight"], p, 0.5, 5, "cuda"), load_file(a)["input.weight"])


def test_cli_options(base, tmp):
    from typer.testing import CliRunner

    from mupscale_cli.cli import app
    out = tmp / "cli"
    r = mupscale("widen", str(base), "--k", "2", "--shard-size", "4KB", "--dtype", "float16", "--threads", "1",
                 "-o", str(out), check=True)
    assert r.stdout.strip() == str(out / "model.safetensors.index.json")
    assert all(v.dtype == torch.float16 for v in load(out).model.values())
    runner = CliRunner()
    for args, words in ((["--shard-size", "5XB"], "invalid size"), (["--dtype", "float64"], "--dtype"),
                        (["--threads", "-1"], "--threads"), (["--noise-device", "gpu"], "--noise-device")):
        r = runner.invoke(app, ["widen", str(base), "--k", "2", "-o", str(tmp / "e.safetensors"), *args])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


MEM_WRAP = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def test_peak_memory_does_not_grow_with_k(tmp):
    """A 61 MB input widened by k=2 and k=4 through the CLI in a subprocess: the peak RSS differs by far
    less than the largest output tensor (245 MB at k=4) and grows over Python + torch alone by a small
    multiple of the unit of work (16 MiB), not by the size of a tensor or of the output."""
    W, D = 256, 60_000
    g = torch.Generator().manual_seed(0)
    sd = {"input.weight": torch.randn(W, D, generator=g), "input.bias": torch.randn(W, generator=g),
          "hidden.0.weight": torch.randn(W, W, generator=g), "hidden.0.bias": torch.randn(W, generator=g),
          "readout.weight": torch.randn(5, W, generator=g), "readout.bias": torch.randn(5, generator=g)}
    src = tmp / "in.safetensors"
    save_file(sd, src)
    in_bytes = src.stat().st_size
    del sd
    idle = subprocess.run([sys.executable, "-c", "import resource, torch, mupscale_cli.cli, "
                           "mupscale_cli.commands.widen; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
                           " * 1024)"], capture_output=True, text=True, check=True)
    base_rss = int(idle.stdout)
    rss = {}
    for k in (2, 4):
        out = tmp / f"k{k}.safetensors"
        r = subprocess.run([sys.executable, "-c", MEM_WRAP, sys.executable, "-m", "mupscale_cli", "widen", str(src),
                            "--k", str(k), "--spec", "mup-mlp", "-q", "-o", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rss[k] = int(r.stdout.split()[-1])
        out.unlink()
    largest = W * 4 * D * 4
    assert abs(rss[4] - rss[2]) < largest / 4, (rss, largest)
    assert rss[4] - base_rss < 12 * DEFAULT_CHUNK_BYTES < largest, (rss, base_rss, in_bytes)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_at_most_threads_plus_one_ranges_in_flight(tmp, threads):
    """Backpressure, counted rather than inferred from RSS: a range is in flight from the moment a worker
    starts making it until its bytes are written. The writer is made slow (the on_bytes callback sleeps),
    so without backpressure the workers would run ahead through all 64 ranges."""
    import threading
    import time

    from mupscale_cli.formats.write import OutTensor, Target, write_streamed
    lock, state = threading.Lock(), {"now": 0, "most": 0}
    n, chunk = 64 * 1024, 4096  # 64 ranges of 1024 float32 values

    second = threading.Event()

    def make(a: int, b: int, alloc=None) -> torch.Tensor:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        if a > 0:
            second.set()
        elif threads > 1:  # the first range waits for a second one to start: ranges are made side by side
            second.wait(30)  # (deterministic: a worker that is merely late only delays this)
        return torch.arange(a, b, dtype=torch.float32)

    def written(name: str, nbytes: int) -> None:
        with lock:
            state["now"] -= 1
        time.sleep(0.002)

    out = tmp / "o.safetensors"
    write_streamed(Target("safetensors", out), [OutTensor("x", (n,), torch.float32, make)], [], None, None, {}, {},
                   threads=threads, chunk_bytes=chunk, on_bytes=written)
    assert torch.equal(load_file(out)["x"], torch.arange(n, dtype=torch.float32))
    # at most threads + 1 in flight; with several workers, at least 2 (with one, whether the worker starts the
    # next range before this thread counts the last one written is a race: not asserted)
    assert state["now"] == 0 and min(threads, 2) <= state["most"] <= threads + 1, state


def test_a_failed_write_in_a_worker_is_raised_and_stops_every_thread(tmp, monkeypatch):
    """The worker threads write their own ranges: an OSError there (ENOSPC) reaches the caller as it is (the CLI
    turns it into its one-line exit 2), no temporary is left and no worker thread is still running."""
    import errno
    import threading

    from mupscale_cli.formats.write import OutTensor, Target, write_streamed
    real, calls = safetensors_io.StreamWriter.write_chunk, {"n": 0, "threads": set()}

    def failing(self, name, offset, data):
        with lock:
            calls["n"] += 1
            calls["threads"].add(threading.current_thread().name)
            fail = calls["n"] == 5
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, offset, data)
    lock = threading.Lock()
    monkeypatch.setattr(safetensors_io.StreamWriter, "write_chunk", failing)
    n, out = 64 * 1024, tmp / "o.safetensors"
    tensors = [OutTensor("x", (n,), torch.float32, lambda a, b, alloc=None: torch.arange(a, b, dtype=torch.float32)),
               OutTensor("tied", (n,), torch.float32, copy_of="x")]  # its worker waits for x: woken, not hung
    with pytest.raises(OSError) as e:
        write_streamed(Target("safetensors", out), tensors, [], None, None, {}, {}, threads=2, chunk_bytes=4096)
    assert e.value.errno == errno.ENOSPC
    assert calls["threads"] and all(t.startswith("mupscale") for t in calls["threads"]), calls
    assert not out.exists() and [p.name for p in tmp.iterdir() if ".mupscale-" in p.name] == []
    assert not [t.name for t in threading.enumerate() if t.name.startswith("mupscale")]


@pytest.mark.parametrize("threads", [0, 2])
def test_tied_aliases_are_written_from_their_tensors_ranges(tmp, threads):
    """A tied alias (stored before its tensor in the file, and an alias of an alias) holds its tensor's bytes and
    checksum; its ranges are made once (counted), neither made again nor read back."""
    from mupscale_cli.formats.write import OutTensor, Target, write_streamed
    made = []
    n = 300_001

    def make(a: int, b: int, alloc=None) -> torch.Tensor:
        made.append((a, b))
        return torch.arange(a, b, dtype=torch.float32).mul_(0.5)

    out = tmp / "o.safetensors"
    tensors = [OutTensor("head", (n,), torch.float32, copy_of="wte"), OutTensor("wte", (n,), torch.float32, make),
               OutTensor("head2", (n,), torch.float32, copy_of="head")]
    write_streamed(Target("safetensors", out), tensors, [], None, None, {}, {}, threads=threads, chunk_bytes=1 << 16)
    sd = load_file(out)
    expected = torch.arange(n, dtype=torch.float32).mul_(0.5)
    assert all(torch.equal(sd[k], expected) for k in ("wte", "head", "head2"))
    assert sorted(made) == [(a, min(n, a + (1 << 14))) for a in range(0, n, 1 << 14)]
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    sums = json.loads(meta["mupscale.xxh3_128"])
    assert sums["head"] == sums["head2"] == sums["wte"] == xxhash.xxh3_128(expected.numpy().tobytes()).hexdigest()
