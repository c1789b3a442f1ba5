"""Declared installation (issue 10): every package the code imports is a declared dependency, or an
optional one imported lazily with a one-line error saying how to install it. `.ci/run` checks the same
from a fresh virtualenv (the README's two commands, then `pip install .` into an empty one)."""
from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from mupscale_cli.errors import OPTIONAL

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mupscale_cli"
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _requirement_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return _norm(req)


def imports_of(path: Path) -> set[tuple[str, bool]]:
    """(top-level module, imported at module level) of every absolute import in a source file."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(a.name.split(".")[0], id(node) in top_level) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], id(node) in top_level))
    return out


def test_every_import_is_declared() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in meta["dependencies"]}
    extras = {_requirement_name(r) for reqs in meta["optional-dependencies"].values() for r in reqs}
    dists = packages_distributions()
    third = {}
    for f in SRC.rglob("*.py"):
        for mod, top in imports_of(f):
            if mod in sys.stdlib_module_names or mod in ("mupscale_cli", "__future__"):
                continue
            third.setdefault(mod, []).append(f.relative_to(SRC))
        if ".numpy()" in f.read_text():  # torch imports numpy for Tensor.numpy() but does not declare it
            third.setdefault("numpy", []).append(f.relative_to(SRC))
    assert {"torch", "numpy", "safetensors", "yaml"} <= set(third)  # the scan sees real imports
    for mod, files in sorted(third.items()):
        names = {_norm(d) for d in dists.get(mod, [mod])}
        if names & declared:
            continue
        assert mod in OPTIONAL, f"{mod} (imported by {files}) is neither a declared dependency nor optional"
        hint = OPTIONAL[mod]
        assert "pip install" in hint
        if "[" in hint:  # an extra: it exists and lists the package
            extra = hint.split("[")[1].split("]")[0]
            assert extra in meta["optional-dependencies"] and names & extras, (mod, hint)


def test_widen_runs_without_mup_and_verify_says_how_to_get_it(tmp_path: Path) -> None:
    """mup is installed with --no-deps (its declared dependencies pull a CUDA torch), so it is not a declared
    dependency: widen never imports it; verify's zoo models say in one line how to install it."""
    block = ("import sys; sys.modules['mup'] = None; sys.argv[0] = 'mupscale'; "
             "from mupscale_cli.cli import main; main()")
    ex = str(ROOT / "examples" / "nanogpt-tiny.pt")
    r = subprocess.run([sys.executable, "-c", block, "widen", ex, "--k", "2", "-o", str(tmp_path / "w.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", block, "verify", ex, "--steps", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"mupscale: error: this needs the mup package, which is not installed: "
                                     f"{OPTIONAL['mup']}"]
