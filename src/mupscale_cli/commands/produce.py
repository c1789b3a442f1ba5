"""produce: the widened tensors of a prepared widening, range by range (core.widen), the optimizer state and
groups, the provenance record and the summary. Shared by the file writers (commands/widen.py) and the DCP
writer (commands/widen_dcp.py)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mupscale_cli.commands.resume import resume_snippet
from mupscale_cli import __version__
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.checks import (_check_elements, _nonfinite, _nonfinite_notes, _untracked_axes,  # noqa: F401
                                      check_state_layout, check_tied, check_values, count_nonfinite, model_bytes,
                                      state_refs, value_checks)
from mupscale_cli.core.job import (DTYPES, Prepared, WidenOptions, out_dtype, parse_sizes,  # noqa: F401
                                   sigma_of)
from mupscale_cli.core.optstate import (STATE_POWER, optimizer_layout, scale_lr)
from mupscale_cli.core.checks import _plain_step  # noqa: F401
from mupscale_cli.core.widen import widen_noised, widen_range
from mupscale_cli.bounded import int_text, loads_json, shown  # noqa: F401 (importable from here)
from mupscale_cli.formats.checkpoint import (OPTIM_NS, LazyTensors, read_rows,
                                             source_sha256, strip_prefix, tensor_meta)
from mupscale_cli.formats.output import (MAX_BYTES, OUT_SUFFIXES, _check_sharded_output, _input_files,  # noqa: F401
                                         _only_sharded_output, check_disk, check_output, check_size, clean_temps,
                                         missing_dirs, output_bytes)
from mupscale_cli.formats.write import (OutTensor, Target)


def provenance(opts: WidenOptions, prep: Prepared, source_digest: str | None = None) -> dict:
    plan = prep.plan
    return {
        "tool": f"mupscale {__version__}",
        "source": prep.ckpt.path.name if prep.ckpt.kind not in ("sharded", "dcp") else
        f"{prep.ckpt.path.parent.name}/{prep.ckpt.path.name}",
        "source_sha256": source_digest if source_digest is not None else source_sha256(prep.ckpt),
        "spec": plan.spec.name,
        "spec_sha256": plan.spec.sha256,
        "spec_text": plan.spec.text,  # the output describes itself: inspect/verify/widen need no --spec
        **({"untie": plan.spec.untie} if plan.untied else {}),
        "readout": plan.spec.readout,
        "k": plan.k,
        "sizes": {n: plan.sizes[n] for n in plan.spec.sizes if n in plan.sizes},
        "sigma": opts.sigma,
        **({"sigma_per_tensor": opts.sigma_map} if opts.sigma_map is not None else {}),
        "seed": opts.seed,
        "noise": noise_mod.CONVENTION,
        "noise_device": opts.noise_device,
        "noise_std": {n: sigma_of(opts, n) * p.noise_unit for n, p in plan.tensors.items()
                      if p.noise_unit and p.alias_of is None and sigma_of(opts, n)},
        "lr_scale": opts.lr_scale,
        **({"hparams": opts.hparams_record} if opts.hparams_record else {}),
        "dtype": opts.dtype,
        "optimizer": prep.omap.kind if prep.omap else None,
        "opt_layout": prep.omap.layout if prep.omap else None,
        "tied": {n: p.alias_of for n, p in plan.tensors.items() if p.alias_of},
        **({"model_args": prep.model_args} if prep.model_args is not None else {}),
    }

def widen_tensors(prep: Prepared, sigma: float, seed: int, noise_device: str = "cpu",
                  dtype: torch.dtype | None = None,
                  sigma_map: dict[str, float] | None = None) -> Callable[[str], torch.Tensor]:
    """name -> widened (noised) tensor, in memory; tied aliases return their canonical tensor's result.
    `sigma_map`: per-tensor σ̄ (canonical names), `sigma` for the others."""
    cache: dict[str, torch.Tensor] = {}
    aliased = {p.alias_of for p in prep.plan.tensors.values() if p.alias_of}

    def produce(n: str) -> torch.Tensor:
        p = prep.plan.tensors[n]
        c = p.alias_of or n
        if c in cache:
            return cache.pop(c) if p.alias_of else cache[c]
        s = sigma if sigma_map is None else sigma_map.get(c, sigma)
        t = widen_noised(prep.ckpt.tensors[prep.plan.tensors[c].source or c], prep.plan.tensors[c], s, seed,
                         noise_device, dtype)
        if c in aliased:
            cache[c] = t
        return t
    return produce

def _torch_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)

def model_out(prep: Prepared, opts: WidenOptions) -> list[OutTensor]:
    """The model's output tensors, made range by range from the input rows they need (aliases copied)."""
    dtype = out_dtype(opts)
    tensors = prep.ckpt.tensors
    out = []
    for n, p in prep.plan.tensors.items():
        dt = dtype if dtype is not None and p.dtype.is_floating_point else p.dtype
        if p.alias_of:
            out.append(OutTensor(n, p.out_shape, dt, copy_of=p.alias_of))
            continue

        def make(a: int, b: int, alloc=None, n=n, p=p) -> torch.Tensor:
            alloc = alloc or _torch_empty
            return widen_range(lambda i0, i1: read_rows(tensors, p.source or n, i0, i1, alloc), p, a, b,
                               sigma=sigma_of(opts, n),
                               seed=opts.seed, noise_device=opts.noise_device, out_dtype=dtype, alloc=alloc)
        out.append(OutTensor(n, p.out_shape, dt, make))
    return out

