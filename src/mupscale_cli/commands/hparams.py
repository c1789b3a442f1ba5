"""`widen --hparams`: σ̄ and γ̄↑ tuned on a small proxy by `mupscale sweep`, carried to a wider model.

Paper 002 §3.2: tune the noise constant σ̄ and the learning-rate constant γ̄↑ on an upscaling n₀ → k·n₀,
reuse them for n → k·n. Under μP both are width-independent constants:
- σ̄ sets the noise as it does with `--sigma` (std = σ̄ × the tensor's μP unit); the relative noise scheme
  exports one effective σ̄ per tensor instead, applied tensor by tensor.
- γ̄↑ becomes the widened model's base learning rate: every widened group's lr and initial_lr (already
  carrying its per-tensor μP factor) is multiplied by lr_scale = γ̄↑ / γ̄, with γ̄ the target checkpoint's own
  base learning rate (--base-lr, else its config.learning_rate, else the proxy's: the μTransfer premise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mupscale_cli.formats.checkpoint import Checkpoint, sha256_file
from mupscale_cli.core.plan import Plan
from mupscale_cli.core.schemes import relative_tensors
from mupscale_cli.bounded import load_yaml
from mupscale_cli.errors import MupscaleError

TRANSFERABLE = ("mup", "relative")  # App. F.5: the other schemes' strengths do not transfer across widths


@dataclass
class Hparams:
    sigma: float  # σ̄ for every noised tensor not in sigma_map
    sigma_map: dict[str, float] | None  # relative scheme: per-tensor effective σ̄ (others get `sigma` = 0)
    lr_scale: float  # every widened group's lr and initial_lr is multiplied by this
    lr: float  # γ̄↑: the new base learning rate
    record: dict  # what goes into the provenance
    notes: list[str] = field(default_factory=list)


def base_lr_of(ckpt: Checkpoint, given: float | None) -> float | None:
    """A checkpoint's base learning rate γ̄: `given`, else nanoGPT's config.learning_rate, else None."""
    if given:
        return given
    cfg = ckpt.extra.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("learning_rate"), (int, float)) \
            and not isinstance(cfg.get("learning_rate"), bool):
        return float(cfg["learning_rate"])
    return None


def _number(d: dict, key: str, path: Path, positive: bool = False) -> float:
    v = d.get(key)
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > 0 if positive else v >= 0))
    if not ok:
        raise MupscaleError(f"--hparams {path}: {key} must be a finite number {'> 0' if positive else '>= 0'}, "
                            f"got {v!r}")
    return float(v)


def load_hparams(path: Path) -> dict:
    """The `sweep -o` file, checked: sigma, lr, base_lr, noise_scheme (and effective_sigma if relative)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MupscaleError(f"--hparams {path}: cannot read: {str(e).splitlines()[0]}") from None
    d = load_yaml(text, f"--hparams {path}")
    if not isinstance(d, dict) or not {"sigma", "lr", "base_lr"} <= set(d):
        raise MupscaleError(f"--hparams {path}: needs sigma, lr and base_lr (write it with mupscale sweep -o)")
    _number(d, "sigma", path)
    _number(d, "lr", path, positive=True)
    _number(d, "base_lr", path, positive=True)
    k = d.get("k")
    if k is not None and not (isinstance(k, dict) and all(
            isinstance(a, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for a, v in k.items())):
        raise MupscaleError(f"--hparams {path}: 'k' must map axis names to integers >= 1 (as sweep writes it)")
    if d.get("spec") is not None and not isinstance(d["spec"], str):
        raise MupscaleError(f"--hparams {path}: 'spec' must be a spec name")
    scheme = d.get("noise_scheme", "mup")
    if not isinstance(scheme, str) or scheme not in TRANSFERABLE:
        raise MupscaleError(f"--hparams {path}: noise scheme {scheme!r} does not transfer across widths "
                            f"(paper App. F.5); sweep with --noise-scheme mup or relative")
    if scheme == "relative":
        eff = d.get("effective_sigma")
        if not isinstance(eff, dict) or not eff:
            raise MupscaleError(f"--hparams {path}: relative scheme without effective_sigma (a map tensor -> σ̄)")
        for n in eff:
            _number(eff, n, path)
    return d


def resolve_hparams(path: Path, ckpt: Checkpoint, plan: Plan, base_lr: float | None) -> Hparams:
    """What `widen --hparams path` applies to this checkpoint and plan."""
    d = load_hparams(path)
    notes = []
    if d.get("k") is not None and d["k"] != plan.k:
        notes.append(f"--hparams were tuned for k = {d['k']}, this widening has k = {plan.k}: σ̄ and γ̄↑ "
                     f"transfer across widths at a fixed k (paper §3.2)")
    if d.get("spec") is not None and d["spec"] != plan.spec.name:
        notes.append(f"--hparams were tuned with spec {d['spec']!r}, this widening uses {plan.spec.name!r}")
    sigma, sigma_map = float(d["sigma"]), None
    if d.get("noise_scheme", "mup") == "relative":
        eff = {str(n): float(v) for n, v in d["effective_sigma"].items()}
        noised = relative_tensors(plan)
        unknown = sorted(set(eff) - set(noised))
        if unknown:
            raise MupscaleError(f"--hparams {path}: effective_sigma names {unknown[0]!r}, which this checkpoint "
                                f"has no noised matrix of: tune on a proxy with the same layers")
        missing = [n for n in noised if n not in eff]
        if missing:
            raise MupscaleError(f"--hparams {path}: effective_sigma has no entry for {missing[0]!r}: tune on a "
                                f"proxy with the same layers")
        sigma, sigma_map = 0.0, eff
    lr, proxy_lr = float(d["lr"]), float(d["base_lr"])
    target_lr = base_lr_of(ckpt, base_lr)
    if target_lr is None:
        target_lr = proxy_lr
        notes.append(f"the checkpoint records no base learning rate (config.learning_rate): taking the "
                     f"proxy's, {proxy_lr:g} (pass --base-lr if it was trained with another)")
    lr_scale = lr / target_lr
    if not (math.isfinite(lr_scale) and lr_scale > 0):
        raise MupscaleError(f"--hparams {path}: lr {lr:g} / the checkpoint's base lr {target_lr:g} = {lr_scale:g} "
                            f"is no usable learning-rate factor")
    record = {"file": path.name, "sha256": sha256_file(path), "noise_scheme": d.get("noise_scheme", "mup"),
              "sigma": float(d["sigma"]), "lr": lr, "proxy_base_lr": proxy_lr, "base_lr": target_lr,
              "lr_scale": lr_scale, "k": d.get("k"), "spec": d.get("spec")}
    return Hparams(sigma, sigma_map, lr_scale, lr, record, notes)
