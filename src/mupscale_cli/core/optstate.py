"""Optimizer state and hyper-parameters: map ids to names, widen state, rescale and split groups."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from mupscale_cli.core.optcheck import check_optimizer
from mupscale_cli.core.source import LazyTensors, tensor_meta
from mupscale_cli.core.plan import Plan
from mupscale_cli.core.spec import saved_name
from mupscale_cli.core.widen import widen
from mupscale_cli.errors import MupscaleError

KINDS = ("sgd", "adam", "adamw")
LAYOUTS = ("named", "single", "nanogpt", "mup", "mup-corrected")
STATE_POWER = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
SCALED = ("lr", "initial_lr", "eps", "weight_decay")
TORCH_KEYS = {"params", "param_names", "lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
              "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay", "momentum", "dampening",
              "nesterov"}
BUILDERS = ("mupscale_cli.optim (MuSGD, MuAdam, MuAdamW) or torch's optimizer over "
            "mupscale_cli.api.optimizer_groups(model, state)")


@dataclass
class OptimizerMap:
    kind: str  # sgd | adam | adamw
    layout: str  # how ids were matched to names
    names: list[list[str]]  # canonical tensor names, per group, in id order


def detect_kind(sd: dict, given: str | None) -> str:
    groups = sd["param_groups"]
    keys = set().union(*(g.keys() for g in groups)) if groups else set()
    if "betas" in keys:
        found = None
        flags = {g.get("decoupled_weight_decay") for g in groups}
        if flags == {True}:
            found = "adamw"
        elif flags == {False}:
            found = "adam"
        elif all(float(g.get("weight_decay", 0)) == 0 for g in groups):
            found = "adam"  # without weight decay, Adam and AdamW follow the same rules
        if given and given not in ("adam", "adamw"):
            raise MupscaleError(f"--optimizer {given} does not fit the checkpoint's optimizer state "
                                f"(its groups have Adam's 'betas')")
        if found and given and given != found:
            raise MupscaleError(f"--optimizer {given} contradicts the checkpoint (decoupled_weight_decay="
                                f"{found == 'adamw'})")
        if not (found or given):
            raise MupscaleError("cannot tell Adam from AdamW (no 'decoupled_weight_decay' in the param "
                                "groups, weight decay > 0): pass --optimizer adam or --optimizer adamw")
        return found or given  # type: ignore[return-value]
    if {"momentum", "dampening", "nesterov"} <= keys:
        if given and given != "sgd":
            raise MupscaleError(f"--optimizer {given} does not fit the checkpoint's optimizer state "
                                f"(its groups have SGD's 'momentum')")
        return "sgd"
    raise MupscaleError(f"unsupported optimizer (param group keys: {', '.join(sorted(keys - {'params'}))}); "
                        f"mupscale widens SGD, Adam and AdamW state")


def factors(kind: str, s: Fraction, g: Fraction) -> dict[str, Fraction]:
    """Per-tensor hyper-parameter factors so the widened model follows the base trajectory."""
    if kind == "sgd":
        return {"lr": s / g, "initial_lr": s / g, "weight_decay": g / s}
    wd = g / s if kind == "adam" else 1 / s
    return {"lr": s, "initial_lr": s, "eps": g, "weight_decay": wd}


def _layout_names(layout: str, sd: dict, plan: Plan, strip) -> list[list[str]] | str:
    """Candidate names per group for one layout, or a reason why it does not apply."""
    groups = sd["param_groups"]
    params = plan.params
    role = {n: plan.tensors[n].role for n in params}
    if layout == "named":
        if not all("param_names" in g for g in groups):
            return "the groups carry no param_names"
        out = []
        for g in groups:
            names = []
            for pid, raw in zip(g["params"], g["param_names"]):
                n = strip(raw)
                n = saved_name(plan.spec, n)  # the file's name of a parameter saved under another name
                if n not in plan.tensors and plan.state_plan(n, _state_meta(sd["state"].get(pid))) is None:
                    return f"param_names has {raw!r}, which is not a tensor of the checkpoint"
                names.append(plan.state_plan(n).alias_of or n)
            out.append(names)
        return out
    if layout in plan.spec.layouts:  # the spec's stack builds its groups this way
        out = [[] for _ in plan.spec.layouts[layout]]
        for n in params:
            dim = len(plan.tensors[n].shape)
            for i, f in enumerate(plan.spec.layouts[layout]):
                if (not f["regex"] or any(r.fullmatch(n) for r in f["regex"])) and dim >= f.get(
                        "min_dim", 0) and dim <= f.get("max_dim", 99):
                    out[i].append(n)
                    break
            else:
                return f"tensor {n!r} fits no group of layout {layout!r}"
        return out
    if layout == "single":
        return [params]
    if layout == "nanogpt":
        return [[n for n in params if len(plan.tensors[n].shape) >= 2],
                [n for n in params if len(plan.tensors[n].shape) < 2]]
    if layout == "mup":  # mup 1.0.0 MuAdam/MuAdamW: matrix, then vector + scalar; MuSGD: matrix, vector, scalar
        kinds = [["matrix"], ["vector", "scalar"]] if "betas" in groups[0] else [["matrix"], ["vector"], ["scalar"]]
    else:  # the paper's corrected MuAdam/MuAdamW (App. C.4): matrix, vector, scalar
        kinds = [["matrix"], ["vector"], ["scalar"]]
    out = [[n for n in params if role[n] in ks] for ks in kinds]
    if len(out) != len(groups):  # mup drops nothing but torch keeps empty groups only if given
        out = [o for o in out if o]
    return out


def _state_meta(st) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of a parameter as its optimizer state shows them (its first non-scalar entry)."""
    if not isinstance(st, (dict, LazyTensors)):
        return None
    for key in st:
        if key == "step":
            continue
        if isinstance(st, LazyTensors):
            shape, dtype = tensor_meta(st, key)
        elif isinstance(st[key], torch.Tensor):
            shape, dtype = tuple(st[key].shape), st[key].dtype
        else:
            continue
        if len(shape) > 0:
            return tuple(shape), dtype
    return None


