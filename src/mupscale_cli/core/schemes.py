"""Noise schemes of paper App. F.5 for sweeps: noise relative to the signal instead of μP-absolute.

Each takes the exact widening W (of plan tensor p) and a strength t; Δ is the σ̄ = 1 μP noise of
`mupscale-noise-v1` (u·z, same bytes as `widen`'s), ‖·‖ the spectral norm of the (out, -1) matrix.
- mup:         W + t·Δ                          (t is σ̄)
- relative:    W + t·(‖W‖/‖Δ‖)·Δ                (signal and noise of equal norm at t = 1)
- masked:      W + t·|dup(W)|⊙z                 (dup(W) = W before the 1/k_in rescale, z ~ N(0, 1))
- interpolate: √(1-t)·W + √t·(‖W‖/‖Δ‖)·Δ        (t = 0: exact widening, t = 1: fresh init of equal norm)
The relative scheme's per-tensor effective σ̄ = t·‖W‖/‖Δ‖ is exported so it transfers as plain μP noise.
"""
from __future__ import annotations

import math

import torch

from mupscale_cli.core.noise import noise
from mupscale_cli.core.plan import TensorPlan
from mupscale_cli.core.widen import widen

SCHEMES = ("mup", "relative", "masked", "interpolate")


def spectral_norm(w: torch.Tensor) -> float:
    m = w.reshape(w.shape[0], -1).double()
    return torch.linalg.matrix_norm(m, ord=2).item()


def relative_tensors(plan) -> list[str]:
    """Tensors the relative scheme noises, and exports an effective σ̄ for: noised matrices (not aliases)."""
    return [n for n, p in plan.tensors.items() if p.noise_unit and p.alias_of is None and len(p.shape) >= 2]


def effective_sigma(w: torch.Tensor, p: TensorPlan, t: float, seed: int) -> float:
    """σ̄ such that μP noise σ̄·Δ has norm t·‖W‖ (relative scheme)."""
    d = noise(p.alias_of or p.name, p.out_shape, seed).double() * p.noise_unit
    nd = spectral_norm(d)
    return t * spectral_norm(w) / nd if nd > 0 else 0.0


def noised(t_in: torch.Tensor, p: TensorPlan, scheme: str, t: float, seed: int) -> torch.Tensor:
    """The widened tensor under `scheme` with strength t (tensors without noise: exact widening)."""
    w = widen(t_in, p)
    if p.noise_unit == 0 or t == 0 or not t_in.is_floating_point():
        return w
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    z = noise(p.alias_of or p.name, p.out_shape, seed).to(acc)
    wa = w.to(acc)
    if scheme == "mup":
        out = wa + t * p.noise_unit * z
    elif scheme == "masked":
        out = wa + t * (wa / float(p.s)).abs() * z
    elif scheme in ("relative", "interpolate"):
        if len(p.shape) < 2:
            return w
        ratio = spectral_norm(wa) / spectral_norm(z * p.noise_unit) if z.abs().sum() > 0 else 0.0
        delta = ratio * p.noise_unit * z
        out = wa + t * delta if scheme == "relative" else math.sqrt(1 - t) * wa + math.sqrt(t) * delta
    else:
        raise ValueError(f"unknown noise scheme {scheme!r}")
    return out.to(w.dtype)
