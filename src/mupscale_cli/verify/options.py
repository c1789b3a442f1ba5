"""What one `mupscale verify` check is: its options, the tolerances per dtype, and `Run`, what the steps of
one check (commands/verify.py: read -> plan and check -> build models -> build optimizers -> lockstep ->
report) hand on to each other."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mupscale_cli.core.job import Prepared
from mupscale_cli.core.optstate import KINDS
from mupscale_cli.errors import MupscaleError
from mupscale_cli.verify.diagnose import Issue
from mupscale_cli.verify.modelspec import ModelDef


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


UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}


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


def default_tol(dtype: str, plan) -> Callable[[int], float]:
    """--tol's default at each step: DEFAULT_TOL per dtype; for a model with BatchNorm (running statistics
    in the plan) in float64, growing tenfold every BATCHNORM_TOL steps up to its cap."""
    base = DEFAULT_TOL[dtype]
    if dtype not in BATCHNORM_TOL or not any(n.rsplit(".", 1)[-1] == "running_var" for n in plan.tensors):
        return lambda t: base
    per_decade, cap = BATCHNORM_TOL[dtype]
    return lambda t: min(cap, base * 10 ** (t / per_decade))


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