def _check(cand: list[list[str]], sd: dict, plan: Plan) -> str | None:
    groups = sd["param_groups"]
    if len(cand) != len(groups):
        return f"{len(cand)} groups expected, the checkpoint has {len(groups)}"
    for i, (names, g) in enumerate(zip(cand, groups)):
        if len(names) != len(g["params"]):
            return f"group {i} has {len(g['params'])} tensors, the layout gives {len(names)}"
        for pid, n in zip(g["params"], names):
            st = sd["state"].get(pid, {})
            for key in st:
                shape = state_shape(st, key)
                if shape is not None and len(shape) > 0 and shape != plan.state_plan(n).shape:
                    return f"state {key!r} of id {pid} has shape {list(shape)}, tensor {n!r} has " \
                           f"{list(plan.state_plan(n).shape)}"
    return None


def state_shape(st, key: str) -> tuple[int, ...] | None:
    """Shape of a state entry (None if it is not a tensor), without reading a lazy one."""
    if isinstance(st, LazyTensors):
        return tensor_meta(st, key)[0]
    v = st[key]
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _id(x):
    """An optimizer id in the int form torch uses: 3 and '3' (a JSON round trip) are the same id; a
    name (torch.distributed's FQN-keyed state) stays as it is."""
    if isinstance(x, str) and x.isascii() and x.isdigit():
        return int(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        return int(x)
    return x


def canonical_ids(sd):
    """The optimizer state dict with every id in one form: state keys and group params as ints where
    they are int-like ('0', '1', ... after a JSON round trip); groups whose params are names (state keyed
    by parameter name) also get them as param_names. Anything not shaped like a torch optimizer state
    dict is returned as it is (map_optimizer refuses it)."""
    if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in sd["param_groups"])):
        return sd
    groups = []
    for g in sd["param_groups"]:
        ids = [_id(p) for p in g["params"]]
        named = ids and all(isinstance(p, str) for p in ids) and "param_names" not in g
        groups.append({**g, "params": ids, **({"param_names": list(ids)} if named else {})})
    state: dict = {}
    for k, v in sd["state"].items():
        i = _id(k)
        if i in state:
            raise MupscaleError(f"optimizer state has two entries for id {i!r} (keys of different types); "
                                f"re-save the optimizer with opt.state_dict()")
        state[i] = v
    return {**sd, "state": state, "param_groups": groups}


