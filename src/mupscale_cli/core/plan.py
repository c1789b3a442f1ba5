"""Resolve a spec against a checkpoint's shapes: each tensor's role, widened shape and factors.

Over 500 lines: planning reads every part of a spec (tied tensors, --untie, blocks and segments, sizes, noise
units, checks of model_args against the shapes) and each part needs the others' results."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction

import torch

from mupscale_cli.core.source import LazyTensors, iter_chunks, tensor_meta
from mupscale_cli.core.spec import Dim, Rule, Spec, eval_expr, eval_size
from mupscale_cli.bounded import int_text, shown
from mupscale_cli.errors import MupscaleError

ONE = Fraction(1)


@dataclass(frozen=True)
class DimPlan:
    axis: str | None
    k: int
    block: int
    segments: tuple[tuple[int, int], ...] = ()  # (size, block) parts of a fused dimension, each duplicated alone

    def source(self, n: int) -> torch.Tensor:
        """For a dimension of input size n: the input coordinate each output coordinate copies (length n k)."""
        parts, off = [], 0
        for size, b in self.segments or ((n, self.block),):
            r = torch.arange(size * self.k)
            parts.append(off + (r // (self.k * b)) * b + r % b)
            off += size
        return torch.cat(parts)


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
    source: str | None = None  # read from this tensor instead (--untie: the readout made from the embedding)
    root: tuple[int, float] | None = None  # (k, p) of a rule's k_power: s holds k^p, g holds k^-p (g_power)

    def g_power(self, power: int) -> Fraction:
        """g ** power, exact where it is rational: with k_power, g = g_r · k^-p holds an irrational float
        (Gemma's k^0.5); its power is taken on the exponent, g_r^power · k^(-p·power), a rational number when
        p·power is an integer (Gemma's exp_avg_sq: × 1/k exactly), not on the float's Fraction (whose square
        needs 106-bit integers, applied as a rounded float)."""
        if self.root is not None:
            k, p = self.root
            e = -p * power
            if float(e).is_integer():
                return (self.g * Fraction(k ** p)) ** power * Fraction(k) ** int(e)
        return self.g ** power
    stateless: bool = False  # its optimizer state lives in a state_only parameter (experts the file splits)

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

    untied: bool = False  # --untie: the spec's tied readout is written as its own tensor
    notes: list[str] = field(default_factory=list)
    state_tensors: dict[str, TensorPlan] = field(default_factory=dict)  # state_only parameters met so far
    env: dict = field(default_factory=dict)  # names the std expressions use
    suspect: list[tuple[str, int, int, str]] = field(default_factory=list)  # suspect_dims: likely spec mistakes
    axis_known: dict[str, set[int]] = field(default_factory=dict)  # axis_sizes: each width axis's base sizes

    def state_plan(self, name: str, meta: tuple | None = None) -> TensorPlan | None:
        """The plan of a parameter the optimizer state names: a tensor of the checkpoint, or a parameter the
        model holds whole and the file splits (a spec rule with state_only: true; Mixtral's fused experts),
        planned from its state's shape `meta` = (shape, dtype) the first time. None when neither."""
        if name in self.tensors:
            return self.tensors[name]
        if name in self.state_tensors:
            return self.state_tensors[name]
        rules = [r for r in self.spec.rules if r.state_only and r.regex.fullmatch(name)]
        if meta is None or len(rules) != 1:
            return None
        shape, dtype = meta
        if rules[0].parts:
            self.state_tensors[name] = fused_plan(self, rules[0], name, tuple(shape), dtype)
        else:
            self.state_tensors[name] = _tensor_plan(self.spec, rules[0], name, tuple(shape), dtype, self.k,
                                                    self.sizes, self.env)
        return self.state_tensors[name]

    def model_args(self, args: dict | None) -> dict | None:
        if args is None:
            return None
        out = dict(args)
        for arg, axis in self.spec.model_args.items():
            if arg in out and out[arg] is not None:  # None (GPT-2's n_inner: 4 n_embd) follows the others
                v = out[arg]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise MupscaleError(f"model_args[{arg!r}] is {v!r} ({type(v).__name__}), not an integer "
                                        f"width; store it as an int in the checkpoint")
                out[arg] = v * self.k[axis]
        return rewrite(out, self.spec.rewrites, self.k, self._untie_set("model_args"),
                       where=f"spec {self.spec.name}: model_args (a Hugging Face model's config.json)")

    def config(self, cfg: dict | None) -> dict | None:
        """The checkpoint's `config` (a training script's settings) rewritten by the spec's 'config' rules."""
        if not isinstance(cfg, dict) or not (self.spec.config or self._untie_set("config")):
            return cfg
        return rewrite(dict(cfg), self.spec.config, self.k, self._untie_set("config"),
                       where=f"spec {self.spec.name}: the checkpoint's config")

    def _untie_set(self, place: str) -> dict:
        if not self.untied:
            return {}
        sets = self.spec.untie.get("set") or {}
        return {k.partition(".")[2]: v for k, v in sets.items() if k.partition(".")[0] == place}


def part_names(rule: Rule, name: str) -> list[str]:
    """The file's tensors whose rows the fused parameter `name` stacks: the rule's `parts` with its {word}
    placeholders filled from `name` (the layer indices)."""
    rx = "".join("([0-9]+)" if re.fullmatch(r"\{\w+\}", part) else re.escape(part)
                 for part in re.split(r"(\{\w+\})", rule.pattern))
    values = re.fullmatch(rx, name).groups()  # type: ignore[union-attr]  (the rule matched `name`)
    out = []
    for q in rule.parts:
        pieces = re.split(r"(\{\w+\})", q)
        it = iter(values)
        out.append("".join(next(it) if re.fullmatch(r"\{\w+\}", x) else x for x in pieces))
    return out


def fused_plan(plan: Plan, rule: Rule, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorPlan:
    """The plan of a parameter the model holds fused and the file stores split (a state_only rule with
    `parts`: torchtitan's FusedQKVLinear keeps one `wqkv` and saves wq, wk, wv), from its parts' plans, so
    that its widened state is in the widened model's own fused layout (its widened parts, fused the same way)
    and moves with the parts' factors.

    `parts_layout: stacked`: the rows are the parts one after another; each part's rows widen as the part does
    (a segmented dimension). `grouped`: the rows are groups, each the parts' blocks in order (torchtitan's wqkv:
    per key/value group, its query heads, its key head, its value head). Each part's rows must then be the same
    number G of blocks: the fused rows are G blocks of the parts' blocks' total size, duplicated in place. That
    is the widened model's layout when G divides the model's group count: G = n_kv_heads (parts duplicated per
    key/value group) or G = 1 (parts tiled whole: copies of all groups follow the originals).
    The parts must agree on everything else: axis and k of the rows, the other dimensions, the weight and
    gradient scales."""
    where = f"optimizer state of {name!r} (fused parameter, spec rule {rule.pattern!r})"
    parts = []
    for q in part_names(rule, name):
        t = plan.tensors.get(q)
        if t is None or t.buffer:
            raise MupscaleError(f"{where}: its part {q!r} is not a parameter of the checkpoint; the spec's 'parts' "
                                f"name the tensors the file stores in its place")
        parts.append(t)
    first = parts[0]
    rows = sum(t.shape[0] if t.shape else 0 for t in parts)
    if any(len(t.shape) != len(shape) or t.shape[1:] != shape[1:] for t in parts) or not shape or rows != shape[0]:
        raise MupscaleError(f"{where}: shape {list(shape)} is not its parts' rows stacked "
                            f"({', '.join(f'{t.name} {list(t.shape)}' for t in parts)})")
    d0 = [t.dims[0] for t in parts]
    groups = {t.shape[0] // d.block for t, d in zip(parts, d0)}
    moves = d0[0].axis is not None and d0[0].k != 1
    same = (all(t.dims[1:] == first.dims[1:] and (t.s, t.g, t.fan_in, t.readout_like) == (
        first.s, first.g, first.fan_in, first.readout_like) for t in parts)
        and len({(d.axis, d.k) for d in d0}) == 1 and not (moves and any(d.segments for d in d0))
        and (len(groups) == 1 or rule.parts_layout == "stacked" or not moves))
    if not same:
        raise MupscaleError(f"{where}: its parts are widened differently (" + "; ".join(
            f"{t.name}: {t.axes_text}, blocks {t.dims[0].block}, weight x{t.s}, gradient x{t.g}" for t in parts)
            + "): the fused state can follow them only if they share axes, k and scales" + (
                " and each part's rows are the same number of blocks" if rule.parts_layout == "grouped" else ""))
    if not moves:
        dim0 = DimPlan(d0[0].axis, d0[0].k, 1)
    elif rule.parts_layout == "stacked":
        dim0 = DimPlan(d0[0].axis, d0[0].k, 1, tuple((t.shape[0], d.block) for t, d in zip(parts, d0)))
    else:
        dim0 = DimPlan(d0[0].axis, d0[0].k, shape[0] // groups.pop())
    return TensorPlan(name, shape, dtype, (dim0, *first.dims[1:]), rule.pattern, fan_in=first.fan_in,
                      readout_like=first.readout_like, s=first.s, g=first.g)


def rewrite(d: dict, rules: dict[str, tuple], k: dict[str, int], sets: dict | None = None,
            where: str = "spec") -> dict:
    """d with rules applied: ('times', axis) × k, ('divide', axis) ÷ k (exact for ints), ('keep', _),
    ('set', value). A key the spec rescales that `d` lacks is an error: the stack then uses its own default,
    which no rewrite changes (Granite without logits_scaling: 1.0 at every width, logits × k)."""
    for key, (op, arg) in rules.items():
        if key not in d:
            if op in ("times", "divide") and k.get(arg, 1) != 1:
                raise MupscaleError(f"{where} has no {key!r}, which the spec {'multiplies' if op == 'times' else 'divides'}"
                                    f" by k ({arg}): the model would keep its default at every width; write the "
                                    f"value it was trained with into the checkpoint (or use a spec without it)")
            continue
        v = d[key]
        if op == "times" and isinstance(v, (int, float)) and not isinstance(v, bool):
            d[key] = v * k[arg]
        elif op == "divide" and isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, int) and v % k[arg] == 0:
                d[key] = v // k[arg]
            else:
                d[key] = v / k[arg]
        elif op == "set":
            d[key] = arg
        elif op != "keep":
            raise MupscaleError(f"{key!r} = {v!r} is not a number, but the spec rescales it ({op} {arg})")
    for key, v in (sets or {}).items():
        d[key] = v
    return d


MAX_K = 1 << 20  # a million-fold widening of a 1-wide axis is already larger than any disk


def parse_k(text: str) -> dict[str, int]:
    """`4` (every axis) or `d_model=2,d_ff=4`; returns {'*': 4} or {axis: k}."""
    def k_of(v: str, what: str) -> int:
        if not (v.isascii() and v.isdigit()):
            raise MupscaleError(f"--k {shown(text)}: {what} must be a positive integer, got {shown(v)}")
        k = int_text(v, f"--k {shown(text)}")
        if k < 1:
            raise MupscaleError(f"--k {shown(text)}: {what} must be >= 1, got {k}")
        if k > MAX_K:
            raise MupscaleError(f"--k {shown(text)}: {what} is {shown(v)}, more than {MAX_K} (no model that wide "
                                f"can be written); use a smaller --k")
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


class Sizes(dict):
    """The base sizes the spec defines that could be computed; `missing` says, for each one that needs a name
    the checkpoint does not give, why: such a size is demanded only by a tensor whose rule uses it (an optional
    rule that matches nothing demands nothing). A wrong expression is refused at once."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.missing: dict[str, str] = {}


def resolve_sizes(spec: Spec, model_args: dict | None, overrides: dict[str, int]) -> Sizes:
    env = Sizes((k, v) for k, v in (model_args or {}).items() if isinstance(v, int) and not isinstance(v, bool))
    env.update(overrides)
    for name, expr in spec.sizes.items():
        if name in overrides or name in env:  # the checkpoint's own record (config.json head_dim) wins
            continue
        try:
            env[name] = eval_size(expr, env)
        except KeyError as e:
            need = e.args[0]
            env.missing[name] = (env.missing.get(need) if need in spec.sizes and need in env.missing else
                                 f"size {name!r} = {expr!r} needs {need!r}, which the checkpoint's model_args do "
                                 f"not give: pass --size {name}=N")
        except ValueError as e:  # the expression itself is wrong (or its values are): refused, used or not
            raise MupscaleError(f"size {name!r}: {e}") from None
    return env


def _block(dim: Dim, sizes: dict[str, int], name: str) -> int:
    return _size(dim.block, sizes, name)


def _size(v: int | str, sizes: dict[str, int], name: str) -> int:
    if isinstance(v, int):
        return v
    if v not in sizes:
        why = getattr(sizes, "missing", {}).get(v)
        raise MupscaleError(f"{name}: {why}" if why else f"{name}: block size {v!r} is unknown: pass --size {v}=N")
    return sizes[v]


def _match(spec: Spec, names: list[str]) -> dict[str, Rule]:
    found, missing = {}, []
    for n in names:
        rules = [r for r in spec.matches(n) if not r.state_only]  # those name the model's parameters
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
        if r.pattern not in used and not r.optional and not r.state_only:
            raise MupscaleError(f"spec {spec.name}: rule {r.pattern!r} matches no tensor of the checkpoint "
                                f"(mark it 'optional: true' if that is expected)")
    return found


def _bsh_extra(spec: Spec, tensors, names: list[str], shapes: dict) -> tuple[dict[str, str], dict]:
    """For base-shape files (they list parameters only): tied aliases (shared storage or equal values),
    BatchNorm buffers (their module's weight axes) and other buffers (a dimension whose size is the
    checkpoint's width of exactly one axis is that axis, e.g. a positional-encoding table's last dimension)."""
    listed = {r.pattern for r in spec.rules}
    tied, buffers = {}, {}
    widths: dict[int, set[str]] = {}  # size in the checkpoint -> axes that have it
    for r in spec.rules:
        if r.pattern in shapes:
            for n, d in zip(shapes[r.pattern][0], r.dims):
                if d.axis:
                    widths.setdefault(n, set()).add(d.axis)
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
        if n in tied:
            continue
        dims = []
        for i, size in enumerate(shapes[n][0]):
            axes = widths.get(size, set())
            if len(axes) > 1:
                raise MupscaleError(f"buffer {n!r} (not in the base-shape file): dimension {i} of size {size} is the "
                                    f"width of axes {', '.join(sorted(axes))}; list it in the .bsh "
                                    f"(name: [base or null, ...]) or write a spec with 'buffer: true'")
            dims.append(Dim(next(iter(axes)) if axes else None))
        buffers[n] = tuple(dims)
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
              tensors=None, config: dict | None = None, untie: bool = False) -> Plan:
    names = list(shapes)
    tied, bsh_buffers = dict(spec.tied), {}
    if spec.bsh:
        tied, bsh_buffers = _bsh_extra(spec, tensors or {}, names, shapes)
        # model_args entries equal to a width axis's base size grow with it (e.g. n_embd: 256 -> w256)
        spec = replace(spec, model_args={a: f"w{v}" for a, v in (model_args or {}).items()
                                         if isinstance(v, int) and f"w{v}" in spec.axes})
    if spec.tied_if is not None and not (model_args or {}).get(spec.tied_if, True):
        tied = {}  # HF: tie_word_embeddings false, the readout is its own tensor
    untied, untie_note = None, None
    if untie and spec.tied_if is not None and not tied:
        untie, untie_note = False, f"--untie: nothing to untie ({spec.tied_if} is false: the readout is its own tensor)"
    if untie:
        if not spec.untie:
            raise MupscaleError(f"--untie: spec {spec.name} says nothing about untying (add 'untie: {{readout, "
                                f"from}}', docs/spec-format.md)")
        untied = spec.untie["readout"]
        if tied.get(untied) != spec.untie["from"]:
            raise MupscaleError(f"--untie: spec {spec.name} does not tie {untied!r} to {spec.untie['from']!r}")
        del tied[untied]
        if spec.untie["from"] not in shapes:
            raise MupscaleError(f"--untie: the checkpoint has no tensor {spec.untie['from']!r}")
        shapes = {**shapes, untied: shapes[spec.untie["from"]]}
        names = list(shapes)
    for alias, canon in tied.items():
        if alias in shapes and canon not in shapes:
            raise MupscaleError(f"tied tensor {alias!r} is in the checkpoint but its canonical "
                                f"{canon!r} is not; rename it or fix 'tied' in spec {spec.name}")
        if alias in shapes and shapes[alias] != shapes[canon]:
            raise MupscaleError(f"tied tensors {alias!r} and {canon!r} have different shapes")
    plain = [n for n in names if n not in tied and n not in bsh_buffers and n != untied]
    rules = _match(spec, plain)
    if untied:
        src = rules[spec.untie["from"]]
        rules[untied] = replace(src, pattern=untied, fan_in=int(spec.untie.get("fan_in", 1)), k_power=0.0)
    kk = resolve_k(k, spec.axes)
    sizes = resolve_sizes(spec, model_args, size_overrides or {})
    plan = Plan(spec, kk, sizes, {}, untied=bool(untied))
    if untie_note:
        plan.notes.append(untie_note)
    env = {**spec.init, **_numbers(plan.config(config)), **_numbers(plan.model_args(model_args))}
    plan.env = env
    plans: dict[str, TensorPlan] = {}
    for n in names:
        shape, dtype = shapes[n]
        if n in tied:
            continue
        if n in bsh_buffers:
            rule = Rule(n, None, bsh_buffers[n], buffer=True)  # type: ignore[arg-type]
        else:
            rule = rules[n]
        plans[n] = _tensor_plan(spec, rule, n, tuple(shape), dtype, kk, sizes, env)
    if untied:
        plans[untied].source = spec.untie["from"]
    for n, dims in bsh_buffers.items():
        if any(d.axis for d in dims) and not n.endswith(("running_mean", "running_var")):
            plan.notes.append(f"buffer {n!r} is not in the base-shape file: widened along "
                              f"{plans[n].axes_text} (its dimensions that have the checkpoint's width)")
    for alias, canon in tied.items():
        c = plans.get(canon)
        # tied_if: a tied HF readout is not in the file (save_pretrained drops it) but tied all the same
        if (alias in shapes or spec.tied_if) and c is not None and spec.readout == "sum" and c.n_width == 1 and (
                not c.buffer):
            raise MupscaleError(
                f"{alias!r} is tied to {canon!r} under a summing readout (standard parametrization): no exact "
                f"widening by duplication exists (the embedding must stay unscaled, the readout needs 1/k); "
                f"see docs/stacks.md" + ("; pass --untie to write a separate readout = embedding / k"
                                         if spec.untie else ""))
    out = {}
    for n in names:  # keep checkpoint order, aliases included
        if n in tied:
            c = plans[tied[n]]
            out[n] = TensorPlan(**{**c.__dict__, "name": n, "alias_of": tied[n]})
        else:
            out[n] = plans[n]
    plan.tensors = out
    check_args_against_shapes(plan, model_args)
    check_rule_shapes(plan, model_args, size_overrides or {})
    plan.axis_known = axis_sizes(plan, model_args)
    plan.suspect = suspect_dims(plan, model_args)
    if plan.suspect:
        plan.notes.append(f"warning: {suspect_text(plan)}: if it grows with width, name the axis there (as "
                          f"written, the output has the wrong shapes and `mupscale verify` fails)")
    return plan


def check_rule_shapes(plan: Plan, model_args: dict | None, overrides: dict[str, int]) -> None:
    """Rules with a `shape` (size expressions of model_args and sizes): each tensor has the shape the
    checkpoint's model_args (config.json) say, and its widened shape is the one the widened model_args say, before
    anything is written. A config.json whose head_dim × heads or intermediate_size is not its weights' rows
    was widened into a config that describes nothing (from_pretrained failed, or built another model)."""
    todo = [(n, t, r) for n, t in plan.tensors.items() if not t.alias_of
            for r in plan.spec.rules if r.pattern == t.rule and r.shape is not None]
    if not todo:
        return
    wide_args = plan.model_args(model_args)
    # an override is a base size (--size, or the sizes verify reads from WIDE's record): one the spec scales
    # as a model_args entry is k times larger in the widened model
    scaled = plan.spec.model_args
    wide_over = {n: v * plan.k.get(scaled[n], 1) if n in scaled else v for n, v in overrides.items()}
    wide_sizes = resolve_sizes(plan.spec, wide_args, wide_over)
    for n, t, r in todo:
        for env, have, what in ((plan.sizes, t.shape, "the checkpoint's model_args (config.json)"),
                                (wide_sizes, t.out_shape, "the widened model_args (config.json)")):
            try:
                want = [None if e is None else eval_size(e, env) for e in r.shape]
            except KeyError as e:
                raise MupscaleError(f"tensor {n!r}: spec {plan.spec.name} checks its shape with {e.args[0]!r}, which "
                                    f"{what} do not give: pass --size {e.args[0]}=N") from None
            except ValueError as e:
                raise MupscaleError(f"tensor {n!r}: its shape per spec {plan.spec.name} cannot be computed from {what} "
                                    f"({e})") from None
            if any(w is not None and w != h for w, h in zip(want, have)):
                said = "[" + ", ".join("*" if w is None else f"{e} = {w}" for w, e in zip(want, r.shape)) + "]"
                if have is t.shape:
                    raise MupscaleError(f"tensor {n!r} is {list(have)}, but {what} say {said}: the config does not "
                                        f"describe its weights")
                raise MupscaleError(f"spec {plan.spec.name}: tensor {n!r} widens to {list(have)}, but {what} would "
                                    f"say {said}: the spec's model_args rules do not describe its widening")


def check_args_against_shapes(plan: Plan, model_args: dict | None) -> None:
    """Every model_args / config.json value the spec multiplies by an axis's k describes the tensors of that
    axis: a positive integer that divides the size of its plain (unblocked) dimensions or is a multiple of it
    (a size equals it; a count such as GPT-NeoX's num_attention_heads divides it, Cohere's a per-head size). A config claiming hidden_size 63, -64 or
    intermediate_size 100 for 32- and 48-wide weights was written widened (×k) beside weights it does not
    describe: from_pretrained failed, or built another model."""
    plain: dict[str, set[int]] = {}
    for t in plan.tensors.values():
        for n, d in zip(t.shape, t.dims):
            if d.axis is not None and d.block == 1 and not d.segments:
                plain.setdefault(d.axis, set()).add(n)
    for arg, axis in plan.spec.model_args.items():
        v = (model_args or {}).get(arg)
        if v is None or axis not in plain:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or any(n % v and v % n for n in plain[axis]):
            have = ", ".join(str(n) for n in sorted(plain[axis]))
            raise MupscaleError(f"model_args[{arg!r}] is {shown(str(v))} but the tensors it describes (axis {axis}) "
                                f"are {have} wide (neither divides the other): the checkpoint's config does not "
                                f"describe its weights")


def axis_sizes(plan: Plan, model_args: dict | None) -> dict[str, set[int]]:
    """Base sizes each width axis is known to have: model_args entries the spec maps to it (n_embd: d_model)
    and 1-D tensors that are that axis alone (biases, norm gains)."""
    out: dict[str, set[int]] = {a: set() for a in plan.spec.axes}
    plain = {(d.axis, n) for t in plan.tensors.values() for n, d in zip(t.shape, t.dims)
             if d.axis and d.block == 1 and not d.segments}
    for arg, axis in plan.spec.model_args.items():
        v = (model_args or {}).get(arg)
        if axis in out and isinstance(v, int) and not isinstance(v, bool) and (axis, v) in plain:
            out[axis].add(v)  # a size (n_embd), not a count (num_attention_heads: a block's number)
    for t in plan.tensors.values():
        if len(t.shape) == 1 and t.dims[0].axis and t.dims[0].block == 1 and not t.dims[0].segments and t.alias_of is None:
            out[t.dims[0].axis].add(t.shape[0])
    return out


def suspect_dims(plan: Plan, model_args: dict | None, misfits: bool = False) -> list[tuple[str, int, int, str]]:
    """(tensor, dimension, size, axis) that look like a spec mistake: a fixed (null) dimension with the size
    of a width axis, in a tensor whose width axes do not fit their sizes (the readout `[d_out, width]` written
    `[width, null]`). With `misfits`, also every width dimension whose size is no multiple of its axis's
    known sizes (for an optimizer-id mismatch, where a wrong role is the likely cause). Buffers, tied
    aliases, blocked and segmented dimensions are not looked at."""
    sizes = plan.axis_known if plan.axis_known else axis_sizes(plan, model_args)
    out = []
    for name, t in plan.tensors.items():
        if t.buffer or t.alias_of is not None or len(t.shape) < 2:
            continue
        bad = [(i, n, d.axis) for i, (n, d) in enumerate(zip(t.shape, t.dims))
               if d.axis and sizes.get(d.axis) and d.block == 1 and not d.segments and all(n % s for s in sizes[d.axis])]
        if not bad:
            continue
        if misfits:
            out += [(name, i, n, a) for i, n, a in bad]
        for i, (n, d) in enumerate(zip(t.shape, t.dims)):
            if d.axis is None:
                axis = next((a for a, ss in sizes.items() if n in ss), None)
                if axis is not None:
                    out.append((name, i, n, axis))
    return out


def suspect_text(plan: Plan, suspect: list | None = None) -> str:
    suspect = plan.suspect if suspect is None else suspect
    parts = []
    for n, i, s, a in suspect[:3]:
        d = plan.tensors[n].dims[i]
        parts.append(f"{n!r} dimension {i} (size {s}) is fixed (null) but has the size of width axis {a!r}"
                     if d.axis is None else
                     f"{n!r} dimension {i} (size {s}) is width axis {a!r} but no multiple of its size "
                     f"({', '.join(map(str, sorted(plan.axis_known.get(a, ()))))})")
    more = f" (and {len(suspect) - 3} more)" if len(suspect) > 3 else ""
    return f"spec {plan.spec.name}: {'; '.join(parts)}{more}"


def _numbers(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tensor_plan(spec: Spec, rule: Rule, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 k: dict[str, int], sizes: dict[str, int], env: dict | None = None) -> TensorPlan:
    if len(rule.dims) != len(shape):
        raise MupscaleError(f"tensor {name!r} has shape {list(shape)} but rule {rule.pattern!r} gives "
                            f"{len(rule.dims)} axes: give one entry per dimension")
    dims = []
    for i, (n, d) in enumerate(zip(shape, rule.dims)):
        if d.axis is None:
            dims.append(DimPlan(None, 1, 1))
            continue
        if d.segments:
            segs = tuple((_size(a, sizes, name), _size(b, sizes, name)) for a, b in d.segments)
            if sum(a for a, _ in segs) != n:
                raise MupscaleError(f"tensor {name!r}: dimension {i} of size {n} is not the sum of its segments "
                                    f"{' + '.join(f'{a} ({sa})' for (a, _), (sa, _) in zip(segs, d.segments))}; "
                                    f"check --size or the spec")
            for (a, b), (sa, sb) in zip(segs, d.segments):
                if b < 1 or a % b:
                    raise MupscaleError(f"tensor {name!r}: segment {sa} of size {a} is not a multiple of its "
                                        f"block size {b} ({sb}); check --size or the spec")
            dims.append(DimPlan(d.axis, k[d.axis], 1, segs))
            continue
        b = max(n, 1) if d.tile else _block(d, sizes, name)
        if b < 1 or n % b:
            raise MupscaleError(f"tensor {name!r}: dimension {i} of size {n} is not a multiple of its "
                                f"block size {b} ({d.block}); check --size or the spec")
        dims.append(DimPlan(d.axis, k[d.axis], b))
    t = TensorPlan(name, shape, dtype, tuple(dims), rule.pattern, buffer=rule.buffer, stateless=rule.stateless)
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
    if rule.k_power and width:  # a constant of the model's forward grows with width (Gemma's sqrt(hidden))
        c = Fraction(dims[width[0]].k ** rule.k_power)  # the float's exact value (k^p itself if rational)
        t.s, t.g = t.s * c, t.g / c
        t.root = (dims[width[0]].k, rule.k_power)
    t.noise_unit = _noise_unit(t, rule, env or {})
    return t


def _fan_in(t: TensorPlan) -> int:
    out = t.out_shape
    if len(out) < 2:
        return out[0] if out else 1
    return math.prod(out) // out[1 if t.fan_in == 0 else 0]


def _noise_unit(t: TensorPlan, rule: Rule, env: dict) -> float:
    """Std of the noise at sigma = 1: the stack's own init std of the widened tensor when the rule gives
    one ('std'), else a fresh μP init's std (docs/usage.md, 'Noise convention')."""
    on = t.n_width > 0 and len(t.shape) >= 2
    mult = 1.0
    if rule.std is not None:
        on = t.n_width > 0
        if rule.noise is False or rule.noise == 0:
            return 0.0
        try:
            std = eval_expr(rule.std, {**env, "fan_in": _fan_in(t)})
        except KeyError as e:
            raise MupscaleError(f"tensor {t.name!r}: its init std {rule.std!r} needs {e.args[0]!r}, which neither "
                                f"the checkpoint's model_args/config nor the spec's 'init' give") from None
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            raise MupscaleError(f"tensor {t.name!r}: init std {shown(rule.std)} cannot be evaluated ({e})") from None
        if not (math.isfinite(std) and std >= 0):
            raise MupscaleError(f"tensor {t.name!r}: init std {rule.std!r} = {std}, expected a finite number >= 0")
        return std * (rule.noise if isinstance(rule.noise, float) else 1.0) if (on or rule.noise) else 0.0
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
