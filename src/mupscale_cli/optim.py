"""μP optimizers with the paper's corrections (App. C.4, Tables 2-3), for training scripts.

    from mupscale_cli.optim import MuAdamW
    mup.set_base_shapes(model, base_model)
    opt = MuAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)

`params` is an `nn.Module`, an iterable of `(name, param)` pairs, or a list of param-group dicts whose
`params` are `(name, param)` pairs. Every parameter needs mup's `infshape` (`mup.set_base_shapes`).
Each incoming group is split into matrix-like groups, then vector-like groups, then one scalar-like group,
keyed by the μP multipliers below (Adam: matrices by (wm, r), vectors by wm; SGD: matrices by r, vectors by
wm, exactly as mup 1.0.0's MuSGD); empty groups are dropped and every group carries `param_names`, so
optimizer checkpoints can be matched to parameters by name. wm = infshape.width_mult() (for a matrix:
its fan-in multiplier), r = infshape.fanin_fanout_mult_ratio() (fan-in mult / fan-out mult):

    Adam/AdamW   lr       eps                      weight_decay: coupled (Adam) | decoupled (AdamW)
    matrix       / wm     / (wm / r) (fan-out mult)   * r | * wm
    vector       1        / wm                        / wm | 1
    SGD          lr       weight_decay (coupled)
    matrix       / r      * r
    vector       * wm     / wm

Unlike mup 1.0.0's MuAdam, eps is scaled and coupled (L2) weight decay gets its own scaling (D in
Table 2); MuSGD matches mup 1.0.0. Scalar-like parameters are never rescaled.
"""
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Factors = Callable[[int, float, float], dict[str, float]]  # (ninf, width_mult, fanin/fanout ratio) -> multipliers


def _groups(params: Any, defaults: dict) -> list[dict]:
    """Normalize `params` to groups of (name, param) pairs with defaults filled in."""
    if isinstance(params, nn.Module):
        params = params.named_parameters()
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for g in groups:
        pairs = list(g["params"])
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], torch.Tensor)):
                raise TypeError("μP optimizers need named parameters: pass the model or "
                                f"model.named_parameters(), got {type(pair).__name__}")
            if not hasattr(pair[1], "infshape"):
                raise ValueError(f"parameter {pair[0]!r} has no `infshape`. "
                                 "Did you forget to call `mup.set_base_shapes`?")
        out.append({**defaults, **g, "params": pairs})
    return out


def _split(params: Any, defaults: dict, factors: Factors) -> list[dict]:
    """Split each group by width class (matrix, vector, scalar) and by μP factors, then apply them."""
    new = []
    for g in _groups(params, defaults):
        sub: dict[tuple, dict] = {}
        for name, p in g["params"]:
            ninf = p.infshape.ninf()
            if ninf > 2:
                raise ValueError(f"parameter {name!r} has {ninf} width dimensions (at most 2 supported)")
            ratio = p.infshape.fanin_fanout_mult_ratio() if ninf == 2 else 1.0
            f = factors(ninf, p.infshape.width_mult(), ratio) if ninf else {}
            key = (-ninf, tuple(sorted(f.items())))  # matrix groups first, then vector, then scalar
            if key not in sub:
                sub[key] = {**g, **{k: g[k] * v for k, v in f.items()}, "params": [], "param_names": []}
            sub[key]["params"].append(p)
            sub[key]["param_names"].append(name)
        new += [sub[k] for k in sorted(sub, key=lambda k: k[0])]
    return new


def MuAdam(params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 0.0, decoupled_weight_decay: bool = False, **kw) -> torch.optim.Adam:
    """Adam (coupled L2 weight decay) or, with decoupled_weight_decay=True, AdamW, with corrected μP scaling."""
    def factors(ninf: int, wm: float, r: float) -> dict[str, float]:
        if ninf == 2:  # eps / fan-out mult; wd * Table 2's D (coupled) or D~ (decoupled)
            return {"lr": 1 / wm, "eps": r / wm, "weight_decay": wm if decoupled_weight_decay else r}
        return {"eps": 1 / wm, "weight_decay": 1.0 if decoupled_weight_decay else 1 / wm}

    groups = _split(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay}, factors)
    if decoupled_weight_decay:
        return torch.optim.AdamW(groups, betas=betas, **kw)
    return torch.optim.Adam(groups, betas=betas, **kw)


def MuAdamW(params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
            weight_decay: float = 1e-2, **kw) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, `p *= 1 - lr*wd`) with corrected μP scaling; returns torch.optim.AdamW."""
    return MuAdam(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, **kw)


def MuSGD(params: Any, lr: float = 1e-3, weight_decay: float = 0.0, **kw) -> torch.optim.SGD:
    """SGD (coupled L2 weight decay; momentum etc. via kw) with μP scaling, as mup 1.0.0's MuSGD."""
    def factors(ninf: int, wm: float, r: float) -> dict[str, float]:
        return {"lr": 1 / r, "weight_decay": r} if ninf == 2 else {"lr": wm, "weight_decay": 1 / wm}

    return torch.optim.SGD(_split(params, {"lr": lr, "weight_decay": weight_decay}, factors), **kw)


def clip_grad_norm_equivalent(params: Any, max_norm: float, scales: dict[str, tuple[float, int]],
                              norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a widened model, computed as the base model would compute it.

        w = mupscale_cli.api.load("wide.pt"); scales = mupscale_cli.api.grad_scales(w)
        loss.backward()
        clip_grad_norm_equivalent(model, 1.0, scales)      # instead of clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    `params`: the model or its `named_parameters()`; `scales`: {name: (g, copies)} per parameter
    (`mupscale_cli.api.grad_scales`; `{}` or all (1, 1) on the base model itself, where this is plain clipping).
    Each gradient's norm is divided by g · copies^(1/p) (core/clip.py), giving the base's per-tensor norm;
    the total is the base's total norm and the clip coefficient, max_norm / (total + 1e-6) capped at 1, is the
    base's, so base and widened models stay in lockstep with clipping active. Returns the base-equivalent
    total norm. Names may carry `_orig_mod.` / `module.` prefixes."""
    from mupscale_cli.core.clip import norm_factor
    if isinstance(params, nn.Module):
        params = params.named_parameters()
    pairs = [(n, p) for n, p in params if p.grad is not None]
    norm_type = float(norm_type)
    if norm_type == 0 or math.isnan(norm_type):  # ord 0 counts non-zero entries: no scale factor relates them
        raise ValueError(f"clip_grad_norm_equivalent: norm_type {norm_type} has no base-equivalent norm; use a "
                         f"p-norm (2.0, 1.0, inf)")
    if not pairs:
        return torch.tensor(0.0)
    norms = []
    for n, p in pairs:
        key = n
        while key.startswith(("_orig_mod.", "module.")):
            key = key.removeprefix("_orig_mod.").removeprefix("module.")
        if scales and key not in scales:
            raise KeyError(f"clip_grad_norm_equivalent: no gradient scale for parameter {n!r} (scales come from "
                           f"mupscale_cli.api.grad_scales of the widened checkpoint this model loaded)")
        g, copies = scales.get(key, (1.0, 1))
        norms.append(torch.linalg.vector_norm(p.grad.detach(), norm_type) / norm_factor(g, copies, norm_type))
    total = torch.linalg.vector_norm(torch.stack([x.to(norms[0].device) for x in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the base-equivalent total norm of order {norm_type} is non-finite")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for _, p in pairs:
        p.grad.detach().mul_(coef.to(p.grad.device))
    return total