def check_state_ids(sd: dict) -> None:
    """Every state entry belongs to a parameter of some group: one that does not would be dropped."""
    listed = {p for g in sd["param_groups"] for p in g["params"]}
    extra = [k for k in sd["state"] if k not in listed]
    if extra:
        raise MupscaleError(f"optimizer state entry {extra[0]!r} belongs to no parameter of param_groups "
                            f"({len(extra)} such entr{'y' if len(extra) == 1 else 'ies'}); the state and its "
                            f"groups come from different optimizers: re-save it with opt.state_dict()")


def map_optimizer(sd: dict, plan: Plan, kind: str | None = None, layout: str | None = None,
                  strip=lambda n: n) -> OptimizerMap:
    """Match optimizer ids to tensor names, validated with shapes; never guess between two fits."""
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) or not isinstance(
            sd.get("state"), dict):
        raise MupscaleError("the optimizer entry is not a torch optimizer state_dict "
                            "(needs 'state' and 'param_groups')")
    check_optimizer(sd)  # types, ranges and ids of the hyper-parameters and state (non-finite: prepare's notes)
    check_state_ids(sd)
    kind = detect_kind(sd, kind)
    layouts = (*plan.spec.layouts, *LAYOUTS)
    if layout and layout not in layouts:
        raise MupscaleError(f"--opt-layout {layout!r}: choose one of {', '.join(layouts)}")
    fits, why = {}, {}
    for lay in [layout] if layout else layouts:
        cand = _layout_names(lay, sd, plan, strip)
        reason = cand if isinstance(cand, str) else _check(cand, sd, plan)
        if reason:
            why[lay] = reason
        else:
            fits[lay] = cand
    if not fits:
        detail = "; ".join(f"{k}: {v}" for k, v in why.items())
        from mupscale_cli.core.plan import suspect_dims, suspect_text
        suspect = suspect_dims(plan, None, misfits=True)
        if suspect:  # a wrong role moves a tensor to another group: the spec first
            raise MupscaleError(f"cannot match optimizer ids to tensor names, and the spec looks wrong: "
                                f"{suspect_text(plan, suspect)}: fix the spec's axes first ({detail})")
        if all("param_names" in g for g in sd["param_groups"]):  # names stored: advise on what they name
            unknown = "which is not a tensor of the checkpoint" in why.get("named", "")
            raise MupscaleError(f"cannot match optimizer ids to tensor names ({detail}); the optimizer stores its "
                                f"parameters' names (param_names)" + (
                                    f", and some name no tensor of the file: a parameter the model holds fused "
                                    f"and the file stores split needs a rule of spec {plan.spec.name} with "
                                    f"'state_only: true' and 'parts', one the file stores under another name "
                                    f"'saved_as' (docs/spec-format.md)" if unknown else
                                    ": the optimizer state does not describe this checkpoint's tensors (saved from "
                                    "another model or run?)"))
        raise MupscaleError(f"cannot match optimizer ids to tensor names ({detail}): describe how your training "
                            f"script built its param groups in spec {plan.spec.name}'s optimizer.layouts (groups "
                            f"in order, each a filter by name patterns or number of dimensions; an empty filter "
                            f"{{}} takes every tensor left; docs/spec-format.md), or pass --opt-layout; a script "
                            f"that builds its optimizer from model.named_parameters() stores param_names and "
                            f"needs neither")
    if "named" in fits:
        return OptimizerMap(kind, "named", fits["named"])
    own = [lay for lay in plan.spec.layouts if lay in fits]
    if len(own) == 1:  # the layout of the stack the spec describes
        return OptimizerMap(kind, own[0], fits[own[0]])
    distinct = {str(v): k for k, v in fits.items()}
    if len(distinct) > 1:
        raise MupscaleError(f"optimizer ids fit several layouts ({', '.join(fits)}) that map them differently; "
                            f"pass --opt-layout with the one your training script used")
    lay = next(iter(fits))
    return OptimizerMap(kind, lay, fits[lay])


