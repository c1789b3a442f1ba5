"""`mupscale sweep`: tune σ̄ and γ̄↑ on a small proxy upscaling n0 -> k·n0 (paper §3.2, App. F)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mupscale_cli.api import make_optimizer, optimizer_groups
from mupscale_cli.commands.hparams import base_lr_of
from mupscale_cli.commands.widen import Prepared, WidenOptions, prepare
from mupscale_cli.formats.checkpoint import sha256_file
from mupscale_cli.verify.modelspec import ModelDef, check_args_scale, param_budget, resolve
from mupscale_cli.core.optstate import scale_lr, widen_optimizer
from mupscale_cli.core.schemes import SCHEMES, effective_sigma, noised, relative_tensors
from mupscale_cli.core.widen import widen
from mupscale_cli.errors import MupscaleError


MIN_RUNG = 1 / 8  # successive halving's first budget, as a fraction of --steps, without --early


@dataclass
class SweepOptions:
    checkpoint: Path
    k: str = "2"
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    lrs: list[float] | None = None  # γ̄↑ values; default: γ̄ × {0.25, 0.5, 1, 2}
    steps: int = 200
    spec: str | None = None
    base_lr: float | None = None  # γ̄ of the proxy (default: config.learning_rate of the checkpoint)
    early: float | None = None  # score on the first fraction of steps only
    halving: bool = False
    seeds: int = 1
    batch_size: int = 32
    scheme: str = "mup"
    data: Path | None = None
    output: Path | None = None  # hparams.yaml
    model: str | None = None  # factory override
    trust_code: bool = False  # --trust-spec-code: import a factory that the spec names outside mupscale_cli


@dataclass
class Run:
    """One (σ̄, γ̄↑, seed) training run, resumable for successive halving."""
    sigma: float
    lr: float
    seed: int
    model: torch.nn.Module | None  # None once the run is dropped (halving)
    opt: torch.optim.Optimizer | None
    gen: torch.Generator | None
    losses: list[float] = field(default_factory=list)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MupscaleError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.25,0.5,1") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise MupscaleError(f"{what} {text!r}: expected finite numbers >= 0")
    return vals


def score(losses: list[float], upto: int | None = None) -> float:
    """Coarse-grained loss: the mean training loss over the first `upto` steps (Hong & Wang, *On the Provable Separation of Scales in μP*: the loss
    landscape settles early while weights keep drifting, so this ranks settings well)."""
    xs = losses[:upto] if upto else losses
    return sum(xs) / len(xs) if xs else math.inf


def _ranks(x: list[float]) -> list[float]:
    """Ranks from 0; tied values share the mean of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in order[i:j + 1]:
            r[t] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on ranks, ties averaged)."""
    n = len(a)
    if n < 2:
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va and vb else 1.0


def check_options(o: SweepOptions) -> None:
    if o.scheme not in SCHEMES:
        raise MupscaleError(f"--noise-scheme {o.scheme!r}: choose one of {', '.join(SCHEMES)}")
    if o.steps < 4:
        raise MupscaleError(f"--steps must be >= 4, got {o.steps}")
    if o.seeds < 1:
        raise MupscaleError(f"--seeds must be >= 1 (training runs per setting), got {o.seeds}")
    if o.batch_size < 1:
        raise MupscaleError(f"--batch-size must be >= 1, got {o.batch_size}")
    if o.early is not None and not 0 < o.early <= 1:
        raise MupscaleError(f"--early must be a fraction in (0, 1], got {o.early}")
    if o.output is not None:
        check_output_file(o.output, "-o")  # before any training: a bad path must not cost the whole sweep
    if o.scheme == "interpolate" and any(s > 1 for s in o.sigmas):
        raise MupscaleError("--noise-scheme interpolate takes t in [0, 1] as --sigma values")


@dataclass
class Proxy:
    """What every run of a sweep starts from: the proxy, its widening plan and widened optimizer state."""
    o: SweepOptions
    prep: Prepared
    md: ModelDef
    gamma: float  # the proxy's base learning rate γ̄
    wide_osd: dict
    data: Callable | None

    def start(self, sigma: float, lr: float, seed: int) -> Run:
        """The widened proxy (noised per scheme) and its optimizer with every lr × γ̄↑/γ̄."""
        plan, ckpt, o = self.prep.plan, self.prep.ckpt, self.o
        torch.manual_seed(seed)
        budget = 2 * sum(math.prod(p.out_shape) for p in plan.tensors.values()) + (1 << 16)
        with param_budget(budget, "the widened proxy"):  # model_args that blow the model up stop early
            model = self.md.build(self.prep.model_args or {}, ckpt.model_args or {})
        sd = {}
        for n, p in plan.tensors.items():
            c = p.alias_of or n
            sd[n] = noised(ckpt.tensors[c], plan.tensors[c], o.scheme, sigma, seed)
        model.load_state_dict(sd)
        osd = {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                         for i, st in self.wide_osd["state"].items()},
               "param_groups": scale_lr(self.wide_osd["param_groups"], lr / self.gamma)}
        opt = make_optimizer(self.prep.omap.kind, optimizer_groups(model, osd))
        opt.load_state_dict(osd)
        return Run(sigma, lr, seed, model, opt, torch.Generator().manual_seed(10_000 + seed))

    def train(self, r: Run, until: int) -> int:
        """Train `r` until it has `until` steps; returns the steps it took."""
        r.model.train()
        taken = max(0, until - len(r.losses))
        while len(r.losses) < until:
            x, y = self.data(len(r.losses)) if self.data else self.md.batch(
                self.prep.ckpt.model_args or {}, self.o.batch_size, r.gen, torch.float32)
            r.opt.zero_grad(set_to_none=True)
            loss = self.md.loss(r.model, x, y)
            loss.backward()
            r.opt.step()
            v = loss.item()
            r.losses.append(v if math.isfinite(v) else 1e9)
        return taken


def load_proxy(o: SweepOptions) -> Proxy:
    prep = prepare(WidenOptions(checkpoint=o.checkpoint, k=o.k, spec=o.spec))
    if prep.omap is None:
        raise MupscaleError("the proxy checkpoint has no optimizer state: sweep trains with the proxy's "
                            "optimizer and its widened state")
    md = resolve(prep.plan.spec.model, prep.plan.spec.name, o.model, o.trust_code)
    plan = prep.plan
    check_args_scale(prep.model_args or {}, [p.out_shape for p in plan.tensors.values()], "the widened proxy")
    gamma = base_lr_of(prep.ckpt, o.base_lr)
    if gamma is None:
        raise MupscaleError("the proxy's base learning rate γ̄ is unknown (no config.learning_rate in the "
                            "checkpoint): pass --base-lr")
    data = None
    if o.data:
        from mupscale_cli.verify.setup import load_data
        data = load_data(o.data, o.batch_size)
    return Proxy(o, prep, md, gamma, widen_optimizer(prep.ckpt.optimizer, prep.plan, prep.omap), data)


def run_grid(px: Proxy, grid: list[tuple], log) -> tuple[dict, int]:
    """Every setting trained the full --steps, one setting's models in memory at a time."""
    o, losses, total = px.o, {}, 0
    for key in grid:
        runs = []
        for seed in range(o.seeds):
            r = px.start(*key, seed)
            total += px.train(r, o.steps)
            runs.append(r.losses)
            del r  # the model and optimizer go before the next run is built
        losses[key] = runs
        log(f"sigma={key[0]:g} lr={key[1]:g}: score {sum(score(x) for x in runs) / o.seeds:.4f}")
    return losses, total


