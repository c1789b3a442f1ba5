"""Resolve a spec against a checkpoint's shapes: each tensor's role, widened shape and factors."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from mupscale_cli.core.source import LazyTensors, iter_chunks, tensor_meta
from mupscale_cli.core.spec import Dim, Rule, Spec, eval_size
from mupscale_cli.bounded import int_text, shown
from mupscale_cli.errors import MupscaleError

ONE = Fraction(1)


@dataclass(frozen=True)
class DimPlan:
    axis: str | None
    k: int
    block: int


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    dims: tuple[DimPlan, ...]
    rule: str
    fan_in: int | None = None  # None for 0-d/1-d tensors
    buffer: bool = False
    readout_like: bool = False
    s: Fraction = ONE  # weight scale
    g: Fraction = ONE  # gradient scale
    noise_unit: float = 0.0  # noise std at sigma = 1
    alias_of: str | None = None

    @property
    def n_width(self) -> int:
        return sum(d.axis is not None for d in self.dims)

    @property
    def role(self) -> str:
        return "buffer" if self.buffer else ("scalar", "vector", "matrix")[self.n_width]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(n * d.k for n, d in zip(self.shape, self.dims))

    @property
    def out_bytes(self) -> int:
        return math.prod(self.out_shape) * self.dtype.itemsize

    @property
    def axes_text(self) -> str:
        return "×".join(d.axis or str(n) for n, d in zip(self.shape, self.dims)) or "()"


@dataclass
class Plan:
    spec: Spec
    k: dict[str, int]
    sizes: dict[str, int]
    tensors: dict[str, TensorPlan]  # checkpoint order; tied aliases carry alias_of

    @property
    def params(self) -> list[str]:
        """Parameter names in checkpoint order, tied aliases left out (named_parameters() order)."""
        return [n for n, t in self.tensors.items() if not t.buffer and t.alias_of is None]

    def model_args(self, args: dict | None) -> dict | None:
        if args is None:
            return None
        out = dict(args)
        for arg, axis in self.spec.model_args.items():
            if arg in out:
                v = out[arg]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise MupscaleError(f"model_args[{arg!r}] is {v!r} ({type(v).__name__}), not an integer "
                                        f"width; store it as an int in the checkpoint")
                out[arg] = v * self.k[axis]
        return out


def parse_k(text: str) -> dict[str, int]:
    """`4` (every axis) or `d_model=2,d_ff=4`; returns {'*': 4} or {axis: k}."""
    def k_of(v: str, what: str) -> int:
        if not (v.isascii() and v.isdigit()):
            raise MupscaleError(f"--k {shown(text)}: {what} must be a positive integer, got {shown(v)}")
        k = int_text(v, f"--k {shown(text)}")
        if k < 1:
            raise MupscaleError(f"--k {text!r}: {what} must be >= 1, got {k}")
        return k

    text = text.strip()
    if "=" not in text:
        return {"*": k_of(text, "k")}
    out = {}
    for part in text.split(","):
        axis, _, v = part.partition("=")
        if not axis.strip().isidentifier():
            raise MupscaleError(f"--k {shown(text)}: expected AXIS=K pairs separated by commas")
        out[axis.strip()] = k_of(v.strip(), f"k for {axis.strip()}")
    return out


def resolve_k(k: dict[str, int], axes: list[str]) -> dict[str, int]:
    unknown = sorted(set(k) - set(axes) - {"*"})
    if unknown:
        raise MupscaleError(f"--k names axis {unknown[0]!r}, which this spec does not have "
                            f"(axes: {', '.join(axes)})")
    out = {}
    for a in axes:
        if a not in k and "*" not in k:
            raise MupscaleError(f"no k for axis {a!r}: pass --k {a}=K or a single --k K for every axis")
        out[a] = k.get(a, k.get("*"))
    return out


def resolve_sizes(spec: Spec, model_args: dict | None, overrides: dict[str, int]) -> dict[str, int]:
    env = {k: v for k, v in (model_args or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    env.update(overrides)
    for name, expr in spec.sizes.items():
        if name in overrides:
            continue
        try:
            env[name] = eval_size(expr, env)
        except KeyError as e:
            raise MupscaleError(f"size {name!r} = {expr!r} needs {e.args[0]!r}, which the checkpoint's "
                                f"model_args do not give: pass --size {name}=N") from None
        except ValueError as e:
            raise MupscaleError(f"size {name!r}: {e}") from None
    return env


def _block(dim: Dim, sizes: dict[str, int], name: str) -> int:
    if isinstance(dim.block, int):
        return dim.block
    if dim.block not in sizes:
        raise MupscaleError(f"{name}: block size {dim.block!r} is unknown: pass --size {dim.block}=N")
    return sizes[dim.block]


def _match(spec: Spec, names: list[str]) -> dict[str, Rule]:
    found, missing = {}, []
    for n in names:
        rules = spec.matches(n)
        if len(rules) > 1:
            raise MupscaleError(f"tensor {n!r} matches two rules of spec {spec.name}: "
                                f"{rules[0].pattern!r} and {rules[1].pattern!r}; make the patterns disjoint")
        if rules:
            found[n] = rules[0]
        else:
            missing.append(n)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MupscaleError(f"spec {spec.name} has no rule for tensor {missing[0]!r}{more}: add a rule "
                            f"(docs/spec-format.md) or pick another --spec")
    used = {r.pattern for r in found.values()}
    for r in spec.rules:
        if r.pattern not in used and not r.optional:
            raise MupscaleError(f"spec {spec.name}: rule {r.pattern!r} matches no tensor of the checkpoint "
                                f"(mark it 'optional: true' if that is expected)")
    return found


def _bsh_extra(spec: Spec, tensors, names: list[str]) -> tuple[dict[str, str], dict]:
    """For base-shape files: tied aliases (shared storage or equal values) and BatchNorm buffers."""
    listed = {r.pattern for r in spec.rules}
    tied, buffers = {}, {}
    for n in names:
        if n in listed:
            continue
        mod, _, leaf = n.rpartition(".")
        if leaf in ("running_mean", "running_var") and f"{mod}.weight" in listed:
            buffers[n] = next(r.dims for r in spec.rules if r.pattern == f"{mod}.weight")
            continue
        if leaf == "num_batches_tracked":
            buffers[n] = ()
            continue
        for m in listed:
            if m not in tensors or n not in tensors or tensor_meta(tensors, m) != tensor_meta(tensors, n):
                continue
            if same_values(tensors, n, m):
                tied[n] = m
                break
    return tied, buffers


def same_values(tensors, a: str, b: str, chunk: int = 1 << 22) -> bool:
    """Whether tensors[a] and tensors[b] (same shape and dtype) hold equal values: shared storage, or
    compared piece by piece (lazy inputs are never read whole)."""
    if not isinstance(tensors, LazyTensors):
        t, u = tensors[a], tensors[b]
        if t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() and t.data_ptr() == u.data_ptr():
            return True
    return all(torch.equal(_comparable(x), _comparable(y))
               for x, y in zip(iter_chunks(tensors, a, chunk), iter_chunks(tensors, b, chunk)))


def is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _comparable(x: torch.Tensor) -> torch.Tensor:
    """float8 tensors compared by their bytes (torch has no equal() for them)."""
    return x.view(torch.uint8) if is_float8(x.dtype) else x


def make_plan(spec: Spec, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], k: dict[str, int],
              model_args: dict | None = None, size_overrides: dict[str, int] | None = None,
              tensors=None) -> Plan:
    names = list(shapes)
    tied, bsh_buffers = dict(spec.tied), {}
    if spec.bsh:
        tied, bsh_buffers = _bsh_extra(spec, tensors or {}, names)
        # model_args entries equal to a width axis's base size grow with it (e.g. n_embd: 256 -> w256)
        spec = replace(spec, model_args={a: f"w{v}" for a, v in (model_args or {}).items()
                                         if isinstance(v, int) and f"w{v}" in spec.axes})
    for alias, canon in tied.items():
        if alias in shapes and canon not in shapes:
            raise MupscaleError(f"tied tensor {alias!r} is in the checkpoint but its canonical "
                                f"{canon!r} is not; rename it or fix 'tied' in spec {spec.name}")
        if alias in shapes and shapes[alias] != shapes[canon]:
            raise MupscaleError(f"tied tensors {alias!r} and {canon!r} have different shapes")
    plain = [n for n in names if n not in tied and n not in bsh_buffers]
    rules = _match(spec, plain)
    kk = resolve_k(k, spec.axes)
    sizes = resolve_sizes(spec, model_args, size_overrides or {})
    plans: dict[str, TensorPlan] = {}
    for n in names:
        shape, dtype = shapes[n]
        if n in tied:
            continue
        if n in bsh_buffers:
            rule = Rule(n, None, bsh_buffers[n], buffer=True)  # type: ignore[arg-type]
        else:
            rule = rules[n]
        plans[n] = _tensor_plan(spec, rule, n, tuple(shape), dtype, kk, sizes)
    out = {}
    for n in names:  # keep checkpoint order, aliases included
        if n in tied:
            c = plans[tied[n]]
            out[n] = TensorPlan(**{**c.__dict__, "name": n, "alias_of": tied[n]})
        else:
            out[n] = plans[n]
    return Plan(spec, kk, sizes, out)


def _tensor_plan(spec: Spec, rule: Rule, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 k: dict[str, int], sizes: dict[str, int]) -> TensorPlan:
    if len(rule.dims) != len(shape):
        raise MupscaleError(f"tensor {name!r} has shape {list(shape)} but rule {rule.pattern!r} gives "
                            f"{len(rule.dims)} axes: give one entry per dimension")
    dims = []
    for i, (n, d) in enumerate(zip(shape, rule.dims)):
        if d.axis is None:
            dims.append(DimPlan(None, 1, 1))
            continue
        b = _block(d, sizes, name)
        if b < 1 or n % b:
            raise MupscaleError(f"tensor {name!r}: dimension {i} of size {n} is not a multiple of its "
                                f"block size {b} ({d.block}); check --size or the spec")
        dims.append(DimPlan(d.axis, k[d.axis], b))
    t = TensorPlan(name, shape, dtype, tuple(dims), rule.pattern, buffer=rule.buffer)
    width = [i for i, d in enumerate(dims) if d.axis]
    if len(shape) >= 2:
        if rule.fan_in >= len(shape):
            raise MupscaleError(f"rule {rule.pattern!r}: fan_in {rule.fan_in} is out of range for "
                                f"{len(shape)}-d tensor {name!r}")
        t.fan_in = rule.fan_in
    if len(width) > 2:
        raise MupscaleError(f"tensor {name!r} has {len(width)} width axes; at most 2 (matrix-like) are "
                            f"supported")
    if t.buffer:
        return t
    if len(width) == 2:
        if t.fan_in not in width:
            raise MupscaleError(f"matrix-like tensor {name!r} has no width axis on its fan-in dimension "
                                f"{t.fan_in}: set 'fan_in' in rule {rule.pattern!r}")
        k_in = dims[t.fan_in].k
        k_out = dims[next(i for i in width if i != t.fan_in)].k
        t.s, t.g = Fraction(1, k_in), Fraction(1, k_out)
    elif len(width) == 1:
        kw = dims[width[0]].k
        t.readout_like = len(shape) >= 2 and width[0] == t.fan_in
        if t.readout_like and spec.readout == "sum":
            t.s, t.g = Fraction(1, kw), ONE
        else:
            t.s, t.g = ONE, Fraction(1, kw)
    t.noise_unit = _noise_unit(t, rule)
    return t


def _noise_unit(t: TensorPlan, rule: Rule) -> float:
    """Std of the noise at sigma = 1: a fresh μP init's std (README, 'Noise convention')."""
    on = t.n_width > 0 and len(t.shape) >= 2
    mult = 1.0
    if isinstance(rule.noise, bool):
        on = rule.noise
    elif isinstance(rule.noise, float):
        on, mult = rule.noise > 0, rule.noise
    if not on:
        return 0.0
    if len(t.shape) < 2 or t.readout_like:
        return mult
    out = t.out_shape
    out_dim = 1 if t.fan_in == 0 else 0
    fan_in = math.prod(n for i, n in enumerate(out) if i != out_dim)
    return mult / math.sqrt(fan_in) if fan_in else 0.0  # fan-in 0: an empty tensor, nothing to noise