def check_state_key(key: str, name: str) -> None:
    if key != "step" and key not in STATE_POWER:
        raise MupscaleError(f"unknown optimizer state {key!r} for tensor {name!r}; mupscale widens SGD, Adam "
                            f"and AdamW state (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, step)")


@dataclass
class StateEntry:
    """One widened optimizer state entry, not yet computed: state[pid][key] of tensor `name`."""
    pid: int  # id in the widened state dict
    name: str  # canonical tensor name
    key: str  # momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, step
    source: Mapping  # the input's state dict of this tensor (maybe lazy): source[key] is the value


@dataclass
class OptimizerLayout:
    groups: list[dict]  # widened param groups (ids in "params", names in "param_names")
    entries: list[StateEntry]  # state entries in id order, then key order
    state_ids: list[int]  # ids that have a state dict (possibly empty)


def optimizer_layout(sd: dict, plan: Plan, omap: OptimizerMap, names_out=None) -> OptimizerLayout:
    """The widened optimizer's param groups (hyper-parameters rescaled, groups split where their tensors
    need different factors, ids renumbered in group order, `param_names` always present) and its state
    entries in id order, to be computed one at a time (`widen_entry`)."""
    groups, entries, ids, nid = [], [], [], 0
    for g, names in zip(sd["param_groups"], omap.names):
        parts: dict[tuple, list[tuple[int, str]]] = {}
        for pid, n in zip(g["params"], names):
            p = plan.state_plan(n)
            f = factors(omap.kind, p.s, p.g)
            f.update({gk: f[hp] for gk, hp in plan.spec.group_keys.items() if hp in f})
            key = tuple((h, f[h]) for h in (*SCALED, *plan.spec.group_keys)
                        if h in f and h in g and _nonzero(g[h]) and f[h] != 1)
            parts.setdefault(key, []).append((pid, n))
        if not parts:  # an empty group stays (torch's load_state_dict wants the same group count)
            parts[()] = []
        for key, members in parts.items():
            ng = {h: v for h, v in g.items() if h not in ("params", "param_names")}
            for h, f in key:
                ng[h] = _mul(g[h], f)
            ng["params"] = []
            pnames = []
            for pid, n in members:
                if pid in sd["state"]:
                    st = sd["state"][pid]
                    ids.append(nid)
                    for k in st:
                        check_state_key(k, n)
                        entries.append(StateEntry(nid, n, k, st))
                ng["params"].append(nid)
                pnames.append(n)
                nid += 1
            ng["param_names"] = [names_out(n) if names_out else n for n in pnames]
            groups.append(ng)
    return OptimizerLayout(groups, entries, ids)


def widen_entry(e: StateEntry, plan: Plan):
    """The widened value of one state entry: like the gradient (g or g²), `step` cloned."""
    v = e.source[e.key]
    if e.key == "step":
        return v.clone() if isinstance(v, torch.Tensor) else v
    return None if v is None else widen(v, plan.state_plan(e.name), STATE_POWER[e.key])


def widen_optimizer(sd: dict, plan: Plan, omap: OptimizerMap, names_out=None) -> dict:
    """Widened optimizer state_dict: state like the gradient, `step` cloned, groups split where their
    tensors need different hyper-parameter factors, ids renumbered in group order.
    Groups always carry `param_names` (`names_out(name)`, default the canonical name), so the state is
    self-describing even when the input's was not (torch's load_state_dict accepts them).
    Everything in memory; `optimizer_layout` + `widen_entry` compute it entry by entry."""
    lay = optimizer_layout(sd, plan, omap, names_out)
    state: dict[int, dict] = {pid: {} for pid in lay.state_ids}
    for e in lay.entries:
        state[e.pid][e.key] = widen_entry(e, plan)
    return {"state": state, "param_groups": lay.groups}


