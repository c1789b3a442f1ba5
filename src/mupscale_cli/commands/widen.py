"""`mupscale widen` and the validation it shares with `inspect`."""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mupscale_cli import __version__
from mupscale_cli.commands.hparams import resolve_hparams
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.formats.checkpoint import (OPTIM_NS, Checkpoint, LazyTensors, is_sharded, iter_chunks,
                                         load_checkpoint, optimizer_prefix, read_rows, sharded_index, source_sha256,
                                         strip_prefix, tensor_meta)
from mupscale_cli.core.checks import check_optimizer, check_widened, hparam_notes
from mupscale_cli.core.optstate import (STATE_POWER, OptimizerMap, check_state_key, map_optimizer, optimizer_layout, scale_lr,
                                       widen_optimizer)
from mupscale_cli.formats.target import TMP_MARKER, InputWatch, claim, env_error, sigbus_names
from mupscale_cli.formats.write import (DEFAULT_CHUNK_BYTES, SHARD_NAME, Background, OutTensor, Target,
                                      clean_stale_temps, sharded_files, write_pt, write_streamed)
from mupscale_cli.core.plan import Plan, is_float8, make_plan, parse_k, same_values
from mupscale_cli.formats.safetensors import fmt_bytes, parse_size
from mupscale_cli.core.spec import Spec, bundled_specs, load_spec
from mupscale_cli.core.widen import widen_noised, widen_range
from mupscale_cli.bounded import int_text, loads_json, shown
from mupscale_cli.errors import MupscaleError

OUT_SUFFIXES = (".safetensors", ".pt")
MAX_BYTES = 2**60  # 1 EiB: a widened model larger than this is a mistaken --k


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
    dtype: str | None = None  # --dtype: cast the model's floating-point tensors (float32, bfloat16, float16)
    shard_size: int | str | None = None  # --shard-size: Hugging Face shards of at most this many bytes
    threads: int = 2  # worker threads making tensor ranges (0: all in the writing thread)
    noise_device: str = "cpu"  # cpu | cuda: the generator of the noise (recorded in the provenance)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # unit of work for large tensors
    source_digest: Callable[[], str] | None = None  # the input file's sha256, if already being computed
    hparams: Path | None = None  # --hparams: σ̄ and γ̄↑ from `mupscale sweep -o` (instead of --sigma)
    base_lr: float | None = None  # --base-lr: the checkpoint's base learning rate γ̄ (for --hparams)
    sigma_map: dict[str, float] | None = None  # per-tensor σ̄ (relative scheme), else `sigma` for all
    lr_scale: float = 1.0  # multiplies every widened group's lr and initial_lr (γ̄↑ / γ̄)
    hparams_record: dict | None = None  # provenance of --hparams
    format: str | None = None  # --format dcp|safetensors|pt|hf (default: from -o and the input)


def sigma_of(opts: WidenOptions, name: str) -> float:
    """σ̄ of canonical tensor `name`."""
    return opts.sigma if opts.sigma_map is None else opts.sigma_map.get(name, opts.sigma)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        if not name.isidentifier() or not (v.isascii() and v.isdigit()) or int_text(v, f"--size {shown(it)}") < 1:
            raise MupscaleError(f"--size {shown(it)}: expected NAME=INT, e.g. --size head_dim=64")
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


