"""Hostile and broken inputs through the installed `mupscale` command (issue 5).

Every case runs `mupscale widen ...` in a real subprocess and must give: the documented exit code (2),
exactly one line on stderr starting with "mupscale: error:", no traceback, nothing at the output path,
no temporary file beside it, an unchanged input, and no side effect of a pickle payload.
The subprocesses run in parallel (each pays torch's import time) from one module-scoped fixture.
"""
from __future__ import annotations

import argparse
import builtins
import copy
import json
import os
import random
import shlex
import shutil
import signal
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from conftest import MUPSCALE
from mupscale_cli.formats.write import TMP_PT, clean_stale_temps
from mupscale_cli.formats.safetensors import LazySafetensors, StreamWriter, TensorInfo
from mupscale_cli.errors import MupscaleError
from mupscale_cli.zoo import gpt, mlp



# ---------------------------------------------------------------------------------------------------
# Pickle payloads: loading them unsafely runs code (a file appears); mupscale must never do that.


class SystemPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class OpenPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------
# Valid base checkpoints (zoo models trained two steps)


@dataclass
class Base:
    dir: Path
    gpt: dict  # nanoGPT layout, in memory (deep-copy before changing)
    mlp: dict[str, torch.Tensor]  # plain state dict
    gpt_pt: Path
    mlp_pt: Path
    mlp_st: Path


def _gpt_ckpt() -> dict:
    torch.manual_seed(0)
    args = dict(gpt.DEFAULT_ARGS)
    model = gpt.build(args)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = gpt.batch(args, 4, g)
        opt.zero_grad()
        gpt.loss(model, x, y).backward()
        opt.step()
    return copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": args,
                          "iter_num": 2, "best_val_loss": 3.0,
                          "config": {"learning_rate": 1e-3, "parametrization": "mup"}})


def _mlp_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {n: t.detach().clone() for n, t in mlp.build(mlp.DEFAULT_ARGS).state_dict().items()}


def _framed(header, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

MLP_SPEC = """name: my-mlp
tensors:
  input.weight: [width, null]
  input.bias: [width]
  "hidden.{i}.weight": [width, width]
  "hidden.{i}.bias": [width]
  readout.weight: [null, width]
  readout.bias: [null]
"""


# ---------------------------------------------------------------------------------------------------
# The corpus: each builder writes its inputs into `d` and returns the argv after `mupscale`.


@dataclass
class Ctx:
    base: Base
    d: Path  # this case's directory; inputs here, output dir d/"out"
    out: Path  # the output path the command is given (must not appear)
    marker: Path  # a pickle payload would create this file

    def write(self, name: str, data: bytes | str) -> Path:
        p = self.d / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def save(self, name: str, obj, **kw) -> Path:
        p = self.d / name
        torch.save(obj, p, **kw)
        return p

    def pickle(self, name: str, obj) -> Path:
        import pickle
        p = self.d / name
        with open(p, "wb") as f:
            pickle.dump(obj, f, protocol=2)
        return p

    def widen(self, inp: Path | str, *extra: str, out: Path | None = None) -> list[str]:
        # the MLP is a plain state dict: it cannot show its parametrization, so it is named (docs/stacks.md)
        spec = ["--spec", "mup-mlp"] if Path(inp) in (self.base.mlp_pt, self.base.mlp_st) and "--spec" not in extra \
            else []
        return ["widen", str(inp), "--k", "2", "-o", str(out or self.out), *extra, *spec]

    def spec(self, text: str, name: str = "spec.yaml") -> list[str]:
        return self.widen(self.base.mlp_pt, "--spec", str(self.write(name, text)))

    def gpt_with(self, change: Callable[[dict], None], name: str = "ckpt.pt") -> Path:
        ck = copy.deepcopy(self.base.gpt)
        change(ck)
        return self.save(name, ck)


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], list[str]]
    match: str  # a substring of the one-line message (names the tensor, field or option)
    code: int = 2
    proc: bool = True  # through the installed command; False: in-process (typer's runner), to keep the file fast


def _first_exp_avg(ck: dict) -> dict:
    return ck["optimizer"]["state"][0]


def _mlp_optimizer() -> dict:
    model = mlp.build(mlp.DEFAULT_ARGS)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    x, y = mlp.batch(mlp.DEFAULT_ARGS, 4, torch.Generator().manual_seed(0))
    mlp.loss(model, x, y).backward()
    opt.step()
    return opt.state_dict()


def _nan(ck: dict) -> None:
    ck["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")


def _untie(ck: dict) -> None:
    ck["model"]["lm_head.weight"] = ck["model"]["lm_head.weight"].clone() + 1


def _int_matrix(c: Ctx) -> list[str]:
    sd = dict(c.base.mlp)
    sd["hidden.0.weight"] = torch.ones(16, 16, dtype=torch.int64)
    return c.widen(c.save("int.pt", sd), "--spec", "mup-mlp")


def _exists(c: Ctx) -> list[str]:
    c.out.write_bytes(b"precious")
    return c.widen(c.base.mlp_pt)


def _over_input(c: Ctx) -> list[str]:
    inp = c.d / "out" / "wide.safetensors"
    shutil.copy(c.base.mlp_st, inp)
    return c.widen(inp, "--force")


def _over_input_pt(c: Ctx) -> list[str]:
    inp = c.d / "out" / "wide.pt"
    shutil.copy(c.base.gpt_pt, inp)
    return c.widen(inp, "--force", out=inp)


def _over_input_link(c: Ctx) -> list[str]:
    inp = c.d / "in.safetensors"
    shutil.copy(c.base.mlp_st, inp)
    os.link(inp, c.out)
    return c.widen(inp, "--force")


def _out_dir(c: Ctx) -> list[str]:
    c.out.mkdir()
    return c.widen(c.base.mlp_pt, "--force")


def _opt_tensors_no_meta(c: Ctx) -> list[str]:
    sd = {**c.base.mlp, "__optim__/input.weight/exp_avg": torch.zeros(16, 12)}
    save_file(sd, c.d / "o.safetensors")
    return c.widen(c.d / "o.safetensors")


def _opt_meta_not_json(c: Ctx) -> list[str]:
    save_file(dict(c.base.mlp), c.d / "o.safetensors", metadata={"mupscale.optimizer": "{"})
    return c.widen(c.d / "o.safetensors")


