"""`mupscale verify`: train BASE and its widening side by side and check that they stay in lockstep.

WIDE omitted: BASE is widened in memory (σ̄ = 0). WIDE with σ̄ = 0: its tensors, optimizer state and
hyper-parameters are compared with the exact widening of BASE, then BASE and WIDE (as loaded) train in
lockstep. WIDE with σ̄ > 0 (or stored in another dtype by `widen --dtype`): the recorded noise (and cast) is
re-derived and WIDE must equal it bit for bit, then BASE trains in lockstep with the noise-free
reconstruction (WIDE's optimizer state). See docs/verify.md.
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mupscale_cli.api import load as load_widened
from mupscale_cli.api import make_optimizer, optimizer_groups
from mupscale_cli.commands.widen import Prepared, WidenOptions, prepare, widen_tensors
from mupscale_cli.core import noise as noise_mod
from mupscale_cli.core.clip import grad_scales
from mupscale_cli.optim import clip_grad_norm_equivalent
from mupscale_cli.formats.checkpoint import source_sha256, strip_prefix
from mupscale_cli.verify.diagnose import (Issue, compare_tensor, finite, groups_by_name, hyper_issues,
                                        shared_steps, state_by_name, state_issues)
from mupscale_cli.verify.lockstep import StepDiff, run_lockstep
from mupscale_cli.verify.modelspec import ModelDef, check_args_scale, check_shapes, param_budget, resolve
from mupscale_cli.core.checks import check_optimizer
from mupscale_cli.core.optstate import KINDS, OptimizerMap, detect_kind, scale_lr, widen_optimizer
from mupscale_cli.core.widen import widen, widen_noised
from mupscale_cli.errors import MupscaleError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Relative loss/output difference allowed per dtype, measured with verify's defaults (200 steps, batch 8,
# k 2, in-memory) on every zoo model x SGD/Adam/AdamW, 3 batch seeds (scripts/bench_verify.py --part drift;
# docs/verify.md): float64 worst 1.1e-14 without BatchNorm (GPT), float32 4.4e-6 and bfloat16 0.24 (GPT).
DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-3, "bfloat16": 0.5}
# Models that normalise by batch statistics (BatchNorm) amplify round-off: the tiny zoo ResNet's float64 gap
# grows about 10x every 25-40 steps at batch 8 (SGD, 5 batch seeds: at most 3e-9 by step 50, 1e-7 by 120,
# 3e-6 by 200). So float64 allows DEFAULT_TOL x 10^(step/20), at most 1e-4: 22x or more above the worst
# measured at every step (3 seeds), still 1.1e-10 at step 1, where injected defects show (1e-6 or more).
# In float32/bfloat16 the ResNet is chaotic (O(1) by step 200): no tolerance separates that from a defect.
BATCHNORM_TOL = {"float64": (20, 1e-4)}  # dtype: (steps per decade of growth, cap)
# Normwise per-tensor distance from the widened base: a diagnostic (names the tensor that diverged first,
# triggers an eval-mode check). Gradient-free directions (attention key biases) carry Adam-normalised
# round-off: measured up to 1.8e-11 (float64), 6.1e-3 (float32), 0.48 (bfloat16).
LR_RULES = ("stored", "lr_scale", "uniform")
TENSOR_TOL = {"float64": 1e-8, "float32": 5e-2, "bfloat16": 1.0}


@dataclass
class VerifyOptions:
    base: Path
    wide: Path | None = None
    spec: str | None = None
    k: str | None = None  # default: WIDE's recorded k, else 2
    steps: int = 200
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float64"
    tol: float | None = None  # default DEFAULT_TOL[dtype]
    batch_size: int = 8
    data: Path | None = None
    hidden: bool = False
    seed: int = 0  # synthetic batches
    optimizer: str | None = None  # sgd|adam|adamw: when the state cannot tell, or BASE has none (with lr)
    lr: float | None = None
    opt_layout: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)  # --model-arg: over BASE's stored model_args
    model: str | None = None  # factory override
    trust_code: bool = False  # --trust-spec-code: import a factory that the spec names outside mupscale_cli
    eval_every: int | None = None  # eval-mode output check every N steps (default 10; 1 with hidden)
    lr_rule: str = "stored"  # stored | lr_scale | uniform: how the training script sets each group's lr
    grad_clip: float | None = None  # clip by the global gradient norm, as the training script does
    clip_mode: str = "plain"  # plain: torch's clip_grad_norm_ on both; equivalent: clip_grad_norm_equivalent on WIDE


# ---------------------------------------------------------------------------------------------- setup

def _check_opts(o: VerifyOptions) -> None:
    if o.steps < 0:
        raise MupscaleError(f"--steps must be >= 0, got {o.steps}")
    if o.batch_size < 1:
        raise MupscaleError(f"--batch-size must be >= 1, got {o.batch_size}")
    if o.dtype not in DTYPES:
        raise MupscaleError(f"--dtype {o.dtype!r}: choose one of {', '.join(DTYPES)}")
    if o.device not in ("auto", "cpu", "cuda"):
        raise MupscaleError(f"--device {o.device!r}: choose auto, cpu or cuda")
    if o.tol is not None and not (math.isfinite(o.tol) and o.tol > 0):
        raise MupscaleError(f"--tol must be a positive number, got {o.tol}")
    if o.optimizer is not None and o.optimizer not in KINDS and ":" not in o.optimizer:
        raise MupscaleError(f"--optimizer {o.optimizer!r}: choose one of {', '.join(KINDS)}, or your builder "
                            f"as package.module:fn or path/to/file.py:fn")
    if o.lr_rule not in LR_RULES:
        raise MupscaleError(f"--lr-rule {o.lr_rule!r}: choose one of {', '.join(LR_RULES)}")
    if o.grad_clip is not None and not (math.isfinite(o.grad_clip) and o.grad_clip > 0):
        raise MupscaleError(f"--grad-clip must be a positive number, got {o.grad_clip}")
    if o.clip_mode not in ("plain", "equivalent"):
        raise MupscaleError(f"--clip-mode {o.clip_mode!r}: choose plain or equivalent")
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise MupscaleError(f"--lr must be a positive number, got {o.lr}")
    if o.eval_every is not None and o.eval_every < 1:
        raise MupscaleError(f"--eval-every must be >= 1, got {o.eval_every}")


def pick_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic GEMMs
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise MupscaleError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device("cpu")


@contextmanager
def deterministic(device: torch.device):
    """On CUDA: TF32 off, deterministic algorithms on (restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def load_data(path: Path, batch_size: int) -> Callable[[int], tuple]:
    """Batches from a file with `inputs` and `targets` (first dimension: examples): the evaluation batch is
    the first batch_size examples; step t trains on examples (t-1)*B .. t*B-1, wrapping around."""
    if not path.is_file():
        raise MupscaleError(f"--data {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            d = load_file(str(path))
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign file
        raise MupscaleError(f"--data {path}: cannot read ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), torch.Tensor) for k in ("inputs", "targets")):
        raise MupscaleError(f"--data {path}: expected tensors 'inputs' and 'targets' "
                            f"(e.g. torch.save({{'inputs': x, 'targets': y}}, path))")
    x, y = d["inputs"], d["targets"]
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise MupscaleError(f"--data {path}: 'inputs' {list(x.shape)} and 'targets' {list(y.shape)} must have "
                            f"the same first dimension (examples)")
    n = x.shape[0]
    if n < batch_size:
        raise MupscaleError(f"--data {path}: {n} examples, fewer than --batch-size {batch_size}")

    def data(t: int):
        start = 0 if t < 0 else (t - 1) * batch_size
        idx = torch.arange(start, start + batch_size) % n
        return x[idx], y[idx]
    return data


def _clone_tree(obj):
    """Deep copy (tensors cloned, sharing between entries kept): never let two optimizers share state."""
    return copy.deepcopy(obj)


def _load_model(md: ModelDef, args: dict, base_args: dict | None, sd: dict[str, torch.Tensor], who: str,
                device: torch.device, dtype: torch.dtype) -> nn.Module:
    check_args_scale(args, [tuple(t.shape) for t in sd.values()], f"{who}")
    budget = 2 * sum(t.numel() for t in sd.values()) + (1 << 16)  # the checkpoint's elements, with room

    def build() -> nn.Module:
        return md.build(args) if base_args is None else md.build(args, base_args)
    check_shapes(build, sd, 4 * budget, who)  # on the meta device first: mup's shape models count there
    with param_budget(budget, who):
        model = build()
    model = model.to(device=device, dtype=dtype)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        hint = "" if args else " (it stores no model_args: pass them, --model-arg KEY=VALUE)"
        raise MupscaleError(f"{who} does not fit the model that {md.factory} builds from model_args {args}"
                            f"{hint}: {first}") from None
    return model


def _optimizer(kind: str, model: nn.Module, sd: dict, names: list[list[str]], who: str) -> torch.optim.Optimizer:
    opt = make_optimizer(kind, optimizer_groups(model, sd, names))
    try:
        opt.load_state_dict(_clone_tree(sd))
    except (ValueError, RuntimeError, KeyError) as e:
        raise MupscaleError(f"{who}'s optimizer state does not load: {e}") from None
    return opt


def _wide_names(sd: dict, prep: Prepared, who: str) -> list[list[str]]:
    """Canonical tensor names per group of a widened optimizer state (from its param_names)."""
    out = []
    for g in sd["param_groups"]:
        if "param_names" not in g:
            raise MupscaleError(f"{who}'s optimizer state has no param_names (not written by mupscale): verify "
                                f"cannot tell which state belongs to which tensor")
        ns = []
        for raw in g["param_names"]:
            n = strip_prefix(raw)
            p = prep.plan.tensors.get(n)
            ns.append(p.alias_of or n if p else n)
        out.append(ns)
    return out


def _fresh_optimizer(prep: Prepared, o: VerifyOptions, base: nn.Module) -> tuple[dict, OptimizerMap]:
    """BASE without optimizer state: a fresh optimizer (--optimizer, --lr, torch defaults otherwise)."""
    if o.optimizer is None or o.lr is None:
        raise MupscaleError(f"{o.base} has no optimizer state: verify trains with the checkpoint's optimizer; "
                            f"pass --optimizer sgd|adam|adamw and --lr X to verify with a fresh one")
    params = dict(base.named_parameters())
    names = prep.plan.params
    opt = make_optimizer(o.optimizer, [{"params": [params[n] for n in names], "lr": o.lr}])
    return opt.state_dict(), OptimizerMap(o.optimizer, "single", [names])


# ------------------------------------------------------------------------------------------ the check

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
    sizes = o.sizes or {n: v for n, v in (prov.get("sizes") or {}).items() if isinstance(v, int)}
    kind = o.optimizer if o.optimizer in KINDS else None  # not a builder (module:fn)
    prep = prepare(WidenOptions(checkpoint=o.base, k=k, spec=spec, optimizer=kind, opt_layout=o.opt_layout,
                                sizes=sizes, model_args=o.model_args))
    return prep, notes + [n for n in prep.notes if not n.startswith("no optimizer state")]


@dataclass
class Run:
    """What the steps of one check hand on to each other."""
    o: VerifyOptions
    t_start: float
    device: torch.device
    dtype: torch.dtype
    tol: float  # at the last step (set once the plan is known: BatchNorm models get more)
    ttol: float
    data: Callable[[int], tuple] | None
    w: object = None  # api.Widened of WIDE, or None (widen in memory)
    prov: dict = field(default_factory=dict)
    sigma: float = 0.0
    sigma_map: dict[str, float] | None = None
    lr_scale: float = 1.0
    stored: torch.dtype | None = None
    mode: str = "in-memory"
    prep: Prepared | None = None
    md: ModelDef | None = None
    base_args: dict = field(default_factory=dict)
    wide_args: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    base: nn.Module | None = None
    wide: nn.Module | None = None
    base_opt: torch.optim.Optimizer | None = None
    wide_opt: torch.optim.Optimizer | None = None
    rows: list[dict] = field(default_factory=list)
    fail: dict | None = None
    first_tensor: dict | None = None
    tol_at: Callable[[int], float] = lambda t: 0.0  # the loss/output tolerance at each step


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
        "spec": plan.spec.name, "k": plan.k, "model": r.md.factory, "model_code": "user" if r.md.user else "bundled",
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
        r.base_opt = _optimizer(omap.kind, r.base, base_osd, omap.names, "BASE")
        r.wide_opt = _optimizer(wide_kind, r.wide, wide_osd, wide_names, who)
    else:
        r.report["optimizer"]["source"] = f"{o.optimizer} (your builder), {opt_source}"
        r.base_opt = build_user_optimizer(builder, o.optimizer, r.base, _train_config(ckpt))
        try:
            load_user_state(r.base_opt, r.base, base_osd, omap.names, omap.kind, o.optimizer, "BASE")
        except MupscaleError as e:
            raise MupscaleError(f"{e}: is it the optimizer the training script builds?") from None
        r.wide_opt = build_user_optimizer(builder, o.optimizer, r.wide, _train_config(ckpt))
        try:
            notes.extend(load_user_state(r.wide_opt, r.wide, wide_osd, wide_names, wide_kind, o.optimizer, who))
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


# ------------------------------------------------------------------- the training script's rule per step

def _train_config(ckpt) -> dict:
    cfg = ckpt.extra.get("config")
    return dict(cfg) if isinstance(cfg, dict) else {}


def schedule(r: Run) -> Callable[[int], float]:
    """The script's base learning rate at lockstep step t (1-based): --lr (constant), else BASE's nanoGPT
    `config` (learning_rate; warmup_iters, lr_decay_iters, min_lr when decay_lr, from iter_num on)."""
    if r.o.lr is not None:
        return lambda t: r.o.lr
    cfg = _train_config(r.prep.ckpt)
    lr = cfg.get("learning_rate")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise MupscaleError(f"--lr-rule {r.o.lr_rule} sets every group's lr from the training script's learning "
                            f"rate, and {r.o.base.name} has no config.learning_rate: pass --lr X")
    it0 = r.prep.ckpt.extra.get("iter_num", 0)
    it0 = it0 if isinstance(it0, int) and not isinstance(it0, bool) else 0
    if not cfg.get("decay_lr"):
        return lambda t: float(lr)
    try:
        warm, decay, low = int(cfg["warmup_iters"]), int(cfg["lr_decay_iters"]), float(cfg["min_lr"])
    except (KeyError, TypeError, ValueError):
        raise MupscaleError(f"{r.o.base.name}: config.decay_lr is set but warmup_iters, lr_decay_iters or min_lr "
                            f"is missing: pass --lr X for a constant rate") from None

    def get_lr(t: int) -> float:  # nanoGPT's cosine schedule with warmup, at iteration iter_num + t - 1
        it = it0 + t - 1
        if it < warm:
            return lr * it / warm
        if it > decay:
            return low
        ratio = (it - warm) / (decay - warm)
        return low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - low)
    return get_lr


def training_rule(r: Run, clip: dict) -> Callable | None:
    """before_step for run_lockstep: set each group's lr by --lr-rule, clip by --grad-clip."""
    o = r.o
    if o.lr_rule == "stored" and not o.grad_clip:
        return None
    lr_of = schedule(r) if o.lr_rule != "stored" else None
    scale = r.lr_scale  # widen --hparams: both runs use the script's lr × γ̄↑/γ̄
    scales = grad_scales(r.prep.plan) if o.grad_clip and o.clip_mode == "equivalent" else None

    def rule(t: int, i: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        if lr_of is not None:
            lr = lr_of(t) * scale
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0) if o.lr_rule == "lr_scale" else lr
        if o.grad_clip:
            if i == 0 or scales is None:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip))
            else:
                norm = float(clip_grad_norm_equivalent(model, o.grad_clip, scales))
            if i == 0:
                clip["max_base_norm"] = max(clip["max_base_norm"] or 0.0, norm)
                if norm > o.grad_clip:
                    clip["active_steps"] += 1
                    clip["first_active"] = clip["first_active"] or t
    return rule


