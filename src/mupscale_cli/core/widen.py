"""The widening math (paper Table 1): pure functions on tensors, no I/O.

`widen`/`widen_noised` make a whole tensor; `widen_range` makes any flat element range of the same result
from the input rows it needs (`source_rows`), bit for bit: every step is a copy or an elementwise
operation, so splitting the work changes no value. That is what lets the writer produce a tensor of any
size in bounded memory, in any order, on any number of threads.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch

from mupscale_cli.core.noise import CHUNK, noise, noise_pieces
from mupscale_cli.core.plan import DimPlan, TensorPlan


def duplicate(t: torch.Tensor, dim: int, k: int, block: int = 1) -> torch.Tensor:
    """Repeat each block of `block` coordinates of `dim` k times in place (block 1: x ⊗ 1_k)."""
    if k == 1:
        return t
    n = t.shape[dim]
    blocks = t.reshape(*t.shape[:dim], n // block, block, *t.shape[dim + 1:])  # (..., n/b, b, ...)
    copies = blocks.unsqueeze(dim + 1).expand(*blocks.shape[:dim + 1], k, *blocks.shape[dim + 1:])
    # one copy, (..., n/b, k, b, ...) in C order; contiguous() copies the stride-0 view of a single block
    return copies.reshape(*t.shape[:dim], n * k, *t.shape[dim + 1:]).contiguous()


def duplicate_dim(t: torch.Tensor, dim: int, d: DimPlan) -> torch.Tensor:
    """Duplicate `dim` of t as the plan's dimension d does (blocks, or a fused dimension's segments)."""
    if d.segments and d.k != 1:
        return t.index_select(dim, d.source(t.shape[dim]).to(t.device))
    return duplicate(t, dim, d.k, d.block)


def _gathered(x: torch.Tensor, p: TensorPlan, first: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """x with each segmented dimension (from `first` on) duplicated by gathering, and the (k, block) pairs
    left for _widen_view ((1, 1) for the gathered ones): a copy, so the values are the same bits."""
    dups = []
    for i, d in enumerate(p.dims):
        if i >= first and d.segments and d.k != 1:
            x = x.index_select(i, d.source(x.shape[i]).to(x.device))
            dups.append((1, 1))
        else:
            dups.append((d.k, d.block))
    return x, dups


EXACT_INT = 1 << 53  # integers a float64 multiplier holds exactly


def _as_float(f: Fraction) -> bool:
    """Whether f is applied as one float multiplication: its numerator or denominator is beyond what a float64
    (or torch's integer scalars) holds exactly, as for k_power's k^(1/2) (Gemma's sqrt(hidden_size)) squared
    for exp_avg_sq. Otherwise t × numerator ÷ denominator, one rounding each (exact for powers of two)."""
    return f.numerator > EXACT_INT or f.denominator > EXACT_INT


def scale(t: torch.Tensor, f: Fraction) -> torch.Tensor:
    """t * f with one rounding per integer factor (exact for powers of two)."""
    if f == 1:
        return t
    if _as_float(f):
        return t * float(f)
    t = t * f.numerator if f.numerator != 1 else t.clone()
    return t.div_(f.denominator) if f.denominator != 1 else t


def widen(t: torch.Tensor, p: TensorPlan, power: int = 0) -> torch.Tensor:
    """Duplicate every width axis of `t`, then scale: weights by s (power 0), optimizer state like
    the gradient: g (power 1, momentum/exp_avg) or g² (power 2, exp_avg_sq).
    Made in one pass: the scaling reads a view holding every duplication (the same values, bit for bit,
    as duplicating axis by axis and then scaling)."""
    x, dups = _gathered(t, p)
    return _widen_view(x, dups, _factor(p, power),
                       lambda shape, dtype: torch.empty(shape, dtype=dtype, device=t.device))


def _factor(p: TensorPlan, power: int) -> Fraction:
    return Fraction(1) if p.buffer else (p.s if power == 0 else p.g_power(power))


Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _widen_view(x: torch.Tensor, dups: list[tuple[int, int]], f: Fraction, alloc: Alloc = _empty) -> torch.Tensor:
    """Duplicate axis i of x by dups[i] = (k, block) and scale by f, writing the result once (into
    `alloc(shape, dtype)`)."""
    view, expand, out_shape = [], [], []
    for n, (k, b) in zip(x.shape, dups):
        if k == 1:
            view.append(n)
            expand.append(n)
        else:
            view += [n // b, 1, b]
            expand += [n // b, k, b]
        out_shape.append(n * k)
    if view == expand:  # nothing duplicated
        return scale(x, f)
    v = x.reshape(view).expand(expand)
    out = alloc(tuple(expand), x.dtype)
    if f == 1:
        return out.copy_(v).reshape(out_shape)
    if _as_float(f):  # the same rounding as scale()
        torch.mul(v, float(f), out=out)
    elif f.numerator != 1:  # the same roundings as scale(): t * numerator, then / denominator
        torch.mul(v, f.numerator, out=out)
        if f.denominator != 1:
            out.div_(f.denominator)
    else:
        torch.div(v, f.denominator, out=out)
    return out.reshape(out_shape)


def widen_noised(t: torch.Tensor, p: TensorPlan, sigma: float, seed: int, noise_device: str = "cpu",
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact widening plus noise of std sigma * p.noise_unit, computed in float64 for float64
    tensors and float32 otherwise, then cast back to the tensor's dtype (and then to `out_dtype`, if
    given, for floating-point tensors: `--dtype`)."""
    w = widen(t, p)
    std = sigma * p.noise_unit
    if std != 0 and t.is_floating_point():
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        z = noise(p.alias_of or p.name, p.out_shape, seed, noise_device).to(acc)
        w = (w.to(acc) + z.mul_(std)).to(t.dtype)
    return cast(w, out_dtype)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`--dtype`: floating-point tensors to `dtype` (round to nearest even); others unchanged."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def _by_blocks(p: TensorPlan, r0: int, r1: int) -> bool:
    """Make output rows [r0, r1) by duplicating the whole blocks they lie in (fast; at most two blocks'
    worth of rows wasted), or by gathering exactly their input rows (for large blocks and few rows)."""
    d = p.dims[0]
    return len(p.shape) == 1 or d.block == 1 or r1 - r0 >= 8 * d.k * d.block


def source_rows(p: TensorPlan, r0: int, r1: int) -> tuple[int, int]:
    """Input rows [i0, i1) (first dimension) that `widen_rows` needs for output rows [r0, r1).

    Duplicating the first axis by k in blocks of b maps output row R to input row
    (R // (k b)) b + R % b: the rows come either from the whole blocks they lie in (duplicated, then
    sliced) or, for large blocks, from exactly the input rows they copy (gathered)."""
    d = p.dims[0]
    if d.k == 1 or r1 <= r0:
        return r0, max(r0, r1)
    if d.segments:  # a fused dimension: the span of the input rows its output rows copy
        src = d.source(p.shape[0])[r0:r1]
        return int(src.min()), int(src.max()) + 1
    per, b = d.k * d.block, d.block
    g0, g1 = r0 // per, (r1 - 1) // per
    if _by_blocks(p, r0, r1):
        return g0 * b, (g1 + 1) * b
    o0, o1 = r0 % per, (r1 - 1) % per
    if g0 == g1:
        if o1 - o0 + 1 >= b or o0 % b > o1 % b:  # every position of the block, or a wrap-around
            return g0 * b, g0 * b + b
        return g0 * b + o0 % b, g0 * b + o1 % b + 1
    first = g0 * b + (o0 % b if per - o0 < b else 0)
    last = g1 * b + (o1 + 1 if o1 + 1 < b else b)
    return first, last


def widen_rows(x: torch.Tensor, p: TensorPlan, r0: int, r1: int, power: int = 0,
               alloc: Alloc = _empty) -> torch.Tensor:
    """Output rows [r0, r1) of widen(t, p, power), from x = t[i0:i1] with (i0, i1) = source_rows(p, r0, r1).
    Bitwise equal to widen(t, p, power)[r0:r1]: only copies and the same elementwise scaling."""
    d = p.dims[0]
    x, dups = _gathered(x, p, first=1)
    f = _factor(p, power)
    if d.k == 1:
        return _widen_view(x, dups, f, alloc)
    i0 = source_rows(p, r0, r1)[0]
    if d.segments:  # row R copies input row src(R)
        return _widen_view(x[d.source(p.shape[0])[r0:r1] - i0], [(1, 1)] + dups[1:], f, alloc)
    per = d.k * d.block
    if _by_blocks(p, r0, r1):  # whole blocks: duplicate them, keep the rows asked for
        first = (i0 // d.block) * per
        return _widen_view(x, dups, f, alloc)[r0 - first:r1 - first]
    r = torch.arange(r0, r1)  # row R copies input row src(R)
    return _widen_view(x[(r // per) * d.block + r % d.block - i0], [(1, 1)] + dups[1:], f, alloc)


def widen_range(rows: Callable[[int, int], torch.Tensor], p: TensorPlan, start: int, stop: int, *,
                power: int = 0, sigma: float = 0.0, seed: int = 0, noise_device: str = "cpu",
                out_dtype: torch.dtype | None = None, alloc: Alloc = _empty) -> torch.Tensor:
    """Flat elements [start, stop) of widen_noised(t, p, sigma, seed, noise_device, out_dtype) (power 0) or
    of widen(t, p, power) (optimizer state: no noise, no cast), as a 1-d tensor, bit for bit.
    `rows(i0, i1)` returns input rows [i0, i1) of t (the whole 0-d tensor for a scalar). Only the
    input rows the range needs are read; the noise comes from the fixed generator chunks covering it.
    Large results and temporaries come from `alloc(shape, dtype)` (a buffer pool, to spare the kernel
    from zeroing fresh pages range after range); its buffers must be 64-byte aligned."""
    out_shape = p.out_shape
    n = stop - start
    if not out_shape:
        w = widen(rows(0, 1), p, power).reshape(1)
        dtype = w.dtype
    else:
        row = math.prod(out_shape[1:])
        if n <= 0 or row == 0:
            return torch.empty(0, dtype=p.dtype if power or out_dtype is None else out_dtype)
        r0, r1 = start // row, -(-stop // row)
        x = rows(*source_rows(p, r0, r1))
        dtype = x.dtype
        w = widen_rows(x, p, r0, r1, power, alloc).reshape(-1)[start - r0 * row:stop - r0 * row]
    if power:
        return w
    std = sigma * p.noise_unit
    if std != 0 and w.is_floating_point():
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        res = alloc((n,), acc)
        scratch = alloc((CHUNK,), torch.float32) if noise_device == "cpu" else None
        for off, z in noise_pieces(p.alias_of or p.name, out_shape, seed, start, stop, noise_device, scratch):
            z = z.to(acc).mul_(std)
            torch.add(w[off:off + z.numel()].to(acc), z, out=res[off:off + z.numel()])
        w = res if acc == dtype else alloc((n,), dtype).copy_(res)
    if out_dtype is None or not w.is_floating_point() or w.dtype == out_dtype:
        return w
    return alloc((n,), out_dtype).copy_(w)  # --dtype: the same rounding as .to()
