"""`mupscale widen` into a distributed checkpoint (DCP), in one process or under torchrun.

The output keeps the input's layout (model under `model.` or at the top, optimizer nested or flattened per
tensor, every other entry carried over), so the training job at the new width resumes with `dcp.load` into
its FSDP2-sharded model and optimizer at any world size, then `set_state_dict`. Learning-rate schedulers'
per-group `base_lrs` / `_last_lr` follow the widened groups. A top-level `mupscale` entry holds the
provenance (JSON); `dcp.load` ignores entries the job does not ask for.

Tensors are made and written in row blocks (one DCP chunk each, 64 × --chunk-size bytes). Under torchrun
(WORLD_SIZE > 1) the ranks share the blocks (largest first, each to the least loaded rank), each makes and
writes its own, and DCP's collective save writes the one `.metadata` on rank 0 once all have written. Every
rank writes into one temporary directory beside OUT (rank 0's `formats.target.temp_name`); rank 0 holds the
output's claim and commits it (`commit_path`) after the save: nothing is at OUT before that, whatever rank
dies."""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from mupscale_cli.commands.prepare import prepare, with_hparams
from mupscale_cli.commands.produce import model_out, optimizer_out, provenance, summary
from mupscale_cli.core.checks import _nonfinite_notes
from mupscale_cli.core.job import WidenOptions
from mupscale_cli.formats.output import OUT_SUFFIXES, check_disk, clean_temps, missing_dirs, new_parents
from mupscale_cli.core.plan import same_values
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.checkpoint import OPTIM_NS, strip_prefix
from mupscale_cli.formats.dcp import PROVENANCE_KEY, DcpLayout, is_dcp
from mupscale_cli.formats.dcp_save import placeholder, row_blocks, save_lazy, set_path
from mupscale_cli.formats.target import (InputWatch, check_not_over_input, claim, commit_path, fsync_dir,
                                         temp_name, track, untrack)

SCHED_LISTS = ("base_lrs", "_last_lr")
BLOCK_CHUNKS = 64  # a DCP chunk (one write, one read unit) is 64 × --chunk-size: 512 MiB by default


def wants_dcp(opts: WidenOptions) -> bool:
    """DCP output: --format dcp, or a DCP input written to a directory (no --shard-size, no file suffix)."""
    fmt = getattr(opts, "format", None)
    if fmt is not None:
        return fmt == "dcp"
    return (opts.output is not None and opts.shard_size is None and opts.output.suffix not in OUT_SUFFIXES
            and is_dcp(opts.checkpoint))


def dist_env() -> tuple[int, int, bool]:
    """(rank, world size, distributed): torchrun's environment starts a gloo group (the widening runs on
    CPU tensors; DCP's collectives carry only plans and metadata), checked and bounded by procgroup."""
    from mupscale_cli.procgroup import start
    rank, world = start("gloo")
    return rank, world, world > 1


def share(sizes: dict, world: int) -> dict:
    """unit -> rank: largest first, each to the least loaded rank (ties: lowest rank); deterministic."""
    load = [0] * world
    out = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[key] = r
        load[r] += sizes[key]
    return out


def _check_target(opts: WidenOptions) -> Path:
    out = opts.output
    if out is None:
        raise MupscaleError("missing -o/--output DIR (a DCP output is a directory)")
    if out.suffix in OUT_SUFFIXES:
        raise MupscaleError(f"-o {out}: a DCP output is a directory; drop the suffix, or pass --format "
                            f"safetensors|pt|hf for a file output")
    check_not_over_input(out, opts.checkpoint)
    if out.exists() and not out.is_dir():
        raise MupscaleError(f"-o {out}: exists and is not a directory")
    if out.exists() and not opts.force:
        raise MupscaleError(f"-o {out}: exists; pass --force to replace it")
    return out


def run_widen_dcp(opts: WidenOptions, progress=lambda n, b: None) -> dict:
    rank, world, distributed = dist_env()
    out = _check_target(opts)
    # -o in directories that do not exist yet: rank 0 creates them (the other ranks write there only after
    # rank 0 broadcast the temporary's name) and removes them again if the write fails, as for every output
    made = missing_dirs(out.parent, f"-o {out}") if rank == 0 else []
    with new_parents(made, f"-o {out}") as notes:
        if rank != 0:
            return _run(opts, progress, out, rank, world, distributed)
        with claim(out):  # one writer per output (rank 0 holds it for all ranks)
            res = _run(opts, progress, out, rank, world, distributed)
    res["notes"] += notes
    return res


