"""Broken and hostile Trainer checkpoints (issue 17 §4, §5): one line, exit 2, nothing written, never an abort.

A real `checkpoint-3/` written by transformers' Trainer (tiny Llama) is copied and edited per case; the installed
`mupscale widen` runs on it in a subprocess."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import MUPSCALE

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from transformers import Trainer

    from hf_tiny import make
    from test_hf_trainer import Tokens, targs
    d = tmp_path_factory.mktemp("trainer")
    t = Trainer(model=make("llama", d / "model"), args=targs(d / "run", 3), train_dataset=Tokens())
    t.train()
    return d / "run" / "checkpoint-3"


def widen(src: Path, out: Path, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess:
    def fsize():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([*MUPSCALE, "widen", str(src), "--k", "2", "-o", str(out), *extra], capture_output=True,
                          text=True, timeout=120, preexec_fn=fsize if limit else None)


def refused(r: subprocess.CompletedProcess, match: str, out: Path) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: ") and match in lines[0], r.stderr
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".mupscale-" in p.name]


def edited(ckpt: Path, tmp: Path, config=None, optimizer=None, files: dict | None = None) -> Path:
    d = tmp / "ck"
    shutil.copytree(ckpt, d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if optimizer is not None:
        sd = torch.load(d / "optimizer.pt", weights_only=True)
        optimizer(sd)
        torch.save(sd, d / "optimizer.pt")
    for name, data in (files or {}).items():
        (d / name).write_bytes(data)
    return d


CASES = {
    "no-model-type": (dict(config=lambda c: c.pop("model_type")), "model_type"),
    "model-type-not-a-string": (dict(config=lambda c: c.__setitem__("model_type", 5)), "model_type"),
    "groups-not-dicts": (dict(optimizer=lambda s: s.__setitem__("param_groups", [1, 2])), "param group 0"),
    "group-without-params": (dict(optimizer=lambda s: s["param_groups"][1].pop("params")), "param group 1"),
    "scheduler-not-loadable": (dict(files={"scheduler.pt": b"PK\x03\x04 not a zip"}), "scheduler.pt"),
    "layers-100000": (dict(config=lambda c: c.__setitem__("num_hidden_layers", 100000)), "num_hidden_layers"),
    "layers-fewer": (dict(config=lambda c: c.__setitem__("num_hidden_layers", 1)), "num_hidden_layers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_trainer_checkpoint(ckpt, tmp_path, case):
    kw, match = CASES[case]
    src = edited(ckpt, tmp_path, **kw)
    t0 = time.monotonic()
    r = widen(src, tmp_path / "wide")
    refused(r, match, tmp_path / "wide")
    assert time.monotonic() - t0 < 60  # bounded: 100000 layers are not built
    assert "terminate called" not in r.stderr


def test_file_size_limit_while_saving_optimizer_pt(ckpt, tmp_path):
    """`ulimit -f` that the widened weights fit under but optimizer.pt (twice as large) does not: exit 2, one
    line naming optimizer.pt (was torch's RuntimeError 'unexpected pos', exit 3), nothing left behind."""
    ok = widen(ckpt, tmp_path / "full")
    assert ok.returncode == 0, ok.stderr
    weights = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert (tmp_path / "full" / "optimizer.pt").stat().st_size > 1.5 * weights
    r = widen(ckpt, tmp_path / "wide", limit=int(1.2 * weights))
    refused(r, "optimizer.pt", tmp_path / "wide")


def test_no_optimizer_writes_no_trainer_state(ckpt, tmp_path):
    """--no-optimizer: a model directory; the base's optimizer.pt and scheduler.pt (the narrow model's) are
    neither widened nor copied."""
    r = widen(ckpt, tmp_path / "wide", "--no-optimizer")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "wide"
    assert (out / "model.safetensors").is_file()
    assert not (out / "optimizer.pt").exists() and not (out / "scheduler.pt").exists()


def test_scheduler_follows_the_widened_groups(ckpt, tmp_path):
    r = widen(ckpt, tmp_path / "wide")
    assert r.returncode == 0, r.stderr
    osd = torch.load(tmp_path / "wide" / "optimizer.pt", weights_only=True)
    sched = torch.load(tmp_path / "wide" / "scheduler.pt", weights_only=True)
    base = torch.load(ckpt / "scheduler.pt", weights_only=True)
    assert sched["_last_lr"] == [g["lr"] for g in osd["param_groups"]]
    assert sched["base_lrs"] == [g["initial_lr"] for g in osd["param_groups"]]
    assert len(sched["_last_lr"]) > len(base["_last_lr"])  # the groups were split for per-tensor factors


def test_save_torch_names_the_file_when_it_cannot_be_opened(tmp_path):
    """An OSError opening the file (here: its directory is gone) is one MupscaleError naming what was being
    written (optimizer.pt), not the temporary path."""
    from mupscale_cli.errors import MupscaleError
    from mupscale_cli.formats.write import save_torch
    with pytest.raises(MupscaleError, match=r"^optimizer\.pt: "):
        save_torch({"a": 1}, tmp_path / "gone" / ".tmp-optimizer.pt", "optimizer.pt")
