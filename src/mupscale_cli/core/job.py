"""What one widening is: the options of `widen` (and the commands that share its checks) and what
`prepare` found (checkpoint, plan, optimizer mapping, notes)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mupscale_cli.core.plan import Plan
from mupscale_cli.core.source import Source
from mupscale_cli.core.spec import Spec
from mupscale_cli.bounded import int_text, shown
from mupscale_cli.errors import MupscaleError

if TYPE_CHECKING:
    from mupscale_cli.core.optstate import OptimizerMap

DEFAULT_CHUNK_BYTES = 8 << 20  # one unit of work: a range of a tensor's output of about this size


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class WidenOptions:
    checkpoint: Path
    output: Path | None = None
    k: str = "2"
    sigma: float = 0.0
    seed: int = 0
    spec: str | Spec | None = None  # a path or bundled name, or a parsed Spec (e.g. recorded in an output)
    optimizer: str | None = None  # sgd | adam | adamw, when the state cannot tell
    opt_layout: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    force: bool = False
    untie: bool = False  # --untie: a tied readout in standard parametrization written untied as E / k
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
    model_args: dict = field(default_factory=dict)  # --model-arg: over the checkpoint's own (DCP stores none)
    risk_model_type: bool = False  # --risk-model-type-mismatch: --spec over a config.json of another model_type


def sigma_of(opts: WidenOptions, name: str) -> float:
    """σ̄ of canonical tensor `name`."""
    return opts.sigma if opts.sigma_map is None else opts.sigma_map.get(name, opts.sigma)


@dataclass
class Prepared:
    ckpt: Source  # a formats.checkpoint.Checkpoint (core reads its tensors and optimizer only)
    plan: Plan
    omap: OptimizerMap | None
    model_args: dict | None
    notes: list[str] = field(default_factory=list)
    config: dict | None = None  # the checkpoint's `config`, rewritten by the spec


def parse_sizes(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items:
        name, _, v = it.partition("=")
        if not name.isidentifier() or not (v.isascii() and v.isdigit()) or int_text(v, f"--size {shown(it)}") < 1:
            raise MupscaleError(f"--size {shown(it)}: expected NAME=INT, e.g. --size head_dim=64")
        out[name] = int(v)
    return out


def parse_model_args(items: list[str]) -> dict:
    """--model-arg KEY=VALUE (repeatable): VALUE an integer, a float, true/false, null, or else a string."""
    out: dict = {}
    for it in items:
        key, eq, v = it.partition("=")
        if not eq or not key.isidentifier():
            raise MupscaleError(f"--model-arg {shown(it)}: expected KEY=VALUE, e.g. --model-arg n_embd=256")
        digits = v[1:] if v[:1] in "+-" else v
        if digits.isascii() and digits.isdigit():
            out[key] = int_text(digits, f"--model-arg {shown(it)}") * (-1 if v[0] == "-" else 1)
        elif v in ("true", "false", "True", "False"):
            out[key] = v in ("true", "True")
        elif v in ("null", "None"):
            out[key] = None
        else:
            try:
                f = float(v)
            except ValueError:
                f = None
            if f is None or v.strip() != v:
                out[key] = v
            elif math.isfinite(f):
                out[key] = f
            else:
                raise MupscaleError(f"--model-arg {shown(it)}: not a finite number")
    return out


def out_dtype(opts: WidenOptions) -> torch.dtype | None:
    if opts.dtype is None:
        return None
    if opts.dtype not in DTYPES:
        raise MupscaleError(f"--dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[opts.dtype]
