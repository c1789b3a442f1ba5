"""Shared helpers: train a zoo model a few steps, save a real checkpoint, rebuild the widened one."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mup
import pytest
import torch

from mupscale_cli import optim as mu_optim
from mupscale_cli.api import load, make_optimizer, optimizer_groups
from mupscale_cli.zoo import gpt

torch.set_num_threads(1)  # tiny models: OpenMP threads only oversubscribe the 2 CI cores

# SGD lr 0.01: at 0.02 the GPT task is chaotic enough that the base model drifts 2.4e-12 from a copy of
# itself perturbed by 1e-16 within 200 steps (as far as the widened model does); at 0.01 that is 1.2e-14.
HP = {"sgd": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3),
      "sgd-nesterov": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
      "adam": dict(lr=1e-3, eps=1e-4, amsgrad=True, weight_decay=1e-2),
      "adamw": dict(lr=1e-3, eps=1e-4, weight_decay=0.1)}


def kind_of(opt: str) -> str:
    return opt.split("-")[0]


def make_opt(model, opt: str, layout: str) -> torch.optim.Optimizer:
    """An optimizer as a training script builds it: layout named | single | nanogpt | mup | corrected."""
    hp, kind = dict(HP[opt]), kind_of(opt)
    if layout == "nanogpt":
        return gpt.configure_optimizers(model, hp["weight_decay"], hp["lr"])
    if layout == "mup":
        return {"sgd": mup.MuSGD, "adam": mup.MuAdam, "adamw": mup.MuAdamW}[kind](model.parameters(), **hp)
    if layout == "corrected":
        return {"sgd": mu_optim.MuSGD, "adam": mu_optim.MuAdam, "adamw": mu_optim.MuAdamW}[kind](model, **hp)
    params = model.named_parameters() if layout == "named" else model.parameters()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(params, **hp)


def train(zoo, args, model, opt, steps: int, seed: int = 1, batch_size: int = 8) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = zoo.batch(args, batch_size, g, torch.float64)
        opt.zero_grad()
        zoo.loss(model, x, y).backward()
        opt.step()


def make_base(tmp: Path, zoo, args: dict, opt: str = "adamw", layout: str = "named", steps: int = 5,
              base_args: dict | None = None, dtype=torch.float64, name: str = "base.pt"):
    """Train a base model `steps` steps and save it nanoGPT-style; returns (path, model, optimizer)."""
    torch.manual_seed(0)
    model = zoo.build(args, base_args).to(dtype)
    o = make_opt(model, opt, layout)
    train(zoo, args, model, o, steps)
    path = tmp / name
    torch.save({"model": model.state_dict(), "optimizer": o.state_dict(), "model_args": args,
                "iter_num": steps, "best_val_loss": 1.5, "config": {"batch_size": 8, "parametrization": "mup"}}, path)
    return path, model, o


def load_wide(zoo, wide_path: Path, base_args: dict, kind: str, dtype=torch.float64):
    """Build the widened model from the written file (strict load) and its optimizer."""
    w = load(wide_path)
    args = w.extra["model_args"]
    model = zoo.build(args, base_args).to(dtype)
    model.load_state_dict(w.model, strict=True)
    o = make_optimizer(kind, optimizer_groups(model, w.optimizer))
    o.load_state_dict(w.optimizer)
    return model, o, w


# The installed `mupscale` command, else the same entry point through this interpreter.
MUPSCALE = [shutil.which("mupscale")] if shutil.which("mupscale") else [sys.executable, "-m", "mupscale_cli"]


def mupscale(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `mupscale` command."""
    r = subprocess.run([*MUPSCALE, *args], capture_output=True, text=True, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"mupscale {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
