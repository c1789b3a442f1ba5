"""Where `widen` writes: the -o / --shard-size target checked before any work (never over the input, an
existing output only with --force, a sharded or Hugging Face directory replaced whole), the bytes it will
take and the free space beside it, stale temporaries of killed runs. (How the output then appears at once:
target.py.)"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mupscale_cli.core.checks import _plain_step, model_bytes, state_refs
from mupscale_cli.core.job import Prepared, WidenOptions, out_dtype
from mupscale_cli.bounded import loads_json
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.checkpoint import LazyTensors, is_sharded, sharded_index, tensor_meta
from mupscale_cli.formats.safetensors import fmt_bytes, parse_size
from mupscale_cli.formats.target import TMP_MARKER, check_not_over_input, env_error
from mupscale_cli.formats.write import SHARD_NAME, Target, clean_stale_temps, sharded_files


OUT_SUFFIXES = (".safetensors", ".pt")


MAX_BYTES = 2**60  # 1 EiB: a widened model larger than this is a mistaken --k


def check_size(prep: Prepared, opts: WidenOptions) -> None:
    """A widened model no machine could hold (a --k far too large) is refused before anything else."""
    need = model_bytes(prep.plan, out_dtype(opts))
    if need > MAX_BYTES:
        raise MupscaleError(f"--k {opts.k}: the widened model would need {fmt_bytes(need)} (more than "
                            f"{fmt_bytes(MAX_BYTES)}); use a smaller --k")


def output_bytes(prep: Prepared, out, dtype: torch.dtype | None = None) -> int:
    """Bytes of the widened tensors written to `out` (a path or a Target): model (aliases again in
    safetensors) + optimizer state; model tensors in `dtype` (--dtype) if given."""
    plan = prep.plan
    pt = (out.kind if isinstance(out, Target) else ("pt" if Path(out).suffix == ".pt" else "st")) == "pt"
    total = model_bytes(plan, dtype, aliases=not pt)
    for n, key, st in state_refs(prep):
        if isinstance(st, LazyTensors) or isinstance(st[key], torch.Tensor):
            shape, dt = tensor_meta(st, key)
            total += dt.itemsize * (1 if len(shape) == 0 else math.prod(plan.state_plan(n).out_shape))
        elif key == "step" and not pt and _plain_step(st):
            total += 4  # a plain-number step, stored as a float32 0-d tensor
    return total


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


def check_output(opts: WidenOptions) -> Target:
    """Where to write (-o, --shard-size), checked: never over the input, existing output only with --force."""
    out = opts.output
    if out is None:
        raise MupscaleError("missing -o/--output PATH (.safetensors or .pt, or a directory with --shard-size)")
    from mupscale_cli.formats import hf
    check_not_over_input(out, opts.checkpoint)
    if hf.claims(opts.checkpoint) and out.suffix not in OUT_SUFFIXES:
        return _check_hf_output(opts, out)
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
    missing_dirs(out.parent, f"-o {out}")
    return Target("pt" if out.suffix == ".pt" else "safetensors", out)


def missing_dirs(d: Path, what: str) -> list[Path]:
    """The directories of `d` that do not exist yet, outermost first (widen creates them, and removes them
    again if the write fails); an ancestor that is a file is an error."""
    missing = []
    while not d.exists():
        missing.append(d)
        if d == d.parent:
            break
        d = d.parent
    if not d.is_dir():
        raise MupscaleError(f"{what}: {d} is not a directory")
    return missing[::-1]


@contextmanager
def new_parents(made: list[Path], shown: str) -> Iterator[list[str]]:
    """The block that writes an output whose missing directories `made` (missing_dirs) it creates first:
    removed again if the block fails, however (error, signal); an OSError is the one-line environment error
    naming `shown`. Yields the notes to add on success ("created directory ...")."""
    notes: list[str] = []
    try:
        if made:
            made[-1].mkdir(parents=True)
        yield notes
        if made:
            notes.append(f"created directory {made[0]}")
    except BaseException as e:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        if isinstance(e, OSError):
            raise env_error(e, shown) or e from None
        raise


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
    missing_dirs(directory, f"-o {out}")
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


def _check_hf_output(opts: WidenOptions, out: Path) -> Target:
    """A Hugging Face directory in, a directory out: config.json, weights (shards with --shard-size) and the
    other files, written beside `out` and renamed onto it."""
    size = None
    if opts.shard_size is not None:
        size = parse_size(opts.shard_size) if isinstance(opts.shard_size, str) else opts.shard_size
        if not isinstance(size, int) or size <= 0:
            raise MupscaleError(f"--shard-size {opts.shard_size!r}: must be a positive size, e.g. 5GB or 500MiB")
    if out.exists() and os.path.samefile(out, opts.checkpoint):
        raise MupscaleError(f"-o {out}: refusing to write over the input directory")
    if out.exists() and not out.is_dir():
        raise MupscaleError(f"-o {out}: exists and is not a directory (a Hugging Face directory is written there)")
    if out.exists() and not opts.force:
        raise MupscaleError(f"-o {out}: exists; pass --force to replace it")
    if out.resolve().is_relative_to(opts.checkpoint.resolve()):
        raise MupscaleError(f"-o {out}: inside the input directory; write beside it")
    missing_dirs(out.parent, f"-o {out}")
    return Target("hf", out, "model", size)
