"""Static checks of a widened checkpoint against the exact widening of its base, for `mupscale verify`:
weights and buffers, optimizer state, per-tensor hyper-parameters (paper Table 1), `step` counters.
Each finding is an Issue whose message says the likely cause."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

from mupscale_cli.verify.lockstep import norm_rel
from mupscale_cli.core.optstate import SCALED, STATE_POWER, factors
from mupscale_cli.core.plan import Plan, TensorPlan
from mupscale_cli.core.widen import widen

MATH_KEYS = ("lr", "eps", "weight_decay", "betas", "momentum", "dampening", "nesterov", "amsgrad", "maximize",
             "decoupled_weight_decay")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Issue:
    kind: str  # structure | source | weights | buffer | noise | hyper | state | step | shared-step
    message: str
    tensor: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _close(a: float, b: float, rtol: float = 1e-9) -> bool:
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def scale_ratio(expected: torch.Tensor, actual: torch.Tensor) -> float | None:
    """c when actual ≈ c * expected (normwise 1e-6), else None."""
    e, a = expected.detach().double().flatten(), actual.detach().double().flatten()
    ee = float(e @ e)
    if ee == 0 or e.shape != a.shape:
        return None
    c = float(e @ a) / ee
    return c if float((a - c * e).norm()) <= 1e-6 * float(a.norm() + e.norm() * abs(c)) else None


def _fraction_text(c: float) -> str:
    f = Fraction(c).limit_denominator(64)
    return str(f) if abs(float(f) - c) <= 1e-9 * abs(c) else f"{c:.6g}"


def _ratio_hint(c: float, p: TensorPlan) -> str:
    """Why a tensor would be c times its exact widening."""
    ks = {d.k for d in p.dims if d.axis}
    k_in = p.dims[p.fan_in].k if p.fan_in is not None and p.dims and p.dims[p.fan_in].axis else None
    if c == 0:
        return "it is all zeros"
    if p.readout_like and any(_close(c, 1 / k) or _close(c, k) for k in ks if k > 1):
        return (f"it is the exact widening × {_fraction_text(c)}: a readout convention mismatch (spec readout "
                f"'mup' duplicates a readout that divides by width, 'sum' divides it by k)")
    if p.role == "matrix" and k_in and k_in > 1 and _close(c, k_in):
        return f"it is the exact widening × {k_in}: the matrix-like rule's 1/k_in was not applied"
    if p.role == "vector" and any(_close(c, 1 / k) for k in ks if k > 1):
        return (f"it is the exact widening × {_fraction_text(c)}: a vector-like tensor was divided by k "
                f"(treated as matrix-like or as a summing readout)")
    return f"it is the exact widening × {_fraction_text(c)}"


def compare_tensor(name: str, p: TensorPlan, expected: torch.Tensor, actual: torch.Tensor,
                   tol: float, what: str = "the exact widening of BASE") -> Issue | None:
    """None when actual equals expected (bitwise, or normwise within tol for floats)."""
    if actual.dtype != expected.dtype:
        return Issue("weights", f"{name!r} has dtype {actual.dtype}, BASE's is {expected.dtype}", name)
    if torch.equal(actual, expected):
        return None
    leaf = name.rpartition(".")[2]
    kind = "buffer" if p.buffer else "weights"
    if not expected.is_floating_point():
        return Issue(kind, f"{name!r} = {actual.flatten()[:4].tolist()} differs from {what} "
                           f"({expected.flatten()[:4].tolist()})" + (
                               ": BatchNorm counter not carried over" if leaf == "num_batches_tracked" else ""),
                     name)
    rel = norm_rel(expected, actual)
    if rel <= tol:
        return None
    if leaf in BN_BUFFERS:
        if bool((actual == 0).all()):
            why = "zeroed"
        elif leaf == "running_var" and bool((actual == 1).all()) or leaf == "running_mean" and bool(
                (actual == 0).all()):
            why = "reset to its initial value"
        else:
            why = f"differs (relative {rel:.3g})"
        return Issue("buffer", f"BatchNorm buffer {name!r} {why}: BatchNorm statistics were not carried over "
                               f"from BASE (running_mean/running_var are duplicated, unscaled)", name)
    c = scale_ratio(expected, actual)
    hint = _ratio_hint(c, p) if c is not None else f"relative difference {rel:.3g}"
    return Issue(kind, f"{name!r} differs from {what}: {hint}", name)


def _hp(v):
    if isinstance(v, torch.Tensor):
        return float(v)
    if isinstance(v, (list, tuple)):
        return tuple(_hp(x) for x in v)
    return v


def groups_by_name(sd: dict, names: list[list[str]]) -> dict[str, dict]:
    """canonical tensor name -> its group's math hyper-parameters."""
    out = {}
    for g, ns in zip(sd["param_groups"], names):
        hp = {k: _hp(g[k]) for k in MATH_KEYS if k in g}
        for n in ns:
            out[n] = hp
    return out


def state_by_name(sd: dict, names: list[list[str]]) -> dict[str, dict]:
    out = {}
    for g, ns in zip(sd["param_groups"], names):
        for pid, n in zip(g["params"], ns):
            out[n] = sd["state"].get(pid, {})
    return out


