"""`mupscale widen` and the validation it shares with `inspect`."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mupscale_cli import __version__
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.checkpoint import Checkpoint, load_checkpoint, sha256_file
from mupscale_cli.core.optstate import OptimizerMap, map_optimizer, widen_optimizer
from mupscale_cli.core.output import write_pt, write_safetensors
from mupscale_cli.core.plan import Plan, make_plan, parse_k
from mupscale_cli.core.spec import Spec, bundled_specs, load_spec
from mupscale_cli.core.widen import widen_noised
from mupscale_cli.errors import MupscaleError

OUT_SUFFIXES = (".safetensors", ".pt")


@dataclass
class WidenOptions:
    checkpoint: Path
    output: Path | None = None
    k: str = "2"
    sigma: float = 0.0
    seed: int = 0
    spec: str | None = None
    optimizer: str | None = None  # sgd | adam | adamw, when the state cannot tell
    opt_layout: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    force: bool = False
    no_optimizer: bool = False
    strict: bool = False  # NaN/Inf in the input: error instead of a warning


@dataclass
class Prepared:
    ckpt: Checkpoint
    plan: Plan
    omap: OptimizerMap | None
    model_args: dict | None
    notes: list[str] = field(default_factory=list)


def parse_sizes(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items:
        name, _, v = it.partition("=")
        if not name.isidentifier() or not v.isdigit() or int(v) < 1:
            raise MupscaleError(f"--size {it!r}: expected NAME=INT, e.g. --size head_dim=64")
        out[name] = int(v)
    return out


def detect_spec(ckpt: Checkpoint, k: dict[str, int], sizes: dict[str, int]) -> Spec:
    """The bundled spec that covers every tensor of the checkpoint; exactly one must fit."""
    fits, why = [], {}
    for spec in bundled_specs():
        if not spec.detect:
            continue
        try:
            make_plan(spec, ckpt.shapes(), {"*": 1}, ckpt.model_args, sizes)
        except MupscaleError as e:
            why[spec.name] = str(e)
            continue
        fits.append(spec)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        detail = "; ".join(f"{n}: {w}" for n, w in why.items())
        raise MupscaleError(f"no bundled spec covers {ckpt.path.name} ({detail}); pass --spec FILE")
    raise MupscaleError(f"several bundled specs cover {ckpt.path.name} ({', '.join(s.name for s in fits)}); "
                        f"pass --spec NAME")


def prepare(opts: WidenOptions) -> Prepared:
    """Everything `widen` checks before heavy work: spec, shapes, k, optimizer mapping."""
    if not math.isfinite(opts.sigma) or opts.sigma < 0:
        raise MupscaleError(f"--sigma must be a finite number >= 0, got {opts.sigma}")
    k = parse_k(opts.k)
    ckpt = load_checkpoint(opts.checkpoint)
    spec = load_spec(opts.spec) if opts.spec else detect_spec(ckpt, k, opts.sizes)
    plan = make_plan(spec, ckpt.shapes(), k, ckpt.model_args, opts.sizes, ckpt.tensors)
    for n, p in plan.tensors.items():
        c = ckpt.tensors[p.alias_of] if p.alias_of else None
        t = ckpt.tensors[n]
        if c is not None and c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() and not torch.equal(c, t):
            raise MupscaleError(f"tied tensors {n!r} and {p.alias_of!r} differ; they must hold the same values")
    omap, notes = None, []
    if ckpt.optimizer is not None and not opts.no_optimizer:
        omap = map_optimizer(ckpt.optimizer, plan, opts.optimizer, opts.opt_layout, ckpt.strip)
    elif ckpt.optimizer is None:
        notes.append("no optimizer state in the checkpoint: weights only")
    return Prepared(ckpt, plan, omap, plan.model_args(ckpt.model_args), notes)


def check_output(opts: WidenOptions) -> Path:
    out = opts.output
    if out is None:
        raise MupscaleError("missing -o/--output PATH (.safetensors or .pt)")
    if out.suffix not in OUT_SUFFIXES:
        raise MupscaleError(f"-o {out}: the output must end in .safetensors or .pt")
    if out.exists() and out.resolve() == opts.checkpoint.resolve():
        raise MupscaleError(f"-o {out}: refusing to write over the input checkpoint")
    if out.is_dir():
        raise MupscaleError(f"-o {out}: is a directory")
    if out.exists() and not opts.force:
        raise MupscaleError(f"-o {out}: exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise MupscaleError(f"-o {out}: directory {out.parent} does not exist")
    return out


def provenance(opts: WidenOptions, prep: Prepared) -> dict:
    plan = prep.plan
    return {
        "tool": f"mupscale {__version__}",
        "source": prep.ckpt.path.name,
        "source_sha256": sha256_file(prep.ckpt.path),
        "spec": plan.spec.name,
        "spec_sha256": plan.spec.sha256,
        "readout": plan.spec.readout,
        "k": plan.k,
        "sizes": {n: plan.sizes[n] for n in plan.spec.sizes},
        "sigma": opts.sigma,
        "seed": opts.seed,
        "noise": noise_mod.CONVENTION,
        "noise_std": {n: opts.sigma * p.noise_unit for n, p in plan.tensors.items()
                      if p.noise_unit and p.alias_of is None and opts.sigma},
        "optimizer": prep.omap.kind if prep.omap else None,
        "opt_layout": prep.omap.layout if prep.omap else None,
        "tied": {n: p.alias_of for n, p in plan.tensors.items() if p.alias_of},
    }


def widen_tensors(prep: Prepared, sigma: float, seed: int) -> Callable[[str], torch.Tensor]:
    """name -> widened (noised) tensor; tied aliases return their canonical tensor's result."""
    cache: dict[str, torch.Tensor] = {}
    aliased = {p.alias_of for p in prep.plan.tensors.values() if p.alias_of}

    def produce(n: str) -> torch.Tensor:
        p = prep.plan.tensors[n]
        c = p.alias_of or n
        if c in cache:
            return cache.pop(c) if p.alias_of else cache[c]
        t = widen_noised(prep.ckpt.tensors[c], prep.plan.tensors[c], sigma, seed)
        if c in aliased:
            cache[c] = t
        return t
    return produce