def _run(opts: WidenOptions, progress, out: Path, rank: int, world: int, distributed: bool) -> dict:
    t0 = time.perf_counter()
    prep = prepare(opts, lazy=True, defer_checks=True)
    watch = InputWatch(prep.ckpt.files)  # size, mtime, inode of every input file: compared before the commit
    if rank == 0:
        check_disk(out, prep)  # free space beside -o for the whole output (every rank writes there)
    if opts.hparams is not None or opts.base_lr is not None:
        opts = with_hparams(opts, prep)
    plan, ckpt = prep.plan, prep.ckpt
    for n, p in plan.tensors.items():
        if p.alias_of and not same_values(ckpt.tensors, n, p.alias_of, 1 << 20):
            raise MupscaleError(f"tied tensors {n!r} and {p.alias_of!r} differ; they must hold the same values")
    reader, lay = ckpt.source if ckpt.kind == "dcp" else (None, DcpLayout(
        "model", "optim" if prep.omap is not None else None, False))
    if rank == 0:
        prep.notes += clean_temps(out)

    tree: dict = {}
    rows: dict = {}  # flattened key -> (shape, itemsize, fn(r0, r1) -> rows [r0, r1) of the output tensor)
    labels: dict[str, str] = {}  # flattened key -> name in NaN notes

    def put(path: tuple, shape, dtype, fn, label: str | None = None) -> None:
        key = ".".join(str(x) for x in path)
        set_path(tree, path, placeholder(tuple(shape), dtype))
        rows[key] = (tuple(shape), dtype.itemsize, fn)
        if label:
            labels[key] = label

    def of_out(o):  # rows of an OutTensor (made from flat element ranges)
        shape = tuple(o.shape)
        row = math.prod(shape[1:]) if shape else 1
        return lambda r0, r1, alloc=None: o.make(r0 * row, r1 * row, alloc).reshape((r1 - r0, *shape[1:])
                                                                                  if shape else ())

    # model
    made = {o.name: o for o in model_out(prep, opts)}
    for n, p in plan.tensors.items():
        o = made[p.alias_of or n]
        fqn = ckpt.original.get(n, n)
        path = (lay.model_root, fqn) if lay.model_root else (fqn,)
        put(path, o.shape, made[n].dtype, of_out(o), None if p.alias_of else n)

    # optimizer
    groups = None
    if prep.omap is not None:
        raw = {strip_prefix(r): r for g in ckpt.optimizer["param_groups"] for r in g.get("param_names", [])}
        groups, optim = optimizer_out(prep, lambda n: n, opts.lr_scale)
        root = lay.optim_root
        for o in optim:
            cname, _, sk = o.name.removeprefix(OPTIM_NS).rpartition("/")
            fqn = raw.get(cname, ckpt.original.get(cname, cname))
            path = (root, f"state.{fqn}.{sk}") if lay.flat_optim else (root, "state", fqn, sk)
            put(path, o.shape, o.dtype, of_out(o), None if sk == "step" else f"{cname}/{sk}")
        for i, g in enumerate(groups):
            hps = {h: v for h, v in g.items() if h not in ("params", "param_names")}
            fqns = [raw.get(c, ckpt.original.get(c, c)) for c in g["param_names"]]
            if lay.flat_optim:
                for fqn in fqns:
                    for h, v in hps.items():
                        set_path(tree, (root, f"param_groups.{fqn}.{h}"), v)
            else:
                for h, v in hps.items():
                    set_path(tree, (root, "param_groups", i, h), v)
                set_path(tree, (root, "param_groups", i, "params"), fqns)
        if lay.flat_optim and len(groups) > 1:
            prep.notes.append(f"the widened optimizer needs {len(groups)} param groups of tensors with the same "
                              f"hyper-parameters: set_state_dict takes each group's values from its first "
                              f"tensor, so build the resuming optimizer's groups the same way")

    # other entries: carried over (schedulers' per-group lists follow the widened groups)
    if reader is not None:
        for k in lay.other:
            path = reader.paths[k]
            if reader.is_tensor(k):
                info = reader.info(k)
                put(path, info.shape, info.dtype, lambda r0, r1, alloc=None, k=k: reader.read_rows(k, r0, r1, alloc))
            else:
                set_path(tree, path, _scheduler(reader, k, path, reader.value(k), ckpt.optimizer, groups))
    prov = provenance(opts, prep, source_digest="")
    prov.pop("source_sha256", None)
    set_path(tree, (PROVENANCE_KEY,), json.dumps({**prov, "format": "dcp"}, sort_keys=True))

    # work units: row blocks of at most `block` bytes, largest first, each to the least loaded rank
    block = max(1, opts.chunk_bytes) * BLOCK_CHUNKS
    units = {(key, r0, r1): max(1, (r1 - r0) * math.prod(shape[1:])) * size if shape else size
             for key, (shape, size, _) in rows.items() for r0, r1 in row_blocks(shape, size, block)}
    owner = share(units, world)
    mine: dict[str, list[tuple[int, int]]] = {}
    for (key, r0, r1), r in owner.items():
        if r == rank:
            mine.setdefault(key, []).append((r0, r1))
    if hasattr(progress, "start"):
        progress.start(sum(b for (key, r0, r1), b in units.items() if owner[(key, r0, r1)] == rank))
    counts: dict[str, int] = {}

    def seen(key: str, t: torch.Tensor) -> None:
        progress(key, t.numel() * t.element_size())

    lock = threading.Lock()

    def check(key: str, piece: torch.Tensor) -> None:  # in the threads that make the pieces
        if key in labels and piece.is_floating_point() and not bool(torch.isfinite(piece.sum())):
            n = int((~torch.isfinite(piece)).sum())
            with lock:
                counts[labels[key]] = counts.get(labels[key], 0) + n

    tmp = _tmp_name(out, distributed)
    if rank == 0:
        track(tmp)
    try:
        short = save_lazy(tree, mine, lambda key, r0, r1, alloc=None: rows[key][2](r0, r1, alloc), tmp, distributed,
                          rank, seen,
                          threads=_threads(opts.threads), piece_bytes=max(1, opts.chunk_bytes), on_piece=check)
        if distributed:  # every rank learns every rank's counts, and whether its files hold what it made
            import torch.distributed as td
            every: list = [None] * world
            td.all_gather_object(every, (counts, short))
            counts = {}
            for c, why in every:
                short = short or why
                for k, v in c.items():
                    counts[k] = counts.get(k, 0) + v
        if short:
            raise MupscaleError(f"-o {out}: the DCP checkpoint came out short ({short}); nothing was written; "
                                f"report it with your torch version ({torch.__version__})")
        order = [labels[k] for k in labels if labels[k] in counts]
        prep.notes += _nonfinite_notes([(n, counts[n]) for n in order], opts.strict)
        watch.check()
        if rank == 0:  # every rank's files are written and fsynced (DCP's sync_files), .metadata too
            fsync_dir(tmp)
            commit_path(tmp, out, opts.force)
    except BaseException as e:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> exception
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            if isinstance(first, tuple):  # (exception, traceback) in some versions
                first = first[0]
            if isinstance(first, MupscaleError):
                raise first from None
            e = first if isinstance(first, BaseException) else e
        if isinstance(e, (MupscaleError, KeyboardInterrupt, SystemExit)) or os.environ.get("MUPSCALE_DEBUG"):
            raise
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MupscaleError(f"-o {out}: writing the DCP checkpoint failed ({type(e).__name__}: {text}); "
                            f"nothing was written") from None
    finally:
        untrack(tmp)
        if distributed:
            import torch.distributed as td
            try:
                td.barrier()
            except Exception:  # noqa: BLE001 - a peer is gone: the error above says why
                pass
    sizes = units
    res = summary(prep, out, opts, groups)
    res["format"] = "dcp"
    res["ranks"] = world
    res["rank"] = rank
    res["output_bytes"] = sum(sizes.values())
    res["time_s"] = round(time.perf_counter() - t0, 3)
    return res


