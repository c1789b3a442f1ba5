"""Float64 exactness figures for docs/measured.md: widen a trained zoo model with σ̄ = 0 through the real
`widen` path, then train base and widened models in lockstep and report the worst relative gap.

    python scripts/exactness_report.py      # prints the table of docs/measured.md, one torch thread
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import mup
import torch

from mupscale_cli.api import load, make_optimizer, optimizer_groups
from mupscale_cli.commands.widen import WidenOptions, run_widen
from mupscale_cli.verify.lockstep import run_lockstep
from mupscale_cli.zoo import gpt, mlp

HP = {"sgd": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3),
      "adam": dict(lr=1e-3, eps=1e-4, amsgrad=True, weight_decay=1e-2),
      "adamw": dict(lr=1e-3, eps=1e-4, weight_decay=0.1)}
MU = {"sgd": mup.MuSGD, "adam": mup.MuAdam, "adamw": mup.MuAdamW}
STEPS = 200


def case(zoo, args, kind, k, tmp: Path) -> tuple[float, float]:
    torch.manual_seed(0)
    base = zoo.build(args).double()
    opt = MU[kind](base.parameters(), **HP[kind])
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # widen mid-training: non-empty optimizer state
        x, y = zoo.batch(args, 8, g, torch.float64)
        opt.zero_grad()
        zoo.loss(base, x, y).backward()
        opt.step()
    src, out = tmp / "base.pt", tmp / "wide.safetensors"
    torch.save({"model": base.state_dict(), "optimizer": opt.state_dict(), "model_args": args,
                "config": {"parametrization": "mup"}}, src)
    run_widen(WidenOptions(checkpoint=src, output=out, k=k, force=True))
    w = load(out)
    wide = zoo.build(w.extra["model_args"], args).double()
    wide.load_state_dict(w.model)
    wopt = make_optimizer(w.kind, optimizer_groups(wide, w.optimizer))
    wopt.load_state_dict(w.optimizer)
    d = run_lockstep(zoo, args, base, opt, wide, wopt, STEPS, seed=2)
    return d[0].out_rel, max(x.rel for x in d)


def main() -> None:
    torch.set_num_threads(1)  # the figures depend on the reduction order; one thread reproduces them
    print(f"| model | optimizer (mup 1.0.0 groups) | k | static rel. gap | max rel. gap over {STEPS} steps |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as t:
        for name, zoo, args, ks in [("μP MLP", mlp, dict(mlp.DEFAULT_ARGS), ["4", "3"]),
                                    ("μP GPT-2", gpt, {**gpt.DEFAULT_ARGS, "d_ff": 64},
                                     ["2", "d_model=2,d_ff=3"])]:
            for kind in HP:
                for k in ks:
                    s, m = case(zoo, args, kind, k, Path(t))
                    print(f"| {name} | {kind} | {k} | {s:.1e} | {m:.1e} |")


if __name__ == "__main__":
    main()
