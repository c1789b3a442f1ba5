"""The model a spec's `model:` section names, for `mupscale verify` (docs/verify.md).

    model:
      factory: mupscale_cli.zoo.gpt          # a module with build/batch/loss/output (the bundled zoo)
    model:
      factory: mypkg.models:make_model       # a user function: fn(model_args[, base_args]) -> nn.Module
      inputs: {kind: tokens, vocab_size: vocab_size, seq_len: 16}

A user function builds the model from model_args; the base model is built as `fn(base_args)`, the wide
one as `fn(wide_args, base_args)` (a μP model sets its base shapes from base_args). Its synthetic batches
come from `inputs`, its loss is cross-entropy on its output (logits; a tuple's first entry or an object's
`.logits` are taken). A `module:function` whose module defines batch/loss/output itself needs no `inputs`.
Importing the factory runs its code, so a factory named by a spec file that lies outside the mupscale_cli
package is imported only with `trust_code=True` (`--trust-spec-code`, like transformers'
`trust_remote_code`); `--model` on the command line is explicit already.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mupscale_cli.errors import MupscaleError, missing_package

MODEL_KEYS = ("factory", "inputs")
INPUT_KEYS = {  # kind -> required keys (values: ints or model_args names)
    "tokens": ("vocab_size", "seq_len"),
    "vectors": ("dim", "classes"),
    "images": ("channels", "size", "classes"),
}


@dataclass
class ModelDef:
    """What the lockstep engine needs: the same interface as a zoo module."""
    factory: str
    build: Callable[..., nn.Module]
    batch: Callable[[dict, int, torch.Generator, torch.dtype], tuple]
    loss: Callable[[nn.Module, Any, Any], torch.Tensor]
    output: Callable[[nn.Module, Any], torch.Tensor]


def logits_of(out) -> torch.Tensor:
    """A model's output as a tensor: itself, a tuple/list's first entry or an object's `.logits`."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise MupscaleError(f"the model returned {type(out).__name__}; verify needs logits (a tensor, a tuple "
                        f"whose first entry is the logits, or an object with .logits)")


def _import(modname: str, factory: str):
    if os.getcwd() not in sys.path:  # the console script's sys.path lacks the current directory
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(modname)
    except ImportError as e:
        if (missing := missing_package(e)) is not None:
            raise missing from None
        raise MupscaleError(f"model factory {factory!r}: cannot import {modname!r} ({e}); install it or put it "
                            f"on PYTHONPATH") from None
    except Exception as e:  # noqa: BLE001 - user code failing on import
        raise MupscaleError(f"model factory {factory!r}: importing {modname!r} failed: "
                            f"{type(e).__name__}: {e}") from None


def _inputs(where: str, d) -> tuple[str, dict]:
    if not isinstance(d, dict):
        raise MupscaleError(f"{where}: 'inputs' must be a mapping with 'kind' ({' | '.join(INPUT_KEYS)})")
    kind = d.get("kind")
    if kind not in INPUT_KEYS:
        raise MupscaleError(f"{where}: inputs.kind must be one of {', '.join(INPUT_KEYS)}, got {kind!r}")
    need = INPUT_KEYS[kind]
    unknown = sorted(set(d) - set(need) - {"kind"})
    if unknown:
        raise MupscaleError(f"{where}: unknown inputs key {unknown[0]!r} for kind {kind} "
                            f"(allowed: kind, {', '.join(need)})")
    missing = [k for k in need if k not in d]
    if missing:
        raise MupscaleError(f"{where}: inputs of kind {kind} need {', '.join(missing)} "
                            f"(an int or a model_args name)")
    for k in need:
        v = d[k]
        if not ((isinstance(v, int) and not isinstance(v, bool) and v > 0) or (isinstance(v, str) and v)):
            raise MupscaleError(f"{where}: inputs.{k} must be a positive int or a model_args name, got {v!r}")
    return kind, {k: d[k] for k in need}


def _size(inputs: dict, key: str, args: dict) -> int:
    v = inputs[key]
    if isinstance(v, int):
        return v
    if v not in args or not isinstance(args[v], int) or isinstance(args[v], bool):
        raise MupscaleError(f"inputs.{key} refers to model_args {v!r}, which the checkpoint's model_args "
                            f"do not give as an int")
    return args[v]