def out_dtype(opts: WidenOptions) -> torch.dtype | None:
    if opts.dtype is None:
        return None
    if opts.dtype not in DTYPES:
        raise MupscaleError(f"--dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[opts.dtype]


def prepare(opts: WidenOptions, lazy: bool = False, defer_checks: bool = False) -> Prepared:
    """Everything `widen` checks before heavy work: spec, shapes, k, optimizer mapping, values.
    lazy=True reads the input's tensors only for the value checks, one piece at a time.
    defer_checks=True leaves the checks that read tensor values (tied tensors equal, dtypes, NaN/Inf) to
    `value_checks(prep, opts)`, which `widen` runs while it writes and awaits before committing."""
    if not math.isfinite(opts.sigma) or opts.sigma < 0:
        raise MupscaleError(f"--sigma must be a finite number >= 0, got {opts.sigma}")
    out_dtype(opts)
    noise_mod.check_device(opts.noise_device)
    if opts.threads < 0:
        raise MupscaleError(f"--threads must be >= 0, got {opts.threads}")
    k = parse_k(opts.k)
    ckpt = load_checkpoint(opts.checkpoint, lazy=lazy)
    spec = load_spec(opts.spec) if opts.spec else detect_spec(ckpt, k, opts.sizes)
    plan = make_plan(spec, ckpt.shapes(), k, ckpt.model_args, opts.sizes, ckpt.tensors)
    omap, notes = None, []
    if ckpt.optimizer is not None and not opts.no_optimizer:
        omap = map_optimizer(ckpt.optimizer, plan, opts.optimizer, opts.opt_layout, ckpt.strip)
        notes += hparam_notes(check_optimizer(ckpt.optimizer), opts.strict)
    elif ckpt.optimizer is None:
        notes.append("no optimizer state in the checkpoint: weights only")
    notes += _untracked_axes(plan, ckpt.model_args)
    notes += [f"warning: {k!r} looks like an LR scheduler's state: it is copied as it is, its base_lrs not "
              f"rescaled; rebuild the scheduler on the widened optimizer (base_lrs come from each group's "
              f"initial_lr, which is rescaled)" for k, v in ckpt.extra.items() if isinstance(v, dict) and "base_lrs" in v]
    prep = Prepared(ckpt, plan, omap, plan.model_args(ckpt.model_args), notes)
    check_size(prep, opts)
    check_state_layout(prep)
    if not defer_checks:
        prep.notes += value_checks(prep, opts)
    return prep


def value_checks(prep: Prepared, opts: WidenOptions) -> list[str]:
    """The checks that read the input's values, piece by piece: tied tensors equal, dtypes the rescale
    needs, NaN/Inf (notes to add, or an error with --strict)."""
    check_tied(prep, opts)
    return check_values(prep, opts.strict, _check_elements(opts))


def check_tied(prep: Prepared, opts: WidenOptions) -> None:
    """Tied tensors hold the same values (compared piece by piece)."""
    for n, p in prep.plan.tensors.items():
        if p.alias_of and not same_values(prep.ckpt.tensors, n, p.alias_of, _check_elements(opts)):
            raise MupscaleError(f"tied tensors {n!r} and {p.alias_of!r} differ; they must hold the same values")


def _check_elements(opts: WidenOptions) -> int:
    """Elements per piece when the value checks read the input."""
    return max(1, min(opts.chunk_bytes, DEFAULT_CHUNK_BYTES) // 4)


def state_refs(prep: Prepared):
    """(tensor name, state key, state dict) of every mapped optimizer state entry; lazy entries unread."""
    if prep.omap is None:
        return
    sd = prep.ckpt.optimizer
    for g, names in zip(sd["param_groups"], prep.omap.names):
        for pid, n in zip(g["params"], names):
            st = sd["state"].get(pid, {})
            if not isinstance(st, (dict, LazyTensors)):
                raise MupscaleError(f"optimizer state of tensor {n!r} is a {type(st).__name__}, expected a dict "
                                    f"of state tensors; re-save the optimizer with opt.state_dict()")
            for key in st:
                yield n, key, st


def _nonfinite(m, name: str, chunk: int) -> int:
    """NaN/Inf count of m[name], read piece by piece."""
    _, dtype = tensor_meta(m, name)
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0
    return sum(count_nonfinite(x) for x in iter_chunks(m, name, chunk))


def count_nonfinite(x: torch.Tensor) -> int:
    """NaN/Inf values in x (0 for integer tensors; float8 looked at in float32: torch cannot sum it)."""
    if is_float8(x.dtype):
        x = x.float()
    if not (x.dtype.is_floating_point or x.dtype.is_complex) or bool(torch.isfinite(x.sum())):
        return 0  # a finite sum has no NaN/Inf term (fast); else count them
    return int((~torch.isfinite(x)).sum())


def scan_input(prep: Prepared, opts: WidenOptions) -> tuple[str, list[str]]:
    """The input's sha256 and the value checks (tied tensors equal; NaN/Inf: notes, or an error with
    --strict), for `widen` to run while it writes. A safetensors input is read once for both: the NaN
    check looks at each tensor's bytes as the digest goes over them."""
    labels: dict[tuple, str] = {}
    if isinstance(prep.ckpt.tensors, LazyTensors):
        for n, p in prep.plan.tensors.items():
            if not p.alias_of:
                labels[prep.ckpt.tensors.location(n)] = n
        for n, key, st in state_refs(prep):
            if key != "step" and isinstance(st, LazyTensors):
                labels[st.location(key)] = f"{n}/{key}"
    counts: dict[str, int] = {}

    def on_piece(path: Path, name: str, x: torch.Tensor) -> None:
        label = labels.get((path, name))
        if label is not None and (bad := count_nonfinite(x)):
            counts[label] = counts.get(label, 0) + bad

    given = opts.source_digest if prep.ckpt.kind != "sharded" else None
    digest = source_sha256(prep.ckpt, on_piece, hashing=given is None) if labels else None
    if digest is None:  # not a lazily read safetensors input: two passes
        notes = value_checks(prep, opts)
        return (given() if given else source_sha256(prep.ckpt)), notes
    if given is not None:
        digest = given()
    check_tied(prep, opts)
    order = [n for n, p in prep.plan.tensors.items() if not p.alias_of]
    order += [f"{n}/{key}" for n, key, _ in state_refs(prep) if key != "step"]
    return digest, _nonfinite_notes([(n, counts[n]) for n in order if counts.get(n)], opts.strict)


def check_state_layout(prep: Prepared) -> None:
    """Dtypes the rescale needs; optimizer state keys, dtypes and shapes (no values read)."""
    for n, p in prep.plan.tensors.items():
        _, dtype = tensor_meta(prep.ckpt.tensors, n)
        if not p.alias_of and not p.buffer and p.s != 1 and not dtype.is_floating_point:
            raise MupscaleError(f"tensor {n!r} has dtype {dtype} but its rule {p.rule!r} rescales it by {p.s}; "
                                f"store it as a float tensor or mark the rule 'buffer: true'")
        if not p.alias_of and not p.buffer and p.s != 1 and is_float8(dtype):
            raise MupscaleError(f"tensor {n!r} is {dtype} and its rule {p.rule!r} rescales it by {p.s}: float8 "
                                f"cannot hold the rescaled values exactly; cast the checkpoint to bfloat16 or "
                                f"float32 first (duplication alone, scale 1, is exact)")
    for n, key, st in state_refs(prep):
        if key == "step":
            continue
        check_state_key(key, n)
        if not isinstance(st, LazyTensors):
            v = st[key]
            if v is None:
                continue
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is "
                                    f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}, expected a "
                                    f"float tensor; re-save the optimizer with opt.state_dict()")
        shape, dtype = tensor_meta(st, key)
        if not dtype.is_floating_point:
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is {dtype}, expected a float tensor; "
                                f"re-save the optimizer with opt.state_dict()")
        p = prep.plan.tensors[n]
        if is_float8(dtype) and not p.buffer and p.g != 1:
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} is {dtype} and moves like the gradient "
                                f"(× {p.g ** STATE_POWER[key]}): float8 cannot hold that exactly; keep optimizer "
                                f"state in float32")
        if shape != prep.plan.tensors[n].shape:
            raise MupscaleError(f"optimizer state {key!r} of tensor {n!r} has shape {list(shape)}, the tensor "
                                f"has {list(prep.plan.tensors[n].shape)}; the optimizer belongs to another model")