def _truncated_st(c: Ctx) -> list[str]:
    data = c.base.mlp_st.read_bytes()
    return c.widen(c.write("t.safetensors", data[: len(data) // 2]))


def _truncated_pt(c: Ctx) -> list[str]:
    data = c.base.gpt_pt.read_bytes()
    return c.widen(c.write("t.pt", data[: len(data) // 2]))


def _bitflip_header(c: Ctx) -> list[str]:
    data = bytearray(c.base.mlp_st.read_bytes())
    i = data.index(b'"shape":[16,12]')
    data[i: i + 15] = b'"shape":[16,13]'
    return c.widen(c.write("f.safetensors", bytes(data)))


def _short_record(c: Ctx) -> list[str]:
    """A .pt whose first storage record is shorter than its tensor (torch.load(mmap=True) would read the
    next entries' bytes as values)."""
    import zipfile
    ok = c.save("ok.pt", c.base.mlp)
    with zipfile.ZipFile(ok) as zin, zipfile.ZipFile(c.d / "short.pt", "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:100] if info.filename.endswith("/data/0") else data)
    ok.unlink()
    return c.widen(c.d / "short.pt")


def _shards_over_other_files(c: Ctx) -> list[str]:
    c.write("out/notes.txt", "mine")
    return c.widen(c.base.mlp_pt, "--shard-size", "1GB", "--force", out=c.d / "out")


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _empty_dir(c: Ctx) -> Path:
    (c.d / "empty").mkdir()
    return c.d / "empty"


def _dcp_payload(c: Ctx, name: str, opcode: str = "stack") -> list[str]:
    """A DCP directory whose .metadata names a callable through DCP's own metadata module (protocol 4 walks
    dotted names through that module's globals: it imports os and torch)."""
    from test_unpicklers import DCPM, payloads
    d = c.d / "dcp"
    d.mkdir()
    form = {"stack": "p4-stack-global", "global": "p4-global", "inst": "p0-inst", "obj": "p1-obj"}[opcode]
    (d / ".metadata").write_bytes(payloads(DCPM, name, f"touch {shlex.quote(str(c.marker))}")[form])
    return c.widen(d)


CASES: list[Case] = [
    # files that are not checkpoints
    Case("missing-file", lambda c: c.widen(c.d / "nope.pt"), "no such file"),
    Case("directory", lambda c: c.widen(_empty_dir(c)), "is a directory"),
    Case("output-inside-input-directory", lambda c: c.widen(c.d), "inside the input directory"),
    Case("empty-pt", lambda c: c.widen(c.write("e.pt", b"")), "empty file"),
    Case("empty-safetensors", lambda c: c.widen(c.write("e.safetensors", b"")), "empty file", proc=False),
    Case("random-bytes-pt", lambda c: c.widen(c.write("r.pt", _rand(4096))), "not a readable PyTorch checkpoint"),
    Case("random-bytes-safetensors", lambda c: c.widen(c.write("r.safetensors", _rand(4096, 1))),
         "not a valid safetensors file", proc=False),
    Case("random-bytes-no-suffix", lambda c: c.widen(c.write("ckpt", _rand(4096, 2))), "ckpt", proc=False),
    Case("text-file", lambda c: c.widen(c.write("notes.pt", "hello, not a checkpoint\n")), "notes.pt", proc=False),
    Case("truncated-safetensors", _truncated_st, "truncated"),
    Case("truncated-pt", _truncated_pt, "not a readable PyTorch checkpoint", proc=False),
    Case("pt-short-storage-record", _short_record, "storage record 'ok/data/0' holds 100 bytes"),
    # hand-made safetensors framing and headers
    Case("st-huge-header", lambda c: c.widen(c.write("h.safetensors", _framed(b"{}", n=2**40))), "exceeds"),
    Case("st-header-past-eof", lambda c: c.widen(c.write("h.safetensors", _framed(b"{}", n=4096))),
         "runs past the end", proc=False),
    Case("st-header-not-json", lambda c: c.widen(c.write("h.safetensors", _framed(b"{nope", b"\0" * 8))),
         "not valid JSON"),
    Case("st-header-not-utf8", lambda c: c.widen(c.write("h.safetensors", _framed(b'{"\xff": 1}'))),
         "not UTF-8", proc=False),
    Case("st-header-json-list", lambda c: c.widen(c.write("h.safetensors", _framed([1, 2]))), "JSON list", proc=False),
    Case("st-unknown-dtype", lambda c: c.widen(c.write(
        "h.safetensors", _framed({"a": {**F32, "dtype": "F13"}}, b"\0" * 8))), "'F13'", proc=False),
    Case("st-shape-mismatch", _bitflip_header, "'input.weight'", proc=False),
    Case("st-overlap", lambda c: c.widen(c.write("h.safetensors", _framed(
        {"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12))), "overlaps"),
    Case("st-trailing-bytes", lambda c: c.widen(c.write("h.safetensors", _framed({"a": F32}, b"\0" * 9))),
         "trailing", proc=False),
    Case("st-duplicate-key", lambda c: c.widen(c.write("h.safetensors", _framed(
        b'{"a":' + json.dumps(F32).encode() + b',"a":' + json.dumps(F32).encode() + b"}", b"\0" * 8))),
        "duplicate key 'a'", proc=False),
    Case("st-no-tensors", lambda c: c.widen(c.write("h.safetensors", _framed(b"{}      "))), "no model tensors",
         proc=False),
    Case("st-optim-without-metadata", _opt_tensors_no_meta, "mupscale.optimizer", proc=False),
    Case("st-optim-metadata-not-json", _opt_meta_not_json, "mupscale.optimizer", proc=False),
    # pickles: payloads must never run
    Case("pickle-system-plain", lambda c: c.widen(c.pickle("p.pt", SystemPayload(str(c.marker)))),
         "refusing to unpickle"),
    Case("pickle-open-plain", lambda c: c.widen(c.pickle("p.pt", OpenPayload(str(c.marker)))),
         "refusing to unpickle"),
    Case("pickle-system-torch-zip", lambda c: c.widen(c.save("p.pt", SystemPayload(str(c.marker)))),
         "refusing to unpickle"),
    Case("pickle-open-torch-zip", lambda c: c.widen(c.save("p.pt", OpenPayload(str(c.marker)))),
         "refusing to unpickle"),
    Case("pickle-dcp-metadata-dotted-os-system", lambda c: _dcp_payload(c, "os.system"), "os.system"),
    Case("pickle-dcp-metadata-dotted-global-opcode", lambda c: _dcp_payload(c, "os.system", "global"), "os.system"),
    Case("pickle-dcp-metadata-walk-globals", lambda c: _dcp_payload(c, "Metadata.__init__.__globals__.os.system"),
         "refusing to unpickle", proc=False),
    Case("pickle-dcp-metadata-torch-load", lambda c: _dcp_payload(c, "torch.load", "inst"), "torch.load", proc=False),
    Case("pickle-dcp-metadata-obj-opcode", lambda c: _dcp_payload(c, "pickle.loads", "obj"), "pickle.loads",
         proc=False),
    Case("pickle-nested-in-nanogpt", lambda c: c.widen(c.gpt_with(
        lambda ck: ck.__setitem__("config", SystemPayload(str(c.marker))))), "refusing to unpickle"),
    Case("pickle-torch-legacy-format", lambda c: c.widen(c.save(
        "p.pt", {"model": c.base.mlp, "x": OpenPayload(str(c.marker))}, _use_new_zipfile_serialization=False)),
        "refusing to unpickle"),
    Case("pickle-namespace-config", lambda c: c.widen(c.gpt_with(
        lambda ck: ck.__setitem__("config", argparse.Namespace(lr=1.0)))), "argparse", proc=False),
    Case("pt-not-a-dict", lambda c: c.widen(c.save("l.pt", [torch.ones(2)])), "found list", proc=False),
    Case("pt-no-state-dict", lambda c: c.widen(c.save("n.pt", {"iter_num": 3})), "no model state dict", proc=False),
    # optimizer state
    Case("optimizer-missing-param-groups", lambda c: c.widen(c.gpt_with(
        lambda ck: ck.__setitem__("optimizer", {"state": {}}))), "param_groups"),
    Case("optimizer-wrong-shape", lambda c: c.widen(c.gpt_with(
        lambda ck: _first_exp_avg(ck).__setitem__("exp_avg", torch.zeros(3, 3)))), "[3, 3]"),
    Case("optimizer-unknown-state-key", lambda c: c.widen(c.gpt_with(
        lambda ck: _first_exp_avg(ck).__setitem__("foo_buffer", torch.zeros(1)))), "'foo_buffer'"),
    Case("optimizer-of-another-model", lambda c: c.widen(c.gpt_with(
        lambda ck: ck.__setitem__("optimizer", _mlp_optimizer()))), "cannot match optimizer ids", proc=False),
    Case("optimizer-int-state", lambda c: c.widen(c.gpt_with(
        lambda ck: _first_exp_avg(ck).__setitem__("exp_avg", _first_exp_avg(ck)["exp_avg"].long()))),
        "'exp_avg'", proc=False),
    # --k and --sigma
    Case("k-zero", lambda c: c.widen(c.base.mlp_pt, "--k", "0"), "--k"),
    Case("k-fraction", lambda c: c.widen(c.base.mlp_pt, "--k", "1.5"), "'1.5'"),
    Case("k-axis-zero", lambda c: c.widen(c.base.gpt_pt, "--k", "d_model=0,d_ff=2"), "d_model"),
    Case("k-unknown-axis", lambda c: c.widen(c.base.gpt_pt, "--k", "d_model=2,d_ff=2,d_modle=2"), "'d_modle'"),
    Case("k-missing-axis", lambda c: c.widen(c.base.gpt_pt, "--k", "d_model=2"), "'d_ff'", proc=False),
    Case("sigma-negative", lambda c: c.widen(c.base.mlp_pt, "--sigma=-1"), "--sigma"),
    Case("sigma-nan", lambda c: c.widen(c.base.mlp_pt, "--sigma", "nan"), "--sigma"),
    # output path
    Case("output-exists", _exists, "--force"),
    Case("output-is-input", _over_input, "input"),
    Case("output-is-input-pt", _over_input_pt, "input", proc=False),
    Case("output-is-hard-link-to-input", _over_input_link, "input", proc=False),
    Case("output-suffix-txt", lambda c: c.widen(c.base.mlp_pt, out=c.d / "out" / "wide.txt"), ".safetensors"),
    Case("output-dir-under-a-file", lambda c: c.widen(c.base.mlp_pt, out=c.write("afile", "x") / "d" / "w.safetensors"),
         "is not a directory"),
    Case("output-is-directory", _out_dir, "directory", proc=False),
    Case("shards-into-a-directory-of-other-files", _shards_over_other_files, "(notes.txt)", proc=False),
    Case("output-missing", lambda c: ["widen", str(c.base.mlp_pt), "--k", "2"], "-o", proc=False),
    Case("disk-too-small", lambda c: c.widen(c.base.gpt_pt, "--k", "100000"), "free; free some space"),
    # specs
    Case("spec-missing", lambda c: c.widen(c.base.mlp_pt, "--spec", str(c.d / "nope.yaml")), "nope.yaml"),
    Case("spec-yaml-syntax", lambda c: c.spec(MLP_SPEC + "  oops: [width, null\n"), "not valid YAML"),
    Case("spec-unknown-key", lambda c: c.spec(MLP_SPEC.replace("tensors:", "tensor:")), "'tensor'"),
    Case("spec-rule-key-typo", lambda c: c.spec(MLP_SPEC.replace(
        "input.bias: [width]", "input.bias: {axes: [width], optinal: true}")), "'optinal'", proc=False),
    Case("spec-duplicate-key", lambda c: c.spec(MLP_SPEC + "  input.bias: [null]\n"), "duplicate key", proc=False),
    Case("spec-two-rules", lambda c: c.spec(MLP_SPEC + '  "hidden.*.weight": [width, width]\n'),
         "matches two rules"),
    Case("spec-rule-matches-nothing", lambda c: c.spec(MLP_SPEC + "  extra.weight: [width, width]\n"),
         "'extra.weight'"),
    Case("spec-no-rule-for-tensor", lambda c: c.spec(MLP_SPEC.replace("  readout.bias: [null]\n", "")),
         "'readout.bias'", proc=False),
    Case("spec-block-not-divisible", lambda c: c.spec(MLP_SPEC.replace(
        '"hidden.{i}.weight": [width, width]', '"hidden.{i}.weight": [{axis: width, block: 3}, width]')),
        "not a multiple"),
    Case("spec-wrong-ndim", lambda c: c.spec(MLP_SPEC.replace("readout.bias: [null]", "readout.bias: [null, null]")),
         "'readout.bias'", proc=False),
    Case("bsh-bad-entry", lambda c: c.widen(c.base.mlp_pt, "--spec", str(c.write(
        "mlp.bsh", "input.weight: [16, null]\nhidden.0.weight: [16, wide]\n"))), "'hidden.0.weight'"),
    # values
    Case("nan-strict", lambda c: c.widen(c.gpt_with(_nan), "--strict"), "'transformer.h.0.mlp.c_fc.weight'"),
    Case("int-matrix", _int_matrix, "'hidden.0.weight'", proc=False),
    Case("tied-differ", lambda c: c.widen(c.gpt_with(_untie)), "tied", proc=False),
]


# ---------------------------------------------------------------------------------------------------
# Issue 10 (validation): hyper-parameters and state, bounded resources, one-line messages, odd tensors


def _group(ck: dict, **kv) -> None:
    ck["optimizer"]["param_groups"][0].update(kv)


def _gpt_hp(c: Ctx, strict: bool = False, **kv) -> list[str]:
    return c.widen(c.gpt_with(lambda ck: _group(ck, **kv)), *(["--strict"] if strict else []))


def _st_meta(c: Ctx, meta: dict[str, str], name: str = "m.safetensors") -> list[str]:
    save_file(dict(c.base.mlp), c.d / name, metadata=meta)
    return c.widen(c.d / name)


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))
BIG_INT = "7" * 4301


def _hparams(c: Ctx, **kv) -> list[str]:
    d = {"sigma": 0.5, "lr": 1e-3, "base_lr": 1e-3, "noise_scheme": "mup", **kv}
    import yaml
    return c.widen(c.base.gpt_pt, "--hparams", str(c.write("h.yaml", yaml.safe_dump(d))))


def _state_of(ck: dict) -> dict:
    return ck["optimizer"]["state"]


def _dangling(ck: dict) -> None:
    _state_of(ck)[999] = {k: v.clone() for k, v in _state_of(ck)[0].items()}


def _deep_st_header(c: Ctx) -> list[str]:
    raw = b'{"a": ' + _deep().encode() + b"}"
    return c.widen(c.write("d.safetensors", _framed(raw + b" " * (-len(raw) % 8))))


def _deep_index(c: Ctx) -> list[str]:
    d = c.d / "sharded"
    d.mkdir()
    save_file(dict(c.base.mlp), d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}, "metadata": ' + _deep() + "}")
    return c.widen(d)


def _symlinked_shard(c: Ctx) -> list[str]:
    d = c.d / "sharded"
    d.mkdir()
    outside = c.d / "outside.bin"
    outside.write_bytes(b"#!/bin/sh\necho secret\n" * 4)
    (d / "model-00001-of-00001.safetensors").symlink_to(outside)
    wm = {n: "model-00001-of-00001.safetensors" for n in c.base.mlp}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return c.widen(d)


def _odd_st(c: Ctx, tensors: dict[str, torch.Tensor], spec: str, *extra: str) -> list[str]:
    save_file(tensors, c.d / "odd.safetensors")
    return c.widen(c.d / "odd.safetensors", "--spec", str(c.write("odd.yaml", spec)), *extra)


ODD_SPEC = "name: odd\ntensors:\n  w: [width, width]\n  b: [width]\n"


def _f8(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), 0.5).to(dtype), "b": torch.full((4,), 2.0).to(dtype)}


def _verify_data_oob(c: Ctx) -> list[str]:
    a = c.base.gpt["model_args"]
    x = torch.full((8, a["block_size"]), a["vocab_size"] + 5, dtype=torch.long)
    torch.save({"inputs": x, "targets": x}, c.d / "data.pt")
    return ["verify", str(c.base.gpt_pt), "--k", "2", "--steps", "1", "--data", str(c.d / "data.pt")]


def _verify_edited_provenance(c: Ctx) -> list[str]:
    from safetensors import safe_open

    from mupscale_cli.commands.widen import WidenOptions, run_widen
    wide = c.d / "w.safetensors"
    run_widen(WidenOptions(c.base.gpt_pt, wide))
    with safe_open(str(wide), "pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    meta["mupscale"] = json.dumps({**json.loads(meta["mupscale"]), "sizes": [1], "xxh3_128": None})
    wide.unlink()
    save_file(tensors, c.d / "edited.safetensors", metadata=meta)
    return ["verify", str(c.base.gpt_pt), str(c.d / "edited.safetensors"), "--steps", "1"]


def _nested(n: int) -> list:
    x: list = []
    for _ in range(n):
        x = [x]
    return x


CASES += [
    # 6. hyper-parameters and optimizer state: types, ranges, finiteness, ids
    Case("hp-lr-nan-strict", lambda c: _gpt_hp(c, True, lr=float("nan")), "'lr'", proc=False),
    Case("hp-lr-string", lambda c: _gpt_hp(c, lr="0.001"), "'lr'", proc=False),
    Case("hp-lr-list", lambda c: _gpt_hp(c, lr=[0.001]), "'lr'", proc=False),
    Case("hp-lr-negative", lambda c: _gpt_hp(c, lr=-1.0), "'lr'", proc=False),
    Case("hp-eps-inf-strict", lambda c: _gpt_hp(c, True, eps=float("inf")), "'eps'", proc=False),
    Case("hp-wd-string", lambda c: _gpt_hp(c, weight_decay="0.1"), "'weight_decay'", proc=False),
    Case("hp-wd-overflow", lambda c: _gpt_hp(c, weight_decay=1e308), "'weight_decay'", proc=False),
    Case("hp-betas-string", lambda c: _gpt_hp(c, betas="0.9"), "'betas'", proc=False),
    Case("hp-betas-three", lambda c: _gpt_hp(c, betas=(0.9, 0.99, 0.5)), "'betas'", proc=False),
    Case("hp-betas-one", lambda c: _gpt_hp(c, betas=(0.9, 1.0)), "'betas'", proc=False),
    Case("hp-params-string", lambda c: _gpt_hp(c, params="0123"), "'params'", proc=False),
    Case("hp-params-float", lambda c: _gpt_hp(c, params=[0.5]), "'params'", proc=False),
    Case("hp-group-not-dict", lambda c: c.widen(c.gpt_with(
        lambda ck: ck["optimizer"]["param_groups"].append(3))), "param_groups", proc=False),
    Case("state-dangling-id", lambda c: c.widen(c.gpt_with(_dangling)), "999", proc=False),
    Case("state-step-string", lambda c: c.widen(c.gpt_with(
        lambda ck: _state_of(ck)[0].__setitem__("step", "3"))), "'step'", proc=False),
    Case("state-step-two-elements", lambda c: c.widen(c.gpt_with(
        lambda ck: _state_of(ck)[0].__setitem__("step", torch.tensor([1.0, 2.0])))), "'step'", proc=False),
    Case("sigma-overflow", lambda c: c.widen(c.base.gpt_pt, "--sigma", "1e39"), "σ̄", proc=False),
    Case("hparams-sigma-overflow", lambda c: _hparams(c, sigma=1e300), "σ̄", proc=False),
    Case("hparams-lr-overflow", lambda c: _hparams(c, lr=1e308), "lr", proc=False),
    Case("hparams-k-not-mapping", lambda c: _hparams(c, k=[1, 2]), "'k'", proc=False),
    Case("meta-optimizer-list", lambda c: _st_meta(c, {"mupscale.optimizer": "[1, 2]"}), "mupscale.optimizer",
         proc=False),
    Case("meta-optimizer-groups-int", lambda c: _st_meta(c, {"mupscale.optimizer": '{"param_groups": 5}'}),
         "mupscale.optimizer", proc=False),
    Case("meta-optimizer-group-string", lambda c: _st_meta(c, {"mupscale.optimizer": '{"param_groups": ["x"]}'}),
         "mupscale.optimizer", proc=False),
    Case("meta-extra-list", lambda c: _st_meta(c, {"mupscale.extra": "[1]"}), "mupscale.extra", proc=False),
    Case("meta-provenance-string", lambda c: ["inspect", _st_meta(c, {"mupscale": '"x"'})[1]], "mupscale",
         proc=False),
    # 7. bounded resources
    Case("spec-alias-bomb", lambda c: c.spec(MLP_SPEC + BOMB), "alias"),
    Case("hparams-alias-bomb", lambda c: c.widen(c.base.gpt_pt, "--hparams", str(c.write(
        "h.yaml", "sigma: 0.5\nlr: 0.001\nbase_lr: 0.001\n" + BOMB))), "alias", proc=False),
    Case("bsh-alias-bomb", lambda c: c.widen(c.base.mlp_pt, "--spec", str(c.write("m.bsh", BOMB))), "alias",
         proc=False),
    Case("spec-deep-yaml", lambda c: c.spec(f"x: {_deep(100_000)}\n"), "nested", proc=False),
    Case("spec-huge-int", lambda c: c.spec(MLP_SPEC + f"sizes:\n  s: {BIG_INT}\n"), "digits", proc=False),
    Case("spec-size-expr-huge-int", lambda c: c.spec(MLP_SPEC + f"sizes:\n  s: \"{BIG_INT} / 2\"\n"), "longer than",
         proc=False),
    Case("st-deep-json-header", _deep_st_header, "nested"),
    Case("st-deep-json-metadata", lambda c: _st_meta(c, {"mupscale.extra": _deep()}), "nested", proc=False),
    Case("st-deep-json-provenance", lambda c: _st_meta(c, {"mupscale": _deep()}), "nested", proc=False),
    Case("hf-index-deep-json", _deep_index, "nested", proc=False),
    Case("st-metadata-huge-int", lambda c: _st_meta(c, {"mupscale.extra": f'{{"iter_num": {BIG_INT}}}'}),
         "digits", proc=False),
    Case("pt-huge-int-model-args", lambda c: c.widen(c.gpt_with(
        lambda ck: ck["model_args"].__setitem__("n_layer", 10 ** 5000))), "not a readable", proc=False),
    Case("pt-deep-config", lambda c: c.widen(c.gpt_with(lambda ck: ck.__setitem__("config", _nested(200)))),
         "nested", proc=False),
    Case("verify-provenance-edited", _verify_edited_provenance, "'sizes'", proc=False),
    Case("k-huge-int", lambda c: c.widen(c.base.mlp_pt, "--k", BIG_INT), "digits"),
    Case("size-huge-int", lambda c: c.widen(c.base.mlp_pt, "--size", f"head_dim={BIG_INT}"), "digits",
         proc=False),
    # 8. one-line messages
    Case("newline-in-input-path", lambda c: c.widen(c.d / "a\nb.pt"), "a\\nb.pt"),
    Case("escape-in-output-path", lambda c: c.widen(c.base.mlp_pt, out=c.write("no\x1b[2Jdir\r", "x") / "w.safetensors"),
         "no\\x1b[2Jdir\\r", proc=False),
    Case("newline-in-spec-name", lambda c: c.spec(MLP_SPEC.replace("name: my-mlp", 'name: "my\\nmlp"').replace(
        "  readout.bias: [null]\n", "")), "my\\nmlp", proc=False),
    Case("symlinked-shard", _symlinked_shard, "symbolic link"),
    # 9-11 and other input errors that were internal errors
    Case("spec-tied-to-itself", lambda c: c.spec(MLP_SPEC + "tied:\n  readout.bias: readout.bias\n"), "tied",
         proc=False),
    Case("f8-e4m3-rescale", lambda c: _odd_st(c, _f8(torch.float8_e4m3fn), ODD_SPEC), "float8", proc=False),
    Case("f8-e8m0-rescale", lambda c: _odd_st(c, _f8(torch.float8_e8m0fnu), ODD_SPEC), "float8", proc=False),
    Case("sweep-output-nodir", lambda c: ["sweep", str(c.base.gpt_pt), "--sigma", "0", "--lr", "0.001", "--steps",
                                          "4", "-o", str(c.d / "nodir" / "h.yaml")], "nodir", proc=False),
    Case("verify-data-token-out-of-range", _verify_data_oob, "--data", proc=False),
]


# ---------------------------------------------------------------------------------------------------
# DCP metadata beyond find_class: planner paths, metadata vs data, EXT and BUILD opcodes (issue 17; the
# unit tests are in tests/test_dcp.py)


def _dcp_edited(c: Ctx, change=None, metadata: bytes | None = None, command: str = "widen") -> list[str]:
    """A real single-process DCP checkpoint in c.d/dcp, its .metadata changed (change(md)) or replaced."""
    import pickle

    from test_dcp import _small_dcp
    d = _small_dcp(c.d / "dcp")
    if change is not None:
        md = pickle.loads((d / ".metadata").read_bytes())
        change(md)
        (d / ".metadata").write_bytes(pickle.dumps(md))
    if metadata is not None:
        (d / ".metadata").write_bytes(metadata)
    return c.widen(d, "--spec", "mup-mlp") if command == "widen" else ["inspect", str(d), "--spec", "mup-mlp"]


def _planner_huge_index(md) -> None:
    from test_dcp import _extra_entry
    _extra_entry(md, "ls.10000000", ("ls", 10 ** 7))  # 10^9 on main: 8 GB


def _retyped(md) -> None:
    md.state_dict_metadata["model.hidden.0.weight"].properties.dtype = torch.float32


def _zstd(md) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    md.storage_data[MetadataIndex("model.hidden.0.weight", torch.Size([0, 0]))].transform_descriptors = ["zstd"]


def _p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def _u(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


EXT_PAYLOAD = _p4(b"\x82\xf3" + _u("touch /nonexistent") + b"\x85R")  # EXT1 0xf3 ("touch ...",) REDUCE
BUILD_ON_FUNCTION = _p4(_u("torch.serialization") + _u("_get_layout") + b"\x93N}(" + _u("cache") + b"}u\x86b")

CASES += [
    Case("dcp-planner-huge-index", lambda c: _dcp_edited(c, _planner_huge_index), "list indices"),
    Case("dcp-planner-huge-index-inspect", lambda c: _dcp_edited(c, _planner_huge_index, command="inspect"),
         "list indices", proc=False),
    Case("dcp-planner-path-int", lambda c: _dcp_edited(c, lambda md: md.planner_data.__setitem__(
        "model.input.weight", 5)), "list indices", proc=False),
    Case("dcp-dtype-differs-from-data", lambda c: _dcp_edited(c, _retyped), "the metadata and the data disagree"),
    Case("dcp-storage-transforms", lambda c: _dcp_edited(c, _zstd), "transforms", proc=False),
    Case("dcp-ext-opcode", lambda c: _dcp_edited(c, metadata=EXT_PAYLOAD), "extension registry", proc=False),
    Case("dcp-ext-opcode-inspect", lambda c: _dcp_edited(c, metadata=EXT_PAYLOAD, command="inspect"),
         "extension registry"),
    Case("dcp-build-on-function", lambda c: _dcp_edited(c, metadata=BUILD_ON_FUNCTION, command="inspect"),
         "sets the state of a function", proc=False),
]


# ---------------------------------------------------------------------------------------------------
# Running the corpus


@dataclass
class Result:
    ctx: Ctx
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    input_bytes: dict[str, bytes]  # files in d (inputs) before the run


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    d = tmp_path_factory.mktemp("base")
    ck = _gpt_ckpt()
    sd = _mlp_sd()
    torch.save(ck, d / "gpt.pt")
    torch.save(sd, d / "mlp.pt")
    save_file(sd, d / "mlp.safetensors")
    return Base(d, ck, sd, d / "gpt.pt", d / "mlp.pt", d / "mlp.safetensors")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def results(base: Base, tmp_path_factory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("corpus")
    prepared = []
    for case in CASES:
        d = root / case.id
        (d / "out").mkdir(parents=True)
        ctx = Ctx(base, d, d / "out" / "wide.safetensors", root / f"PWNED-{case.id}")
        argv = case.make(ctx)
        if case.id == "output-is-input-pt":
            ctx.out = d / "out" / "wide.pt"
        prepared.append((case, ctx, argv, _snapshot(d)))
    env = {k: v for k, v in os.environ.items() if k != "MUPSCALE_DEBUG"}

    def run(item) -> tuple[str, Result]:
        case, ctx, argv, snap = item
        p = subprocess.run([*MUPSCALE, *argv], capture_output=True, text=True, cwd=ctx.d, env=env, timeout=120)
        return case.id, Result(ctx, argv, p.returncode, p.stdout, p.stderr, snap)

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as ex:
        done = ex.map(run, [it for it in prepared if it[0].proc])
        out = {}
        from typer.testing import CliRunner

        from mupscale_cli.cli import app
        runner = CliRunner()
        term = signal.getsignal(signal.SIGTERM)
        try:
            for case, ctx, argv, snap in prepared:
                if not case.proc:
                    r = runner.invoke(app, argv)
                    out[case.id] = Result(ctx, argv, r.exit_code, r.stdout, r.stderr, snap)
        finally:
            signal.signal(signal.SIGTERM, term)  # the CLI's guard installs its own handler
        out.update(done)
    return out


def test_corpus_is_large_enough() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.proc for c in CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, results: dict[str, Result]) -> None:
    r = results[case.id]
    where = f"mupscale {' '.join(r.argv)}\nstderr: {r.stderr!r}"
    assert r.code == case.code, where
    assert "Traceback" not in r.stderr + r.stdout, where
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: "), where
    assert lines[0].strip() != "mupscale: error:", where
    assert case.match in lines[0], where
    assert r.stdout == "", where
    ctx = r.ctx
    # nothing new at the output path, no temporaries, inputs (and a pre-existing output) untouched
    after = _snapshot(ctx.d)
    assert after == r.input_bytes, where
    leftovers = [p.name for p in ctx.d.rglob("*") if TMP_PT in p.name]
    assert leftovers == [], where
    assert not ctx.marker.exists(), f"pickle payload ran: {where}"


def test_payloads_are_live(tmp_path: Path) -> None:
    """The payloads would create their marker when unpickled unsafely (so their absence above means something)."""
    import pickle
    for i, cls in enumerate((SystemPayload, OpenPayload)):
        marker = tmp_path / f"m{i}"
        obj = pickle.loads(pickle.dumps(cls(str(marker))))
        if hasattr(obj, "close"):
            obj.close()
        assert marker.exists()
        marker2 = tmp_path / f"t{i}"
        torch.save(cls(str(marker2)), tmp_path / "p.pt")
        obj = torch.load(tmp_path / "p.pt", weights_only=False)
        if hasattr(obj, "close"):
            obj.close()
        assert marker2.exists()


# ---------------------------------------------------------------------------------------------------
# In-process checks of the pieces behind the corpus


def test_nan_is_a_warning_without_strict(base: Base, tmp_path: Path) -> None:
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    ck = copy.deepcopy(base.gpt)
    _nan(ck)
    ck["optimizer"]["state"][0]["exp_avg_sq"][0, 0] = float("inf")
    torch.save(ck, tmp_path / "n.pt")
    res = run_widen(WidenOptions(tmp_path / "n.pt", tmp_path / "w.safetensors"))
    warned = [n for n in res["notes"] if n.startswith("warning:")]
    assert len(warned) == 2 and "'transformer.h.0.mlp.c_fc.weight'" in warned[0] and "exp_avg_sq" in warned[1]
    with pytest.raises(MupscaleError, match="--strict"):
        run_widen(WidenOptions(tmp_path / "n.pt", tmp_path / "w2.safetensors", strict=True))
    assert not (tmp_path / "w2.safetensors").exists()


def test_disk_check_counts_model_and_optimizer(base: Base, tmp_path: Path, monkeypatch) -> None:
    from mupscale_cli.commands import widen as W
    opts = W.WidenOptions(base.gpt_pt, tmp_path / "w.safetensors")
    prep = W.prepare(opts)
    need = W.output_bytes(prep, opts.output)
    W.run_widen(opts)
    size = opts.output.stat().st_size
    assert need <= size <= need + 2**20  # tensors + header
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need))
    with pytest.raises(MupscaleError, match=r"has only [0-9.]+ [KMG]?i?B free; free some space"):
        W.run_widen(W.WidenOptions(base.gpt_pt, tmp_path / "w2.safetensors"))
    assert not (tmp_path / "w2.safetensors").exists()


def test_stale_temporaries(tmp_path: Path) -> None:
    dest = tmp_path / "wide.safetensors"
    dead = tmp_path / f".wide.safetensors{TMP_PT}999999999-abcd1234"  # above any pid_max
    live = tmp_path / f".wide.safetensors{TMP_PT}{os.getpid()}-abcd1234"
    old = tmp_path / f".wide.safetensors{TMP_PT}{os.getppid()}-00000000"
    nopid = tmp_path / f".wide.safetensors{TMP_PT}k3x9_qz1"
    other = tmp_path / f".other.safetensors{TMP_PT}999999999-abcd1234"
    for p in (dead, live, old, nopid, other):
        p.write_bytes(b"x")
    two_hours = time.time() - 7200
    os.utime(old, (two_hours, two_hours))
    removed, kept = clean_stale_temps(dest)
    assert sorted(removed) == sorted([dead.name, old.name])
    assert sorted(kept) == sorted([live.name, nopid.name])
    assert other.exists() and live.exists() and nopid.exists() and not dead.exists() and not old.exists()
    from mupscale_cli.formats.write import atomic_path
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "w.pt") as tmp:
            assert tmp.name.startswith(f".w.pt{TMP_PT}{os.getpid()}-")  # the pid tells later runs it is stale
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not tmp.exists() and not (tmp_path / "w.pt").exists()


def test_update_metadata_rewrites_header_in_place(tmp_path: Path) -> None:
    t = {"a": torch.arange(6.0), "b": torch.ones(2, 3, dtype=torch.float64)}
    infos = [TensorInfo(n, v.dtype, tuple(v.shape)) for n, v in t.items()]
    dest = tmp_path / "m.safetensors"
    with StreamWriter(dest, infos, {"x": "1"}, reserve_metadata_bytes=100) as w:
        for n, v in t.items():
            w.write(n, v)
        w.update_metadata({"y": "2" * 90})
        with pytest.raises(MupscaleError, match="reserve"):
            w.update_metadata({"z": "3" * 200})
    r = LazySafetensors(dest)
    assert r.metadata() == {"x": "1", "y": "2" * 90}
    assert all(torch.equal(r.get(n), v) for n, v in t.items())
    from safetensors.torch import load_file
    assert torch.equal(load_file(dest)["b"], t["b"])


def test_widened_files_record_and_check_digests(base: Base, tmp_path: Path) -> None:
    from mupscale_cli.commands.inspect import run_inspect
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    for suffix in (".safetensors", ".pt"):
        out = tmp_path / f"w{suffix}"
        run_widen(WidenOptions(base.gpt_pt, out))
        rep = run_inspect(WidenOptions(out))
        assert rep["digests"]["checked"] == 113 and rep["digests"]["bad"] == []
        assert rep["provenance"]["source"] == "gpt.pt"
    assert run_inspect(WidenOptions(base.gpt_pt))["digests"] is None
    data = bytearray((tmp_path / "w.safetensors").read_bytes())
    data[-3] ^= 0x40  # last tensor: the last optimizer state entry
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    with pytest.raises(MupscaleError, match=r"tensor '__optim__/.*' does not match the checksum") as e:
        run_inspect(WidenOptions(tmp_path / "c.safetensors"))
    assert "\n" not in str(e.value)


def test_inspect_cli_rejects_a_corrupted_file(base: Base, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    run_widen(WidenOptions(base.mlp_pt, out, spec="mup-mlp"))
    data = bytearray(out.read_bytes())
    data[-1] ^= 0x01
    out.write_bytes(bytes(data))
    p = subprocess.run([*MUPSCALE, "inspect", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("mupscale: error: ") and "'readout.bias'" in p.stderr, p.stderr


def test_help_documents_exit_codes() -> None:
    from typer.testing import CliRunner

    from mupscale_cli.cli import app
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for words in ("0 success", "1 verification failed", "2 usage, input or environment error", "130 interrupted"):
        assert words in " ".join(text.split()), words


def test_directory_swap_without_rename_exchange(tmp_path: Path, monkeypatch) -> None:
    """Where renameat2 is missing, the swap takes two renames; a run killed between them leaves the old
    directory moved aside, which the next run puts back before anything else."""
    from mupscale_cli.formats import target as T
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a").write_text("old")
    monkeypatch.setattr(T, "_renameat2", None)
    with T.atomic_dir(dest, replace=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(MupscaleError, match="appeared"):  # no clobbering without replace
        with T.atomic_dir(dest) as tmp:
            pass
    # killed between the renames: dest is missing, the old output sits aside under a dead pid
    aside = tmp_path / f".out{T.OLD_MARKER}999999999-abcd1234"
    dest.rename(aside)
    removed, kept = clean_stale_temps(dest)
    assert removed == [f"{aside.name} (put back as out)"] and kept == []
    assert (dest / "b").read_text() == "new" and not aside.exists()


def test_claim_is_exclusive_and_leaves_no_lock(tmp_path: Path) -> None:
    from mupscale_cli.formats.target import claim, lock_path
    dest = tmp_path / "w.safetensors"
    with claim(dest):
        assert lock_path(dest).read_text().strip() == str(os.getpid())
        with pytest.raises(MupscaleError, match=f"being written by pid {os.getpid()}"):
            with claim(dest):  # a second open file description: flock refuses it, in-process too
                pass
    assert not lock_path(dest).exists()
    with claim(dest):  # free again
        pass


def test_environment_errors_are_one_line_naming_the_output() -> None:
    """Every environment errno becomes one line naming the output (not the temporary) and the errno."""
    import errno as E
    from mupscale_cli.formats.target import ENV_ERRORS, env_error
    for code in ENV_ERRORS:
        e = env_error(OSError(code, os.strerror(code), f"/d/.w.safetensors{TMP_PT}1-ab"), "-o /d/w.safetensors")
        assert str(e).startswith("-o /d/w.safetensors: ") and E.errorcode[code] in str(e) and "\n" not in str(e)
    e = env_error(OSError(E.EMFILE, "Too many open files", "/d/in.pt"), "-o /d/w.safetensors")
    assert str(e).startswith("/d/in.pt: too many open files")  # the file it could not open
    assert env_error(OSError(E.ENOENT, "No such file"), "x") is None  # not the environment's: not mapped


# ---------------------------------------------------------------------------------------------------
# Issue 10 (validation): what must work, and the bounds, measured


def test_one_line_escapes_control_characters() -> None:
    from mupscale_cli.errors import one_line
    assert one_line("a\nb\rc\x1b[2J\u2028d\te") == "a\\nb\\rc\\x1b[2J\\u2028d\\te"
    assert one_line("σ̄ = 0.5, γ̄↑ ok 'x'") == "σ̄ = 0.5, γ̄↑ ok 'x'"  # printable text stays as it is


def test_glob_matches_in_linear_time() -> None:
    """A 14-star pattern against a 34-character name that does not match: a backtracking regex of the same
    pattern takes minutes; the automaton, milliseconds. Same answers as the regex on random patterns."""
    import re

    from mupscale_cli.core.spec import compile_pattern
    pattern, name = "*a" * 14, "a" * 33 + "b"
    t = time.perf_counter()
    assert not compile_pattern(pattern).fullmatch(name)
    assert compile_pattern(pattern).fullmatch("a" * 34)
    assert time.perf_counter() - t < 0.05

    def regex(p: str) -> re.Pattern:
        parts = re.split(r"(\{\w+\}|\*)", p)
        return re.compile("".join(r"[0-9]+" if s.startswith("{") else r"[^.]*" if s == "*" else re.escape(s)
                                  for s in parts))
    rng = random.Random(0)
    for _ in range(3000):
        p = "".join(rng.choice(["a", "b", ".", "1", "*", "{i}"]) for _ in range(rng.randint(0, 7)))
        n = "".join(rng.choice("ab.12") for _ in range(rng.randint(0, 8)))
        assert bool(compile_pattern(p).fullmatch(n)) == bool(regex(p).fullmatch(n)), (p, n)


def test_threads_are_capped_by_cores_with_the_same_bytes(base: Base, tmp_path: Path) -> None:
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    res = run_widen(WidenOptions(base.gpt_pt, tmp_path / "a.safetensors", threads=10000))
    cores = len(os.sched_getaffinity(0))
    assert any(n.startswith(f"--threads 10000: using {cores}") for n in res["notes"]), res["notes"]
    run_widen(WidenOptions(base.gpt_pt, tmp_path / "b.safetensors", threads=1))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_zero_size_and_float8_tensors_widen_exactly(tmp_path: Path) -> None:
    """Zero-size dimensions widen (an empty matrix stays empty, its width axes grow); float8 tensors that are
    only duplicated (scale 1) are copied bit for bit; those that need 1/k are refused (corpus: f8-*)."""
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    from mupscale_cli.formats.safetensors import LazySafetensors
    spec = tmp_path / "s.yaml"
    spec.write_text("name: odd\ntensors:\n  empty: [width, width]\n  e4: [width, null]\n  e5: [width]\n"
                    "  e8: [width]\n  m: [width, width]\n")
    g = torch.Generator().manual_seed(0)
    t = {"empty": torch.zeros(0, 4), "m": torch.randn(4, 4, generator=g),
         "e4": torch.randn(4, 3, generator=g).to(torch.float8_e4m3fn),
         "e5": torch.randn(4, generator=g).to(torch.float8_e5m2),
         "e8": torch.rand(4, generator=g).add(0.1).to(torch.float8_e8m0fnu)}
    save_file(t, tmp_path / "in.safetensors")
    for out in ("w.safetensors", "w.pt"):
        run_widen(WidenOptions(tmp_path / "in.safetensors", tmp_path / out, spec=str(spec), k="2"))
        w = dict(torch.load(tmp_path / out, weights_only=True)) if out.endswith(".pt") else {
            n: LazySafetensors(tmp_path / out).get(n) for n in t}
        assert w["empty"].shape == (0, 8) and w["m"].shape == (8, 8)
        for n in ("e4", "e5", "e8"):
            assert w[n].dtype == t[n].dtype
            want = t[n].view(torch.uint8).repeat_interleave(2, dim=0)
            assert torch.equal(w[n].view(torch.uint8), want), n


def test_plain_number_step_is_kept_and_nonfinite_lr_is_a_warning(base: Base, tmp_path: Path) -> None:
    """An int `step` (older torch) survives a safetensors widening as a 0-d tensor that Adam loads; an Inf
    lr widens with a warning (like NaN tensors), and is refused with --strict."""
    from mupscale_cli.api import load
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    ck = copy.deepcopy(base.gpt)
    for st in ck["optimizer"]["state"].values():
        st["step"] = 2
    ck["optimizer"]["param_groups"][0]["initial_lr"] = float("inf")
    torch.save(ck, tmp_path / "c.pt")
    res = run_widen(WidenOptions(tmp_path / "c.pt", tmp_path / "w.safetensors"))
    assert any("'initial_lr' is inf" in n and n.startswith("warning:") for n in res["notes"]), res["notes"]
    w = load(tmp_path / "w.safetensors")
    steps = [st["step"] for st in w.optimizer["state"].values()]
    assert len(steps) == len(ck["optimizer"]["state"]) and all(float(s) == 2 and s.dim() == 0 for s in steps)
    with pytest.raises(MupscaleError, match="'initial_lr' is inf; --strict"):
        run_widen(WidenOptions(tmp_path / "c.pt", tmp_path / "w2.safetensors", strict=True))


@pytest.mark.parametrize("arg,value", [("n_layer", 20000), ("vocab_size", 10**8)])
def test_verify_refuses_model_args_that_blow_up_the_model_fast(base: Base, tmp_path: Path, arg, value) -> None:
    """model_args that do not describe the checkpoint: verify stops while building (a budget of the
    checkpoint's own elements), in well under a second, instead of building 20000 layers or 12.8 GB."""
    from mupscale_cli.commands.verify import VerifyOptions, run_verify
    ck = copy.deepcopy(base.gpt)
    ck["model_args"][arg] = value
    torch.save(ck, tmp_path / "c.pt")
    t = time.perf_counter()
    with pytest.raises(MupscaleError, match="model_args") as e:
        run_verify(VerifyOptions(tmp_path / "c.pt", k="2", steps=1, device="cpu"))
    assert time.perf_counter() - t < 3, time.perf_counter() - t
    assert "\n" not in str(e.value)


def test_verify_checks_shapes_on_the_meta_device_before_building(base: Base, tmp_path: Path) -> None:
    """model_args within every budget but describing other shapes (block_size 3/2 x): verify names the
    first tensor and both shapes, from a model built on the meta device, before building it for real."""
    from mupscale_cli.commands.verify import VerifyOptions, run_verify
    ck = copy.deepcopy(base.gpt)
    ck["model_args"]["block_size"] = ck["model_args"]["block_size"] * 3 // 2
    torch.save(ck, tmp_path / "c.pt")
    built = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda m, n, p: built.append(p.device.type) if p is not None else None)
    try:
        with pytest.raises(MupscaleError) as e:
            run_verify(VerifyOptions(tmp_path / "c.pt", k="2", steps=1, device="cpu"))
    finally:
        hook.remove()
    wpe = list(base.gpt["model"]["transformer.wpe.weight"].shape)
    msg = str(e.value)
    assert f"BASE: tensor 'transformer.wpe.weight' is {wpe} but the model its model_args describe has" in msg, msg
    assert set(built) == {"meta"}, "a real parameter was made before the shapes were checked"