def _threads(asked: int) -> int:
    """--threads, at most this rank's share of the cores (torchrun's ranks on one machine share them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(asked, cores // local))


def _tmp_name(out: Path, distributed: bool) -> Path:
    """Rank 0's temporary directory name beside `out` (`.<name>.mupscale-tmp-<pid>-<random>`), on every rank."""
    name = temp_name(out).name
    if distributed:
        import torch.distributed as td
        box = [name]
        td.broadcast_object_list(box, src=0)
        name = box[0]
    return out.parent / name


def _scheduler(reader, key: str, path: tuple, value, osd: dict | None, groups: list[dict] | None):
    """A scheduler's per-group list (base_lrs, _last_lr) for the widened groups: each widened group takes
    its source group's entry × the group's lr factor; any other value as it was."""
    if not (path and path[-1] in SCHED_LISTS and isinstance(value, list) and osd is not None and groups):
        return value
    src = osd["param_groups"]
    if len(value) != len(src):
        raise MupscaleError(f"{reader.root}: {key} has {len(value)} entries for {len(src)} optimizer param groups; "
                            f"mupscale cannot tell which group each belongs to (pass --no-optimizer, or save "
                            f"the scheduler with one entry per group)")
    where = {strip_prefix(n): i for i, g in enumerate(src) for n in g["param_names"]}
    out = []
    for g in groups:
        i = where[g["param_names"][0]]
        lr0, lr1 = src[i].get("lr"), g.get("lr")
        f = (float(lr1) / float(lr0)) if isinstance(lr0, (int, float)) and lr0 and lr1 is not None else 1.0
        out.append(value[i] * f)
    return out
