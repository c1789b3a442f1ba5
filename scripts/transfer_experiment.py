"""Hyper-parameter transfer figures for docs/sweep.md (issue: tune σ̄ and γ̄↑ on a small proxy).

For the zoo MLP and GPT, two proxy widths each, upscaled by k = 4: train a proxy, sweep (σ̄, γ̄↑) on its
upscaling, and compare the best settings across widths; measure the rank correlation of early scores
(first 15% of steps) with full-run scores, and what successive halving saves and picks.
Run: python scripts/transfer_experiment.py --steps 150 --seeds 2 --plot docs/transfer.png
It prints the table of docs/sweep.md as it stands there, rows preceded by '#' notes.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import mup
import torch

from mupscale_cli.commands.plots import plot_sweep
from mupscale_cli.commands.sweep import SweepOptions, run_sweep, spearman
from mupscale_cli.zoo import gpt, mlp

LR_MULTS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
MODELS = {  # zoo, proxy args per width, base learning rate γ̄ (MuAdamW), proxy training steps, σ̄ grid
    # (the MLP teacher task wants far less noise than the GPT copy task; below 1/16 its score is flat)
    "mlp": (mlp, [{"width": 16, "depth": 3}, {"width": 32, "depth": 3}], 1e-2, 150,
            [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]),
    "gpt": (gpt, [{"n_embd": 16, "n_head": 2}, {"n_embd": 32, "n_head": 2}], 3e-3, 150,
            [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4]),
}


def make_proxy(zoo, args: dict, lr: float, steps: int, path: Path, base: dict) -> None:
    torch.manual_seed(0)
    model = zoo.build(args, base)
    opt = mup.MuAdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = zoo.batch(args, 32, g)
        opt.zero_grad()
        zoo.loss(model, x, y).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": args,
                "config": {"learning_rate": lr, "parametrization": "mup"}}, path)


def grid_step(values: list[float], a: float, b: float) -> int:
    return abs(values.index(a) - values.index(b))


def regret(pick: dict, ref: dict) -> str:
    """How much worse `ref`'s grid scores `pick`'s setting than `ref`'s best, in standard errors over seeds:
    the transfer criterion that still means something where the score is flat within seed noise."""
    mult = pick["lr"] / pick["base_lr"]
    row = next(r for r in ref["grid"] if r["sigma"] == pick["sigma"] and
               math.isclose(r["lr"] / ref["base_lr"], mult, rel_tol=1e-9))
    best = min((r for r in ref["grid"] if r["score"] is not None), key=lambda r: r["score"])
    gap = row["score"] - best["score"]
    se = math.sqrt((row["score_se"] or 0) ** 2 + (best["score_se"] or 0) ** 2)
    return "0" if gap == 0 else f"{gap:.2g} ({gap / se:.1f} s.e.)" if se > 0 else f"{gap:.2g}"


def fs(sigma: float) -> str:
    """σ̄ as docs/sweep.md writes it: 1/64 rather than 0.015625."""
    return f"1/{1 / sigma:g}" if 0 < sigma < 1 and len(f"{sigma:g}") > 5 else f"{sigma:g}"


def mult(res: dict) -> str:
    return f"{res['lr'] / res['base_lr']:g}"


def picks(full: dict, halv: dict) -> str:
    same = full["sigma"] == halv["sigma"] and math.isclose(full["lr"], halv["lr"], rel_tol=1e-9)
    return "the same" if same else f"σ̄ {fs(halv['sigma'])}, {mult(halv)}γ̄"


def apart(sigmas: list[float], full: dict, halv: dict) -> str:
    """Grid steps (σ̄, γ̄↑) between the halving pick and the full sweep's best."""
    return f"{grid_step(sigmas, full['sigma'], halv['sigma'])}, " \
           f"{grid_step(LR_MULTS, full['lr'] / full['base_lr'], halv['lr'] / halv['base_lr'])}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as t:
        for name, (zoo, widths, lr, psteps, sigmas) in MODELS.items():
            full_args = [{**zoo.DEFAULT_ARGS, **w} for w in widths]
            res = []
            for args in full_args:
                p = Path(t) / f"{name}-{len(res)}.pt"
                make_proxy(zoo, args, lr, psteps, p, full_args[0])
                lrs = [lr * m for m in LR_MULTS]
                full = run_sweep(SweepOptions(p, k="4", sigmas=sigmas, lrs=lrs, steps=a.steps, seeds=a.seeds,
                                              early=0.15))
                halv = run_sweep(SweepOptions(p, k="4", sigmas=sigmas, lrs=lrs, steps=a.steps, seeds=a.seeds,
                                              halving=True))  # first rung T/8
                res.append((args, full, halv, lrs))
                results.append(full)
            (a0, f0, h0, _), (a1, f1, h1, _) = res
            ws = [x.get("width", x.get("n_embd")) for x in (a0, a1)]
            rows.append(
                f"| {name} | {ws[0]}→{4 * ws[0]} / {ws[1]}→{4 * ws[1]} "
                f"| σ̄ {fs(f0['sigma'])}, γ̄↑ {mult(f0)}γ̄ / σ̄ {fs(f1['sigma'])}, γ̄↑ {mult(f1)}γ̄ "
                f"| {grid_step(sigmas, f0['sigma'], f1['sigma'])}, {grid_step(LR_MULTS, f0['lr'] / f0['base_lr'], f1['lr'] / f1['base_lr'])} "
                f"| {regret(f0, f1)} "
                f"| {f0['rank_correlation_early_full']:.2f} / {f1['rank_correlation_early_full']:.2f} "
                f"| {h0['total_train_steps'] / h0['full_grid_steps']:.2f} / {h1['total_train_steps'] / h1['full_grid_steps']:.2f} "
                f"| {picks(f0, h0)} / {picks(f1, h1)} "
                f"| {apart(sigmas, f0, h0)}; {regret(h0, f0)} / {apart(sigmas, f1, h1)}; {regret(h1, f1)} |")
            for args, full, halv, lrs in res:
                print(f"# {name} {args}: best {full['sigma']}, {full['lr']} ({full['confidence']}); "
                      f"halving picks {halv['sigma']}, {halv['lr']}")
    print("| model | proxies (k = 4) | best (narrow / wide proxy) | grid steps apart (σ̄, γ̄↑) "
          "| narrow pick on the wide proxy: score − best | Spearman early 15% vs full | halving steps / full "
          "| halving picks | halving vs full: grid steps; score − best |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.plot:
        plot_sweep(results, a.plot, labels=[f"{n} proxy {i}" for n in MODELS for i in (1, 2)])


if __name__ == "__main__":
    main()