def run_halving(px: Proxy, grid: list[tuple], log) -> tuple[dict, int, list[dict]]:
    """Successive halving: budgets T/2^R, ..., T/2, T; the better half of the settings goes on at each rung.
    The first rung trains at least the --early fraction (else T/8): fewer steps rank settings poorly."""
    o = px.o
    runs = {key: [px.start(*key, seed) for seed in range(o.seeds)] for key in grid}
    first = max(1, math.floor(o.steps * (o.early or MIN_RUNG)))
    n_rungs = max(0, min(math.floor(math.log2(len(grid))), math.floor(math.log2(o.steps / first))))
    alive, total, rungs = list(grid), 0, []
    for i in range(n_rungs + 1):
        until = max(1, o.steps // 2 ** (n_rungs - i))
        for key in alive:
            for r in runs[key]:
                total += px.train(r, until)
        ranked = sorted(alive, key=lambda key: sum(score(r.losses) for r in runs[key]))
        rungs.append({"steps": until, "configs": len(alive)})
        if i < n_rungs:
            for key in ranked[max(1, math.ceil(len(alive) / 2)):]:
                runs[key] = [Run(r.sigma, r.lr, r.seed, None, None, None, r.losses) for r in runs[key]]  # free
            alive = ranked[:max(1, math.ceil(len(alive) / 2))]
    log(f"halving: {len(grid)} settings, rungs {rungs}")
    return {key: [r.losses for r in rs] for key, rs in runs.items()}, total, rungs


def score_table(o: SweepOptions, grid: list[tuple], losses: dict) -> list[dict]:
    early_n = max(1, int(o.early * o.steps)) if o.early else None
    table = []
    for key in grid:
        ls = losses[key]
        full = [score(x) for x in ls] if all(len(x) == o.steps for x in ls) else None
        early = [score(x, early_n) for x in ls] if early_n and all(len(x) >= early_n for x in ls) else None
        table.append({"sigma": key[0], "lr": key[1], "steps": len(ls[0]),
                      "score": _mean(full), "score_se": _se(full), "early": _mean(early),
                      "final_loss": _mean([sum(x[-10:]) / len(x[-10:]) for x in ls])})
    return table


def run_sweep(o: SweepOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    check_options(o)
    px = load_proxy(o)
    lrs = o.lrs or [px.gamma * f for f in (0.25, 0.5, 1.0, 2.0)]
    grid = [(s, lr) for s in o.sigmas for lr in lrs]
    rungs: list[dict] = []
    if o.halving:
        losses, total_steps, rungs = run_halving(px, grid, log)
    else:
        losses, total_steps = run_grid(px, grid, log)
    table = score_table(o, grid, losses)
    by = "score"  # the full-run score picks; early scores are reported with their rank correlation
    ranked = sorted((r for r in table if r[by] is not None), key=lambda r: r[by])
    best = ranked[0]
    corr = spearman([r["early"] for r in table], [r["score"] for r in table]) if o.early and not o.halving else None
    plan, ckpt = px.prep.plan, px.prep.ckpt
    eff = {}
    if o.scheme == "relative":
        for n in relative_tensors(plan):
            p = plan.tensors[n]
            eff[n] = effective_sigma(widen(ckpt.tensors[n], p), p, best["sigma"], 0)
    result = {
        "sigma": best["sigma"], "lr": best["lr"], "base_lr": px.gamma, "noise_scheme": o.scheme,
        "k": plan.k, "spec": plan.spec.name, "steps": o.steps, "seeds": o.seeds, "scored_by": by,
        "proxy": {"checkpoint": ckpt.path.name, "sha256": sha256_file(ckpt.path), "model_args": ckpt.model_args or {}},
        "confidence": _confidence(ranked, by, o.seeds), "rank_correlation_early_full": corr,
        "total_train_steps": total_steps, "full_grid_steps": len(grid) * o.steps * o.seeds, "rungs": rungs,
        "grid": table,
    }
    if eff:
        result["effective_sigma"] = eff
    if o.output:
        try:
            o.output.write_text(yaml.safe_dump(result, sort_keys=False))
        except OSError as e:
            raise MupscaleError(f"-o {o.output}: cannot write: {e.strerror or e}") from None
    return result


def check_output_file(path: Path, what: str) -> None:
    """A file path that can be written: not a directory, in an existing writable directory."""
    if path.is_dir():
        raise MupscaleError(f"{what} {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise MupscaleError(f"{what} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MupscaleError(f"{what} {path}: not writable")


def _mean(xs):
    return None if not xs else sum(xs) / len(xs)


def _se(xs):
    if not xs or len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _confidence(ranked: list[dict], by: str, seeds: int) -> str:
    if len(ranked) < 2:
        return "only one setting was scored"
    a, b = ranked[0], ranked[1]
    gap = b[by] - a[by]
    if seeds < 2 or by != "score" or a["score_se"] is None:
        return f"best beats the runner-up (sigma={b['sigma']:g}, lr={b['lr']:g}) by {gap:.4g}; use --seeds >= 2 " \
               f"for a confidence estimate"
    z = gap / math.sqrt(a["score_se"] ** 2 + b["score_se"] ** 2 + 1e-30)
    verdict = "clear" if z > 2 else "within seed noise"
    return f"{verdict}: best beats the runner-up (sigma={b['sigma']:g}, lr={b['lr']:g}) by {gap:.4g} " \
           f"= {z:.1f} standard errors over {seeds} seeds"
