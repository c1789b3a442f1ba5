"""read → plan → check: `prepare` reads the checkpoint (formats), chooses the spec from the file's own
evidence, plans every tensor, maps the optimizer ids and runs the checks that need no output (core.checks).
Shared by widen, widen_dcp, inspect, verify and sweep."""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from mupscale_cli.commands.hparams import resolve_hparams
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.checks import (_check_elements, _nonfinite, _nonfinite_notes, _untracked_axes,  # noqa: F401
                                      check_state_layout, check_tied, check_values, count_nonfinite, model_bytes,
                                      state_refs, value_checks)
from mupscale_cli.core.job import (DTYPES, Prepared, WidenOptions, out_dtype, parse_sizes,  # noqa: F401
                                   sigma_of)
from mupscale_cli.core.optstate import (map_optimizer, optimizer_notes)
from mupscale_cli.core.plan import make_plan, parse_k
from mupscale_cli.core.spec import Spec, bundled_specs, load_spec, parse_spec, shows_evidence
from mupscale_cli.core.checks import check_optimizer, hparam_notes
from mupscale_cli.core.checks import _plain_step  # noqa: F401
from mupscale_cli.bounded import int_text, loads_json, shown  # noqa: F401 (importable from here)
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats import load_checkpoint
from mupscale_cli.formats.checkpoint import (Checkpoint, LazyTensors, provenance_of, source_sha256)
from mupscale_cli.formats.output import (MAX_BYTES, OUT_SUFFIXES, _check_sharded_output, _input_files,  # noqa: F401
                                         _only_sharded_output, check_disk, check_output, check_size, clean_temps,
                                         missing_dirs, output_bytes)


NO_EVIDENCE_DOC = "docs/stacks.md"

def where_of(ckpt: Checkpoint) -> str:
    """The input as the user named it: a Hugging Face model's directory, else the file."""
    hfdir = getattr(ckpt.hf, "path", None)
    return str(hfdir if hfdir is not None else ckpt.path)


