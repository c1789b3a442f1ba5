"""Architecture specs: which axes of each tensor grow with width (docs/spec-format.md)."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mupscale_cli.bounded import BoundedLoader, int_text, load_yaml, shown
from mupscale_cli.errors import MupscaleError

BUNDLED_DIRS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parents[3] / "configs")
SPEC_KEYS = {"name", "description", "detect", "readout", "sizes", "model_args", "tied", "tensors", "model"}
RULE_KEYS = {"axes", "fan_in", "buffer", "noise", "optional"}
DIM_KEYS = {"axis", "block"}
READOUTS = ("mup", "sum")


@dataclass(frozen=True)
class Dim:
    """One tensor dimension: fixed (axis None) or a width axis duplicated in blocks of `block`."""
    axis: str | None
    block: int | str = 1


@dataclass(frozen=True)
class Rule:
    pattern: str
    regex: Glob | re.Pattern  # fullmatch(name): whether the rule applies
    dims: tuple[Dim, ...]
    fan_in: int = 1
    buffer: bool = False
    noise: bool | float | None = None  # None: default by role
    optional: bool = False


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
        ok = (isinstance(block, int) and not isinstance(block, bool) and block >= 1) or (
            isinstance(block, str) and block.isidentifier())
        if not ok:
            raise _fail(where, f"'block' must be a positive int or a size name, got {block!r}")
        return Dim(axis, block)
    raise _fail(where, f"an axis entry must be null, an axis name or {{axis, block}}, got {x!r}")


def _parse_rule(pattern: str, body) -> Rule:
    where = f"tensor {pattern!r}"
    if isinstance(body, list):
        body = {"axes": body}
    if not isinstance(body, dict):
        raise _fail(where, "a rule is a list of axes or a mapping with 'axes'")
    _check_keys(where, body, RULE_KEYS)
    if not isinstance(body.get("axes"), list):
        raise _fail(where, "'axes' (one entry per dimension) is required")
    dims = tuple(_parse_dim(where, x) for x in body["axes"])
    fan_in = body.get("fan_in", 1)
    if not isinstance(fan_in, int) or isinstance(fan_in, bool) or fan_in < 0:
        raise _fail(where, f"'fan_in' must be a dimension index, got {fan_in!r}")
    noise = body.get("noise")
    if noise is not None and not isinstance(noise, (bool, int, float)):
        raise _fail(where, f"'noise' must be true, false or a multiplier, got {noise!r}")
    if isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise < 0:
        raise _fail(where, f"'noise' multiplier must be >= 0, got {noise!r}")
    for key in ("buffer", "optional"):
        if not isinstance(body.get(key, False), bool):
            raise _fail(where, f"'{key}' must be true or false")
    return Rule(pattern, compile_pattern(pattern), dims, fan_in, body.get("buffer", False),
                noise if isinstance(noise, bool) or noise is None else float(noise), body.get("optional", False))


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


def parse_spec(text: str, source: str) -> Spec:
    d = load_yaml(text, f"spec {source}", _UniqueKeyLoader)
    if not isinstance(d, dict):
        raise MupscaleError(f"spec {source}: expected a mapping at the top level")
    sha = hashlib.sha256(text.encode()).hexdigest()
    if "tensors" not in d and all(isinstance(v, list) for v in d.values()):
        return _from_bsh(d, source, sha)
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
    for key in ("sizes", "model_args", "tied"):
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
    spec = Spec(name=str(d["name"]), source=source, sha256=sha, readout=readout,
                description=str(d.get("description", "")), detect=bool(d.get("detect", True)),
                sizes={k: str(v) for k, v in maps["sizes"].items()},
                model_args={k: str(v) for k, v in maps["model_args"].items()},
                tied={k: str(v) for k, v in maps["tied"].items()}, rules=rules, model=maps["model"])
    for arg, axis in spec.model_args.items():
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
    by_name = {s.name: s for s in bundled_specs()}
    if arg in by_name:
        return by_name[arg]
    raise MupscaleError(f"spec {arg!r}: no such file and no bundled spec of that name "
                        f"(bundled: {', '.join(sorted(by_name))})")


def eval_size(expr: str, env: dict[str, int]) -> int:
    """`NAME|INT ((*|/) NAME|INT)*`, left to right; division must be exact."""
    tokens = expr.replace("*", " * ").replace("/", " / ").split()

    def value(tok: str) -> int:
        if tok.isdigit():
            return int_text(tok, f"size expression {shown(expr)}")
        if tok not in env:
            raise KeyError(tok)
        return int(env[tok])

    if not tokens or len(tokens) % 2 == 0:
        raise ValueError(f"bad size expression {expr!r}")
    acc = value(tokens[0])
    for op, tok in zip(tokens[1::2], tokens[2::2]):
        v = value(tok)
        if op == "*":
            acc *= v
        elif op == "/" and v and acc % v == 0:
            acc //= v
        else:
            raise ValueError(f"size expression {expr!r} is not an exact product/quotient")
    return acc
