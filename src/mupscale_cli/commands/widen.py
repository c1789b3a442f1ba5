"""`mupscale widen` and the validation it shares with `inspect`."""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mupscale_cli import __version__
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.checkpoint import Checkpoint, load_checkpoint, sha256_file
from mupscale_cli.core.optstate import STATE_POWER, OptimizerMap, map_optimizer, widen_optimizer
from mupscale_cli.core.output import clean_stale_temps, write_pt, write_safetensors
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
    notes += _untracked_axes(plan, ckpt.model_args)
    prep = Prepared(ckpt, plan, omap, plan.model_args(ckpt.model_args), notes)
    check_values(prep, opts.strict)
    return prep


def state_items(prep: Prepared):
    """(tensor name, state key, value) of every mapped optimizer state entry."""
    if prep.omap is None:
        return
    sd = prep.ckpt.optimizer
    for g, names in zip(sd["param_groups"], prep.omap.names):
        for pid, n in zip(g["params"], names):
            st = sd["state"].get(pid, {})
            if not isinstance(st, dict):
                raise MupscaleError(f"optimizer state of tensor {n!r} is a {type(st).__name__}, expected a dict "
                                    f"of state tensors; re-save the optimizer with opt.state_dict()")
            for key, v in st.items():
                yield n, key, v


def _nonfinite(t: torch.Tensor) -> int:
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return 0
    return int((~torch.isfinite(t)).sum())


def check_values(prep: Prepared, strict: bool) -> None:
    """Dtypes that the rescale needs, known optimizer state keys, and NaN/Inf in the input (a warning
    in `prep.notes`, an error with --strict)."""
    found: list[tuple[str, int]] = []
    for n, p in prep.plan.tensors.items():
        if p.alias_of:
            continue
        t = prep.ckpt.tensors[n]
        if not p.buffer and p.s != 1 and not t.is_floating_point():
            raise MupscaleError(f"tensor {n!r} has dtype {t.dtype} but its rule {p.rule!r} rescales it by {p.s}; "
                                f"store it as a float tensor or mark the rule 'buffer: true'")
        if bad := _nonfinite(t):
            found.append((n, bad))
    for n, key, v in state_items(prep):
        if key == "step":
            continue
        if key not in STATE_POWER:
            raise MupscaleError(f"unknown optimizer state {key!r} for tensor {n!r}; mupscale widens SGD, Adam "
                                f"and AdamW state (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, step)")
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is "
                                f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}, expected a "
                                f"float tensor; re-save the optimizer with opt.state_dict()")
        if tuple(v.shape) != prep.plan.tensors[n].shape:
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} has shape {list(v.shape)}, the tensor "
                                f"has {list(prep.plan.tensors[n].shape)}; the optimizer belongs to another model")
        if bad := _nonfinite(v):
            found.append((f"{n}/{key}", bad))
    if found and strict:
        n, bad = found[0]
        more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
        raise MupscaleError(f"tensor {n!r} holds {bad} NaN/Inf value(s){more}; --strict refuses them: "
                            f"widen an earlier checkpoint, or drop --strict to widen them as they are")
    for n, bad in found:
        prep.notes.append(f"warning: tensor {n!r} holds {bad} NaN/Inf value(s), widened as they are "
                          f"(--strict makes this an error)")


def output_bytes(prep: Prepared, out: Path) -> int:
    """Bytes of the widened tensors written to `out`: model (aliases again in safetensors) + optimizer state."""
    plan = prep.plan
    total = sum(p.out_bytes for p in plan.tensors.values() if out.suffix == ".safetensors" or not p.alias_of)
    for n, _, v in state_items(prep):
        if isinstance(v, torch.Tensor):
            total += v.nbytes if v.dim() == 0 else math.prod(plan.tensors[n].out_shape) * v.element_size()
    return total


def check_disk(out: Path, prep: Prepared) -> None:
    """Enough free space beside `out` for the whole output (plus 1 MiB for headers), before writing."""
    need = output_bytes(prep, out) + 2**20
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return
    if need > free:
        raise MupscaleError(f"-o {out}: the output needs {need / 2**20:.1f} MiB but {out.parent} has only "
                            f"{free / 2**20:.1f} MiB free; free some space, write elsewhere or use a smaller --k")


def clean_temps(out: Path) -> list[str]:
    """Remove temporaries left beside `out` by killed runs; notes saying what was removed or kept."""
    removed, kept = clean_stale_temps(out)
    notes = [f"removed stale temporary {out.parent / n} (left by an interrupted run)" for n in removed]
    notes += [f"kept temporary {out.parent / n}: another mupscale process may still be writing {out.name}"
              for n in kept]
    return notes


def _untracked_axes(plan: Plan, model_args: dict | None) -> list[str]:
    """Axes that grow differently from every axis the checkpoint's model_args record."""
    if not model_args:
        return []
    tracked = {plan.k[a] for arg, a in plan.spec.model_args.items() if arg in model_args}
    return [f"model_args has no {arg!r}: axis {a} grows by {plan.k[a]}, which model_args cannot record; "
            f"the training script must build that width itself"
            for arg, a in plan.spec.model_args.items() if arg not in model_args and plan.k[a] not in tracked]


def check_output(opts: WidenOptions) -> Path:
    out = opts.output
    if out is None:
        raise MupscaleError("missing -o/--output PATH (.safetensors or .pt)")
    if out.suffix not in OUT_SUFFIXES:
        raise MupscaleError(f"-o {out}: the output must end in .safetensors or .pt")
    if out.exists() and opts.checkpoint.exists() and os.path.samefile(out, opts.checkpoint):  # links too
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
    prep.notes += clean_temps(out)
    check_disk(out, prep)
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
        if ckpt.model_key is not None or osd is not None:  # a plain state dict stays plain
            extra["mupscale"] = prov
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
