"""The house (issue 19): no import circles between the package's modules, and core (the widening math)
imports neither formats, commands nor verify. Every import counts, lazy ones inside functions and those under
TYPE_CHECKING too: a circle that only a lazy import keeps from failing at start-up is still a circle."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "mupscale_cli"
LIMIT = 500  # lines; a longer module states why at its top ("Over 500 lines: ...")


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        out[mod] = path
    return out


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for a in node.names:
                    for cand in (f"{base}.{a.name}", base):
                        if cand in mods and cand != mod:
                            out[mod].add(cand)
                            break
            elif isinstance(node, ast.Import):
                out[mod] |= {a.name for a in node.names if a.name in mods and a.name != mod}
    return out


def circles(graph: dict[str, set[str]], nodes) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    mods = modules()
    assert circles(edges(mods), mods) == []


def test_the_finder_finds_a_circle():
    """The check itself: a two-module circle and a self-contained chain."""
    g = defaultdict(set, {"a": {"b"}, "b": {"a"}, "c": {"a"}})
    assert circles(g, ["a", "b", "c"]) == [["a", "b"]]


def test_core_is_pure_math():
    mods = modules()
    g = edges(mods)
    bad = {m: sorted(d for d in g[m] if d.split(".")[1] in ("formats", "commands", "verify", "cli"))
           for m in mods if m.startswith("mupscale_cli.core.")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_long_modules_say_why():
    long = {m: len(p.read_text().splitlines()) for m, p in modules().items()
            if len(p.read_text().splitlines()) > LIMIT}
    unexplained = [m for m in long if "Over 500 lines:" not in modules()[m].read_text()[:3000]]
    assert unexplained == [], f"modules over {LIMIT} lines without a reason at their top: {long}"