def hyper_issues(kind: str, wide_kind: str, base_hp: dict[str, dict], wide_hp: dict[str, dict],
                 plan: Plan) -> list[Issue]:
    """WIDE's per-tensor hyper-parameters against BASE's × the Table 1 factors."""
    if kind != wide_kind:
        return [Issue("hyper", f"WIDE's optimizer is {wide_kind}, BASE's is {kind}")]
    missing = [n for n in base_hp if n not in wide_hp]
    issues = []
    if missing:
        issues.append(Issue("hyper", f"WIDE's optimizer has no entry for {len(missing)} tensor(s), e.g. "
                                     f"{missing[0]!r}: it does not train them", missing[0]))
    found: dict[tuple[str, str], list[str]] = {}
    for n, bh in base_hp.items():
        wh = wide_hp.get(n)
        if wh is None:
            continue
        p = plan.state_plan(n)  # a tensor of the file, or a parameter it splits (state_only)
        f = factors(kind, p.s, p.g)
        for key in MATH_KEYS:
            b, w = bh.get(key), wh.get(key)
            if key in SCALED and isinstance(b, (int, float)) and isinstance(w, (int, float)):
                fk = f.get(key, Fraction(1))
                exp = b * fk.numerator / fk.denominator
                if _close(w, exp):
                    continue
                if _close(w, b) and fk != 1:
                    msg = f"{key} not rescaled"
                    ex = f"{n!r}: {w:.6g}, expected {exp:.6g} = BASE × {fk}"
                else:
                    msg = f"{key} wrong"
                    ex = f"{n!r}: {w:.6g} = BASE × {_fraction_text(w / b) if b else w}, expected BASE × {fk}"
                found.setdefault((msg, key), []).append(ex)
            elif b != w:
                found.setdefault((f"{key} changed", key), []).append(f"{n!r}: {w!r}, BASE {b!r}")
    extra = {"lr": "the learning rate must follow lr × s/g (SGD) or lr × s (Adam, AdamW), paper Table 1",
             "eps": "Adam's eps must be scaled by the gradient scale g (mup 1.0.0's MuAdam does not)",
             "weight_decay": "weight decay must be scaled by g/s (SGD, Adam) or 1/s (AdamW)"}
    for (msg, key), exs in found.items():
        more = f" and {len(exs) - 1} more" if len(exs) > 1 else ""
        why = f"; {extra[key]}" if key in extra else ""
        issues.append(Issue("hyper", f"{msg} for {len(exs)} tensor(s) ({exs[0]}{more}){why}",
                            exs[0].split("'")[1]))
    return issues


def _step(v) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v)
    return float(v) if isinstance(v, (int, float)) else None


def state_issues(base_state: dict[str, dict], wide_state: dict[str, dict], plan: Plan, tol: float) -> list[Issue]:
    """WIDE's optimizer state against the widened BASE state; `step` against BASE's."""
    issues, steps = [], []
    for n, bst in base_state.items():
        wst = wide_state.get(n)
        if wst is None:
            continue
        p = plan.state_plan(n)
        for key, v in bst.items():
            w = wst.get(key)
            if key == "step":
                b, ws = _step(v), _step(w)
                if b is not None and ws != b:
                    steps.append((n, b, ws))
                continue
            if key not in STATE_POWER or not isinstance(v, torch.Tensor):
                continue
            if not isinstance(w, torch.Tensor):
                issues.append(Issue("state", f"WIDE's optimizer has no {key!r} for {n!r}", n))
                continue
            exp = widen(v, p, STATE_POWER[key])
            if w.shape != exp.shape:
                issues.append(Issue("state", f"{key!r} of {n!r} has shape {list(w.shape)}, expected "
                                             f"{list(exp.shape)}", n))
                continue
            if torch.equal(w.to(exp.dtype), exp) or norm_rel(exp, w) <= tol:
                continue
            c = scale_ratio(exp, w)
            scale = {1: "g", 2: "g²"}[STATE_POWER[key]]
            hint = (f"it is the widened BASE state × {_fraction_text(c)} (it must be scaled by {scale} like the "
                    f"gradient)") if c is not None else f"relative difference {norm_rel(exp, w):.3g}"
            issues.append(Issue("state", f"optimizer state {key!r} of {n!r} differs: {hint}", n))
    if steps:
        n, b, w = steps[0]
        reset = all(w == 0 for _, _, w in steps)
        what = "reset to 0" if reset else "differs"
        issues.append(Issue("step", f"optimizer 'step' {what} in WIDE for {len(steps)} tensor(s) (e.g. {n!r}: "
                                    f"{w:g}, BASE {b:g}): Adam's bias correction then differs from BASE's; "
                                    f"copy each tensor's step", n))
    return issues


def shared_steps(base_opt: torch.optim.Optimizer, wide_opt: torch.optim.Optimizer,
                 names: dict[int, str]) -> list[Issue]:
    """`step` tensors shared between the two optimizers, or between parameters of one optimizer."""
    seen: dict[int, list[tuple[str, str]]] = {}
    for who, opt in (("BASE", base_opt), ("WIDE", wide_opt)):
        for p, st in opt.state.items():
            s = st.get("step") if isinstance(st, dict) else None
            if isinstance(s, torch.Tensor):
                seen.setdefault(s.untyped_storage().data_ptr(), []).append((who, names.get(id(p), "?")))
    issues = []
    for users in seen.values():
        if len(users) < 2:
            continue
        whos = {w for w, _ in users}
        if whos == {"BASE", "WIDE"}:
            msg = (f"BASE's and WIDE's optimizers share a 'step' tensor ({users[0][1]!r}): both increment "
                   f"one counter (the paper's reference transfer_optimizer copies it by reference); clone it")
        else:
            msg = (f"{users[0][0]}'s optimizer shares one 'step' tensor between {len(users)} parameters "
                   f"({users[0][1]!r}, {users[1][1]!r}, ...): it advances {len(users)} times per step; clone it")
        issues.append(Issue("shared-step", msg, users[0][1]))
    return issues


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