def _check_config_json_markers(spec: Spec, ckpt: Checkpoint, risk: bool = False) -> list[str]:
    """--spec NAME|FILE on a Hugging Face directory: a spec whose markers are all config.json's (model_type,
    multi_query, alibi, ...) describes only the layouts they name; config.json is the model transformers builds,
    so a spec whose markers it contradicts would widen another architecture (exit 0, not the same function).
    Refused, unless `risk` (--risk-model-type-mismatch): then a warning note, returned."""
    cj = getattr(ckpt, "config_json", None)
    alts = spec.evidence
    if not isinstance(cj, dict) or not alts or not all(k.startswith("config_json.") for a in alts for k in a):
        return []
    if spec.refuse and shows_evidence(spec, evidence_places(ckpt)):
        raise MupscaleError(f"{where_of(ckpt)} is {spec.name}: {spec.refuse['reason']} "
                            f"(see {spec.refuse.get('doc', NO_EVIDENCE_DOC)})")
    if shows_evidence(spec, evidence_places(ckpt)):
        return []
    has = f"model_type {cj.get('model_type')!r}" + "".join(
        f", {k.partition('.')[2]} {cj.get(k.partition('.')[2])!r}" for k in spec.evidence[0]
        if k != "config_json.model_type")
    if risk:
        return [f"warning: --risk-model-type-mismatch: spec {spec.name} is for config.json with {_marker(spec)}, "
                f"this one has {has}: the output is NOT known to compute the same function; check it with "
                f"`mupscale verify` before use"]
    raise MupscaleError(f"--spec {spec.name} is for config.json with {_marker(spec)}, but {where_of(ckpt)}/config.json "
                        f"has {has}: another architecture; omit --spec to let config.json choose (or, at the risk "
                        f"of a different function, --risk-model-type-mismatch)")


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
    bundled spec whose evidence the checkpoint shows (model_args / config markers, config.json's model_type)
    AND that covers every tensor. Names and shapes alone never choose a parametrization, and a refusal never
    suggests a spec whose evidence the checkpoint does not show."""
    rec = recorded_spec(ckpt)
    if rec is not None:
        return rec
    where = where_of(ckpt)
    places = evidence_places(ckpt)
    specs = [s for s in bundled_specs() if s.detect]
    shown = [s for s in specs if shows_evidence(s, places)]
    refusing = [s for s in shown if s.refuse]
    if refusing:  # a refusal's markers are narrower than its exact sibling's (model_type): the variant decides
        s = refusing[0]
        raise MupscaleError(f"{where} is {s.name}: {s.refuse['reason']} (see {s.refuse.get('doc', NO_EVIDENCE_DOC)})")
    fits, why = [], {}
    for spec in shown:
        try:
            # a tied summing readout is refused later, by prepare, with its own message
            make_plan(spec, ckpt.shapes(), {"*": 1}, ckpt.model_args, sizes, untie=bool(spec.untie))
        except MupscaleError as e:
            why[spec.name] = str(e)
            continue
        fits.append(spec)
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        raise MupscaleError(f"{where} shows the markers of several bundled specs ({', '.join(s.name for s in fits)}); "
                            f"pass --spec NAME")
    if shown:  # the reason of the spec whose names fit (several stacks share a marker: config.parametrization)
        named = [s for s in shown if not any(w in why[s.name] for w in ("has no rule for tensor", "matches no tensor"))]
        s = (named or shown)[0]
        which = f"spec {s.name}" if named or len(shown) == 1 else f"specs {', '.join(x.name for x in shown)}"
        raise MupscaleError(f"{where} shows {_marker(s, places)} ({which}), but the spec does not describe it: "
                            f"{why[s.name]}")
    cj = places.get("config_json")
    if isinstance(cj, dict):
        raise MupscaleError(f"{where}: config.json's model_type {shown_value(cj.get('model_type'))} has no bundled "
                            f"spec (`mupscale specs` lists them); write one for its layout and parametrization "
                            f"(docs/spec-format.md) and pass --spec FILE")
    layout = []
    for spec in specs:
        try:
            make_plan(spec, ckpt.shapes(), {"*": 1}, ckpt.model_args, sizes, untie=bool(spec.untie))
        except MupscaleError:
            continue
        layout.append(spec)
    if layout:
        raise MupscaleError(
            f"{where} shows no marker of its parametrization (names and shapes fit "
            f"{', '.join(s.name + (f' [marker {_marker(s)}]' if s.evidence else '') for s in layout)}, but standard "
            f"and μP models look the same on disk): if you vouch for one, pass --spec NAME|FILE (see {NO_EVIDENCE_DOC})")
    first = next(iter(ckpt.shapes()), None)
    raise MupscaleError(f"no bundled spec covers {Path(where).name} (none has a rule for all its tensors"
                        + (f", e.g. {first!r}" if first else "") + "): pass --spec FILE (docs/spec-format.md)")


def shown_value(v) -> str:
    return repr(v) if isinstance(v, (str, int, float, bool)) or v is None else shown(str(v))


def _marker(spec: Spec, places: dict | None = None) -> str:
    """The spec's first marker, or the one `places` (evidence_places) hold."""
    alt = spec.evidence[0]
    if places is not None:
        alt = next((a for a in spec.evidence if shows_evidence(replace(spec, evidence=[a]), places)), alt)
    return " and ".join(f"{k.removeprefix('config_json.')}={v!r}" if k.startswith("config_json.") else f"{k}={v!r}"
                        for k, v in alt.items())

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
            given += _check_config_json_markers(spec, ckpt, opts.risk_model_type)
    cfg = ckpt.extra.get("config") if isinstance(ckpt.extra.get("config"), dict) else None
    plan = make_plan(spec, ckpt.shapes(), k, ckpt.model_args, opts.sizes, ckpt.tensors, config=cfg,
                     untie=opts.untie)
    omap, notes = None, given + list(ckpt.notes) + list(plan.notes)
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

