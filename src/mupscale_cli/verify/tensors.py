"""WIDE's tensors against BASE's exact widening: its structure (names, shapes) and, for a noised or cast
WIDE, the recorded noise re-derived and compared bit for bit."""
from __future__ import annotations

import torch

from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.job import Prepared
from mupscale_cli.core.widen import widen, widen_noised
from mupscale_cli.errors import MupscaleError
from mupscale_cli.verify.diagnose import Issue
from mupscale_cli.verify.setup import _noised


def _structure(model: dict[str, torch.Tensor], plan) -> list[Issue]:
    issues = []
    for n, p in plan.tensors.items():
        t = model.get(n)
        if t is None:
            issues.append(Issue("structure", f"WIDE has no tensor {n!r}", n))
        elif tuple(t.shape) != p.out_shape:
            issues.append(Issue("structure", f"WIDE's {n!r} has shape {list(t.shape)}; widening BASE by k "
                                             f"{plan.k} gives {list(p.out_shape)}: was it widened with another "
                                             f"--k or --spec?", n))
    extra = [n for n in model if n not in plan.tensors]
    if extra:
        issues.append(Issue("structure", f"WIDE has {len(extra)} tensor(s) BASE does not, e.g. {extra[0]!r}",
                            extra[0]))
    return issues


def _noise_check(w, prep: Prepared, sigma: float, prov: dict, stored: torch.dtype | None = None,
                 sigma_map: dict[str, float] | None = None) -> tuple[dict, list[Issue]]:
    """WIDE = exact widening + the noise re-derived from (seed, convention, noise device, σ̄ or σ̄ per
    tensor), then cast to its recorded dtype: tensor by tensor, bit for bit."""
    noised = _noised(sigma, sigma_map)
    seed = prov.get("seed", 0)
    conv = prov.get("noise", noise_mod.CONVENTION)
    device = prov.get("noise_device", "cpu")
    kw = {}
    if noised and device != "cpu":
        if device != "cuda" or not torch.cuda.is_available():
            raise MupscaleError(f"WIDE's noise was drawn with the {device!r} generator (--noise-device); "
                                f"verify it where that device is available")
        kw["noise_device"] = device
    if stored is not None:
        kw["out_dtype"] = stored
    if noised and conv != noise_mod.CONVENTION:
        raise MupscaleError(f"WIDE records noise convention {conv!r}; this mupscale re-derives "
                            f"{noise_mod.CONVENTION!r} only")
    if not isinstance(seed, int):
        raise MupscaleError(f"WIDE records σ̄ = {sigma} but no integer seed; its noise cannot be re-derived")
    recorded = prov.get("noise_std") or {}
    tensors, issues = {}, []
    for n, p in prep.plan.tensors.items():
        if p.alias_of:
            continue
        s_n = sigma if sigma_map is None else sigma_map.get(n, sigma)
        std = s_n * p.noise_unit
        if recorded and abs(float(recorded.get(n, 0.0)) - std) > 1e-12 * max(std, 1e-300):
            issues.append(Issue("noise", f"WIDE records noise std {recorded.get(n, 0.0)} for {n!r}, the spec "
                                         f"gives {std}: another spec or k?", n))
        base_t = prep.ckpt.tensors[n]
        exp = widen_noised(base_t, p, s_n, seed, **kw)
        got = w.model[n]
        status = "noised" if std and base_t.is_floating_point() else "exact"
        what = "plus the recorded noise" if noised else ""
        what += (" and " if what else "") + f"cast to {stored}" if stored is not None else ""
        if got.dtype != exp.dtype or not torch.equal(got, exp):
            if got.dtype != exp.dtype:
                status = f"dtype {got.dtype}, expected {exp.dtype}"
            elif std and torch.equal(got, _cast(widen(base_t, p), stored)):
                status = "noise missing"
            else:
                d = (got.double() - exp.double()).abs().max().item() if got.dtype.is_floating_point else float("nan")
                status = f"differs (max |Δ| {d:.3g} from exact widening {what})"
            issues.append(Issue("noise", f"{n!r} is not the exact widening of BASE {what} "
                                         f"(σ̄ {s_n}, seed {seed}): {status}", n))
        tensors[n] = status
    ok = not issues
    return {"sigma": sigma, **({"sigma_per_tensor": sigma_map} if sigma_map is not None else {}),
            "seed": seed, "convention": conv, "noise_device": device,
            "dtype": str(stored).removeprefix("torch.") if stored else None, "ok": ok,
            "checked": len(tensors), "tensors": tensors}, issues


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