def generic(kind: str, inputs: dict):
    """(batch, loss, output) for a user factory described by `inputs`."""
    def batch(args: dict, batch_size: int, gen: torch.Generator, dtype=torch.float32):
        n = lambda key: _size(inputs, key, args)  # noqa: E731
        if kind == "tokens":
            x = torch.randint(n("vocab_size"), (batch_size, n("seq_len")), generator=gen)
            y = torch.randint(n("vocab_size"), (batch_size, n("seq_len")), generator=gen)
        elif kind == "vectors":
            x = torch.randn(batch_size, n("dim"), generator=gen, dtype=dtype)
            y = torch.randint(n("classes"), (batch_size,), generator=gen)
        else:
            s = n("size")
            x = torch.randn(batch_size, n("channels"), s, s, generator=gen, dtype=dtype)
            y = torch.randint(n("classes"), (batch_size,), generator=gen)
        return x, y

    def output(model, x):
        return logits_of(model(x))

    def loss(model, x, y):
        logits = output(model, x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    return batch, loss, output


def _two_arg(fn: Callable, factory: str) -> Callable[..., nn.Module]:
    """fn(args) for the base, fn(args, base_args) for the wide model; checked to return a module."""
    try:
        takes_base = len(inspect.signature(fn).parameters) >= 2 or any(
            p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        takes_base = True

    def build(args: dict, base_args: dict | None = None) -> nn.Module:
        try:
            m = fn(args) if base_args is None or not takes_base else fn(args, base_args)
        except MupscaleError:
            raise
        except Exception as e:  # noqa: BLE001 - user code
            raise MupscaleError(f"model factory {factory!r} failed on model_args {args}: "
                                f"{type(e).__name__}: {e}") from None
        if not isinstance(m, nn.Module):
            raise MupscaleError(f"model factory {factory!r} returned {type(m).__name__}, not a torch nn.Module")
        return m
    return build


class OverBudget(MupscaleError):
    """The factory made more parameters than the checkpoint holds (model_args that do not describe it)."""


@contextmanager
def param_budget(limit: int, what: str):
    """While building `what`: stop as soon as its parameters (real ones: mup's shape-only models on the meta
    device do not count) exceed `limit` elements, before a model that model_args blow up (n_layer 20000,
    vocab_size 1e8) takes minutes or all memory to build."""
    count, seen = [0], set()

    def hook(module, name, param):
        if param is None or param.device.type == "meta" or id(param) in seen:
            return None
        seen.add(id(param))
        count[0] += param.numel()
        if count[0] > limit:
            raise OverBudget(f"{what}: the model factory has made more than {limit} parameter elements, more "
                             f"than the checkpoint's tensors hold: its model_args do not describe it")
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_args_scale(args: dict, shapes: list[tuple[int, ...]], what: str) -> None:
    """An integer model_args entry far larger than every dimension of the checkpoint's tensors (vocab_size
    1e8 for a 32-token embedding) would make the factory allocate for it: refused before building."""
    largest = max((n for s in shapes for n in s), default=1)
    cap = max(16 * largest, 1 << 20)
    for key, v in args.items():
        if isinstance(v, int) and not isinstance(v, bool) and v > cap:
            raise MupscaleError(f"{what}: model_args {key} = {v} is larger than {cap} (16 x the largest dimension "
                                f"of its tensors, {largest}, or 2^20): model_args do not describe this checkpoint")


def resolve(model: dict | None, spec_name: str, override: str | None = None, trust_code: bool = False) -> ModelDef:
    """The ModelDef of a spec's `model:` section (or of `override`, a factory given on the command line).
    A spec's factory outside the mupscale_cli package needs `trust_code` (it runs code named by a file)."""
    where = f"spec {spec_name}: model"
    model = dict(model or {})
    if override:
        model["factory"] = override
        where = f"--model {override}"
    unknown = sorted(set(map(str, model)) - set(MODEL_KEYS))
    if unknown:
        raise MupscaleError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(MODEL_KEYS)})")
    factory = model.get("factory")
    if not factory:
        raise MupscaleError(f"spec {spec_name} names no model (a 'model: {{factory: ...}}' section): verify needs "
                            f"one to build the models; pass --model package.module[:function] "
                            f"(docs/verify.md)")
    if not isinstance(factory, str) or factory.count(":") > 1:
        raise MupscaleError(f"{where}: factory must be 'package.module' or 'package.module:function', "
                            f"got {factory!r}")
    modname, _, fname = factory.partition(":")
    if not all(p.isidentifier() for p in modname.split(".")) or (fname and not fname.isidentifier()):
        raise MupscaleError(f"{where}: factory must be 'package.module' or 'package.module:function', "
                            f"got {factory!r}")
    if not override and not trust_code and modname.split(".")[0] != "mupscale_cli":
        raise MupscaleError(f"spec {spec_name}: model.factory {factory!r} is code outside mupscale that verify "
                            f"would import and run; pass --trust-spec-code if you trust this spec (or name the "
                            f"factory yourself with --model)")
    mod = _import(modname, factory)
    fn = getattr(mod, fname or "build", None)
    if not callable(fn):
        raise MupscaleError(f"model factory {factory!r}: {modname} has no function {fname or 'build'!r}")
    if "inputs" in model:
        batch, loss, output = generic(*_inputs(where, model["inputs"]))
    elif all(callable(getattr(mod, a, None)) for a in ("batch", "loss", "output")):
        batch, loss, output = mod.batch, mod.loss, mod.output
    else:
        raise MupscaleError(f"{where}: {modname} defines no batch/loss/output, so the spec must describe the "
                            f"inputs: model: {{factory: {factory}, inputs: {{kind: tokens|vectors|images, ...}}}} "
                            f"(docs/verify.md)")
    return ModelDef(factory, _two_arg(fn, factory), batch, loss, output)
