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
                                         missing_dirs, output_bytes)
from mupscale_cli.formats.target import TMP_MARKER, InputWatch, claim, env_error, sigbus_names
from mupscale_cli.formats.write import (Background, OutTensor, Target, save_torch, sharded_files, write_pt,
                                         write_streamed)


NO_EVIDENCE_DOC = "docs/stacks.md"


def recorded_spec(ckpt: Checkpoint) -> Spec | None:
    """The spec an output of ours was widened with: its recorded text, else the bundled spec of its name."""
    prov = provenance_of(ckpt)
    text, name = prov.get("spec_text"), prov.get("spec")
    if isinstance(text, str) and text:
        return parse_spec(text, f"recorded:{name}", name=str(name) if name else None)
    if isinstance(name, str):
        by_name = {s.name: s for s in bundled_specs()}
        if name in by_name:
            return by_name[name]
    return None


def evidence_places(ckpt: Checkpoint) -> dict[str, dict | None]:
    cfg = ckpt.extra.get("config")
    return {"model_args": ckpt.model_args, "config": cfg if isinstance(cfg, dict) else None,
            "config_json": getattr(ckpt, "config_json", None)}


def detect_spec(ckpt: Checkpoint, k: dict[str, int], sizes: dict[str, int]) -> Spec:
    """The spec of a checkpoint given no --spec: the one its provenance records (our outputs), else the one
    bundled spec that covers every tensor AND whose evidence the checkpoint shows (model_args / config
    markers). Names and shapes alone never choose a parametrization."""
    rec = recorded_spec(ckpt)
    if rec is not None:
        return rec
    fits, why = [], {}
    for spec in bundled_specs():
        if not spec.detect:
            continue
        try:
            # a tied summing readout is refused later, by prepare, with its own message
            make_plan(spec, ckpt.shapes(), {"*": 1}, ckpt.model_args, sizes, untie=bool(spec.untie))
        except MupscaleError as e:
            why[spec.name] = str(e)
            continue
        fits.append(spec)
    places = evidence_places(ckpt)
    shown = [s for s in fits if shows_evidence(s, places)]
    refusing = [s for s in shown if s.refuse]
    if refusing and len(shown) > 1:  # a refusal's markers are narrower than its exact sibling's (model_type)
        shown = refusing[:1]
    if len(shown) == 1:
        if shown[0].refuse:
            raise MupscaleError(f"{ckpt.path.name} is {shown[0].name}: {shown[0].refuse['reason']} "
                                f"(see {shown[0].refuse.get('doc', NO_EVIDENCE_DOC)})")
        return shown[0]
    if len(shown) > 1:
        raise MupscaleError(f"several bundled specs cover {ckpt.path.name} and its markers "
                            f"({', '.join(s.name for s in shown)}); pass --spec NAME")
    if fits:
        cands = ", ".join(s.name + (f" (marker {_marker(s)})" if s.evidence else "") for s in fits)
        raise MupscaleError(
            f"{ckpt.path.name}: names and shapes fit {cands}, but it shows no evidence of its parametrization, and "
            f"names and shapes alone cannot tell (standard nanoGPT and the μP GPT-2 look the same on disk): if it "
            f"is μP, pass --spec {fits[0].name} (or your own spec); a tied readout under standard "
            f"parametrization (stock nanoGPT, Hugging Face "
            f"GPT-2) has no exact widening (see {NO_EVIDENCE_DOC})")
    detail = "; ".join(f"{n}: {w}" for n, w in why.items())
    raise MupscaleError(f"no bundled spec covers {ckpt.path.name} ({detail}); pass --spec FILE")


def _check_config_json_markers(spec: Spec, ckpt: Checkpoint) -> None:
    """--spec NAME on a Hugging Face directory: a spec whose markers are all config.json's (model_type,
    multi_query, alibi, ...) describes only the layouts they name; config.json is the model transformers builds,
    so a spec whose markers it contradicts would widen another architecture (exit 0, not the same function)."""
    cj = getattr(ckpt, "config_json", None)
    alts = spec.evidence
    if not isinstance(cj, dict) or not alts or not all(k.startswith("config_json.") for a in alts for k in a):
        return
    if spec.refuse and shows_evidence(spec, evidence_places(ckpt)):
        raise MupscaleError(f"{ckpt.path.name} is {spec.name}: {spec.refuse['reason']} "
                            f"(see {spec.refuse.get('doc', NO_EVIDENCE_DOC)})")
    if not shows_evidence(spec, evidence_places(ckpt)):
        raise MupscaleError(f"--spec {spec.name} describes config.json with {_marker(spec)}, but "
                            f"{ckpt.path.name}'s config.json has model_type {cj.get('model_type')!r}"
                            + "".join(f", {k.partition('.')[2]} {cj.get(k.partition('.')[2])!r}"
                                      for k in spec.evidence[0] if k != "config_json.model_type")
                            + "; that is another architecture: omit --spec to let config.json choose")


