"""The widening math (paper Table 1): pure functions on tensors, no I/O."""
from __future__ import annotations

from fractions import Fraction

import torch

from mupscale_cli.core.noise import noise
from mupscale_cli.core.plan import TensorPlan


def duplicate(t: torch.Tensor, dim: int, k: int, block: int = 1) -> torch.Tensor:
    """Repeat each block of `block` coordinates of `dim` k times in place (block 1: x ⊗ 1_k)."""
    if k == 1:
        return t
    n = t.shape[dim]
    blocks = t.reshape(*t.shape[:dim], n // block, block, *t.shape[dim + 1:])  # (..., n/b, b, ...)
    out = blocks.repeat_interleave(k, dim=dim)  # (..., k*n/b, b, ...)
    return out.reshape(*t.shape[:dim], n * k, *t.shape[dim + 1:])


def scale(t: torch.Tensor, f: Fraction) -> torch.Tensor:
    """t * f with one rounding per integer factor (exact for powers of two)."""
    if f == 1:
        return t
    t = t * f.numerator if f.numerator != 1 else t.clone()
    return t.div_(f.denominator) if f.denominator != 1 else t


def widen(t: torch.Tensor, p: TensorPlan, power: int = 0) -> torch.Tensor:
    """Duplicate every width axis of `t`, then scale: weights by s (power 0), optimizer state like
    the gradient: g (power 1, momentum/exp_avg) or g² (power 2, exp_avg_sq)."""
    for i, d in enumerate(p.dims):
        t = duplicate(t, i, d.k, d.block)
    if p.buffer:
        return t
    return scale(t, p.s if power == 0 else p.g ** power)


def widen_noised(t: torch.Tensor, p: TensorPlan, sigma: float, seed: int) -> torch.Tensor:
    """Exact widening plus noise of std sigma * p.noise_unit, computed in float64 for float64
    tensors and float32 otherwise, then cast back to the tensor's dtype."""
    w = widen(t, p)
    std = sigma * p.noise_unit
    if std == 0 or not t.is_floating_point():
        return w
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    z = noise(p.alias_of or p.name, p.out_shape, seed).to(acc)
    return (w.to(acc) + z.mul_(std)).to(t.dtype)