def check_values(prep: Prepared, strict: bool, chunk: int = 1 << 22) -> list[str]:
    """NaN/Inf in the input, read piece by piece: warnings (returned as notes), an error with --strict.
    (Keys, dtypes and shapes: check_state_layout.)"""
    found: list[tuple[str, int]] = []
    for n, p in prep.plan.tensors.items():
        if not p.alias_of and (bad := _nonfinite(prep.ckpt.tensors, n, chunk)):
            found.append((n, bad))
    for n, key, st in state_refs(prep):
        if key == "step" or (not isinstance(st, LazyTensors) and st[key] is None):
            continue
        if bad := _nonfinite(st, key, chunk):
            found.append((f"{n}/{key}", bad))
    return _nonfinite_notes(found, strict)


def _nonfinite_notes(found: list[tuple[str, int]], strict: bool) -> list[str]:
    if found and strict:
        n, bad = found[0]
        more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
        raise MupscaleError(f"tensor {n!r} holds {bad} NaN/Inf value(s){more}; --strict refuses them: "
                            f"widen an earlier checkpoint, or drop --strict to widen them as they are")
    return [f"warning: tensor {n!r} holds {bad} NaN/Inf value(s), widened as they are (--strict makes this "
            f"an error)" for n, bad in found]


def output_bytes(prep: Prepared, out, dtype: torch.dtype | None = None) -> int:
    """Bytes of the widened tensors written to `out` (a path or a Target): model (aliases again in
    safetensors) + optimizer state; model tensors in `dtype` (--dtype) if given."""
    plan = prep.plan
    pt = (out.kind if isinstance(out, Target) else ("pt" if Path(out).suffix == ".pt" else "st")) == "pt"
    total = model_bytes(plan, dtype, aliases=not pt)
    for n, key, st in state_refs(prep):
        if isinstance(st, LazyTensors) or isinstance(st[key], torch.Tensor):
            shape, dt = tensor_meta(st, key)
            total += dt.itemsize * (1 if len(shape) == 0 else math.prod(plan.tensors[n].out_shape))
        elif key == "step" and not pt and _plain_step(st):
            total += 4  # a plain-number step, stored as a float32 0-d tensor
    return total


