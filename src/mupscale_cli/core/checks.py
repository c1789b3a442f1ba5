"""The checks `widen` runs before the first byte is written: tensor and optimizer-state dtypes and shapes,
tied tensors, NaN/Inf, model_args that cannot record a width (values read piece by piece: lazy inputs are
never read whole). The optimizer state dict's own types, ranges and ids: core/optcheck.py."""
from __future__ import annotations

import math

import torch

from mupscale_cli.core.job import DEFAULT_CHUNK_BYTES, Prepared, WidenOptions
from mupscale_cli.core.optcheck import (NONNEG, _id_key, _kind, _value, check_optimizer,  # noqa: F401 (importable from here)
                                       check_widened, hparam_notes)
from mupscale_cli.core.plan import Plan, is_float8, same_values
from mupscale_cli.core.source import LazyTensors, iter_chunks, tensor_meta
from mupscale_cli.errors import MupscaleError















def value_checks(prep: Prepared, opts: WidenOptions) -> list[str]:
    """The checks that read the input's values, piece by piece: tied tensors equal, dtypes the rescale
    needs, NaN/Inf (notes to add, or an error with --strict)."""
    check_tied(prep, opts)
    return check_values(prep, opts.strict, _check_elements(opts))


def check_tied(prep: Prepared, opts: WidenOptions) -> None:
    """Tied tensors hold the same values (compared piece by piece)."""
    for n, p in prep.plan.tensors.items():
        if p.alias_of and not same_values(prep.ckpt.tensors, n, p.alias_of, _check_elements(opts)):
            raise MupscaleError(f"tied tensors {n!r} and {p.alias_of!r} differ; they must hold the same values")


def _check_elements(opts: WidenOptions) -> int:
    """Elements per piece when the value checks read the input."""
    return max(1, min(opts.chunk_bytes, DEFAULT_CHUNK_BYTES) // 4)


def state_refs(prep: Prepared):
    """(tensor name, state key, state dict) of every mapped optimizer state entry; lazy entries unread."""
    if prep.omap is None:
        return
    sd = prep.ckpt.optimizer
    for g, names in zip(sd["param_groups"], prep.omap.names):
        for pid, n in zip(g["params"], names):
            st = sd["state"].get(pid, {})
            if not isinstance(st, (dict, LazyTensors)):
                raise MupscaleError(f"optimizer state of tensor {n!r} is a {type(st).__name__}, expected a dict "
                                    f"of state tensors; re-save the optimizer with opt.state_dict()")
            for key in st:
                yield n, key, st


def _nonfinite(m, name: str, chunk: int) -> int:
    """NaN/Inf count of m[name], read piece by piece."""
    _, dtype = tensor_meta(m, name)
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0
    return sum(count_nonfinite(x) for x in iter_chunks(m, name, chunk))


def count_nonfinite(x: torch.Tensor) -> int:
    """NaN/Inf values in x (0 for integer tensors; float8 looked at in float32: torch cannot sum it)."""
    if is_float8(x.dtype):
        x = x.float()
    if not (x.dtype.is_floating_point or x.dtype.is_complex) or bool(torch.isfinite(x.sum())):
        return 0  # a finite sum has no NaN/Inf term (fast); else count them
    return int((~torch.isfinite(x)).sum())


def check_state_layout(prep: Prepared) -> None:
    """Dtypes the rescale needs; optimizer state keys, dtypes and shapes (no values read)."""
    for n, p in prep.plan.tensors.items():
        _, dtype = tensor_meta(prep.ckpt.tensors, p.source or n)
        if not p.alias_of and not p.buffer and p.s != 1 and not dtype.is_floating_point:
            raise MupscaleError(f"tensor {n!r} has dtype {dtype} but its rule {p.rule!r} rescales it by {p.s}; "
                                f"store it as a float tensor or mark the rule 'buffer: true'")
        if not p.alias_of and not p.buffer and p.s != 1 and is_float8(dtype):
            raise MupscaleError(f"tensor {n!r} is {dtype} and its rule {p.rule!r} rescales it by {p.s}: float8 "
                                f"cannot hold the rescaled values exactly; cast the checkpoint to bfloat16 or "
                                f"float32 first (duplication alone, scale 1, is exact)")
    for n, key, st in state_refs(prep):
        if key == "step":
            continue
        from mupscale_cli.core.optstate import check_state_key  # (optstate imports this module)
        check_state_key(key, n)
        if not isinstance(st, LazyTensors):
            v = st[key]
            if v is None:
                continue
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is "
                                    f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}, expected a "
                                    f"float tensor; re-save the optimizer with opt.state_dict()")
        shape, dtype = tensor_meta(st, key)
        if not dtype.is_floating_point:
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is {dtype}, expected a float tensor; "
                                f"re-save the optimizer with opt.state_dict()")
        p = prep.plan.state_plan(n)
        if is_float8(dtype) and not p.buffer and p.g != 1:
            from mupscale_cli.core.optstate import STATE_POWER
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is {dtype} and moves like the gradient "
                                f"(× {p.g_power(STATE_POWER[key])}): float8 cannot hold that exactly; keep optimizer "
                                f"state in float32")
        if shape != p.shape:
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} has shape {list(shape)}, the tensor "
                                f"has {list(p.shape)}; the optimizer belongs to another model")


