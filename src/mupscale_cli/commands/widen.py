"""`mupscale widen`: read → plan → validate → produce → write.

    prepare()        read the checkpoint (formats.READERS), choose the spec, plan every tensor, map the
                     optimizer ids, check layouts (core.checks)
    run_widen()      check the target (formats.output), then produce range by range (core.widen) and write
                     (formats.write, formats.hf), the value checks and input digest running beside the writer

The helpers other commands import (WidenOptions, Prepared, prepare, value_checks, check_output, ...) stay
importable from here."""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from mupscale_cli import __version__
from mupscale_cli.commands.hparams import resolve_hparams
from mupscale_cli.commands.prepare import (NO_EVIDENCE_DOC, _check_config_json_markers, _fill,  # noqa: F401
                                          _given_args, _marker, cap_threads, check_noise, detect_spec,
                                          evidence_places, prepare, recorded_spec, scan_input, with_hparams)
from mupscale_cli.commands.produce import (_names_out, _torch_empty, model_out, optimizer_out,  # noqa: F401
                                          provenance, summary, widen_tensors)
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.checks import (_check_elements, _nonfinite, _nonfinite_notes, _untracked_axes,  # noqa: F401
                                      check_state_layout, check_tied, check_values, count_nonfinite, model_bytes,
                                      state_refs, value_checks)
from mupscale_cli.core.job import (DTYPES, Prepared, WidenOptions, out_dtype, parse_sizes,  # noqa: F401
                                   sigma_of)
from mupscale_cli.core.optstate import (STATE_POWER, map_optimizer, optimizer_layout, optimizer_notes, scale_lr,
                                        widen_optimizer)
from mupscale_cli.core.plan import make_plan, parse_k
from mupscale_cli.core.spec import Spec, bundled_specs, load_spec, parse_spec, saved_name, shows_evidence
from mupscale_cli.core.checks import check_optimizer, check_widened, hparam_notes
from mupscale_cli.core.checks import _plain_step  # noqa: F401
from mupscale_cli.core.widen import widen_noised, widen_range
from mupscale_cli.bounded import int_text, loads_json, shown  # noqa: F401 (importable from here)
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats import hf, hf_trainer, load_checkpoint
from mupscale_cli.formats.checkpoint import (OPTIM_NS, Checkpoint, LazyTensors, provenance_of, read_rows,
                                             source_sha256, strip_prefix, tensor_meta)
from mupscale_cli.formats.output import (MAX_BYTES, OUT_SUFFIXES, _check_sharded_output, _input_files,  # noqa: F401
                                         _only_sharded_output, check_disk, check_output, check_size, clean_temps,
                                         missing_dirs, new_parents, output_bytes)
from mupscale_cli.formats.target import TMP_MARKER, InputWatch, claim, env_error, sigbus_names
from mupscale_cli.formats.write import (Background, OutTensor, Target, save_torch, sharded_files, write_pt,
                                         write_streamed)




































def single_writer_rank() -> int:
    """Under torchrun (WORLD_SIZE > 1, the environment checked by procgroup.check_env) this process's
    RANK, else 0. Only a DCP output is written by the ranks together; any other output (a Hugging Face
    directory, .safetensors, .pt, shards) has one writer: rank 0 writes it and speaks for all, every other rank
    returns at once, nothing read or written (exit 0: torchrun's result is rank 0's). The ranks used to race
    for the output's lock: the losers exit 2, torchrun exit 1."""
    from mupscale_cli.procgroup import check_env
    rank, world, _ = check_env()
    return rank if world > 1 else 0


def run_widen(opts: WidenOptions, progress: Callable[[str, int], None] = lambda n, b: None) -> dict:
    """Widen `opts.checkpoint` into `opts.output`; returns a summary.
    `progress(name, nbytes)` is called as bytes are written; `progress.start(total_bytes)`, if it exists,
    once before."""
    t_start = time.perf_counter()
    from mupscale_cli.commands.widen_dcp import run_widen_dcp, wants_dcp
    opts = _with_format(opts)
    if wants_dcp(opts):
        return run_widen_dcp(opts, progress)
    rank = single_writer_rank()
    if rank:
        return {"rank": rank, "output": None, "notes": []}
    target = check_output(opts)
    made = missing_dirs(target.path if target.kind == "sharded" else target.path.parent, f"-o {target.path}")
    # -o into new directories (a run layout: out-wide/ckpt.pt): created, and removed again if the write fails
    with new_parents(made, f"-o {target.shown}") as notes:
        with claim(target.path):  # one writer per output
            res = _run_widen(opts, target, progress, t_start)
    res["notes"] += notes
    return res


