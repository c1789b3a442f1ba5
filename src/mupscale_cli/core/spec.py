"""Architecture specs: which axes of each tensor grow with width (docs/spec-format.md).

Over 500 lines: the spec language is parsed and validated in one place (rules, sizes, rewrites, evidence,
segments), so a spec file's every key is checked by the code that defines it."""
from __future__ import annotations

import ast
import hashlib
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import yaml

from mupscale_cli.bounded import BoundedLoader, int_text, load_yaml, shown
from mupscale_cli.errors import MupscaleError

BUNDLED_DIRS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parents[3] / "configs")
SPEC_KEYS = {"name", "description", "detect", "readout", "sizes", "model_args", "tied", "tensors", "model",
             "evidence", "refuse", "config", "optimizer", "init", "untie", "notes", "tied_if", "saved_as"}
RULE_KEYS = {"axes", "fan_in", "buffer", "noise", "optional", "std", "k_power", "state_only", "state", "parts",
             "parts_layout", "shape"}
EVIDENCE_PLACES = ("model_args", "config", "config_json")  # where a checkpoint shows its parametrization
REWRITES = ("times", "divide", "keep", "set")
OPTIM_KEYS = {"layouts", "group_keys", "resume_note"}
HPARAMS = ("lr", "eps", "weight_decay")
DIM_KEYS = {"axis", "block", "segments", "tile"}
READOUTS = ("mup", "sum")
PARTS_LAYOUTS = ("grouped", "stacked")


@dataclass(frozen=True)
class Dim:
    """One tensor dimension: fixed (axis None) or a width axis duplicated in blocks of `block`; or, for a
    fused dimension whose parts have different blocks (Phi-3's [q | k | v] under GQA: query groups, then key
    and value heads), `segments`: consecutive (size, block) parts, each duplicated in place on its own."""
    axis: str | None
    block: int | str = 1
    segments: tuple[tuple[int | str, int | str], ...] = ()
    tile: bool = False  # the whole dimension is one block: the copies follow each other ([x; x])


@dataclass(frozen=True)
class Rule:
    pattern: str
    regex: Glob | re.Pattern  # fullmatch(name): whether the rule applies
    dims: tuple[Dim, ...]
    fan_in: int = 1
    buffer: bool = False
    noise: bool | float | None = None  # None: default by role
    optional: bool = False
    std: str | None = None  # the stack's own init std of this tensor: an expression (init_std below)
    k_power: float = 0.0  # weights × k^p, gradients × k^-p: the model multiplies this tensor by c ∝ width^-p
    state_only: bool = False  # names a parameter of the model that the file stores split (optimizer state only)
    stateless: bool = False  # a file tensor whose optimizer state lives in a state_only parameter
    shape: tuple[str | None, ...] | None = None  # the shape model_args/sizes say it has (size expressions; null: any)
    parts: tuple[str, ...] = ()  # state_only: the file's tensors whose rows this fused parameter holds
    parts_layout: str = ""  # how: "grouped" (per group, each the parts' blocks: torchtitan) | "stacked"


@dataclass
class Spec:
    name: str
    source: str
    sha256: str
    readout: str = "mup"
    description: str = ""
    detect: bool = True
    sizes: dict[str, str] = field(default_factory=dict)
    model_args: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    bsh: bool = False  # a mup base-shape file: tied aliases and BatchNorm buffers are inferred
    text: str = ""  # the spec's own text (recorded in outputs, so they describe themselves)
    evidence: list[dict[str, object]] = field(default_factory=list)  # alternatives of {place.key: value}
    refuse: dict = field(default_factory=dict)  # {reason, doc}: why a checkpoint that fits is refused
    config: dict[str, tuple] = field(default_factory=dict)  # config key -> rewrite (see Rewrite)
    rewrites: dict[str, tuple] = field(default_factory=dict)  # model_args key -> rewrite (non-axis ones)
    layouts: dict[str, list[dict]] = field(default_factory=dict)  # optimizer layouts: name -> group filters
    group_keys: dict[str, str] = field(default_factory=dict)  # param-group key -> hyper-parameter it scales as
    resume_note: str = ""  # shown after widening: how to resume in the stack's own script
    init: dict[str, object] = field(default_factory=dict)  # defaults of names the std expressions use
    untie: dict = field(default_factory=dict)  # {readout, from, fan_in, set}: --untie
    notes: list[str] = field(default_factory=list)
    tied_if: str | None = None  # model_args key saying whether `tied` applies (HF: tie_word_embeddings)
    saved_as: dict[str, str] = field(default_factory=dict)  # the model's parameter name -> its name in the file

    @property
    def axes(self) -> list[str]:
        seen = {d.axis: None for r in self.rules for d in r.dims if d.axis}
        return list(seen)

    def matches(self, name: str) -> list[Rule]:
        return [r for r in self.rules if r.regex.fullmatch(name)]