def rule_issues(rule: str, kind: str, base_osd: dict, base_names: list[list[str]], wide_osd: dict,
                wide_names: list[list[str]], plan) -> list[Issue]:
    """What a per-step lr rule does to Table 1's per-tensor lr: `uniform` erases it; `lr_scale` needs each
    group's lr_scale rescaled like its lr."""
    if rule == "stored":
        return []
    bh, wh = groups_by_name(base_osd, base_names), groups_by_name(wide_osd, wide_names)
    bad = []
    for n, b in bh.items():
        wg = wh.get(n)
        if wg is None:
            continue
        f = lr_factor(kind, plan.tensors[n])
        got = 1.0 if rule == "uniform" else (float(wg.get("lr_scale", 1.0)) / float(b.get("lr_scale", 1.0)))
        if abs(got - f) > 1e-12 * abs(f):
            bad.append((n, got, f))
    if not bad:
        return []
    n, got, f = bad[0]
    if rule == "uniform":
        return [Issue("hyper", f"--lr-rule uniform gives every group the same lr, but Table 1 needs per-tensor "
                               f"lr for {len(bad)} tensor(s) (e.g. {n!r}: lr × {f:g}): a script that sets one lr "
                               f"for all groups (stock nanoGPT's train.py) cannot train this widening exactly", n)]
    return [Issue("hyper", f"lr_scale not rescaled for {len(bad)} tensor(s) (e.g. {n!r}: WIDE's lr_scale is BASE's "
                           f"× {got:g}, Table 1 needs × {f:g}): the script's lr × lr_scale leaves the trajectory", n)]


