"""LR schedulers: a checkpoint taken mid-schedule resumes in the widened model on the same trajectory.

A scheduler rebuilt on the widened optimizer (`LambdaLR(opt, f, last_epoch=t)`, what a resuming training
script does) takes its `base_lrs` from each group's `initial_lr`: widen must rescale `initial_lr` with `lr`
(docs/optimizer.md: "`initial_lr` like lr"), or every later learning rate loses its per-tensor μP factor."""
from __future__ import annotations

import pytest
import torch

from conftest import HP, load_wide, mupscale
from mupscale_cli.verify.lockstep import run_lockstep
from mupscale_cli.zoo import mlp

ARGS = dict(mlp.DEFAULT_ARGS)
STEPS = 6


def decay(t: int) -> float:
    return 1 / (1 + 0.2 * t)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_rebuilt_scheduler_follows_the_base_schedule(tmp, opt):
    torch.manual_seed(0)
    base = mlp.build(ARGS).double()
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[opt]
    base_opt = cls(base.named_parameters(), **HP[opt])
    sched = torch.optim.lr_scheduler.LambdaLR(base_opt, decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = mlp.batch(ARGS, 8, g, torch.float64)
        base_opt.zero_grad()
        mlp.loss(base, x, y).backward()
        base_opt.step()
        sched.step()
    assert all("initial_lr" in grp for grp in base_opt.state_dict()["param_groups"])
    torch.save({"model": base.state_dict(), "optimizer": base_opt.state_dict(), "model_args": ARGS,
                "lr_scheduler": sched.state_dict(), "config": {"parametrization": "mup"}}, tmp / "base.pt")
    r = mupscale("widen", str(tmp / "base.pt"), "--k", "4", "-o", str(tmp / "wide.pt"), check=True)
    assert "'lr_scheduler' looks like an LR scheduler's state" in r.stderr  # its base_lrs are not rescaled
    wide, wide_opt, _ = load_wide(mlp, tmp / "wide.pt", ARGS, opt)
    wide_sched = torch.optim.lr_scheduler.LambdaLR(wide_opt, decay, last_epoch=STEPS - 1)  # resume
    assert wide_sched.last_epoch == sched.last_epoch == STEPS
    lrs = {}
    for grp in wide_opt.param_groups:  # the widened learning rates carry their μP factors (k = 4)
        lrs.setdefault(grp["lr"] / base_opt.param_groups[0]["lr"], []).append(grp["initial_lr"] / grp["lr"])
    assert len(lrs) > 1 and all(v == pytest.approx(1 / decay(STEPS)) for vs in lrs.values() for v in vs)

    def both_schedulers(d) -> bool:
        if d.step:  # after each optimizer step, as the base's training loop did
            sched.step()
            wide_sched.step()
        return False
    diffs = run_lockstep(mlp, ARGS, base, base_opt, wide, wide_opt, 30, seed=2, on_step=both_schedulers)
    assert base_opt.param_groups[0]["lr"] == pytest.approx(HP[opt]["lr"] * decay(STEPS + 30))
    assert max(d.rel for d in diffs) <= 1e-12
