"""verify's report: one row per step, the result, and the likely causes of a failure (a step-0 probe of the
layers and the readout, amplified round-off, the training rule)."""
from __future__ import annotations

import time

import torch

from mupscale_cli.verify.diagnose import Issue, finite
from mupscale_cli.verify.lockstep import StepDiff
from mupscale_cli.verify.options import UNIT_ROUNDOFF, Run, VerifyOptions


def _row(d: StepDiff) -> dict:
    return {"step": d.step, "loss": finite(d.loss), "loss_rel": finite(d.loss_rel), "out_abs": finite(d.out_abs),
            "out_rel": finite(d.out_rel), "train_out_rel": finite(d.train_out_rel), "eval": d.evaluated,
            "tensor": d.worst_tensor, "tensor_rel": finite(d.worst_rel),
            **({"hidden": {n: finite(v) for n, v in d.hidden.items()}} if d.hidden else {})}


def _finish(report: dict, issues: list[Issue], rows: list[dict], fail: dict | None, first_tensor: dict | None,
            t_start: float, o: VerifyOptions, tol: float) -> dict:
    static_fail = [i for i in issues if i.kind in ("structure", "noise", "builder")]
    report["steps_run"] = max((r["step"] for r in rows), default=None)
    report["max"] = {k: max((r[k] for r in rows if r[k] is not None), default=None)
                     for k in ("loss_rel", "out_rel", "train_out_rel", "tensor_rel")}
    report["first_failure"] = fail
    report["first_tensor_over_tol"] = first_tensor
    report["issues"] = [i.to_dict() for i in issues]
    report["diagnosis"] = diagnose(report, issues, fail, o, tol, rows) if (fail or static_fail) else []
    report["result"] = "fail" if (fail or static_fail) else "pass"
    report["lockstep"] = None if not rows else ("fail" if fail else "pass")
    report["time_s"] = round(time.perf_counter() - t_start, 3)
    report["rows"] = rows
    return report


def rule_causes(report: dict, fail: dict) -> list[str]:
    """Causes the training rule or the model's readout explain: plain clipping active, a summing readout."""
    out = []
    clip = report.get("grad_clip") or {}
    if clip.get("mode") == "plain" and clip.get("first_active") is not None and fail["step"] >= clip["first_active"]:
        out.append(f"gradient clipping was active from step {clip['first_active']} (BASE's norm up to "
                   f"{clip['max_base_norm']:.3g} > {clip['max_norm']:g}): torch's clip_grad_norm_ computes another "
                   f"norm on the wide model (per-tensor norms scale by role), so its clip coefficient differs; clip "
                   f"with mupscale_cli.optim.clip_grad_norm_equivalent in the training script (--clip-mode equivalent)")
    if fail.get("readout"):
        out.append(f"the wide outputs are {fail['output_ratio']:.3g} × BASE's at step 0: the readout "
                   f"{fail['readout']!r} sums over the widened axis (standard parametrization, e.g. lm_head tied to "
                   f"wte with no 1/width multiplier); duplication is exact only for a μP readout that divides by "
                   f"width, so this model has no exact widening under spec {report['spec']!r}")
    return out


def _rel(r: dict) -> float:
    return max(v for v in (r["loss_rel"], r["out_rel"], r["train_out_rel"], 0.0) if v is not None)


def _roundoff_growth(rows: list[dict], step: int, dtype: str) -> bool:
    """The first steps agreed to round-off and the failure came later: amplified round-off."""
    return step >= 5 and len(rows) > 4 and max(_rel(r) for r in rows[:4]) <= 1e3 * UNIT_ROUNDOFF[dtype]