def run_widen(opts: WidenOptions, progress: Callable[[str, int], None] = lambda n, b: None) -> dict:
    """Widen `opts.checkpoint` into `opts.output`; returns a summary."""
    out = check_output(opts)
    prep = prepare(opts)
    plan, ckpt = prep.plan, prep.ckpt
    prov = provenance(opts, prep)
    osd = None
    if prep.omap is not None:
        osd = widen_optimizer(ckpt.optimizer, plan, prep.omap, names_out=_names_out(prep, out))
    extra = dict(ckpt.extra)
    if prep.model_args is not None:
        extra["model_args"] = prep.model_args
    produce = widen_tensors(prep, opts.sigma, opts.seed)
    if out.suffix == ".safetensors":
        model = [(n, p.out_shape, p.dtype) for n, p in plan.tensors.items()]
        write_safetensors(out, model, produce, osd, prep.omap.kind if prep.omap else None, prov, extra, progress)
    else:
        model = {}
        for n in plan.tensors:  # aliases share the canonical tensor, as in the input
            p = plan.tensors[n]
            model[n] = model[p.alias_of] if p.alias_of in model else produce(n)
            progress(n, model[n].numel() * model[n].element_size())
        extra["mupscale"] = prov | {"k": dict(plan.k)}
        write_pt(out, ckpt, model, osd, extra)
    return summary(prep, out, opts, osd)


def _names_out(prep: Prepared, out: Path):
    """param_names for the output: canonical names in safetensors; in .pt the input's own form
    (its param_names, else its model keys, prefixes included)."""
    if out.suffix == ".safetensors":
        return lambda n: n
    raw = {prep.ckpt.strip(r): r for g in prep.ckpt.optimizer["param_groups"] for r in g.get("param_names", [])}
    return lambda n: raw.get(n) or prep.ckpt.original.get(n, n)


def summary(prep: Prepared, out: Path | None, opts: WidenOptions, osd: dict | None) -> dict:
    plan = prep.plan
    base = sum(math.prod(p.shape) * p.dtype.itemsize for p in plan.tensors.values())
    wide = sum(p.out_bytes for p in plan.tensors.values())
    return {
        "output": str(out) if out else None,
        "spec": plan.spec.name,
        "k": plan.k,
        "sigma": opts.sigma,
        "seed": opts.seed,
        "tensors": len(plan.tensors),
        "model_bytes": {"base": base, "widened": wide},
        "optimizer": None if prep.omap is None else {
            "kind": prep.omap.kind, "layout": prep.omap.layout,
            "groups": {"base": len(prep.ckpt.optimizer["param_groups"]),
                       "widened": len(osd["param_groups"]) if osd else None}},
        "model_args": prep.model_args,
        "notes": prep.notes,
    }
