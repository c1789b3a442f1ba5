"""What verify sets up before training: the device (deterministic on CUDA), the data, both models built from
their model_args and loaded strictly, optimizers from their states, and WIDE's recorded provenance checked."""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mupscale_cli.api import make_optimizer, optimizer_groups
from mupscale_cli.core.job import Prepared
from mupscale_cli.core.optstate import OptimizerMap
from mupscale_cli.core.spec import Spec, saved_name
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.checkpoint import source_sha256, strip_prefix
from mupscale_cli.verify.modelspec import ModelDef, check_args_scale, check_shapes, param_budget
from mupscale_cli.verify.options import VerifyOptions


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


def model_names(names: list[list[str]], spec: Spec) -> list[list[str]]:
    """The model's parameter names of the file's tensor names per group (spec saved_as: GPT-NeoX's lm_head is
    saved as embed_out); names of parameters the file splits (state_only) are the model's already."""
    return [[saved_name(spec, n, reverse=True) for n in ns] for ns in names]


def _optimizer(kind: str, model: nn.Module, sd: dict, names: list[list[str]], who: str,
               spec: Spec | None = None) -> torch.optim.Optimizer:
    opt = make_optimizer(kind, optimizer_groups(model, sd, model_names(names, spec) if spec else names))
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
            n = saved_name(prep.plan.spec, strip_prefix(raw))  # the file's name (spec saved_as)
            p = prep.plan.state_plan(n)
            ns.append(p.alias_of or n if p else n)
        out.append(ns)
    return out


def _fresh_optimizer(prep: Prepared, o: VerifyOptions, base: nn.Module) -> tuple[dict, OptimizerMap]:
    """BASE without optimizer state: a fresh optimizer (--optimizer, --lr, torch defaults otherwise)."""
    if o.optimizer is None or o.lr is None:
        raise MupscaleError(f"{o.base} has no optimizer state: verify trains with the checkpoint's optimizer; "
                            f"pass --optimizer sgd|adam|adamw and --lr X to verify with a fresh one")
    plan, params, names = prep.plan, [], []
    for n, p in base.named_parameters():  # the model's parameters, named as the file names them
        f = saved_name(plan.spec, n)
        if plan.state_plan(f, (tuple(p.shape), p.dtype)) is None:  # neither a tensor of the file nor split by it
            raise MupscaleError(f"the model verify built has a parameter {n!r} that is no tensor of {o.base} "
                                f"and no spec rule plans: the spec does not describe this model")
        params.append(p)
        names.append(f)
    opt = make_optimizer(o.optimizer, [{"params": params, "lr": o.lr}])
    return opt.state_dict(), OptimizerMap(o.optimizer, "single", [names])


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


def _source_digest(prep: Prepared) -> str:
    """BASE's digest as `widen` records it (the file's sha256; sharded inputs: widen's own digest)."""
    return source_sha256(prep.ckpt)


def _digest_note(path: Path) -> str | None:
    """A note when WIDE's recorded tensor digests say it was modified after widening."""
    try:
        from mupscale_cli.commands.inspect import check_digests
        from mupscale_cli.formats import load_checkpoint
        check_digests(load_checkpoint(path))
    except MupscaleError as e:
        return f"WIDE was modified after widening: {str(e).split(': ', 1)[-1]}"
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
    return None