DIGITS = frozenset("0123456789")


class Glob:
    """A compiled name pattern: `{i}` (any `{word}`) matches a layer index (ASCII digits), `*` a run of
    characters without dots; the rest is literal. Matched by simulating its automaton over the name (all
    positions at once, as bit sets), so time is linear in the name's length whatever the pattern: a
    backtracking regex of 14 `*` against a 34-character name runs for minutes."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        lit: dict[str, int] = {}
        star = dstar = digit = 0
        i = 0
        parts = re.split(r"(\{\w+\}|\*)", pattern)
        self._prefix, self._suffix = parts[0], parts[-1] if len(parts) > 1 else ""  # quick rejections
        for part in parts:
            if part == "*":
                star |= 1 << i
                i += 1
            elif part.startswith("{") and part.endswith("}") and len(part) > 2:
                digit |= 1 << i  # one digit, then any more
                dstar |= 1 << (i + 1)
                i += 2
            else:
                for c in part:
                    lit[c] = lit.get(c, 0) | 1 << i
                    i += 1
        self._lit, self._star, self._dstar, self._digit = lit, star, dstar, digit
        self._skip, self._accept = star | dstar, 1 << i
        self._start = self._close(1)

    def _close(self, s: int) -> int:
        """Add the positions reachable by skipping `*` / the optional digits (each skips forward once)."""
        while True:
            more = (s & self._skip) << 1
            if not more & ~s:
                return s
            s |= more

    def fullmatch(self, name: str) -> bool:
        if not (name.startswith(self._prefix) and name.endswith(self._suffix)):
            return False
        s = self._start
        lit, star, dstar, digit = self._lit, self._star, self._dstar, self._digit
        for c in name:
            move = s & lit.get(c, 0)
            if c in DIGITS:
                move |= s & digit
                stay = s & (star | dstar)
            else:
                stay = s & star if c != "." else 0
            s = self._close(move << 1 | stay)
            if not s:
                return False
        return bool(s & self._accept)

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"


def compile_pattern(pattern: str) -> Glob:
    """`{i}` (any `{word}`) matches a layer index, `*` a run without dots; the rest is literal."""
    return Glob(pattern)


def _fail(where: str, msg: str) -> MupscaleError:
    return MupscaleError(f"spec {where}: {msg}")


def _check_keys(where: str, d: dict, allowed: set[str]) -> None:
    unknown = sorted(set(map(str, d)) - allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _parse_dim(where: str, x) -> Dim:
    if x is None:
        return Dim(None)
    if isinstance(x, str) and x.isidentifier():
        return Dim(x)
    if isinstance(x, dict):
        _check_keys(where, x, DIM_KEYS)
        axis, block = x.get("axis"), x.get("block", 1)
        if not (isinstance(axis, str) and axis.isidentifier()):
            raise _fail(where, f"'axis' must be an axis name, got {axis!r}")

        def size_ok(v) -> bool:
            return (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
                isinstance(v, str) and v.isidentifier())
        if not size_ok(block):
            raise _fail(where, f"'block' must be a positive int or a size name, got {block!r}")
        segs = x.get("segments")
        tile = x.get("tile", False)
        if not isinstance(tile, bool):
            raise _fail(where, f"'tile' must be true or false, got {tile!r}")
        if tile and ("block" in x or segs is not None):
            raise _fail(where, "'tile: true' makes the whole dimension one block: give no 'block' or 'segments'")
        if tile:
            return Dim(axis, 1, tile=True)
        if segs is None:
            return Dim(axis, block)
        if "block" in x:
            raise _fail(where, "give 'block' or 'segments', not both")
        if not (isinstance(segs, list) and segs and all(
                isinstance(g, list) and len(g) == 2 and all(map(size_ok, g)) for g in segs)):
            raise _fail(where, f"'segments' is a list of [SIZE, BLOCK] pairs (ints or size names), got {segs!r}")
        return Dim(axis, 1, tuple((a, b) for a, b in segs))
    raise _fail(where, f"an axis entry must be null, an axis name or {{axis, block}}, got {x!r}")


def _parse_rule(pattern: str, body) -> Rule:
    where = f"tensor {pattern!r}"
    if isinstance(body, list):
        body = {"axes": body}
    if not isinstance(body, dict):
        raise _fail(where, "a rule is a list of axes or a mapping with 'axes'")
    _check_keys(where, body, RULE_KEYS)
    parts = body.get("parts")
    if parts is not None:
        if not (isinstance(parts, list) and parts and all(isinstance(q, str) and q for q in parts)):
            raise _fail(where, f"'parts' is a list of tensor name patterns, got {parts!r}")
        if body.get("state_only") is not True or "axes" in body:
            raise _fail(where, "'parts' describes a fused parameter of the model that the file stores split: it "
                               "needs 'state_only: true' and no 'axes' (they follow from the parts' rules)")
        holes = re.findall(r"\{\w+\}", pattern)
        for q in parts:
            if re.findall(r"\{\w+\}", q) != holes or "*" in q + pattern:
                raise _fail(where, f"part {q!r}: each part must hold the fused name's {{word}} placeholders, in the "
                                   f"same order, and no '*'")
        if body.get("parts_layout") not in PARTS_LAYOUTS:
            raise _fail(where, f"'parts_layout' must be one of {', '.join(PARTS_LAYOUTS)} (how the fused rows hold the "
                               f"parts: in groups, each group the parts' blocks in order, as torchtitan's wqkv; or "
                               f"the parts one after another), got {body.get('parts_layout')!r}")
        body = {**body, "axes": []}
    elif "parts_layout" in body:
        raise _fail(where, "'parts_layout' needs 'parts'")
    if not isinstance(body.get("axes"), list):
        raise _fail(where, "'axes' (one entry per dimension) is required")
    dims = tuple(_parse_dim(where, x) for x in body["axes"])
    fan_in = body.get("fan_in", 1)
    if not isinstance(fan_in, int) or isinstance(fan_in, bool) or fan_in < 0:
        raise _fail(where, f"'fan_in' must be a dimension index, got {fan_in!r}")
    std = body.get("std")
    if std is not None:
        if not isinstance(std, (str, int, float)) or isinstance(std, bool):
            raise _fail(where, f"'std' must be an expression, got {std!r}")
        check_expr(str(std), where)
    noise = body.get("noise")
    if noise is not None and not isinstance(noise, (bool, int, float)):
        raise _fail(where, f"'noise' must be true, false or a multiplier, got {noise!r}")
    if isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise < 0:
        raise _fail(where, f"'noise' multiplier must be >= 0, got {noise!r}")
    for key in ("buffer", "optional"):
        if not isinstance(body.get(key, False), bool):
            raise _fail(where, f"'{key}' must be true or false")
    kp = body.get("k_power", 0)
    if not isinstance(kp, (int, float)) or isinstance(kp, bool):
        raise _fail(where, f"'k_power' must be a number (e.g. -0.5), got {kp!r}")
    for key in ("state_only", "state"):
        if not isinstance(body.get(key, key == "state"), bool):
            raise _fail(where, f"'{key}' must be true or false")
    shape = body.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) != len(dims):
            raise _fail(where, f"'shape' is a list of one size expression (or null) per dimension, like 'axes'; got "
                               f"{shape!r}")
        for e in shape:
            if e is not None:
                check_size_expr(e, where)
        shape = tuple(None if e is None else str(e) for e in shape)
    return Rule(pattern, compile_pattern(pattern), dims, fan_in, body.get("buffer", False),
                noise if isinstance(noise, bool) or noise is None else float(noise), body.get("optional", False),
                None if std is None else str(std), float(kp), body.get("state_only", False),
                not body.get("state", True), shape, tuple(parts or ()), str(body.get("parts_layout") or ""))


def check_size_expr(expr, where: str) -> None:
    """A size expression (see eval_size) well formed, or an int >= 0; its values are checked where it is used."""
    if isinstance(expr, int) and not isinstance(expr, bool) and expr >= 0:
        return
    try:
        if not isinstance(expr, str):
            raise ValueError(f"{expr!r} is not a size expression")
        eval_size(expr, {}, syntax_only=True)
    except ValueError as e:
        raise _fail(where, f"{expr!r} is not a size expression: {e} (integers and names joined by + - * / and "
                           f"parentheses)") from None


class _UniqueKeyLoader(BoundedLoader):
    """The bounded safe loader (no aliases, limited depth) that also refuses a key given twice in one mapping
    (a silently overridden rule is a typo)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:
                continue
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_spec(text: str, source: str, name: str | None = None) -> Spec:
    d = load_yaml(text, f"spec {source}", _UniqueKeyLoader)
    if not isinstance(d, dict):
        raise MupscaleError(f"spec {source}: expected a mapping at the top level")
    sha = hashlib.sha256(text.encode()).hexdigest()
    if "tensors" not in d and all(isinstance(v, list) for v in d.values()):
        spec = _from_bsh(d, source, sha)
        spec.text = text
        if name:
            spec.name = name
        return spec
    _check_keys(source, d, SPEC_KEYS)
    for key in ("name", "tensors"):
        if key not in d:
            raise _fail(source, f"missing required key {key!r}")
    readout = d.get("readout", "mup")
    if readout not in READOUTS:
        raise _fail(source, f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    maps = {}
    for key in ("sizes", "model_args", "tied", "tensors", "model"):
        v = d.get(key) or {}
        if not isinstance(v, dict):
            raise _fail(source, f"{key!r} must be a mapping")
        maps[key] = v
    for key in ("sizes", "tied"):
        for a, b in maps[key].items():
            if not isinstance(a, str) or not isinstance(b, (str, int)) or isinstance(b, bool):
                raise _fail(source, f"{key}: bad entry {a!r}: {b!r}")
    for alias, canon in maps["tied"].items():
        if alias == canon or canon in maps["tied"]:
            raise _fail(source, f"tied: {alias!r} is tied to {canon!r}, which is "
                                f"{'itself' if alias == canon else 'an alias too'}; tie each alias to the "
                                f"tensor that is stored")
    rules = [_parse_rule(str(p), body) for p, body in maps["tensors"].items()]
    if not rules:
        raise _fail(source, "'tensors' is empty")
    axis_args = {k: v for k, v in maps["model_args"].items() if isinstance(v, str)}
    spec = Spec(name=str(d["name"]), source=source, sha256=sha, readout=readout,
                description=str(d.get("description", "")), detect=bool(d.get("detect", True)),
                sizes={k: str(v) for k, v in maps["sizes"].items()},
                model_args={k: str(v) for k, v in axis_args.items()},
                tied={k: str(v) for k, v in maps["tied"].items()}, rules=rules, model=maps["model"], text=text)
    _parse_extras(spec, d, maps["model_args"])
    for arg, axis in [*spec.model_args.items(), *[(a, r[1]) for a, r in [*spec.rewrites.items(),
                                                                           *spec.config.items()]
                                                    if r[0] in ("times", "divide")]]:
        if axis not in spec.axes:
            raise _fail(source, f"model_args: {arg!r} refers to axis {axis!r}, which no tensor uses "
                                f"(axes: {', '.join(spec.axes) or 'none'})")
    return spec


def _from_bsh(d: dict, source: str, sha: str) -> Spec:
    """A mup base-shape file: `name: [base_dim or null, ...]`."""
    rules = []
    for name, dims in d.items():
        if not all(x is None or (isinstance(x, int) and not isinstance(x, bool) and x > 0) for x in dims):
            raise _fail(source, f"{name!r}: base-shape entries must be positive ints or null, got {dims}")
        rules.append(Rule(str(name), re.compile(re.escape(str(name))),
                          tuple(Dim(None if x is None else f"w{x}") for x in dims)))
    stem = Path(source).stem
    return Spec(name=stem, source=source, sha256=sha, readout="mup", rules=rules, bsh=True,
                description="mup base-shape file")


def bundled_paths() -> list[Path]:
    for d in BUNDLED_DIRS:
        if d.is_dir():
            return sorted(d.glob("*.yaml"))
    return []


def bundled_specs() -> list[Spec]:
    return [parse_spec(p.read_text(), f"bundled:{p.stem}") for p in bundled_paths()]


def load_spec(arg: str) -> Spec:
    """A spec from a file path (.yaml, .yml, .bsh) or the name of a bundled spec."""
    path = Path(arg)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise MupscaleError(f"spec {arg}: cannot read: {e}") from None
        return parse_spec(text, str(path))
    if path.exists():
        raise MupscaleError(f"spec {arg}: is not a file")
    for p in bundled_paths():  # the file of that name first: parsing all 32 is a quarter second of start-up
        if p.stem == arg:
            spec = parse_spec(p.read_text(), f"bundled:{p.stem}")
            if spec.name == arg:
                return spec
    by_name = {s.name: s for s in bundled_specs()}
    if arg in by_name:
        return by_name[arg]
    raise MupscaleError(f"spec {arg!r}: no such file and no bundled spec of that name "
                        f"(bundled: {', '.join(sorted(by_name))})")


MAX_EXPR_CHARS = 256  # a spec's size or std expression; thousands of factors are no spec's
MAX_SIZE = 1 << 62


_SIZE_TOKEN = re.compile(r"\s*(?:([0-9]+)|([A-Za-z_][A-Za-z_0-9]*)|([-+*/()]))")


def eval_size(expr: str, env: dict[str, int], syntax_only: bool = False) -> int:
    """A size expression: integers, names, `+ - * /` and parentheses, evaluated in exact rational arithmetic
    (torchtitan's fused row block `head_dim * n_heads / n_kv_heads + 2 * head_dim`, or the same as
    `head_dim / n_kv_heads * n_heads + 2 * head_dim`); the result must be a whole number >= 0. Every
    intermediate numerator and denominator is at most MAX_SIZE (larger than any tensor), so the work is
    bounded by the expression's length. A missing name raises KeyError(name), anything else ValueError.
    syntax_only: only the form is checked (names stand for 1, values are not judged; the result is 0)."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"size expression {shown(expr)} is longer than {MAX_EXPR_CHARS} characters")
    tokens, pos, text = [], 0, expr.rstrip()
    while pos < len(text):
        m = _SIZE_TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"bad size expression {shown(expr)}: unexpected {shown(text[pos:].strip()[:10])}")
        tokens.append(m.group(1) or m.group(2) or m.group(3))
        pos = m.end()
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise ValueError(f"bad size expression {shown(expr)}: it ends too early")
        i += 1
        return tokens[i - 1]

    def bounded(v: Fraction) -> Fraction:
        if abs(v.numerator) > MAX_SIZE or v.denominator > MAX_SIZE:
            raise ValueError(f"size expression {shown(expr)} exceeds {MAX_SIZE}, larger than any tensor")
        return v

    def atom() -> Fraction:
        tok = take()
        if tok == "(":
            v = total()
            if take() != ")":
                raise ValueError(f"bad size expression {shown(expr)}: unbalanced parentheses")
            return v
        if tok.isdigit():
            return bounded(Fraction(int_text(tok, f"size expression {shown(expr)}")))
        if tok[0].isalpha() or tok[0] == "_":
            if syntax_only:
                return Fraction(1)
            if tok not in env:
                raise KeyError(tok)
            v = env[tok]
            if isinstance(v, bool) or not isinstance(v, int):
                raise KeyError(tok)
            return bounded(Fraction(v))
        raise ValueError(f"bad size expression {shown(expr)}: unexpected {tok!r}")

    def product() -> Fraction:
        v = atom()
        while peek() in ("*", "/"):
            op, w = take(), atom()
            if op == "/" and w == 0 and not syntax_only:
                raise ValueError(f"size expression {shown(expr)} divides by zero")
            v = bounded(v * w if op == "*" else v / w if w else v)
        return v

    def total() -> Fraction:
        v = product()
        while peek() in ("+", "-"):
            op, w = take(), product()
            v = bounded(v + w if op == "+" else v - w)
        return v

    if not tokens:
        raise ValueError(f"bad size expression {shown(expr)}")
    value = total()
    if i != len(tokens):
        raise ValueError(f"bad size expression {shown(expr)}: unexpected {tokens[i]!r}")
    if syntax_only:
        return 0
    if value.denominator != 1 or value < 0:
        raise ValueError(f"size expression {shown(expr)} is {value}, not a whole number of coordinates")
    return int(value)


def _rewrite(where: str, v) -> tuple:
    """A model_args/config rewrite: an axis name or {times: AXIS} (× its k), {divide: AXIS}, {keep: true},
    {set: VALUE}; returned as (op, arg)."""
    if isinstance(v, str):
        return ("times", v)
    if isinstance(v, dict) and len(v) == 1:
        (op, arg), = v.items()
        if op in ("times", "divide") and isinstance(arg, str) and arg.isidentifier():
            return (op, arg)
        if op == "keep":
            return ("keep", None)
        if op == "set" and (arg is None or isinstance(arg, (bool, int, float, str))):
            return ("set", arg)
    raise _fail(where, f"a rewrite is an axis name or one of {{times: AXIS}}, {{divide: AXIS}}, {{keep: true}}, "
                       f"{{set: VALUE}}, got {v!r}")


def _parse_extras(spec: Spec, d: dict, model_args: dict) -> None:
    """The stack-level sections: evidence, refuse, config/model_args rewrites, optimizer, init, untie."""
    src = spec.source
    for a, v in model_args.items():
        if not isinstance(a, str):
            raise _fail(src, f"model_args: bad entry {a!r}: {v!r}")
        if not isinstance(v, str):
            spec.rewrites[a] = _rewrite(f"{src} model_args {a!r}", v)
    cfg = d.get("config") or {}
    if not isinstance(cfg, dict):
        raise _fail(src, "'config' must be a mapping of config key -> rewrite")
    spec.config = {str(a): _rewrite(f"{src} config {a!r}", v) for a, v in cfg.items()}
    ev = d.get("evidence")
    if ev is not None:
        alts = ev if isinstance(ev, list) else [ev]
        for alt in alts:
            if not isinstance(alt, dict) or not alt:
                raise _fail(src, "'evidence' is a mapping {PLACE.KEY: VALUE} or a list of them (alternatives)")
            for key, val in alt.items():
                place, _, k = str(key).partition(".")
                if place not in EVIDENCE_PLACES or not k:
                    raise _fail(src, f"evidence key {key!r} must be PLACE.KEY with PLACE one of "
                                     f"{', '.join(EVIDENCE_PLACES)}")
                if isinstance(val, (list, dict)):
                    raise _fail(src, f"evidence {key!r}: the value must be a plain value, got {val!r}")
            spec.evidence.append({str(k): v for k, v in alt.items()})
    ref = d.get("refuse")
    if ref is not None:
        if not isinstance(ref, dict) or not isinstance(ref.get("reason"), str) or set(ref) - {"reason", "doc"}:
            raise _fail(src, "'refuse' is {reason: TEXT, doc: PATH}")
        spec.refuse = dict(ref)
    opt = d.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict):
            raise _fail(src, "'optimizer' must be a mapping")
        _check_keys(f"{src} optimizer", opt, OPTIM_KEYS)
        for name, groups in (opt.get("layouts") or {}).items():
            if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                raise _fail(src, f"optimizer layout {name!r}: a list of group filters {{match, min_dim, max_dim}}")
            for g in groups:
                _check_keys(f"{src} optimizer layout {name!r}", g, {"match", "min_dim", "max_dim"})
                if not isinstance(g.get("match", []), list):
                    raise _fail(src, f"optimizer layout {name!r}: 'match' is a list of name patterns")
            spec.layouts[str(name)] = [{**g, "regex": [compile_pattern(str(p)) for p in g.get("match", [])]}
                                       for g in groups]
        for key, hp in (opt.get("group_keys") or {}).items():
            if hp not in HPARAMS:
                raise _fail(src, f"optimizer group_keys {key!r}: scales like one of {', '.join(HPARAMS)}, got {hp!r}")
            spec.group_keys[str(key)] = hp
        spec.resume_note = str(opt.get("resume_note", ""))
    init = d.get("init") or {}
    if not isinstance(init, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in init.values()):
        raise _fail(src, "'init' is a mapping NAME: number (defaults of names the 'std' expressions use)")
    spec.init = dict(init)
    untie = d.get("untie")
    if untie is not None:
        if not isinstance(untie, dict) or not isinstance(untie.get("readout"), str) or not isinstance(
                untie.get("from"), str):
            raise _fail(src, "'untie' is {readout: NAME, from: NAME, fan_in: INT, set: {PLACE.KEY: VALUE}}")
        _check_keys(f"{src} untie", untie, {"readout", "from", "fan_in", "set"})
        spec.untie = dict(untie)
    notes = d.get("notes") or []
    spec.notes = [str(n) for n in (notes if isinstance(notes, list) else [notes])]
    tied_if = d.get("tied_if")
    if tied_if is not None and not isinstance(tied_if, str):
        raise _fail(src, f"'tied_if' must be a model_args key, got {tied_if!r}")
    spec.tied_if = tied_if
    saved = d.get("saved_as") or {}
    if not isinstance(saved, dict) or not all(isinstance(a, str) and isinstance(b, str) and a != b
                                              for a, b in saved.items()):
        raise _fail(src, "'saved_as' is a mapping PARAMETER_NAME: NAME_IN_THE_FILE (two different names)")
    if len(set(saved.values())) != len(saved) or set(saved) & set(saved.values()):
        raise _fail(src, "'saved_as': each file name once, and no name both a parameter and a file name")
    spec.saved_as = dict(saved)
    for a, b in saved.items():
        if re.findall(r"\{\w+\}", a) != re.findall(r"\{\w+\}", b) or "*" in a + b:
            raise _fail(src, f"'saved_as' {a!r}: {b!r}: both names must hold the same {{word}} placeholders, in "
                             f"the same order, and no '*'")


def saved_name(spec: Spec, name: str, reverse: bool = False) -> str:
    """The file's name of the model's parameter `name` (spec 'saved_as', whose {word} placeholders match layer
    indices), else `name` itself; reverse=True: the model's name of a file's tensor."""
    for a, b in spec.saved_as.items():
        if reverse:
            a, b = b, a
        keys = re.findall(r"\{(\w+)\}", a)
        rx = "".join("([0-9]+)" if re.fullmatch(r"\{\w+\}", part) else re.escape(part)
                     for part in re.split(r"(\{\w+\})", a))
        m = re.fullmatch(rx, name)
        if m:
            out = b
            for key, value in zip(keys, m.groups()):
                out = out.replace("{" + key + "}", value, 1)
            return out
    return name


# ---- init-std expressions: numbers, names, + - * / **, sqrt(), parentheses -----------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}


def check_expr(expr: str, where: str) -> None:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise _fail(where, f"std {expr!r} is not an expression") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.UAdd, ast.Name, ast.Load,
                               ast.Constant, ast.Call, *_OPS))
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            ok = False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == "sqrt"
                                               and len(node.args) == 1 and not node.keywords):
            ok = False
        if not ok:
            raise _fail(where, f"std {expr!r}: only numbers, names, + - * / **, sqrt() and parentheses")


def eval_expr(expr: str, env: dict) -> float:
    """Value of a std expression; a name missing from env raises KeyError(name)."""
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return float(n.value)
        if isinstance(n, ast.Name):
            if n.id not in env:
                raise KeyError(n.id)
            v = env[n.id]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise KeyError(n.id)
            return float(v)
        if isinstance(n, ast.UnaryOp):
            return -ev(n.operand) if isinstance(n.op, ast.USub) else ev(n.operand)
        if isinstance(n, ast.BinOp):
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Call):
            return math.sqrt(ev(n.args[0]))
        raise ValueError(expr)
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression {shown(expr)} is longer than {MAX_EXPR_CHARS} characters")
    try:
        value = ev(ast.parse(expr, mode="eval"))
    except (OverflowError, RecursionError, ZeroDivisionError, MemoryError, SyntaxError) as e:
        raise ValueError(f"expression {shown(expr)}: {type(e).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"expression {shown(expr)} is not finite")
    return value


def shows_evidence(spec: Spec, places: dict[str, dict | None]) -> bool:
    """Whether a checkpoint's model_args / config / config.json hold one alternative of the spec's evidence."""
    def holds(key: str, want) -> bool:
        place, _, k = key.partition(".")
        d = places.get(place)
        return isinstance(d, dict) and k in d and _same(d[k], want)
    return any(all(holds(k, v) for k, v in alt.items()) for alt in spec.evidence)


def _same(a, b) -> bool:
    """Equal, with booleans never equal to numbers (True is not 1 here)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b