def optimizer_out(prep: Prepared, names_out, lr_scale: float = 1.0) -> tuple[list[dict] | None, list[OutTensor]]:
    """The widened optimizer's param groups (learning rates × lr_scale) and its state tensors
    (`__optim__/<name>/<key>`), made range by range like the model's; optimizer state keeps its dtype
    (--dtype casts the model only)."""
    if prep.omap is None:
        return None, []
    lay = optimizer_layout(prep.ckpt.optimizer, prep.plan, prep.omap, names_out)
    lay.groups = scale_lr(lay.groups, lr_scale)
    out = []
    for e in lay.entries:
        st = e.source
        if e.key == "step" and _plain_step(st):  # an int/float step (older torch): stored as a 0-d tensor
            name = f"{OPTIM_NS}{strip_prefix(names_out(e.name))}/step"
            out.append(OutTensor(name, (), torch.float32, lambda a, b, alloc=None, v=float(st["step"]):
                                 torch.tensor([v], dtype=torch.float32)[a:b]))
            continue
        if not isinstance(st, LazyTensors) and not isinstance(st[e.key], torch.Tensor):
            continue  # None: not stored, as torch would not need it
        shape, dtype = tensor_meta(st, e.key)
        p = prep.plan.state_plan(e.name)
        name = f"{OPTIM_NS}{strip_prefix(names_out(e.name))}/{e.key}"
        if e.key == "step" or len(shape) == 0:
            def make(a: int, b: int, alloc=None, st=st, key=e.key) -> torch.Tensor:
                return st[key].detach().clone().reshape(-1)[a:b]
            out.append(OutTensor(name, shape, dtype, make))
            continue

        def make(a: int, b: int, alloc=None, st=st, key=e.key, p=p) -> torch.Tensor:
            alloc = alloc or _torch_empty
            return widen_range(lambda i0, i1: read_rows(st, key, i0, i1, alloc), p, a, b, power=STATE_POWER[key],
                               alloc=alloc)
        out.append(OutTensor(name, p.out_shape, dtype, make))
    return lay.groups, out

def _names_out(prep: Prepared, target: Target):
    """param_names for the output: canonical names in safetensors; in .pt the input's own form
    (its param_names, else its model keys, prefixes included)."""
    if target.kind != "pt":
        return lambda n: n
    groups = prep.ckpt.optimizer["param_groups"] if prep.ckpt.optimizer else []
    raw = {prep.ckpt.strip(r): r for g in groups for r in g.get("param_names", [])}
    return lambda n: raw.get(n) or prep.ckpt.original.get(n, n)

def summary(prep: Prepared, out: Path | None, opts: WidenOptions, groups: list[dict] | None) -> dict:
    plan = prep.plan
    base = model_bytes(plan, widened=False)
    wide = model_bytes(plan, out_dtype(opts))
    return {
        "output": str(out) if out else None,
        "spec": plan.spec.name,
        "k": plan.k,
        "sigma": opts.sigma,
        **({"sigma_per_tensor": opts.sigma_map} if opts.sigma_map is not None else {}),
        "lr_scale": opts.lr_scale,
        "seed": opts.seed,
        "dtype": opts.dtype,
        "tensors": len(plan.tensors),
        "model_bytes": {"base": base, "widened": wide},
        "optimizer": None if prep.omap is None else {
            "kind": prep.omap.kind, "layout": prep.omap.layout,
            "groups": {"base": len(prep.ckpt.optimizer["param_groups"]),
                       "widened": len(groups) if groups is not None else None}},
        "model_args": prep.model_args,
        "notes": prep.notes,
        **({"resume": snip} if (snip := resume_snippet(
            out, prep.omap.kind if prep.omap else None, groups,
            len(prep.ckpt.optimizer["param_groups"]) if prep.ckpt.optimizer else 0)) else {}),
    }