def model_bytes(plan: Plan, dtype: torch.dtype | None = None, aliases: bool = True, widened: bool = True) -> int:
    """Bytes of the model's tensors, widened (or as in the input), floating-point ones in `dtype` if given;
    tied aliases counted again unless `aliases` is False (a .pt stores them once)."""
    total = 0
    for p in plan.tensors.values():
        if p.alias_of and not aliases:
            continue
        size = dtype.itemsize if dtype is not None and p.dtype.is_floating_point else p.dtype.itemsize
        total += math.prod(p.out_shape if widened else p.shape) * size
    return total


def check_size(prep: Prepared, opts: WidenOptions) -> None:
    """A widened model no machine could hold (a --k far too large) is refused before anything else."""
    need = model_bytes(prep.plan, out_dtype(opts))
    if need > MAX_BYTES:
        raise MupscaleError(f"--k {opts.k}: the widened model would need {fmt_bytes(need)} (more than "
                            f"{fmt_bytes(MAX_BYTES)}); use a smaller --k")


def check_disk(out, prep: Prepared, dtype: torch.dtype | None = None) -> None:
    """Enough free space beside `out` for the whole output (plus 1 MiB for headers), before writing."""
    need = output_bytes(prep, out, dtype) + 2**20
    where = out.directory if isinstance(out, Target) else Path(out).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise MupscaleError(f"-o {out.shown if isinstance(out, Target) else out}: the output needs "
                            f"{fmt_bytes(need)} but {where} has only {fmt_bytes(free)} free; free some "
                            f"space, write elsewhere or use a smaller --k")


def clean_temps(out: Path, also: Callable[[str], bool] | None = None) -> list[str]:
    """Remove temporaries left beside `out` by killed runs; notes saying what was removed or kept."""
    removed, kept = clean_stale_temps(out, also=also)
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