def lr_factor(kind: str, p) -> float:
    """Table 1's lr factor of one tensor (SGD s/g, Adam/AdamW s)."""
    return float(p.s / p.g) if kind == "sgd" else float(p.s)


# --------------------------------------------------------------------------------- the user's optimizer

def resolve_builder(ref: str) -> Callable:
    """--optimizer module:fn or FILE.py:fn: the user's optimizer builder."""
    from mupscale_cli.verify.modelspec import import_ref
    fn = import_ref(ref, "--optimizer")
    if not callable(fn):
        raise MupscaleError(f"--optimizer {ref!r}: not a function")
    return fn


def build_user_optimizer(fn: Callable, ref: str, model: nn.Module, config: dict) -> torch.optim.Optimizer:
    """fn(model) or fn(model, config) (config: BASE's training `config`, e.g. nanoGPT's, or {})."""
    import inspect
    try:
        n = len([p for p in inspect.signature(fn).parameters.values()
                 if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        n = 1
    try:
        opt = fn(model, config) if n >= 2 else fn(model)
    except MupscaleError:
        raise
    except Exception as e:  # noqa: BLE001 - user code
        raise MupscaleError(f"--optimizer {ref!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise MupscaleError(f"--optimizer {ref!r} returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def _opt_kind(opt: torch.optim.Optimizer) -> str | None:
    if isinstance(opt, torch.optim.SGD):
        return "sgd"
    if isinstance(opt, torch.optim.AdamW):
        return "adamw"
    if isinstance(opt, torch.optim.Adam):
        return "adamw" if opt.param_groups and opt.param_groups[0].get("decoupled_weight_decay") else "adam"
    return None


def load_user_state(opt: torch.optim.Optimizer, model: nn.Module, sd: dict, names: list[list[str]], kind: str,
                    ref: str, who: str) -> list[str]:
    """Load `sd` into the user's optimizer as a training script would; raise MupscaleError (naming why) when
    it does not load, pairs a tensor with another's state (groups in another order), or is another type.
    Returns notes: hyper-parameters the builder set that load_state_dict replaced."""
    pname = {id(p): n for n, p in model.named_parameters()}
    got = [[pname.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]
    built = {n: {k: v for k, v in g.items() if k not in ("params", "param_names")}
             for g, ns in zip(opt.param_groups, got) for n in ns}
    ok = _opt_kind(opt)
    if ok is not None and ok != kind:
        raise MupscaleError(f"{who}'s optimizer state is {kind}, the optimizer {ref} builds is {ok}")
    try:
        opt.load_state_dict(_clone_tree(sd))
    except (ValueError, RuntimeError, KeyError) as e:
        sizes = [len(g["params"]) for g in sd["param_groups"]]
        raise MupscaleError(f"{who}'s optimizer state does not load into the optimizer {ref} builds: "
                            f"{' '.join(str(e).split())} (state: {len(sizes)} groups of {sizes} tensors; the "
                            f"builder: {len(got)} groups of {[len(g) for g in got]})") from None
    for i, (want, have) in enumerate(zip(names, got)):
        if want != have:
            j = next(x for x in range(len(want)) if want[x] != have[x])
            raise MupscaleError(f"{who}'s optimizer state pairs group {i} entry {j}, {want[j]!r}, with the "
                                f"builder's {have[j]!r}: load_state_dict matches by position, so {have[j]!r} would "
                                f"train with {want[j]!r}'s state and hyper-parameters")
    saved = {n: g for g, ns in zip(sd["param_groups"], names) for n in ns}
    changed = {}
    for n, hp in built.items():
        for k2, v in hp.items():
            sv = saved.get(n, {}).get(k2)
            if isinstance(v, (int, float)) and isinstance(sv, (int, float)) and not math.isclose(v, sv, rel_tol=1e-12):
                changed.setdefault(k2, []).append(n)
    return [f"the optimizer {ref} builds for {who} gives {k2} another value than the loaded state for "
            f"{len(ns)} tensor(s), e.g. {ns[0]!r}: load_state_dict keeps the state's" for k2, ns in changed.items()]


# ----------------------------------------------------------------------------- what a step-0 failure is

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


@contextmanager
def _data_errors(path: Path | None):
    """With --data, the model failing on a batch (a token id past the vocabulary, a wrong shape) is an input
    error, not a bug."""
    try:
        yield
    except (IndexError, RuntimeError, ValueError) as e:
        if path is None:
            raise
        first = " ".join(str(e).split())[:200]
        raise MupscaleError(f"--data {path}: the model fails on its batches ({type(e).__name__}: {first}); check "
                            f"that token ids are below vocab_size and shapes fit the model") from None


PROV_TYPES = {"k": dict, "spec": str, "spec_sha256": str, "sizes": dict, "seed": int, "noise": str,
              "noise_device": str, "noise_std": dict, "source": str, "source_sha256": str}


def _check_provenance(prov: dict, path: Path | None) -> None:
    """The provenance entries verify reads have the types widen writes (a hand-edited file: exit 2)."""
    for key, kind in PROV_TYPES.items():
        v = prov.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise MupscaleError(f"{path}: its provenance entry {key!r} is {type(v).__name__}, expected "
                                f"{kind.__name__}; the file was edited: widen again")
    for key in ("sigma",):
        v = prov.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v >= 0):
            raise MupscaleError(f"{path}: its provenance entry {key!r} is {v!r}, expected a number >= 0")
    if isinstance(prov.get("noise_std"), dict) and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in prov["noise_std"].values()):
        raise MupscaleError(f"{path}: its provenance entry 'noise_std' must map tensor names to numbers")


def default_tol(dtype: str, plan) -> Callable[[int], float]:
    """--tol's default at each step: DEFAULT_TOL per dtype; for a model with BatchNorm (running statistics
    in the plan) in float64, growing tenfold every BATCHNORM_TOL steps up to its cap."""
    base = DEFAULT_TOL[dtype]
    if dtype not in BATCHNORM_TOL or not any(n.rsplit(".", 1)[-1] == "running_var" for n in plan.tensors):
        return lambda t: base
    per_decade, cap = BATCHNORM_TOL[dtype]
    return lambda t: min(cap, base * 10 ** (t / per_decade))


def _source_digest(prep: Prepared) -> str:
    """BASE's digest as `widen` records it (the file's sha256; sharded inputs: widen's own digest)."""
    return source_sha256(prep.ckpt)


def _digest_note(path: Path) -> str | None:
    """A note when WIDE's recorded tensor digests say it was modified after widening."""
    try:
        from mupscale_cli.commands.inspect import check_digests
        from mupscale_cli.formats.checkpoint import load_checkpoint
        check_digests(load_checkpoint(path))
    except MupscaleError as e:
        return f"WIDE was modified after widening: {str(e).split(': ', 1)[-1]}"
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
    return None


def _roundoff_growth(rows: list[dict], step: int, dtype: str) -> bool:
    """The first steps agreed to round-off and the failure came later: amplified round-off."""
    return step >= 5 and len(rows) > 4 and max(_rel(r) for r in rows[:4]) <= 1e3 * UNIT_ROUNDOFF[dtype]


def _structure(model: dict[str, torch.Tensor], plan) -> list[Issue]:
    issues = []
    for n, p in plan.tensors.items():
        t = model.get(n)
        if t is None:
            issues.append(Issue("structure", f"WIDE has no tensor {n!r}", n))
        elif tuple(t.shape) != p.out_shape:
            issues.append(Issue("structure", f"WIDE's {n!r} has shape {list(t.shape)}; widening BASE by k "
                                             f"{plan.k} gives {list(p.out_shape)}: was it widened with another "
                                             f"--k or --spec?", n))
    extra = [n for n in model if n not in plan.tensors]
    if extra:
        issues.append(Issue("structure", f"WIDE has {len(extra)} tensor(s) BASE does not, e.g. {extra[0]!r}",
                            extra[0]))
    return issues


def _stored_dtype(prov: dict) -> torch.dtype | None:
    """The dtype `widen --dtype` cast WIDE's floating-point tensors to, if it records one."""
    name = prov.get("dtype")
    if name is None:
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise MupscaleError(f"WIDE records dtype {name!r}, which is not a floating-point torch dtype")
    return dt


def _sigma_map(prov: dict) -> dict[str, float] | None:
    m = prov.get("sigma_per_tensor")
    if m is None:
        return None
    if not isinstance(m, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                          for v in m.values()):
        raise MupscaleError("WIDE records sigma_per_tensor that is not a map of tensor names to numbers >= 0")
    return {str(n): float(v) for n, v in m.items()}


def _noised(sigma: float, sigma_map: dict[str, float] | None) -> bool:
    return sigma > 0 or any(v > 0 for v in (sigma_map or {}).values())


def _lr_scale(prov: dict) -> float:
    v = prov.get("lr_scale", 1.0)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
        raise MupscaleError(f"WIDE records lr_scale {v!r}; expected a positive number")
    return float(v)


def _noise_check(w, prep: Prepared, sigma: float, prov: dict, stored: torch.dtype | None = None,
                 sigma_map: dict[str, float] | None = None) -> tuple[dict, list[Issue]]:
    """WIDE = exact widening + the noise re-derived from (seed, convention, noise device, σ̄ or σ̄ per
    tensor), then cast to its recorded dtype: tensor by tensor, bit for bit."""
    noised = _noised(sigma, sigma_map)
    seed = prov.get("seed", 0)
    conv = prov.get("noise", noise_mod.CONVENTION)
    device = prov.get("noise_device", "cpu")
    kw = {}
    if noised and device != "cpu":
        if device != "cuda" or not torch.cuda.is_available():
            raise MupscaleError(f"WIDE's noise was drawn with the {device!r} generator (--noise-device); "
                                f"verify it where that device is available")
        kw["noise_device"] = device
    if stored is not None:
        kw["out_dtype"] = stored
    if noised and conv != noise_mod.CONVENTION:
        raise MupscaleError(f"WIDE records noise convention {conv!r}; this mupscale re-derives "
                            f"{noise_mod.CONVENTION!r} only")
    if not isinstance(seed, int):
        raise MupscaleError(f"WIDE records σ̄ = {sigma} but no integer seed; its noise cannot be re-derived")
    recorded = prov.get("noise_std") or {}
    tensors, issues = {}, []
    for n, p in prep.plan.tensors.items():
        if p.alias_of:
            continue
        s_n = sigma if sigma_map is None else sigma_map.get(n, sigma)
        std = s_n * p.noise_unit
        if recorded and abs(float(recorded.get(n, 0.0)) - std) > 1e-12 * max(std, 1e-300):
            issues.append(Issue("noise", f"WIDE records noise std {recorded.get(n, 0.0)} for {n!r}, the spec "
                                         f"gives {std}: another spec or k?", n))
        base_t = prep.ckpt.tensors[n]
        exp = widen_noised(base_t, p, s_n, seed, **kw)
        got = w.model[n]
        status = "noised" if std and base_t.is_floating_point() else "exact"
        what = "plus the recorded noise" if noised else ""
        what += (" and " if what else "") + f"cast to {stored}" if stored is not None else ""
        if got.dtype != exp.dtype or not torch.equal(got, exp):
            if got.dtype != exp.dtype:
                status = f"dtype {got.dtype}, expected {exp.dtype}"
            elif std and torch.equal(got, _cast(widen(base_t, p), stored)):
                status = "noise missing"
            else:
                d = (got.double() - exp.double()).abs().max().item() if got.dtype.is_floating_point else float("nan")
                status = f"differs (max |Δ| {d:.3g} from exact widening {what})"
            issues.append(Issue("noise", f"{n!r} is not the exact widening of BASE {what} "
                                         f"(σ̄ {s_n}, seed {seed}): {status}", n))
        tensors[n] = status
    ok = not issues
    return {"sigma": sigma, **({"sigma_per_tensor": sigma_map} if sigma_map is not None else {}),
            "seed": seed, "convention": conv, "noise_device": device,
            "dtype": str(stored).removeprefix("torch.") if stored else None, "ok": ok,
            "checked": len(tensors), "tensors": tensors}, issues


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


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


UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}


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