def optimizer_notes(sd: dict, plan: Plan, omap: OptimizerMap) -> list[str]:
    """What the user must know before loading the widened state: group keys copied without a rule, and
    groups that Table 1 forces to split (an optimizer built like the input's will not load them)."""
    notes = []
    known = TORCH_KEYS | set(plan.spec.group_keys)
    unknown = sorted({k for g in sd["param_groups"] for k in g if k not in known})
    for k in unknown:
        notes.append(f"param-group key {k!r} is not a torch hyper-parameter and spec {plan.spec.name} does not "
                     f"say how it scales (optimizer group_keys): copied unchanged")
    parts = group_parts(sd, plan, omap)
    if len(parts) != len(sd["param_groups"]):
        split = sorted({b for b, _, _ in parts if sum(1 for x, _, _ in parts if x == b) > 1})
        what = "; ".join(f"group {b} into " + ", ".join(
            f"{_factor_text(key)} ({_names_text([plan.state_plan(n) for n in names])})"
            for x, key, names in parts if x == b) for b in split)
        why = (" (mup 1.0.0's MuAdam/MuAdamW put vector- and scalar-like tensors in one group and never scale "
               "eps)" if omap.layout == "mup" else "")
        notes.append(f"the optimizer's {len(sd['param_groups'])} param groups become {len(parts)}, since Table 1 "
                     f"gives tensors of one group different factors{why}: {what}. An optimizer built like the "
                     f"training script's will not load this state: build its groups from the state with "
                     f"mupscale_cli.api.optimizer_groups (docs/optimizer.md)")
    return notes


def group_parts(sd: dict, plan: Plan, omap: OptimizerMap) -> list[tuple[int, tuple, list[str]]]:
    """The widened groups as (base group index, the factors ≠ 1 its hyper-parameters get, canonical names),
    in the order `optimizer_layout` writes them."""
    out = []
    for b, (g, names) in enumerate(zip(sd["param_groups"], omap.names)):
        parts: dict[tuple, list[str]] = {}
        for n in names:
            p = plan.state_plan(n)
            f = factors(omap.kind, p.s, p.g)
            f.update({gk: f[hp] for gk, hp in plan.spec.group_keys.items() if hp in f})
            key = tuple((h, f[h]) for h in (*SCALED, *plan.spec.group_keys)
                        if h in f and h in g and _nonzero(g[h]) and f[h] != 1)
            parts.setdefault(key, []).append(n)
        for key, members in (parts or {(): []}).items():
            out.append((b, key, members))
    return out


def _factor_text(key: tuple) -> str:
    shown = [(h, f) for h, f in key if h != "initial_lr"]
    return ", ".join(f"{h} × {f}" for h, f in shown) if shown else "unchanged"


def _names_text(tensors: list) -> str:
    """A group's tensors, briefly: their role and up to two names."""
    if not tensors:
        return "empty"
    roles = sorted({f"{t.role}-like" for t in tensors})
    names = [t.name for t in tensors]
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return f"{'/'.join(roles)}: {', '.join(names[:2])}{more}"


def _nonzero(v) -> bool:
    return bool(v != 0) if not isinstance(v, (list, tuple)) else True


def _mul(v, f: Fraction):
    if isinstance(v, torch.Tensor):
        return v * f.numerator / f.denominator
    return float(v) * f.numerator / f.denominator


LR_KEYS = ("lr", "initial_lr")  # initial_lr: what LR schedulers restart from


def scale_lr(groups: list[dict], factor: float) -> list[dict]:
    """Groups with lr and initial_lr multiplied by `factor` (a new base learning rate, widen --hparams);
    the per-tensor μP factors they carry stay. Unchanged groups for factor 1."""
    if factor == 1:
        return groups
    return [{**g, **{h: g[h] * factor for h in LR_KEYS
                     if isinstance(g.get(h), (int, float, torch.Tensor)) and not isinstance(g.get(h), bool)}}
            for g in groups]