def _run_widen(opts: WidenOptions, target: Target, progress, t_start: float) -> dict:
    if not opts.force and os.path.lexists(target.path) and (target.kind != "sharded" or sharded_files(target)):
        raise MupscaleError(f"-o {target.shown}: exists (written meanwhile by another run?); pass --force to "
                            f"overwrite")
    watch = InputWatch(_input_files(opts.checkpoint))  # size, mtime, inode: compared before the commit
    replace = opts.force  # an existing empty directory is replaced too, if it still holds nothing then
    if target.kind == "sharded" and target.path.is_dir() and not opts.force:
        replace = all(TMP_MARKER in p.name for p in target.path.iterdir())  # empty, or old temporaries

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
    if prep.config is not None and "config" in extra:
        extra["config"] = prep.config
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
    elif target.kind == "hf":
        groups = write_hf(target, prep, opts, progress, replace, before_commit)
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


def write_hf(target: Target, prep: Prepared, opts: WidenOptions, progress, replace: bool,
             before_commit: Callable[[], None]) -> list[dict] | None:
    """A Hugging Face directory: weights streamed (one file, or shards with --shard-size), config.json
    rewritten, the other files copied; a Trainer checkpoint's optimizer.pt and scheduler.pt widened."""

    def weights(tmp: Path) -> None:
        inner = (Target("sharded", tmp, "model", target.shard_size) if target.shard_size else
                 Target("safetensors", tmp / hf.WEIGHTS))
        write_streamed(inner, model_out(prep, opts), [], None, None, provenance(opts, prep, source_digest=""), {},
                       source_sha256=lambda: scan.result()[0], threads=opts.threads, chunk_bytes=opts.chunk_bytes,
                       on_bytes=progress, poll=scan.poll)
    files, groups = trainer_files(prep, opts, target)  # before the scan thread: an error here leaves none running
    scan = Background(lambda: scan_input(prep, opts), "mupscale-scan")  # digest + checks, while writing
    try:
        prep.notes += hf.write(target.path, weights, hf.out_config(prep.model_args, opts.dtype), prep.ckpt.hf,
                               files, skip={hf.OPTIMIZER, hf.SCHEDULER}, replace=replace,
                               before_commit=before_commit)
    finally:
        scan.stop()  # joined on every path: no thread may be left inside torch at exit
    prep.notes += scan.result()[1]
    return groups


def trainer_files(prep: Prepared, opts: WidenOptions, target: Target) -> tuple[dict, list[dict] | None]:
    """optimizer.pt and scheduler.pt of a Trainer checkpoint, widened (none for a model directory)."""
    src = prep.ckpt.hf
    if not src.trainer:
        return {}, None
    if prep.omap is None:
        prep.notes.append("optimizer.pt and scheduler.pt not written (no optimizer state widened): the output "
                          "is a model directory")
        return {}, None
    mapped = {n for names in prep.omap.names for n in names}
    if any(n not in mapped and not prep.plan.tensors[n].stateless for n in prep.plan.params):
        raise MupscaleError(f"{src.path}: --untie adds a parameter the Trainer's optimizer state has no entry for; "
                            f"widen the model only (--no-optimizer) and start a new optimizer")
    spec = prep.plan.spec  # param_names as the model names them
    osd = widen_optimizer(prep.ckpt.optimizer, prep.plan, prep.omap,
                          names_out=lambda n: saved_name(spec, n, reverse=True))
    osd["param_groups"] = scale_lr(osd["param_groups"], opts.lr_scale)
    sched = (hf_trainer.widen_scheduler(src.path, osd["param_groups"], prep.ckpt.optimizer["param_groups"])
             if (src.path / hf.SCHEDULER).is_file() else None)
    files = {hf.OPTIMIZER: lambda p: save_torch(osd, p, f"-o {target.path / hf.OPTIMIZER}")}
    if sched is not None:
        files[hf.SCHEDULER] = lambda p: save_torch(sched, p, f"-o {target.path / hf.SCHEDULER}")
    if len(osd["param_groups"]) != len(prep.ckpt.optimizer["param_groups"]):
        prep.notes.append(f"optimizer groups split {len(prep.ckpt.optimizer['param_groups'])} -> "
                          f"{len(osd['param_groups'])} for per-tensor Table-1 factors: resume with a "
                          f"create_optimizer built from optimizer.pt (docs/formats.md 'Trainer checkpoints')")
    return files, osd["param_groups"]






