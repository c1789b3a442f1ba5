"""Validation of an optimizer state dict's hyper-parameters and ids, before anything is widened.

Types and ranges are errors (a string lr, betas that are not a pair in [0, 1), a negative eps, `params`
that are not a list of ids, an id in two groups, a `step` that is not a number). Non-finite values
(NaN/Inf lr, eps, ...) are reported like NaN/Inf tensors: a warning, an error with --strict. A value that
the widening itself makes non-finite (lr × factor overflowing) is always an error (`check_widened`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mupscale_cli.core.source import LazyTensors, tensor_meta
from mupscale_cli.errors import MupscaleError


NONNEG = ("lr", "initial_lr", "eps", "weight_decay", "momentum", "dampening")  # numbers >= 0 when present


def _value(v) -> float | None:
    """A hyper-parameter as a float (a Python number, or a 1-element real tensor), None if it is neither."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    if isinstance(v, float):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
        return float(v.detach().reshape(()).double())
    return None


def _kind(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {list(v.shape)}"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:40] + '...'}"


def _id_key(i):
    """Ids compare as ints whether stored as 3 or "3" (JSON round trips turn keys into strings)."""
    if isinstance(i, str) and i.isascii() and i.isdigit() and len(i) < 20:
        return int(i)
    return i


def check_optimizer(sd: dict) -> list[tuple[str, str, float]]:
    """Check an optimizer state dict's groups, hyper-parameters, ids and `step` entries; raise on a wrong
    type, range or id. Returns the non-finite values found as (where, key, value), for a warning
    (or an error with --strict)."""
    groups, state = sd["param_groups"], sd["state"]
    nonfinite: list[tuple[str, str, float]] = []
    seen: dict = {}
    for i, g in enumerate(groups):
        where = f"optimizer param_groups[{i}]"
        if not isinstance(g, Mapping):
            raise MupscaleError(f"{where} is {_kind(g)}, expected a mapping of hyper-parameters with 'params'")
        ids = g.get("params")
        if not isinstance(ids, (list, tuple)) or not all(
                (isinstance(p, int) and not isinstance(p, bool)) or isinstance(p, str) for p in ids):
            raise MupscaleError(f"{where}: 'params' is {_kind(ids)}, expected a list of parameter ids "
                                f"(ints) as opt.state_dict() writes")
        for p in ids:
            if _id_key(p) in seen:
                raise MupscaleError(f"{where}: 'params' id {p!r} is also in param_groups[{seen[_id_key(p)]}]; "
                                    f"each parameter belongs to one group")
            seen[_id_key(p)] = i
        names = g.get("param_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(ids) or not all(
                isinstance(n, str) for n in names)):
            raise MupscaleError(f"{where}: 'param_names' must be a list of {len(ids)} names, one per id in "
                                f"'params'")
        for key in NONNEG:
            if key not in g:
                continue
            x = _value(g[key])
            if x is None:
                raise MupscaleError(f"{where}: {key!r} is {_kind(g[key])}, expected a number")
            if math.isnan(x) or math.isinf(x):
                nonfinite.append((where, key, x))
            elif x < 0:
                raise MupscaleError(f"{where}: {key!r} is {x!r}, expected a number >= 0")
        if "betas" in g:
            b = g["betas"]
            xs = [_value(v) for v in b] if isinstance(b, (list, tuple)) and len(b) == 2 else None
            if xs is None or any(x is None or not (0 <= x < 1) for x in xs):
                raise MupscaleError(f"{where}: 'betas' is {_kind(b)}, expected a pair of numbers in [0, 1)")
    for pid, st in state.items():  # (an id in no group: optstate.check_state_ids)
        if isinstance(st, Mapping) and "step" in st:
            if isinstance(st, LazyTensors):  # read later; only its size now (reads stay counted per tensor)
                shape, _ = tensor_meta(st, "step")
                if math.prod(shape) != 1:
                    raise MupscaleError(f"optimizer state id {pid!r}: 'step' has shape {list(shape)}, expected "
                                        f"a number or a 1-element tensor")
                continue
            v = st["step"]
            x = _value(v)
            if x is None:
                raise MupscaleError(f"optimizer state id {pid!r}: 'step' is {_kind(v)}, expected a number or a "
                                    f"1-element tensor")
            if math.isnan(x) or math.isinf(x) or x < 0:
                nonfinite.append((f"optimizer state id {pid!r}", "step", x))
    return nonfinite


def hparam_notes(found: list[tuple[str, str, float]], strict: bool) -> list[str]:
    """Warnings for non-finite hyper-parameters, or an error with --strict."""
    if found and strict:
        where, key, x = found[0]
        raise MupscaleError(f"{where}: {key!r} is {x}; --strict refuses non-finite hyper-parameters: fix the "
                            f"checkpoint, or drop --strict to widen it as it is")
    return [f"warning: {where}: {key!r} is {x}, widened as it is (--strict makes this an error)"
            for where, key, x in found]


def check_widened(groups: list[dict] | None, found: list[tuple[str, str, float]], what: str = "the widening") -> None:
    """Every hyper-parameter of the widened groups is finite, unless the input's was already (`found`)."""
    already = {key for _, key, _ in found}
    for i, g in enumerate(groups or []):
        for key in NONNEG:
            if key in g and key not in already:
                x = _value(g[key])
                if x is not None and not math.isfinite(x):
                    raise MupscaleError(f"{what} makes {key!r} of widened param group {i} {x} (a finite value "
                                        f"times its μP factor overflows): the output would not train; check the "
                                        f"checkpoint's {key} and --k")
