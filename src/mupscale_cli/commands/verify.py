"""`mupscale verify`: train BASE and its widening side by side and check that they stay in lockstep.

WIDE omitted: BASE is widened in memory (σ̄ = 0). WIDE with σ̄ = 0: its tensors, optimizer state and
hyper-parameters are compared with the exact widening of BASE, then BASE and WIDE (as loaded) train in
lockstep. WIDE with σ̄ > 0 (or stored in another dtype by `widen --dtype`): the recorded noise (and cast) is
re-derived and WIDE must equal it bit for bit, then BASE trains in lockstep with the noise-free
reconstruction (WIDE's optimizer state). See docs/verify.md.

This module is the pipeline (read -> plan and check -> build models -> build optimizers -> lockstep ->
report); its steps live in verify/: options (VerifyOptions, Run, tolerances), setup (device, data, models,
optimizers), tensors (structure, noise), training (the script's per-step rules, the user's optimizer),
report (rows, diagnosis).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from mupscale_cli.api import load as load_widened
from mupscale_cli.commands.widen import Prepared, WidenOptions, prepare, widen_tensors
from mupscale_cli.core.checks import check_optimizer
from mupscale_cli.core.optstate import KINDS, detect_kind, scale_lr, widen_optimizer
from mupscale_cli.core.widen import widen
from mupscale_cli.errors import MupscaleError
from mupscale_cli.verify.diagnose import (Issue, compare_tensor, finite, groups_by_name, hyper_issues,
                                        shared_steps, state_by_name, state_issues)
from mupscale_cli.verify.lockstep import StepDiff, run_lockstep
from mupscale_cli.verify.modelspec import resolve
from mupscale_cli.verify.options import (BATCHNORM_TOL, DEFAULT_TOL, DTYPES, TENSOR_TOL, Run,  # noqa: F401
                                         VerifyOptions, _check_opts, default_tol)
from mupscale_cli.verify.report import _finish, _row, step0_probe
from mupscale_cli.verify.setup import (_check_provenance, _data_errors, _digest_note, _fresh_optimizer,
                                       _load_model, _lr_scale, _noised, _optimizer, _sigma_map, _source_digest,
                                       _stored_dtype, _wide_names, deterministic, load_data, model_names,
                                       pick_device)  # noqa: F401
from mupscale_cli.verify.tensors import _noise_check, _structure
from mupscale_cli.verify.training import (_train_config, build_user_optimizer, load_user_state,  # noqa: F401
                                          resolve_builder, rule_issues, schedule, training_rule)



def _k_text(k: dict) -> str:
    return ",".join(f"{a}={v}" for a, v in k.items())


def _prepare(o: VerifyOptions, prov: dict) -> tuple[Prepared, list[str]]:
    notes = []
    k = o.k
    if k is None:
        k = _k_text(prov["k"]) if isinstance(prov.get("k"), dict) and prov["k"] else "2"
    spec = o.spec
    if spec is None and isinstance(prov.get("spec_text"), str) and prov["spec_text"]:  # WIDE describes itself
        from mupscale_cli.core.spec import parse_spec
        spec = parse_spec(prov["spec_text"], f"recorded:{prov.get('spec')}", name=prov.get("spec"))
    elif spec is None and prov.get("spec"):
        from mupscale_cli.core.spec import bundled_specs
        names = {s.name: s for s in bundled_specs()}
        if prov["spec"] not in names:
            raise MupscaleError(f"WIDE was widened with spec {prov['spec']!r}, which is not bundled: pass "
                                f"--spec FILE")
        spec = prov["spec"]
        if prov.get("spec_sha256") and names[spec].sha256 != prov["spec_sha256"]:
            notes.append(f"bundled spec {spec} differs from the one WIDE was widened with (sha256)")
    if prov.get("untie"):
        u = prov["untie"] if isinstance(prov["untie"], dict) else {}
        raise MupscaleError(f"WIDE was widened with --untie: its readout {u.get('readout', '')!r} is a new tensor, "
                            f"{u.get('from', 'the embedding')} / k, "
                            f"while BASE trains them as one tied tensor, so the two follow "
                            f"different trajectories by design and verify has nothing exact to check (docs/stacks.md);"
                            f" widen without --untie where the spec allows it, or check your own training run")
    sizes = o.sizes or {n: v for n, v in (prov.get("sizes") or {}).items() if isinstance(v, int)}
    kind = o.optimizer if o.optimizer in KINDS else None  # not a builder (module:fn)
    prep = prepare(WidenOptions(checkpoint=o.base, k=k, spec=spec, optimizer=kind, opt_layout=o.opt_layout,
                                sizes=sizes, model_args=o.model_args))
    return prep, notes + [n for n in prep.notes if not n.startswith("no optimizer state")]


def run_verify(o: VerifyOptions, on_step: Callable[[dict, bool], None] | None = None) -> dict:
    """Run the check; returns the report (docs/verify.md). result 'pass' or 'fail'; input errors raise
    MupscaleError (exit 2). Steps: read -> plan (and static checks) -> build models -> build optimizers ->
    lockstep -> report."""
    r = read(o)
    if plan_and_check(r):
        build_models(r)
        if build_optimizers(r):
            lockstep(r, on_step)
    return finish(r)


def read(o: VerifyOptions) -> Run:
    """Options, device, data, and WIDE with what its provenance records (σ̄, lr_scale, stored dtype)."""
    t_start = time.perf_counter()
    _check_opts(o)
    from mupscale_cli.verify.dist import dist_env
    dist_env(o.device)  # torchrun: the process group for FSDP2 over WORLD_SIZE ranks
    device = pick_device(o.device)
    r = Run(o, t_start, device, DTYPES[o.dtype], 0.0, TENSOR_TOL[o.dtype],
            load_data(o.data, o.batch_size) if o.data else None)
    if o.wide:
        r.w = load_widened(o.wide)
        r.prov = r.w.provenance
        _check_provenance(r.prov, o.wide)
        if r.w.optimizer is not None:
            check_optimizer(r.w.optimizer)  # types, ranges, ids of WIDE's hyper-parameters (NaN/Inf: the lockstep shows)
        r.sigma = float(r.prov.get("sigma") or 0.0)
        r.sigma_map = _sigma_map(r.prov)  # widen --hparams with the relative scheme: σ̄ per tensor
        r.lr_scale = _lr_scale(r.prov)  # widen --hparams: WIDE's learning rates × γ̄↑/γ̄
        r.stored = _stored_dtype(r.prov)  # widen --dtype: WIDE's floats were cast after widening
        r.mode = "noised" if _noised(r.sigma, r.sigma_map) else "cast" if r.stored else "file"
    return r


def _model_code(r: Run) -> str:
    """Whose code the two models run: "user" (--model), "transformers" (a Hugging Face directory: the class
    config.json names, from the installed transformers; the user's own model code if they train with it), or
    "bundled" (mupscale's zoo stand-in for the stack)."""
    if r.md.user:
        return "user"
    return "transformers" if r.md.factory == "mupscale_cli.zoo.hf" else "bundled"


def plan_and_check(r: Run) -> bool:
    """Spec, k, plan and models' definition; WIDE's structure, model_args, tensors (exact, or noised bit for
    bit). False: WIDE's structure already fails (no training)."""
    o, w, prov = r.o, r.w, r.prov
    r.prep, notes = _prepare(o, prov)
    r.notes += notes
    plan, ckpt = r.prep.plan, r.prep.ckpt
    r.tol_at = (lambda t: o.tol) if o.tol is not None else default_tol(o.dtype, plan)
    r.tol = r.tol_at(o.steps)
    r.md = resolve(plan.spec.model, plan.spec.name, o.model, o.trust_code)
    r.base_args = dict(ckpt.model_args or {})
    r.wide_args = dict(r.prep.model_args or {})
    r.report = {
        "result": None, "mode": r.mode, "base": str(o.base), "wide": str(o.wide) if o.wide else None,
        "spec": plan.spec.name, "k": plan.k, "model": r.md.factory, "model_code": _model_code(r),
        "model_args": {"base": r.base_args, "wide": r.wide_args},
        "dtype": o.dtype, "device": str(r.device), "steps": o.steps, "batch_size": o.batch_size,
        "data": str(o.data) if o.data else f"synthetic (seed {o.seed})", "lr_rule": o.lr_rule,
        "grad_clip": {"max_norm": o.grad_clip, "mode": o.clip_mode} if o.grad_clip else None,
        "tolerance": {"loss_output": r.tol, "tensor": r.ttol,
                      "loss_output_at": {t: r.tol_at(t) for t in (0, 1, 10, 50) if t < o.steps}}, "notes": r.notes,
    }
    if w is None:
        return True
    if prov.get("source_sha256") and prov["source_sha256"] != _source_digest(r.prep):
        r.notes.append(f"WIDE records source {prov.get('source')!r} with another sha256 than {o.base.name}: "
                       f"it was widened from a different file")
        r.issues.append(Issue("source", "WIDE was widened from a different checkpoint than BASE "
                                        "(its recorded source sha256 differs)"))
    if (msg := _digest_note(o.wide)) is not None:
        r.notes.append(msg)
    r.issues += _structure(w.model, plan)
    wa = w.extra.get("model_args")
    if wa is None and isinstance(prov.get("model_args"), dict):  # a safetensors or DCP WIDE: its provenance
        wa = prov["model_args"]
    if isinstance(wa, dict) and wa and not r.base_args:
        raise MupscaleError(f"{o.base} stores no model_args and WIDE records the widened ones: pass BASE's, "
                            f"--model-arg KEY=VALUE (e.g. {_arg_example(wa)})")
    if isinstance(wa, dict) and wa != r.wide_args:
        diff = {a: (wa.get(a), r.wide_args.get(a)) for a in set(wa) | set(r.wide_args)
                if wa.get(a) != r.wide_args.get(a)}
        r.issues.append(Issue("structure", f"WIDE's model_args differ from BASE's widened ones "
                                           f"(WIDE, expected): {diff}"))
    elif wa is None:
        r.notes.append("WIDE records no model_args; the wide model is built from BASE's, widened by the spec")
    if any(i.kind == "structure" for i in r.issues):
        return False
    # static comparison of the tensors with the exact (noised) widening
    if r.mode in ("noised", "cast"):
        r.report["noise"], nissues = _noise_check(w, r.prep, r.sigma, prov, r.stored, r.sigma_map)
        r.issues += nissues
    else:
        for n, p in plan.tensors.items():
            if not p.alias_of and (i := compare_tensor(n, p, widen(ckpt.tensors[n], p), w.model[n], r.ttol)):
                r.issues.append(i)
    return True


def _arg_example(args: dict) -> str:
    return " ".join(f"--model-arg {a}=..." for a in list(args)[:2])


def build_models(r: Run) -> None:
    """BASE from its model_args, the wide model from its own (WIDE's recorded ones, else BASE's widened);
    weights loaded strictly. A noised or cast WIDE trains as its noise-free reconstruction."""
    plan = r.prep.plan
    r.base = _load_model(r.md, r.base_args, None, r.prep.ckpt.tensors, "BASE", r.device, r.dtype)
    if r.mode == "file":
        wide_sd = r.w.model
    else:
        produce = widen_tensors(r.prep, 0.0, 0)
        wide_sd = {n: produce(n).clone() for n in plan.tensors}
    r.wide = _load_model(r.md, r.wide_args, r.base_args, wide_sd, "the widened model", r.device, r.dtype)


def build_optimizers(r: Run) -> bool:
    """Both optimizers with their states: torch's, built from the states' groups, or the user's builder
    (--optimizer module:fn), which the widened state must load into. False: it does not (a failure)."""
    o, w, prep, plan, ckpt, notes = r.o, r.w, r.prep, r.prep.plan, r.prep.ckpt, r.notes
    builder = resolve_builder(o.optimizer) if o.optimizer and ":" in o.optimizer else None
    if prep.omap is not None:
        base_osd, omap = ckpt.optimizer, prep.omap
        opt_source = "checkpoint"
        if r.lr_scale != 1 and w is not None and w.optimizer is not None:
            base_osd = {**base_osd, "param_groups": scale_lr(base_osd["param_groups"], r.lr_scale)}
            opt_source += f", learning rates × {r.lr_scale:g}"
            notes.append(f"WIDE's learning rates carry γ̄↑/γ̄ = {r.lr_scale:g} (widen --hparams): BASE trains with "
                         f"its learning rates × {r.lr_scale:g}, so both follow the same trajectory")
    elif builder is not None:
        raise MupscaleError(f"{o.base} has no optimizer state: --optimizer {o.optimizer} checks that a widened "
                            f"state loads into your optimizer, so BASE needs one")
    else:
        base_osd, omap = _fresh_optimizer(prep, o, r.base)
        opt_source = f"fresh {omap.kind} (lr {o.lr}; BASE has no optimizer state)"
        notes.append(f"BASE has no optimizer state: both models train with a fresh {omap.kind}, lr {o.lr}, "
                     f"widened by Table 1")
    if w is not None and w.optimizer is not None and prep.omap is not None:
        wide_osd = w.optimizer
        try:
            wide_kind = detect_kind(wide_osd, None)
        except MupscaleError:
            wide_kind = w.kind or omap.kind
        wide_names = _wide_names(wide_osd, prep, "WIDE")
        r.issues += hyper_issues(omap.kind, wide_kind, groups_by_name(base_osd, omap.names),
                                 groups_by_name(wide_osd, wide_names), plan)
        r.issues += state_issues(state_by_name(base_osd, omap.names), state_by_name(wide_osd, wide_names), plan,
                                 r.ttol)
    else:
        if w is not None and w.optimizer is None:
            notes.append("WIDE has no optimizer state: its optimizer is the exact widening of BASE's")
        elif w is not None:
            notes.append("BASE has no optimizer state, so WIDE's is not checked: the wide model trains with "
                         "the widening of the fresh base optimizer")
        wide_osd, wide_kind = widen_optimizer(base_osd, plan, omap), omap.kind
        wide_names = [list(g["param_names"]) for g in wide_osd["param_groups"]]
    r.issues += rule_issues(o.lr_rule, omap.kind, base_osd, omap.names, wide_osd, wide_names, plan)
    r.report["optimizer"] = {"kind": omap.kind, "source": opt_source, "layout": omap.layout,
                             "groups": {"base": len(base_osd["param_groups"]), "wide": len(wide_osd["param_groups"])}}
    who = "WIDE" if w else "the widened"
    if builder is None:
        r.base_opt = _optimizer(omap.kind, r.base, base_osd, omap.names, "BASE", plan.spec)
        r.wide_opt = _optimizer(wide_kind, r.wide, wide_osd, wide_names, who, plan.spec)
    else:
        r.report["optimizer"]["source"] = f"{o.optimizer} (your builder), {opt_source}"
        r.base_opt = build_user_optimizer(builder, o.optimizer, r.base, _train_config(ckpt))
        try:
            load_user_state(r.base_opt, r.base, base_osd, model_names(omap.names, plan.spec), omap.kind,
                            o.optimizer, "BASE")
        except MupscaleError as e:
            raise MupscaleError(f"{e}: is it the optimizer the training script builds?") from None
        r.wide_opt = build_user_optimizer(builder, o.optimizer, r.wide, _train_config(ckpt))
        try:
            notes.extend(load_user_state(r.wide_opt, r.wide, wide_osd, model_names(wide_names, plan.spec),
                                         wide_kind, o.optimizer, who))
        except MupscaleError as e:
            r.issues.append(Issue("builder", str(e)))
            return False
    pnames = {id(p): n for n, p in r.base.named_parameters()} | {id(p): n for n, p in r.wide.named_parameters()}
    r.issues += shared_steps(r.base_opt, r.wide_opt, pnames)
    return True


def lockstep(r: Run, on_step: Callable[[dict, bool], None] | None) -> None:
    """Train both on identical batches, the training rule (--lr-rule, --grad-clip) applied to each; stop at
    the first step whose loss or outputs differ beyond the tolerance."""
    o = r.o
    tol, ttol = r.tol, r.ttol
    clip = {"active_steps": 0, "first_active": None, "max_base_norm": None}

    def step_cb(d: StepDiff) -> bool:
        row = _row(d)
        r.rows.append(row)
        if r.first_tensor is None and d.worst_tensor and not d.worst_rel <= ttol:
            r.first_tensor = {"step": d.step, "tensor": d.worst_tensor, "rel": finite(d.worst_rel)}
        tol = r.tol_at(d.step)
        failed = not (d.rel <= tol)
        if failed:
            what = ("loss" if not d.loss_rel <= tol else "output" if not d.out_rel <= tol or not d.evaluated
                    else "training-pass output")
            layer = next((n for n, v in d.hidden.items() if not v <= tol), None)
            r.fail = {"step": d.step, "what": what, "value": finite(d.rel), "tol": tol,
                      "layer": layer, "tensor": d.worst_tensor, "tensor_rel": finite(d.worst_rel)}
        if on_step:
            on_step(row, failed)
        return failed

    from mupscale_cli.verify.dist import dist_env, shard
    _, world = dist_env(o.device)
    if world > 1:  # under torchrun: both models sharded with FSDP2 across the ranks
        r.base, r.base_opt = shard(r.base, r.base_opt)
        r.wide, r.wide_opt = shard(r.wide, r.wide_opt)
        r.report["ranks"] = world
    rule = training_rule(r, clip)
    with deterministic(r.device), _data_errors(o.data):
        run_lockstep(r.md, r.base_args, r.base, r.base_opt, r.wide, r.wide_opt, o.steps, batch_size=o.batch_size,
                     seed=o.seed, dtype=r.dtype, plan=r.prep.plan, hidden=o.hidden, data=r.data, on_step=step_cb,
                     eval_every=o.eval_every or (1 if o.hidden else 10), tensor_tol=ttol, before_step=rule)
        if r.fail is not None and r.fail["step"] == 0:
            r.fail.update(step0_probe(r))
    if o.grad_clip:
        r.report["grad_clip"].update(clip)


def finish(r: Run) -> dict:
    return _finish(r.report, r.issues, r.rows, r.fail, r.first_tensor, r.t_start, r.o, r.tol)