def diagnose(report: dict, issues: list[Issue], fail: dict | None, o: VerifyOptions, tol: float,
             rows: list[dict]) -> list[str]:
    """Likely causes, most specific first."""
    out = [i.message for i in issues if i.kind in ("structure", "noise", "builder")][:5]
    if fail is None:
        return out
    out += [i.message for i in issues if i.kind == "source"]
    found = [i.message for i in issues if i.kind not in ("structure", "noise", "source")] + rule_causes(report, fail)
    out += found
    step = fail["step"]
    if step == 0 and not found:
        out.append("the outputs differ before any training although every tensor equals the exact widening of "
                   "BASE: the model is not width-invariant under this spec, e.g. 1/sqrt(d) attention with a "
                   "widened head_dim (use μP's 1/d scale, or widen whole heads: spec nanogpt-mup-heads), a "
                   "readout convention mismatch (spec 'readout: mup' needs a readout that divides by width, "
                   "mup's MuReadout; 'sum' a plain one), or model_args that build a different architecture")
    elif step > 0 and not found and fail["value"] is not None and _roundoff_growth(rows, step, o.dtype):
        early = max(_rel(r) for r in rows[:4])
        growth = (fail["value"] / max(early, UNIT_ROUNDOFF[o.dtype])) ** (1 / step)
        out.append(f"the difference grew gradually from round-off (steps 0-3: {early:.1e}, step {step}: "
                   f"{fail['value']:.1e}, about x{growth:.3g} per step) with weights, optimizer state and "
                   f"hyper-parameters all matching the exact widening: the training is chaotic enough to "
                   f"amplify {o.dtype} round-off; this is not a widening defect: verify fewer --steps"
                   f"{', use --dtype float64' if o.dtype != 'float64' else ''} or a larger --tol")
    elif step > 0 and not found and fail["value"] is None:
        out.append(f"non-finite loss or outputs at step {step} (NaN/Inf) with everything static matching: "
                   f"the training itself blew up; try a smaller --steps"
                   f"{' or --dtype float64' if o.dtype != 'float64' else ''}")
    elif step > 0 and not found:
        why = ("weights, optimizer state and hyper-parameters all match the exact widening, so the training "
               "step itself is not width-invariant: e.g. gradient clipping or a loss that depends on width, "
               "dropout, a parameter the optimizer does not train, a non-μP layer")
        if o.dtype != "float64":
            why += f", or {o.dtype} round-off growing over training (try --dtype float64 or a larger --tol)"
        out.append(f"diverged at step {step}: {why}")
    if fail.get("layer"):
        out.append(f"first diverging layer at step {step}: {fail['layer']!r}")
    return out


def step0_probe(r: Run) -> dict:
    """At a step-0 failure: each layer's activation (first diverging layer) and the ratio of the wide
    outputs to the base's; a ratio near k with a readout summing over the width names the readout."""
    from mupscale_cli.verify.lockstep import _hidden_diffs
    plan, md = r.prep.plan, r.md
    x = r.data(-1)[0] if r.data else md.batch(r.base_args, r.o.batch_size, torch.Generator().manual_seed(r.o.seed),
                                              r.dtype)[0]
    x = x.to(r.device, r.dtype) if x.is_floating_point() else x.to(r.device)
    out = {}
    r.base.eval(), r.wide.eval()
    with torch.no_grad():
        ob, ow = md.output(r.base, x).double(), md.output(r.wide, x).double()
        try:
            hid = _hidden_diffs(md, r.base, r.wide, x, plan)
        except Exception:  # noqa: BLE001 - a diagnostic only
            hid = {}
    layer = next((n for n, v in hid.items() if not v <= r.tol_at(0)), None)
    if layer and not r.fail.get("layer"):
        out["layer"] = layer
    if ob.shape == ow.shape and ob.norm() > 0:
        c = float((ob * ow).sum() / (ob * ob).sum())
        out["output_ratio"] = c
        readout = _readout(plan)
        if readout is not None:
            name, kr = readout
            if kr > 1 and abs(c - kr) < abs(c - 1):
                out["readout"] = name
    return out


def _readout(plan) -> tuple[str, int] | None:
    """The readout weight: a tied alias (lm_head tied to wte) or a vector-like tensor with width on its
    fan-in; with the k of its width axis."""
    for n, p in plan.tensors.items():
        if p.alias_of or p.readout_like:
            ks = [d.k for d in p.dims if d.axis is not None]
            if ks:
                return n, ks[0]
    return None
