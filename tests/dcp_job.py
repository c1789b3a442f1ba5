"""A tiny FSDP2 training job for the DCP tests, run under torchrun (gloo on CPU, float64).

    python dcp_job.py base OUT_DIR TRAJ.pt [--layout plain|titan] [--steps 5] [--after 50]
        trains a μP MLP (width 8) for --steps, saves model + AdamW state with dcp.save, then trains --after
        more steps and records the global loss and the readout's outputs on a probe batch at each step.
    python dcp_job.py wide IN_DIR TRAJ.pt --k 2 [--layout ...] [--after 50]
        builds the model at width 8k, loads IN_DIR with dcp.load + set_state_dict, trains --after steps on the
        same batches and records the same figures.

The model's names follow the bundled `mup-mlp` spec (input, hidden.i, readout); its readout divides by the
width multiplier (width / 8), as mup's MuReadout does, written out so that FSDP2 can shard it. The global
batch is split evenly over the ranks, so any world size sees the same mean gradient."""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

BASE_WIDTH, D_IN, D_OUT, DEPTH, BATCH = 8, 6, 4, 3, 8


class Readout(nn.Linear):
    """μP readout: the input divided by the width multiplier (mup's MuReadout), then linear."""

    def __init__(self, width: int, d_out: int):
        super().__init__(width, d_out)
        self.mult = width / BASE_WIDTH

    def forward(self, x):
        return super().forward(x / self.mult)


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.input = nn.Linear(D_IN, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(DEPTH - 2))
        self.readout = Readout(width, D_OUT)

    def forward(self, x):  # (B, D_IN) -> (B, D_OUT)
        x = F.relu(self.input(x))
        for h in self.hidden:
            x = F.relu(h(x))
        return self.readout(x)


def groups(model: MLP) -> list[dict]:
    """AdamW groups by role: matrix-like, vector-like, scalar-like (widening gives them different factors)."""
    named = dict(model.named_parameters())
    matrix = [p for n, p in named.items() if n.startswith("hidden.") and n.endswith(".weight")]
    scalar = [named["readout.bias"]]
    vector = [p for n, p in named.items() if all(p is not q for q in matrix + scalar)]
    return [{"params": matrix, "lr": 0.02, "eps": 1e-6, "weight_decay": 0.1},
            {"params": vector, "lr": 0.05, "eps": 1e-6, "weight_decay": 0.1},
            {"params": scalar, "lr": 0.05, "eps": 1e-6, "weight_decay": 0.1}]


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (BATCH,), generator=g)
    per = BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


PROBE = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def train(model, opt, sched, steps: int, start: int, rank: int, world: int, record: list | None = None):
    for s in range(start, start + steps):
        x, y = batch(s, rank, world)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if record is not None:
            total = loss.detach().clone()
            dist.all_reduce(total)
            with torch.no_grad():
                out = model(PROBE)
            record.append((float(total) / world, out.detach().clone()))


def make(width: int):
    torch.manual_seed(0)
    model = MLP(width).double()
    for layer in [*model.hidden, model.readout]:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(groups(model), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    return model, opt, sched


def state(model, opt, sched, layout: str, step: int) -> dict:
    if layout == "plain":
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd, "lr_scheduler": sched.state_dict(), "train_state": {"step": step}}
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {**msd, "optimizer": osd, "lr_scheduler": {"last_epoch": sched.last_epoch},
            "dataloader": {"sample": step * BATCH}, "train_state": {"step": step}}


def restore(model, opt, sched, sd: dict, layout: str) -> int:
    if layout == "plain":
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        sched.load_state_dict(sd["lr_scheduler"])
    else:
        msd = {k: v for k, v in sd.items() if k not in ("optimizer", "lr_scheduler", "dataloader", "train_state")}
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=sd["optimizer"],
                       options=StateDictOptions(flatten_optimizer_state_dict=True))
        sched.last_epoch = sd["lr_scheduler"]["last_epoch"]  # torchtitan saves only this: the scheduler
        sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]  # restarts from the loaded groups
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    return int(sd["train_state"]["step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["base", "wide"])
    ap.add_argument("ckpt")
    ap.add_argument("traj")
    ap.add_argument("--layout", default="plain", choices=["plain", "titan"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--after", type=int, default=50)
    ap.add_argument("--k", type=int, default=2)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: list = []
    if a.mode == "base":
        model, opt, sched = make(BASE_WIDTH)
        train(model, opt, sched, a.steps, 0, rank, world)
        dcp.save(state(model, opt, sched, a.layout, a.steps), checkpoint_id=a.ckpt)
        train(model, opt, sched, a.after, a.steps, rank, world, record)
    else:
        model, opt, sched = make(BASE_WIDTH * a.k)
        train(model, opt, sched, 1, 0, rank, world)  # optimizer state exists (set_state_dict fills it)
        sd = state(model, opt, sched, a.layout, 0)
        dcp.load(sd, checkpoint_id=a.ckpt)
        start = restore(model, opt, sched, sd, a.layout)
        del sd  # DTensors: released before the process group (see the teardown below)
        train(model, opt, sched, a.after, start, rank, world, record)
    if rank == 0:
        torch.save({"loss": [r[0] for r in record], "out": torch.stack([r[1] for r in record]),
                    "lr": [g["lr"] for g in opt.param_groups], "world": world}, a.traj)
    # Teardown: what holds the process group's tensors (the FSDP2 model, its DTensor state, the optimizer) is
    # released while the group is alive, then the group is destroyed. Left to the interpreter's exit, their
    # destructors ran after destroy_process_group and a rank aborted in about 1 run of 6 under CPU load
    # ("terminate called without an active exception"); released here, 0 of 14.
    del model, opt, sched, record
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
