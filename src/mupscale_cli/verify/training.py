"""The training script's rules that verify applies to both models at every step: each group's lr (--lr-rule,
nanoGPT's schedule), gradient clipping (--grad-clip), and the user's own optimizer builder (--optimizer
module:fn) that the widened state must load into."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mupscale_cli.core.clip import grad_scales
from mupscale_cli.errors import MupscaleError
from mupscale_cli.optim import clip_grad_norm_equivalent
from mupscale_cli.verify.diagnose import Issue, groups_by_name
from mupscale_cli.verify.options import Run
from mupscale_cli.verify.setup import _clone_tree


def _train_config(ckpt) -> dict:
    cfg = ckpt.extra.get("config")
    return dict(cfg) if isinstance(cfg, dict) else {}


def schedule(r: Run) -> Callable[[int], float]:
    """The script's base learning rate at lockstep step t (1-based): --lr (constant), else BASE's nanoGPT
    `config` (learning_rate; warmup_iters, lr_decay_iters, min_lr when decay_lr, from iter_num on)."""
    if r.o.lr is not None:
        return lambda t: r.o.lr
    cfg = _train_config(r.prep.ckpt)
    lr = cfg.get("learning_rate")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise MupscaleError(f"--lr-rule {r.o.lr_rule} sets every group's lr from the training script's learning "
                            f"rate, and {r.o.base.name} has no config.learning_rate: pass --lr X")
    it0 = r.prep.ckpt.extra.get("iter_num", 0)
    it0 = it0 if isinstance(it0, int) and not isinstance(it0, bool) else 0
    if not cfg.get("decay_lr"):
        return lambda t: float(lr)
    try:
        warm, decay, low = int(cfg["warmup_iters"]), int(cfg["lr_decay_iters"]), float(cfg["min_lr"])
    except (KeyError, TypeError, ValueError):
        raise MupscaleError(f"{r.o.base.name}: config.decay_lr is set but warmup_iters, lr_decay_iters or min_lr "
                            f"is missing: pass --lr X for a constant rate") from None

    def get_lr(t: int) -> float:  # nanoGPT's cosine schedule with warmup, at iteration iter_num + t - 1
        it = it0 + t - 1
        if it < warm:
            return lr * it / warm
        if it > decay:
            return low
        ratio = (it - warm) / (decay - warm)
        return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - low)
    return get_lr


def training_rule(r: Run, clip: dict) -> Callable | None:
    """before_step for run_lockstep: set each group's lr by --lr-rule, clip by --grad-clip."""
    o = r.o
    if o.lr_rule == "stored" and not o.grad_clip:
        return None
    lr_of = schedule(r) if o.lr_rule != "stored" else None
    scale = r.lr_scale  # widen --hparams: both runs use the script's lr × γ̄↑/γ̄
    scales = grad_scales(r.prep.plan) if o.grad_clip and o.clip_mode == "equivalent" else None

    def rule(t: int, i: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        if lr_of is not None:
            lr = lr_of(t) * scale
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0) if o.lr_rule == "lr_scale" else lr
        if o.grad_clip:
            if i == 0 or scales is None:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip))
            else:
                norm = float(clip_grad_norm_equivalent(model, o.grad_clip, scales))
            if i == 0:
                clip["max_base_norm"] = max(clip["max_base_norm"] or 0.0, norm)
                if norm > o.grad_clip:
                    clip["active_steps"] += 1
                    clip["first_active"] = clip["first_active"] or t
    return rule


def rule_issues(rule: str, kind: str, base_osd: dict, base_names: list[list[str]], wide_osd: dict,
                wide_names: list[list[str]], plan) -> list[Issue]:
    """What a per-step lr rule does to Table 1's per-tensor lr: `uniform` erases it; `lr_scale` needs each
    group's lr_scale rescaled like its lr."""
    if rule == "stored":
        return []
    bh, wh = groups_by_name(base_osd, base_names), groups_by_name(wide_osd, wide_names)
    bad = []
    for n, b in bh.items():
        wg = wh.get(n)
        if wg is None:
            continue
        f = lr_factor(kind, plan.state_plan(n))
        got = 1.0 if rule == "uniform" else (float(wg.get("lr_scale", 1.0)) / float(b.get("lr_scale", 1.0)))
        if abs(got - f) > 1e-12 * abs(f):
            bad.append((n, got, f))
    if not bad:
        return []
    n, got, f = bad[0]
    if rule == "uniform":
        return [Issue("hyper", f"--lr-rule uniform gives every group the same lr, but Table 1 needs per-tensor "
                               f"lr for {len(bad)} tensor(s) (e.g. {n!r}: lr × {f:g}): a script that sets one lr "
                               f"for all groups (stock nanoGPT's train.py) cannot train this widening exactly", n)]
    return [Issue("hyper", f"lr_scale not rescaled for {len(bad)} tensor(s) (e.g. {n!r}: WIDE's lr_scale is BASE's "
                           f"× {got:g}, Table 1 needs × {f:g}): the script's lr × lr_scale leaves the trajectory", n)]


