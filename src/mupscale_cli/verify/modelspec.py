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

`--model` also takes the user's own model code: `path/to/model.py:GPT` (a file) or `pkg.module:GPT`. A
class whose `__init__` takes one config object is built as `GPT(GPTConfig(**model_args))` (the config class:
the `__init__` annotation, else `<Class>Config`, `GPTConfig` or `Config` in the same module); any other class
as `Cls(**model_args)`. Base and wide are each built from their own model_args. Without batch/loss/output
in its module or `inputs` in the spec, token batches are drawn from `vocab_size` and `block_size` (at most
32 positions); a forward that takes `targets` is called as `model(x, targets)` and its `(logits, loss)` used.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
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
    user: bool = True  # False: a bundled zoo model (not the user's training code)


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


def _import_file(path_text: str, factory: str):
    """Import a model file by path (its directory goes on sys.path, so its own imports work)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MupscaleError(f"--model {factory!r}: no such file {path_text!r}")
    path = path.resolve()
    name = f"mupscale_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    if os.getcwd() not in sys.path:  # as `python train.py` run here would find its packages
        sys.path.append(os.getcwd())
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MupscaleError(f"--model {factory!r}: cannot import {path_text!r} (not a Python file?)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - user code failing on import
        del sys.modules[name]
        raise MupscaleError(f"--model {factory!r}: importing {path_text!r} failed: {type(e).__name__}: {e}") from None
    return mod


def split_ref(ref: str, where: str) -> tuple[str, str, bool]:
    """'pkg.module[:name]' or 'path/to/file.py[:name]' -> (module or path, name, is_file)."""
    modname, _, fname = ref.rpartition(":") if ":" in ref else (ref, "", "")
    is_file = modname.endswith(".py") or "/" in modname or os.sep in modname
    if (not is_file and not all(p.isidentifier() for p in modname.split("."))) or (fname and not fname.isidentifier()):
        raise MupscaleError(f"{where}: expected 'package.module[:name]' or 'path/to/file.py[:name]', got {ref!r}")
    return modname, fname, is_file


def import_ref(ref: str, where: str, default: str = "build"):
    """The object a 'pkg.module:name' or 'path/to/file.py:name' reference names (importing runs its code)."""
    modname, fname, is_file = split_ref(ref, where)
    try:
        mod = _import_file(modname, ref) if is_file else _import(modname, ref)
    except MupscaleError as e:
        raise MupscaleError(str(e).replace("model factory", where).replace("--model", where)) from None
    obj = getattr(mod, fname or default, None)
    if obj is None:
        raise MupscaleError(f"{where} {ref!r}: {modname} has no {fname or default!r}")
    return obj


def _config_class(mod, cls: type, param: inspect.Parameter):
    """The config class a `Cls(config)` model takes: its annotation, else <Cls>Config, GPTConfig, Config."""
    ann = param.annotation
    if isinstance(ann, str):
        ann = getattr(mod, ann.split(".")[-1].strip("'\""), None)
    if inspect.isclass(ann) and ann is not inspect.Parameter.empty:
        return ann
    for n in (f"{cls.__name__}Config", "GPTConfig", "Config"):
        if inspect.isclass(c := getattr(mod, n, None)):
            return c
    return None


def class_builder(cls: type, mod, factory: str) -> Callable[..., nn.Module]:
    """build(model_args) for a model class: Cls(Config(**model_args)) or Cls(**model_args)."""
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    cfg = None
    if len(named) == 1 and named[0].name not in ("kwargs",):
        cfg = _config_class(mod, cls, named[0])
        if cfg is None and named[0].name in ("config", "cfg", "conf", "args"):
            raise MupscaleError(f"--model {factory!r}: {cls.__name__}.__init__ takes a config object but the "
                                f"module has no {cls.__name__}Config, GPTConfig or Config class; pass a "
                                f"function instead (pkg.module:fn, fn(model_args) -> nn.Module)")

    def build(args: dict, base_args: dict | None = None) -> nn.Module:
        try:
            m = cls(cfg(**args)) if cfg is not None else cls(**args)
        except MupscaleError:
            raise
        except TypeError as e:
            what = f"{cfg.__name__}(**model_args)" if cfg is not None else f"{cls.__name__}(**model_args)"
            raise MupscaleError(f"--model {factory!r}: {what} failed on model_args {args}: {e}") from None
        except Exception as e:  # noqa: BLE001 - user code
            raise MupscaleError(f"model {factory!r} failed on model_args {args}: {type(e).__name__}: {e}") from None
        return m
    return build


def _takes_targets(cls_or_fn) -> bool:
    fwd = getattr(cls_or_fn, "forward", None)
    try:
        ps = list(inspect.signature(fwd).parameters) if fwd is not None else []
    except (TypeError, ValueError):
        return False
    return "targets" in ps


def token_io(takes_targets: bool):
    """(batch, loss, output) for a token model without batch/loss/output: tokens from vocab_size and
    block_size; a forward with `targets` gives (logits, loss) (nanoGPT: full logits only with targets)."""
    def batch(args: dict, batch_size: int, gen: torch.Generator, dtype=torch.float32):
        for key in ("vocab_size", "block_size"):
            if not isinstance(args.get(key), int) or isinstance(args.get(key), bool):
                raise MupscaleError(f"model_args have no int {key!r}: verify cannot draw token batches for this "
                                    f"model; describe them in the spec (model: {{inputs: ...}}) or pass --data")
        t = min(args["block_size"], 32)
        x = torch.randint(args["vocab_size"], (batch_size, t), generator=gen)
        return x, torch.roll(x, 1, dims=1)  # predict the previous token: learnable through attention

    def output(model, x):
        return logits_of(model(x, x) if takes_targets else model(x))

    def loss(model, x, y):
        out = model(x, y) if takes_targets else model(x)
        if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor) and out[1].dim() == 0:
            return out[1]
        logits = logits_of(out)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    return batch, loss, output


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
def param_budget(limit: int, what: str, meta: bool = False):
    """While building `what`: stop as soon as its parameters (real ones: mup's shape-only models on the meta
    device do not count, unless `meta`) exceed `limit` elements, before a model that model_args blow up
    (n_layer 20000, vocab_size 1e8) takes minutes or all memory to build."""
    count, seen = [0], set()

    def hook(module, name, param):
        if param is None or (param.device.type == "meta" and not meta) or id(param) in seen:
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
    if not isinstance(factory, str):
        raise MupscaleError(f"{where}: factory must be 'package.module' or 'package.module:function', "
                            f"got {factory!r}")
    modname, fname, is_file = split_ref(factory, where)
    if not override and not trust_code and (is_file or modname.split(".")[0] != "mupscale_cli"):
        raise MupscaleError(f"spec {spec_name}: model.factory {factory!r} is code outside mupscale that verify "
                            f"would import and run; pass --trust-spec-code if you trust this spec (or name the "
                            f"factory yourself with --model)")
    mod = _import_file(modname, factory) if is_file else _import(modname, factory)
    fn = getattr(mod, fname or "build", None)
    if not callable(fn):
        raise MupscaleError(f"model factory {factory!r}: {modname} has no function or class {fname or 'build'!r}")
    user = not (modname == "mupscale_cli.zoo" or modname.startswith("mupscale_cli.zoo."))
    own_io = all(callable(getattr(mod, a, None)) for a in ("batch", "loss", "output"))
    if inspect.isclass(fn) and issubclass(fn, nn.Module):
        build = class_builder(fn, mod, factory)
        if "inputs" in model:
            batch, loss, output = generic(*_inputs(where, model["inputs"]))
        elif own_io:
            batch, loss, output = mod.batch, mod.loss, mod.output
        else:
            batch, loss, output = token_io(_takes_targets(fn))
        return ModelDef(factory, build, batch, loss, output, user)
    if "inputs" in model:
        batch, loss, output = generic(*_inputs(where, model["inputs"]))
    elif all(callable(getattr(mod, a, None)) for a in ("batch", "loss", "output")):
        batch, loss, output = mod.batch, mod.loss, mod.output
    else:
        raise MupscaleError(f"{where}: {modname} defines no batch/loss/output, so the spec must describe the "
                            f"inputs: model: {{factory: {factory}, inputs: {{kind: tokens|vectors|images, ...}}}} "
                            f"(docs/verify.md)")
    return ModelDef(factory, _two_arg(fn, factory), batch, loss, output, user)


def check_shapes(build: Callable[[], nn.Module], tensors: dict, limit: int, what: str) -> None:
    """The model that model_args describe, built first on the meta device (no memory, no init, within a
    budget of `limit` elements counting shape-only models): every tensor it shares a name with must have
    the checkpoint's shape, else stop before building it for real. A factory that cannot build on the
    meta device is skipped here (the strict load after the real build checks it)."""
    try:
        with torch.device("meta"), param_budget(limit, what, meta=True):
            model = build()
    except OverBudget:
        raise
    except Exception:  # noqa: BLE001 - user code that needs real tensors to build
        return
    for n, t in model.state_dict().items():
        if n in tensors and tuple(t.shape) != tuple(tensors[n].shape):
            raise MupscaleError(f"{what}: tensor {n!r} is {list(tensors[n].shape)} but the model its model_args "
                                f"describe has {list(t.shape)}: its model_args do not describe it")
