"""What gradient clipping needs to stay exact: how each widened gradient relates to the base's.

A widened parameter's gradient is g · dup(base gradient) (Table 1: g the gradient scale, dup repeating every
base element `copies` = Π k over its width axes times), so its p-norm is g · copies^(1/p) · the base's
(norm² = copies · g² · ‖grad_base‖² for p = 2; the max norm is g · the base's). Dividing each tensor's norm by
that factor gives the base-equivalent norm; clipping by it applies the base's clip coefficient to every
gradient, and the widened model keeps following the base's trajectory (mupscale_cli.optim.clip_grad_norm_equivalent).
"""
from __future__ import annotations

import math

from mupscale_cli.core.plan import Plan


def grad_scales(plan: Plan) -> dict[str, tuple[float, int]]:
    """Per trained parameter (tied aliases left out, buffers too): (gradient scale g, copies)."""
    return {n: (float(p.g), math.prod(d.k for d in p.dims if d.axis is not None))
            for n, p in plan.tensors.items() if not p.buffer and p.alias_of is None}


def norm_factor(g: float, copies: int, norm_type: float) -> float:
    """‖widened gradient‖_p = norm_factor · ‖base gradient‖_p."""
    return g if math.isinf(norm_type) else g * copies ** (1.0 / norm_type)