def check_values(prep: Prepared, strict: bool, chunk: int = 1 << 22) -> list[str]:
    """NaN/Inf in the input, read piece by piece: warnings (returned as notes), an error with --strict.
    (Keys, dtypes and shapes: check_state_layout.)"""
    found: list[tuple[str, int]] = []
    for n, p in prep.plan.tensors.items():
        if not p.alias_of and not p.source and (bad := _nonfinite(prep.ckpt.tensors, n, chunk)):
            found.append((n, bad))
    for n, key, st in state_refs(prep):
        if key == "step" or (not isinstance(st, LazyTensors) and st[key] is None):
            continue
        if bad := _nonfinite(st, key, chunk):
            found.append((f"{n}/{key}", bad))
    return _nonfinite_notes(found, strict)


def _nonfinite_notes(found: list[tuple[str, int]], strict: bool) -> list[str]:
    if found and strict:
        n, bad = found[0]
        more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
        raise MupscaleError(f"tensor {n!r} holds {bad} NaN/Inf value(s){more}; --strict refuses them: "
                            f"widen an earlier checkpoint, or drop --strict to widen them as they are")
    return [f"warning: tensor {n!r} holds {bad} NaN/Inf value(s), widened as they are (--strict makes this "
            f"an error)" for n, bad in found]


def _untracked_axes(plan: Plan, model_args: dict | None) -> list[str]:
    """Axes that grow differently from every axis the checkpoint's model_args record."""
    if not model_args:
        return []
    tracked = {plan.k[a] for arg, a in plan.spec.model_args.items() if arg in model_args}
    return [f"model_args has no {arg!r}: axis {a} grows by {plan.k[a]}, which model_args cannot record; "
            f"the training script must build that width itself"
            for arg, a in plan.spec.model_args.items() if arg not in model_args and plan.k[a] not in tracked]


def model_bytes(plan: Plan, dtype: torch.dtype | None = None, aliases: bool = True, widened: bool = True) -> int:
    """Bytes of the model's tensors, widened (or as in the input), floating-point ones in `dtype` if given;
    tied aliases counted again unless `aliases` is False (a .pt stores them once)."""
    total = 0
    for p in plan.tensors.values():
        if p.alias_of and not aliases:
            continue
        size = dtype.itemsize if dtype is not None and p.dtype.is_floating_point else p.dtype.itemsize
        total += math.prod(p.out_shape if widened else p.shape) * size
    return total


def _plain_step(st) -> bool:
    """A state dict whose `step` is a plain number (not a tensor): torch's Adam accepts a 0-d tensor instead."""
    return not isinstance(st, LazyTensors) and isinstance(st.get("step"), (int, float)) and not isinstance(
        st.get("step"), bool)