def _marker(spec: Spec) -> str:
    return " and ".join(f"{k}={v!r}" for k, v in spec.evidence[0].items())


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
    given = _given_args(ckpt, opts.model_args)
    if isinstance(opts.spec, Spec):
        spec = opts.spec
    else:
        spec = load_spec(opts.spec) if opts.spec else detect_spec(ckpt, k, opts.sizes)
        if opts.spec:
            _check_config_json_markers(spec, ckpt)
    cfg = ckpt.extra.get("config") if isinstance(ckpt.extra.get("config"), dict) else None
    plan = make_plan(spec, ckpt.shapes(), k, ckpt.model_args, opts.sizes, ckpt.tensors, config=cfg,
                     untie=opts.untie)
    omap, notes = None, given + list(plan.notes)
    if ckpt.optimizer is not None and opts.untie:
        notes.append("--untie: the optimizer state of the tied tensor does not describe two untied ones (their "
                     "training differs from the tied base's): weights only")
    elif ckpt.optimizer is not None and not opts.no_optimizer:
        omap = map_optimizer(ckpt.optimizer, plan, opts.optimizer, opts.opt_layout, ckpt.strip)
        notes += optimizer_notes(ckpt.optimizer, plan, omap)
        notes += hparam_notes(check_optimizer(ckpt.optimizer), opts.strict)
    elif ckpt.optimizer is None:
        notes.append("no optimizer state in the checkpoint: weights only")
    notes += _untracked_axes(plan, ckpt.model_args)
    wide_args = plan.model_args(ckpt.model_args)
    notes += [n for n in spec.notes]
    if spec.resume_note:
        notes.append(_fill(spec.resume_note, wide_args, plan.config(cfg)))
    notes += [f"warning: {k!r} looks like an LR scheduler's state: it is copied as it is, its base_lrs not "
              f"rescaled; rebuild the scheduler on the widened optimizer (base_lrs come from each group's "
              f"initial_lr, which is rescaled)" for k, v in ckpt.extra.items() if isinstance(v, dict) and "base_lrs" in v]
    prep = Prepared(ckpt, plan, omap, wide_args, notes, plan.config(cfg))
    check_size(prep, opts)
    check_state_layout(prep)
    if not defer_checks:
        prep.notes += value_checks(prep, opts)
    return prep


def _given_args(ckpt, args: dict) -> list[str]:
    """--model-arg entries laid over the checkpoint's model_args (a DCP or plain safetensors checkpoint stores
    none; a user who gives one is believed); a note for each that replaces a different stored value."""
    if not args:
        return []
    stored = dict(ckpt.model_args or {})
    notes = [f"--model-arg {a}={v!r} replaces the checkpoint's model_args {a} = {stored[a]!r}"
             for a, v in args.items() if a in stored and stored[a] != v]
    ckpt.extra = {**ckpt.extra, "model_args": {**stored, **args}}
    return notes


def _fill(text: str, args: dict | None, cfg: dict | None) -> str:
    """A spec's note with {model_args.KEY} / {config.KEY} filled from the widened values."""
    def sub(m):
        place, key = m[1], m[2]
        d = args if place == "model_args" else cfg
        return str(d[key]) if isinstance(d, dict) and key in d else m[0]
    return re.sub(r"\{(model_args|config)\.(\w+)\}", sub, text)


def scan_input(prep: Prepared, opts: WidenOptions) -> tuple[str, list[str]]:
    """The input's sha256 and the value checks (tied tensors equal; NaN/Inf: notes, or an error with
    --strict), for `widen` to run while it writes. A safetensors input is read once for both: the NaN
    check looks at each tensor's bytes as the digest goes over them."""
    labels: dict[tuple, str] = {}
    if isinstance(prep.ckpt.tensors, LazyTensors):
        for n, p in prep.plan.tensors.items():
            if not p.alias_of and not p.source:
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
    order = [n for n, p in prep.plan.tensors.items() if not p.alias_of and not p.source]
    order += [f"{n}/{key}" for n, key, _ in state_refs(prep) if key != "step"]
    return digest, _nonfinite_notes([(n, counts[n]) for n in order if counts.get(n)], opts.strict)


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
    made = missing_dirs(target.path if target.kind == "sharded" else target.path.parent, f"-o {target.path}")
    try:
        if made:  # -o into new directories (a run layout: out-wide/ckpt.pt); removed again if the write fails
            made[-1].mkdir(parents=True)
        with claim(target.path):  # one writer per output
            res = _run_widen(opts, target, progress, t_start)
        if made:
            res["notes"].append(f"created directory {made[0]}")
        return res
    except OSError as e:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise env_error(e, f"-o {target.shown}") or e from None
    except BaseException:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise


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
    sched = hf_trainer.widen_scheduler(src.path, osd["param_groups"]) if (src.path / hf.SCHEDULER).is_file() else None
    files = {hf.OPTIMIZER: lambda p: save_torch(osd, p, f"-o {target.path / hf.OPTIMIZER}")}
    if sched is not None:
        files[hf.SCHEDULER] = lambda p: save_torch(sched, p, f"-o {target.path / hf.SCHEDULER}")
    if len(osd["param_groups"]) != len(prep.ckpt.optimizer["param_groups"]):
        prep.notes.append(f"optimizer groups split {len(prep.ckpt.optimizer['param_groups'])} -> "
                          f"{len(osd['param_groups'])} for per-tensor Table-1 factors: resume with a "
                          f"create_optimizer built from optimizer.pt (README 'Trainer checkpoints')")
    return files, osd["param_groups"]


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