def check_output(opts: WidenOptions) -> Target:
    """Where to write (-o, --shard-size), checked: never over the input, existing output only with --force."""
    out = opts.output
    if out is None:
        raise MupscaleError("missing -o/--output PATH (.safetensors or .pt, or a directory with --shard-size)")
    if opts.shard_size is not None:
        return _check_sharded_output(opts, out)
    if out.suffix not in OUT_SUFFIXES:
        more = " (or a directory with --shard-size)" if not out.suffix else ""
        raise MupscaleError(f"-o {out}: the output must end in .safetensors or .pt{more}")
    if out.exists() and opts.checkpoint.exists() and os.path.samefile(out, opts.checkpoint):  # links too
        raise MupscaleError(f"-o {out}: refusing to write over the input checkpoint")
    if out.exists() and is_sharded(opts.checkpoint) and any(
            f.exists() and os.path.samefile(out, f) for f in _input_files(opts.checkpoint)):
        raise MupscaleError(f"-o {out}: refusing to write over a file of the input checkpoint")
    if out.is_dir():
        raise MupscaleError(f"-o {out}: is a directory (pass --shard-size to write shards into it)")
    if out.exists() and not opts.force:
        raise MupscaleError(f"-o {out}: exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise MupscaleError(f"-o {out}: directory {out.parent} does not exist")
    return Target("pt" if out.suffix == ".pt" else "safetensors", out)


def _input_files(path: Path) -> list[Path]:
    if not is_sharded(path):
        return [path]
    try:
        index = sharded_index(path)
        wm = loads_json(index.read_text(), str(index)).get("weight_map", {})
        return [index] + [index.parent / f for f in sorted(set(wm.values())) if isinstance(f, str)]
    except (MupscaleError, OSError, ValueError, AttributeError):
        return []


def _check_sharded_output(opts: WidenOptions, out: Path) -> Target:
    size = parse_size(opts.shard_size) if isinstance(opts.shard_size, str) else opts.shard_size
    if not isinstance(size, int) or size <= 0:
        raise MupscaleError(f"--shard-size {opts.shard_size!r}: must be a positive size, e.g. 5GB or 500MiB")
    if out.suffix == ".pt":
        raise MupscaleError(f"-o {out}: --shard-size writes safetensors shards: give a directory or "
                            f"DIR/NAME.safetensors")
    if out.suffix == ".safetensors":
        directory, prefix = out.parent, out.name.removesuffix(".safetensors")
    else:
        directory, prefix = out, "model"
    if SHARD_NAME.match(f"{prefix}.safetensors") or not prefix:
        raise MupscaleError(f"-o {out}: {prefix!r} is not a usable shard prefix; name the output e.g. "
                            f"DIR/model.safetensors")
    t = Target("sharded", directory, prefix, size)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise MupscaleError(f"-o {out}: {directory} exists and is not a directory")
    if not directory.exists() and not directory.parent.is_dir():
        raise MupscaleError(f"-o {out}: directory {directory.parent} does not exist")
    if not directory.exists():
        return t
    # The directory is the output: it is built beside and swapped in whole, so it may hold nothing else.
    for f in _input_files(opts.checkpoint):
        if f.exists() and os.path.samefile(f.parent, directory):
            raise MupscaleError(f"-o {out}: refusing to write over the input checkpoint ({f.name} is in "
                                f"{directory}, which the sharded output replaces as a whole)")
    ours = _only_sharded_output(t, out)
    if ours and not opts.force:
        raise MupscaleError(f"-o {out}: {t.index_path} exists; pass --force to overwrite")
    return t


def _only_sharded_output(t: Target, out: Path) -> set[str]:
    """The files of an earlier sharded output in directory `t.path`; an error if it holds anything else
    (the sharded output replaces the whole directory)."""
    ours = sharded_files(t)
    try:
        others = sorted(p.name for p in t.path.iterdir() if p.name not in ours and TMP_MARKER not in p.name)
    except FileNotFoundError:
        return set()
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise MupscaleError(f"-o {out}: {t.path} holds files that are not part of a sharded output "
                            f"({', '.join(others[:3])}{more}); a sharded output replaces its whole directory: "
                            f"give a new or empty directory")
    return ours


def provenance(opts: WidenOptions, prep: Prepared, source_digest: str | None = None) -> dict:
    plan = prep.plan
    return {
        "tool": f"mupscale {__version__}",
        "source": prep.ckpt.path.name if prep.ckpt.kind not in ("sharded", "dcp") else
        f"{prep.ckpt.path.parent.name}/{prep.ckpt.path.name}",
        "source_sha256": source_digest if source_digest is not None else source_sha256(prep.ckpt),
        "spec": plan.spec.name,
        "spec_sha256": plan.spec.sha256,
        "readout": plan.spec.readout,
        "k": plan.k,
        "sizes": {n: plan.sizes[n] for n in plan.spec.sizes},
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
        t = widen_noised(prep.ckpt.tensors[c], prep.plan.tensors[c], s, seed, noise_device, dtype)
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
            return widen_range(lambda i0, i1: read_rows(tensors, n, i0, i1, alloc), p, a, b, sigma=sigma_of(opts, n),
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
        p = prep.plan.tensors[e.name]
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


def cap_threads(opts: WidenOptions) -> tuple[WidenOptions, list[str]]:
    """--threads at most the cores this process may use: more threads only add ranges in flight (memory
    grows with them, speed does not)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if opts.threads <= max(cores, 1):
        return opts, []
    return replace(opts, threads=max(cores, 1)), [f"--threads {opts.threads}: using {max(cores, 1)}, the cores "
                                                  f"available (more threads would only hold more memory)"]


def _plain_step(st) -> bool:
    """A state dict whose `step` is a plain number (not a tensor): torch's Adam accepts a 0-d tensor instead."""
    return not isinstance(st, LazyTensors) and isinstance(st.get("step"), (int, float)) and not isinstance(
        st.get("step"), bool)


def check_noise(prep: Prepared, opts: WidenOptions) -> None:
    """The noise std of every noised tensor must fit, with room, in the dtype it is drawn in (float32, or
    float64 for float64 tensors), the tensor's own and --dtype: else the output would hold Inf/NaN."""
    dtype = out_dtype(opts)
    for n, p in prep.plan.tensors.items():
        if p.alias_of or not p.noise_unit or not p.dtype.is_floating_point:
            continue
        s = sigma_of(opts, n)
        std = s * p.noise_unit
        if not std:
            continue
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        dts = {acc, p.dtype, dtype or p.dtype}
        limit = min(torch.finfo(d).max for d in dts) / 64  # a normal draw stays far below 64 standard deviations
        if not std <= limit:
            dt = min(dts, key=lambda d: torch.finfo(d).max)
            raise MupscaleError(f"σ̄ = {s:g} gives tensor {n!r} noise of std {std:.3g}, beyond what {dt} holds "
                                f"(max {torch.finfo(dt).max:.3g}): the output would hold Inf/NaN; use a smaller σ̄")


def run_widen(opts: WidenOptions, progress: Callable[[str, int], None] = lambda n, b: None) -> dict:
    """Widen `opts.checkpoint` into `opts.output`; returns a summary.
    `progress(name, nbytes)` is called as bytes are written; `progress.start(total_bytes)`, if it exists,
    once before."""
    t_start = time.perf_counter()
    from mupscale_cli.commands.widen_dcp import run_widen_dcp, wants_dcp
    opts = _with_format(opts)
    if wants_dcp(opts):
        return run_widen_dcp(opts, progress)
    target = check_output(opts)
    try:
        with claim(target.path):  # one writer per output
            return _run_widen(opts, target, progress, t_start)
    except OSError as e:
        raise env_error(e, f"-o {target.shown}") or e from None


def _run_widen(opts: WidenOptions, target: Target, progress, t_start: float) -> dict:
    if not opts.force and os.path.lexists(target.path) and (target.kind != "sharded" or sharded_files(target)):
        raise MupscaleError(f"-o {target.shown}: exists (written meanwhile by another run?); pass --force to "
                            f"overwrite")
    watch = InputWatch(_input_files(opts.checkpoint))  # size, mtime, inode: compared before the commit
    replace = opts.force  # an existing empty directory is replaced too, if it still holds nothing then
    if target.kind == "sharded" and target.path.is_dir() and not opts.force:
        replace = not any(target.path.iterdir())

    def before_commit() -> None:
        watch.check()
        if target.kind == "sharded" and target.path.is_dir():
            if _only_sharded_output(target, opts.output) and not opts.force:
                raise MupscaleError(f"-o {target.shown}: appeared while this output was written; pass --force "
                                    f"to overwrite")

    sigbus_names(str(opts.checkpoint))
    streamed = target.kind != "pt"
    prep = prepare(opts, lazy=True, defer_checks=streamed)
    watch.add(prep.ckpt.files)
    opts, note = cap_threads(opts)
    prep.notes += note
    if opts.hparams is not None or opts.base_lr is not None:
        opts = with_hparams(opts, prep)
    check_noise(prep, opts)
    found = check_optimizer(prep.ckpt.optimizer) if prep.omap is not None else []
    dtype = out_dtype(opts)
    prep.notes += clean_temps(target.path)
    check_disk(target, prep, dtype)
    plan, ckpt = prep.plan, prep.ckpt
    extra = dict(ckpt.extra)
    if prep.model_args is not None:
        extra["model_args"] = prep.model_args
    if opts.hparams_record and isinstance(extra.get("config"), dict) and "learning_rate" in extra["config"]:
        extra["config"] = {**extra["config"], "learning_rate": opts.hparams_record["lr"]}  # nanoGPT's schedule
    if hasattr(progress, "start"):
        progress.start(output_bytes(prep, target, dtype))
    names_out = _names_out(prep, target)
    if target.kind == "pt":
        osd = None
        if prep.omap is not None:
            osd = widen_optimizer(ckpt.optimizer, plan, prep.omap, names_out=names_out)
            osd["param_groups"] = scale_lr(osd["param_groups"], opts.lr_scale)
            check_widened(osd["param_groups"], found)
        produce = widen_tensors(prep, opts.sigma, opts.seed, opts.noise_device, dtype, opts.sigma_map)
        model = {}
        for n in plan.tensors:  # aliases share the canonical tensor, as in the input
            p = plan.tensors[n]
            model[n] = model[p.alias_of] if p.alias_of in model else produce(n)
            progress(n, model[n].numel() * model[n].element_size())
        if ckpt.model_key is not None or osd is not None:  # a plain state dict stays plain
            given = opts.source_digest if ckpt.kind != "sharded" else None
            extra["mupscale"] = provenance(opts, prep, given() if given else None)
        write_pt(target.path, ckpt, model, osd, extra, replace=replace, before_commit=before_commit)
        groups = None if osd is None else osd["param_groups"]
    else:
        groups, optim = optimizer_out(prep, names_out, opts.lr_scale)
        check_widened(groups, found)
        scan = Background(lambda: scan_input(prep, opts), "mupscale-scan")  # digest + checks, while writing
        try:
            write_streamed(target, model_out(prep, opts), optim, prep.omap.kind if prep.omap else None, groups,
                           provenance(opts, prep, source_digest=""), extra,
                           source_sha256=lambda: scan.result()[0], threads=opts.threads,
                           chunk_bytes=opts.chunk_bytes, on_bytes=progress, poll=scan.poll, replace=replace,
                           before_commit=before_commit)
        finally:
            scan.stop()  # joined on every path: no thread may be left inside torch at exit
        prep.notes += scan.result()[1]
    res = summary(prep, target.shown, opts, groups)
    res["output_bytes"] = output_bytes(prep, target, dtype)
    res["time_s"] = round(time.perf_counter() - t_start, 3)  # in this process: start-up not counted
    return res


FORMATS = ("dcp", "safetensors", "pt", "hf")


def _with_format(opts: WidenOptions) -> WidenOptions:
    """--format: dcp (a directory), safetensors or pt (-o's suffix must agree), hf (shards, 5GB unless
    --shard-size)."""
    fmt = opts.format
    if fmt is None:
        return opts
    if fmt not in FORMATS:
        raise MupscaleError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "hf":
        return opts if opts.shard_size is not None else replace(opts, shard_size="5GB")
    if fmt in ("safetensors", "pt") and opts.output is not None and opts.output.suffix != f".{fmt}":
        raise MupscaleError(f"-o {opts.output}: --format {fmt} writes a .{fmt} file; name the output *.{fmt}")
    if fmt == "dcp" and opts.shard_size is not None:
        raise MupscaleError("--shard-size writes Hugging Face shards; it does not apply to --format dcp")
    return opts


def with_hparams(opts: WidenOptions, prep: Prepared) -> WidenOptions:
    """opts with σ̄ (or per-tensor σ̄), lr_scale and their provenance from --hparams."""
    if opts.hparams is None:
        raise MupscaleError("--base-lr is the checkpoint's γ̄ for --hparams; it does nothing alone")
    if opts.base_lr is not None and not (math.isfinite(opts.base_lr) and opts.base_lr > 0):
        raise MupscaleError(f"--base-lr must be a positive number, got {opts.base_lr}")
    if opts.sigma:
        raise MupscaleError("--sigma and --hparams both set σ̄: give one of them")
    hp = resolve_hparams(opts.hparams, prep.ckpt, prep.plan, opts.base_lr)
    prep.notes += hp.notes
    if prep.omap is None:
        prep.notes.append(f"no optimizer state is written: use γ̄↑ = {hp.lr:g} from --hparams as the base "
                          f"learning rate (it is recorded in the provenance)")
    return replace(opts, sigma=hp.sigma, sigma_map=hp.sigma_map, lr_scale=hp.lr_scale, hparams_record=hp.record)


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
    }