def lr_factor(kind: str, p) -> float:
    """Table 1's lr factor of one tensor (SGD s/g, Adam/AdamW s)."""
    return float(p.s / p.g) if kind == "sgd" else float(p.s)


def resolve_builder(ref: str) -> Callable:
    """--optimizer module:fn or FILE.py:fn: the user's optimizer builder."""
    from mupscale_cli.verify.modelspec import import_ref
    fn = import_ref(ref, "--optimizer")
    if not callable(fn):
        raise MupscaleError(f"--optimizer {ref!r}: not a function")
    return fn


def build_user_optimizer(fn: Callable, ref: str, model: nn.Module, config: dict) -> torch.optim.Optimizer:
    """fn(model) or fn(model, config) (config: BASE's training `config`, e.g. nanoGPT's, or {})."""
    import inspect
    try:
        n = len([p for p in inspect.signature(fn).parameters.values()
                 if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        n = 1
    try:
        opt = fn(model, config) if n >= 2 else fn(model)
    except MupscaleError:
        raise
    except Exception as e:  # noqa: BLE001 - user code
        raise MupscaleError(f"--optimizer {ref!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise MupscaleError(f"--optimizer {ref!r} returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _opt_kind(opt: torch.optim.Optimizer) -> str | None:
    if isinstance(opt, torch.optim.SGD):
        return "sgd"
    if isinstance(opt, torch.optim.AdamW):
        return "adamw"
    if isinstance(opt, torch.optim.Adam):
        return "adamw" if opt.param_groups and opt.param_groups[0].get("decoupled_weight_decay") else "adam"
    return None


def load_user_state(opt: torch.optim.Optimizer, model: nn.Module, sd: dict, names: list[list[str]], kind: str,
                    ref: str, who: str) -> list[str]:
    """Load `sd` into the user's optimizer as a training script would; raise MupscaleError (naming why) when
    it does not load, pairs a tensor with another's state (groups in another order), or is another type.
    Returns notes: hyper-parameters the builder set that load_state_dict replaced."""
    pname = {id(p): n for n, p in model.named_parameters()}
    got = [[pname.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]
    built = {n: {k: v for k, v in g.items() if k not in ("params", "param_names")}
             for g, ns in zip(opt.param_groups, got) for n in ns}
    ok = _opt_kind(opt)
    if ok is not None and ok != kind:
        raise MupscaleError(f"{who}'s optimizer state is {kind}, the optimizer {ref} builds is {ok}")
    try:
        opt.load_state_dict(_clone_tree(sd))
    except (ValueError, RuntimeError, KeyError) as e:
        sizes = [len(g["params"]) for g in sd["param_groups"]]
        raise MupscaleError(f"{who}'s optimizer state does not load into the optimizer {ref} builds: "
                            f"{' '.join(str(e).split())} (state: {len(sizes)} groups of {sizes} tensors; the "
                            f"builder: {len(got)} groups of {[len(g) for g in got]})") from None
    for i, (want, have) in enumerate(zip(names, got)):
        if want != have:
            j = next(x for x in range(len(want)) if want[x] != have[x])
            raise MupscaleError(f"{who}'s optimizer state pairs group {i} entry {j}, {want[j]!r}, with the "
                                f"builder's {have[j]!r}: load_state_dict matches by position, so {have[j]!r} would "
                                f"train with {want[j]!r}'s state and hyper-parameters")
    saved = {n: g for g, ns in zip(sd["param_groups"], names) for n in ns}
    changed = {}
    for n, hp in built.items():
        for k2, v in hp.items():
            sv = saved.get(n, {}).get(k2)
            if isinstance(v, (int, float)) and isinstance(sv, (int, float)) and not math.isclose(v, sv, rel_tol=1e-12):
                changed.setdefault(k2, []).append(n)
    return [f"the optimizer {ref} builds for {who} gives {k2} another value than the loaded state for "
            f"{len(ns)} tensor(s), e.g. {ns[0]!r}: load_state_dict keeps the state's" for k2, ns in changed.items()]
