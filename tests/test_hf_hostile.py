"""Hostile and broken Hugging Face directories and Trainer checkpoints through `mupscale widen` (issue 17).

Every case copies a real tiny checkpoint (saved by transformers; optimizer.pt / scheduler.pt by torch), breaks one
thing, and runs `mupscale widen DIR --k 2 -o OUT`: one case per kind through the installed command in a real
subprocess (proc=True), the others in-process through the same CLI (each subprocess pays torch's and
transformers' import, about 5 s of a CI core). Each must give exit 2, exactly one stderr
line `mupscale: error: ...` naming the problem, no traceback, nothing at OUT, no temporary, an unchanged input.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MUPSCALE
from hf_tiny import make, trainer_checkpoint
from mupscale_cli.formats.write import TMP_PT

os.environ["HF_HUB_OFFLINE"] = "1"


@dataclass
class Bases:
    trainer: Path  # Llama Trainer checkpoint: model.safetensors, optimizer.pt, scheduler.pt, trainer_state.json, ...
    sharded: Path  # Llama model directory in 4 shards + model.safetensors.index.json


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    d = tmp_path_factory.mktemp("hfbase")
    trainer_checkpoint(d / "trainer", steps=2)
    make("llama", d / "sharded", dtype=torch.float64, shard="50KB")
    return Bases(d / "trainer", d / "sharded")


@dataclass
class Case:
    id: str
    base: str  # trainer | sharded
    make: Callable[[Path, Path], list[str]]  # (the copied input directory, the case directory) -> extra argv
    match: str  # a substring of the one line
    proc: bool = False  # through the installed command; else in-process (typer's runner: no torch import each)


def _json(p: Path, change: Callable[[dict], object]) -> None:
    d = json.loads(p.read_text())
    change(d)
    p.write_text(json.dumps(d))


def _config(change) -> Callable[[Path, Path], list[str]]:
    def make_(d: Path, _: Path) -> list[str]:
        _json(d / "config.json", change)
        return []
    return make_


def _index(change) -> Callable[[Path, Path], list[str]]:
    def make_(d: Path, _: Path) -> list[str]:
        _json(d / "model.safetensors.index.json", change)
        return []
    return make_


def _optimizer(change) -> Callable[[Path, Path], list[str]]:
    def make_(d: Path, _: Path) -> list[str]:
        sd = torch.load(d / "optimizer.pt", weights_only=True)
        change(sd)
        torch.save(sd, d / "optimizer.pt")
        return []
    return make_


def _scheduler(change) -> Callable[[Path, Path], list[str]]:
    def make_(d: Path, _: Path) -> list[str]:
        sd = torch.load(d / "scheduler.pt", weights_only=True)
        change(sd)
        torch.save(sd, d / "scheduler.pt")
        return []
    return make_


def _shards(d: Path) -> list[str]:
    return sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _write(name: str, data: bytes) -> Callable[[Path, Path], list[str]]:
    def make_(d: Path, _: Path) -> list[str]:
        (d / name).write_bytes(data)
        return []
    return make_


def _stale_model_st(d: Path, _: Path) -> list[str]:  # an earlier single-file save left beside the shards
    tensors = {}
    for s in _shards(d):
        tensors.update(load_file(d / s))
    save_file(tensors, d / "model.safetensors")
    return []


def _unlisted_shard(d: Path, _: Path) -> list[str]:
    shutil.copyfile(d / _shards(d)[0], d / "model-00009-of-00009.safetensors")
    return []


def _other_index(d: Path, _: Path) -> list[str]:
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    return []


def _link(name: str, to: Callable[[Path, Path], str], setup: Callable[[Path, Path], None] = lambda d, c: None):
    def make_(d: Path, c: Path) -> list[str]:
        setup(d, c)
        if (d / name).exists():
            (d / name).unlink()
        os.symlink(to(d, c), d / name)
        return []
    return make_


def _secret(d: Path, c: Path) -> None:
    (c / "secret").mkdir(exist_ok=True)
    (c / "secret" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n")


def _cache(d: Path, c: Path) -> Path:
    """Moves the input to a Hugging Face cache layout: models--org--tiny/snapshots/rev/ (returns the snapshot)."""
    snap = c / "hub" / "models--org--tiny" / "snapshots" / "rev"
    snap.parent.mkdir(parents=True)
    shutil.move(d, snap)
    (c / "hub" / "models--org--tiny" / "blobs").mkdir()
    (c / "hub" / "models--other--repo" / "blobs").mkdir(parents=True)
    return snap


def _cache_case(fix: Callable[[Path, Path], None]) -> Callable[[Path, Path], list[str]]:
    def make_(d: Path, c: Path) -> list[str]:
        snap = _cache(d, c)
        fix(snap, c)
        return ["__input__", str(snap)]
    return make_


def _cache_chain(snap: Path, c: Path) -> None:  # blobs/abc is itself a link leaving the tree
    _secret(snap, c)
    os.symlink(c / "secret" / "id_rsa", c / "hub" / "models--org--tiny" / "blobs" / "abc")
    os.symlink("../../blobs/abc", snap / "tokenizer.model")


def _symlinked_subdir(d: Path, c: Path) -> list[str]:
    _secret(d, c)
    os.symlink(c / "secret", d / "original")
    return []


CASES: list[Case] = [
    # 1. a second set of weights beside the one read
    Case("stale-model-st-beside-shards", "sharded", _stale_model_st, "model.safetensors"),
    Case("pytorch-bin-beside-shards", "sharded", _write("pytorch_model.bin", b"PK\x03\x04 stale"), "pytorch_model.bin"),
    Case("unlisted-shard", "sharded", _unlisted_shard, "model-00009-of-00009.safetensors"),
    Case("second-index", "sharded", _other_index, "pytorch_model.bin.index.json", proc=True),
    Case("pytorch-bin-beside-single", "trainer", _write("pytorch_model.bin", b"PK\x03\x04 stale"), "pytorch_model.bin"),
    Case("index-missing-shard", "sharded", _index(lambda x: x["weight_map"].update({"extra.weight": "model-00007-of-00009.safetensors"})),
         "does not exist"),
    Case("shard-tensor-not-in-map", "sharded", _index(lambda x: x["weight_map"].pop("model.norm.weight")), "model.norm.weight"),
    Case("map-tensor-not-in-shard", "sharded",
         _index(lambda x: x["weight_map"].update({"model.extra": x["weight_map"]["model.norm.weight"]})), "model.extra"),
    Case("index-parent-shard", "sharded", _index(lambda x: x["weight_map"].update({"model.norm.weight": "../model.safetensors"})),
         "not a plain file name"),
    Case("index-absolute-shard", "sharded", _index(lambda x: x["weight_map"].update({"model.norm.weight": "/etc/passwd"})),
         "not a plain file name"),
    Case("index-duplicate-key", "sharded", _write("model.safetensors.index.json",
                                                  b'{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}'),
         "duplicate"),
    # 2. symbolic links out of the input
    Case("link-tokenizer-to-secret", "trainer", _link("tokenizer.model", lambda d, c: "../secret/id_rsa", _secret),
         "symbolic link", proc=True),
    Case("link-absolute-config", "trainer",
         _link("config.json", lambda d, c: str(c / "cfg.json"),
               lambda d, c: shutil.copyfile(d / "config.json", c / "cfg.json")), "symbolic link"),
    Case("link-shard-outside", "sharded",
         _link("model-00001-of-00004.safetensors", lambda d, c: str(c / "s1"),
               lambda d, c: shutil.copyfile(d / "model-00001-of-00004.safetensors", c / "s1")), "symbolic link"),
    Case("link-optimizer-outside", "trainer",
         _link("optimizer.pt", lambda d, c: str(c / "o.pt"),
               lambda d, c: shutil.copyfile(d / "optimizer.pt", c / "o.pt")), "symbolic link"),
    Case("link-training-args-outside", "trainer", _link("training_args.bin", lambda d, c: "../secret/id_rsa", _secret),
         "symbolic link"),
    Case("link-to-dir", "trainer", _symlinked_subdir, "symbolic link"),
    Case("cache-link-chain", "trainer", _cache_case(_cache_chain), "symbolic link", proc=True),
    # config.json
    Case("config-not-object", "trainer", _write("config.json", b'[{"model_type": "llama"}]'), "JSON object"),
    Case("config-nan", "trainer", _write("config.json", b'{"model_type": "llama", "rms_norm_eps": NaN}'), "rms_norm_eps", proc=True),
    Case("config-infinity-nested", "sharded",
         _config(lambda c: c.update(rope_scaling={"factor": float("inf"), "rope_type": "linear"})), "rope_scaling.factor"),
    Case("config-bogus-dtype", "sharded", _config(lambda c: c.update(dtype="float1024")), "dtype"),
    Case("config-dtype-not-string", "trainer", _config(lambda c: c.update(torch_dtype=["float32"])), "torch_dtype"),
    Case("config-layers-not-int", "sharded", _config(lambda c: c.update(num_hidden_layers="2")), "num_hidden_layers"),
    # 3. Trainer files
    Case("trainer-model-type-unknown", "trainer", _config(lambda c: c.update(model_type="nosuchmodel")), "nosuchmodel"),
    Case("optimizer-params-not-ints", "trainer", _optimizer(lambda s: s["param_groups"][0].update(params=["a"])),
         "integer ids"),
    Case("optimizer-id-twice", "trainer", _optimizer(lambda s: s["param_groups"][1]["params"].append(0)), "twice"),
    Case("optimizer-state-stray-id", "trainer", _optimizer(lambda s: s["state"].update({999: s["state"][0]})), "999", proc=True),
    Case("optimizer-not-a-state-dict", "trainer", lambda d, c: torch.save([1, 2], d / "optimizer.pt") or [], "state_dict"),
    Case("scheduler-last-lr-disagrees", "trainer", _scheduler(lambda s: s.update(_last_lr=[x * 2 for x in s["_last_lr"]])),
         "_last_lr", proc=True),
    Case("scheduler-base-lrs-disagree", "trainer", _scheduler(lambda s: s.update(base_lrs=[1.0, 1.0])), "base_lrs"),
    Case("scheduler-base-lrs-not-list", "trainer", _scheduler(lambda s: s.update(base_lrs="0.001")), "base_lrs"),
    Case("scheduler-last-lr-short", "trainer", _scheduler(lambda s: s.update(_last_lr=s["_last_lr"][:1])), "_last_lr"),
    Case("scheduler-last-epoch-str", "trainer", _scheduler(lambda s: s.update(last_epoch="2")), "last_epoch"),
    Case("trainer-state-not-json", "trainer", _write("trainer_state.json", b"{not json"), "trainer_state.json", proc=True),
    Case("trainer-state-list", "trainer", _write("trainer_state.json", b"[1, 2]"), "trainer_state.json"),
    Case("trainer-state-step-str", "trainer", _write("trainer_state.json", b'{"global_step": "3"}'), "global_step"),
    # 5. trainer_files() refusing while the scan thread runs beside the writer (it used to be left running: abort)
    Case("scheduler-no-base-lrs", "trainer", _scheduler(lambda s: s.pop("base_lrs")), "base_lrs", proc=True),
]


@dataclass
class Result:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float
    case_dir: Path
    before: dict[str, bytes]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.fixture(scope="module")
def results(bases: Bases, tmp_path_factory, request) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("hfcorpus")
    prepared = []
    chosen = {it.callspec.params["case"].id for it in request.session.items
              if it.module is request.module and hasattr(it, "callspec") and "case" in it.callspec.params}
    for case in [c for c in CASES if c.id in chosen]:  # only the cases pytest selected (-k)
        c = root / case.id
        c.mkdir()
        d = c / "in"
        shutil.copytree(getattr(bases, case.base), d)
        extra = case.make(d, c)
        inp = d
        if extra[:1] == ["__input__"]:
            inp, extra = Path(extra[1]), extra[2:]
        argv = ["widen", str(inp), "--k", "2", "-o", str(c / "out"), *extra]
        prepared.append((case, argv, c, _snapshot(c)))
    env = {k: v for k, v in os.environ.items() if k != "MUPSCALE_DEBUG"}

    def run(item) -> tuple[str, Result]:
        case, argv, c, snap = item
        t = time.perf_counter()
        p = subprocess.run([*MUPSCALE, *argv], capture_output=True, text=True, cwd=c, env=env, timeout=300)
        return case.id, Result(argv, p.returncode, p.stdout, p.stderr, time.perf_counter() - t, c, snap)

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as ex:
        done = ex.map(run, [it for it in prepared if it[0].proc])
        from typer.testing import CliRunner

        from mupscale_cli.cli import app
        runner = CliRunner()
        out = {}
        term = signal.getsignal(signal.SIGTERM)
        try:
            for case, argv, c, snap in prepared:
                if not case.proc:
                    t = time.perf_counter()
                    cwd = os.getcwd()
                    os.chdir(c)
                    try:
                        r = runner.invoke(app, argv)
                    finally:
                        os.chdir(cwd)
                    out[case.id] = Result(argv, r.exit_code, r.stdout, r.stderr, time.perf_counter() - t, c, snap)
        finally:
            signal.signal(signal.SIGTERM, term)  # the CLI's guard installs its own handler
        out.update(done)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_hf_input(case: Case, results: dict[str, Result]) -> None:
    r = results[case.id]
    where = f"mupscale {' '.join(r.argv)}\nstderr: {r.stderr!r}"
    assert r.code == 2, where
    assert "Traceback" not in r.stderr + r.stdout, where
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: "), where
    assert case.match in lines[0], where
    assert r.stdout == "", where
    assert not (r.case_dir / "out").exists(), where
    assert _snapshot(r.case_dir) == r.before, where
    assert [p.name for p in r.case_dir.rglob("*") if TMP_PT in p.name] == [], where


def test_corpus_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


def _run(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MUPSCALE_DEBUG"}
    return subprocess.run([*MUPSCALE, *argv], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_index_total_size_that_lies_is_a_note(bases: Bases, tmp_path: Path) -> None:
    """total_size is never used (the output's index records its own): a wrong one is said, not refused."""
    d = tmp_path / "in"
    shutil.copytree(bases.sharded, d)
    _json(d / "model.safetensors.index.json", lambda x: x["metadata"].update(total_size=1))
    r = _run("widen", str(d), "--k", "2", "-o", str(tmp_path / "wide"))
    assert r.returncode == 0, r.stderr
    assert "total_size '1' is not the" in r.stderr


def test_torchrun_with_a_hugging_face_output_has_one_writer(bases: Bases, tmp_path: Path) -> None:
    """Under torchrun, a single-writer output (Hugging Face directory) is written by rank 0; the other ranks
    return at once (they used to race for the output's lock: one failed, torchrun exit 1)."""
    import sys
    out = tmp_path / "wide"
    env = {k: v for k, v in os.environ.items() if k != "MUPSCALE_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                        "-m", "mupscale_cli", "widen", str(bases.trainer), "--k", "2", "-o", str(out), "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines() == [str(out)]  # rank 0 speaks for all
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt"} <= {p.name for p in out.iterdir()}


def test_guard_stops_a_background_thread_whatever_raised() -> None:
    """Every background thread (formats.write.Background) is stopped and joined by the CLI's guard on the way
    out, even where no caller's try/finally did: a thread left inside torch at exit aborts the process."""
    import typer

    from mupscale_cli.cli import guard
    from mupscale_cli.errors import MupscaleError, check_cancelled
    from mupscale_cli.formats.write import Background

    def forever() -> None:
        while True:
            check_cancelled()
            time.sleep(0.01)
    term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(typer.Exit):
            with guard():
                bg = Background(forever, "mupscale-test")
                raise MupscaleError("refused while the thread runs")
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, intr)
    assert not bg._thread.is_alive()
