"""Numbers a user or a spec file gives are bounded before any arithmetic (issue 17 §4): `--k` with 170 digits
and size or std expressions with thousands of factors were internal errors (exit 3); now one line, exit 2."""
from __future__ import annotations

import pytest

from conftest import mupscale
from mupscale_cli.core.spec import MAX_EXPR_CHARS, eval_expr, eval_size
from mupscale_cli.errors import MupscaleError

EXAMPLE = "examples/nanogpt-tiny.pt"
HUGE = "9" * 170


@pytest.mark.parametrize("k", [HUGE, f"d_model=2,d_ff={HUGE}", str(1 << 21)])
def test_huge_k_is_one_line_exit_2(k, tmp_path):
    from pathlib import Path
    ex = str(Path(__file__).resolve().parents[1] / EXAMPLE)
    for args in (["widen", ex, "-o", str(tmp_path / "w.pt")], ["inspect", ex]):
        r = mupscale(*args, "--k", k)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "more than 1048576" in lines[0] and len(lines[0]) < 300, r.stderr
    assert not (tmp_path / "w.pt").exists()


def test_size_expressions_are_bounded():
    env = {"n_embd": 64, "n_head": 4}
    assert eval_size("n_embd / n_head", env) == 16
    with pytest.raises(ValueError, match="longer than"):
        eval_size("n_embd" + " * 9999" * 3000, env)
    with pytest.raises(ValueError, match="exceeds"):
        eval_size(" * ".join(["n_embd"] * 12), env)  # 64^12: short, but larger than any tensor
    with pytest.raises(ValueError, match="longer than"):
        eval_expr("1" + " * 2" * 5000, {})
    with pytest.raises(ValueError, match="not finite|OverflowError"):
        eval_expr("1e300 * 1e300", {})
    assert len("n_embd / n_head") < MAX_EXPR_CHARS


def test_a_spec_with_a_huge_expression_is_one_line_exit_2(tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = (root / "configs" / "nanogpt-mup-heads.yaml").read_text()
    assert "head_dim:" in spec
    bad = tmp_path / "bad.yaml"
    lines = [ln + (" * 9999" * 3000 if ln.strip().startswith("head_dim:") and "/" in ln else "")
             for ln in spec.splitlines()]
    bad.write_text("\n".join(lines) + "\n")
    assert bad.read_text().count("9999") >= 3000
    r = mupscale("widen", str(root / EXAMPLE), "-o", str(tmp_path / "w.pt"), "--k", "2", "--spec", str(bad))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "longer than" in r.stderr and len(r.stderr) < 400, r.stderr


@pytest.mark.parametrize("env,match", [({"WORLD_SIZE": "2"}, "RANK is not set"),
                                       ({"WORLD_SIZE": "2", "RANK": "5"}, "not below WORLD_SIZE"),
                                       ({"WORLD_SIZE": "two"}, "non-negative integer"),
                                       ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR")])
def test_torchrun_environment_checked(tmp_path, env, match):
    """A half-set torchrun environment (WORLD_SIZE=2 without RANK was torch's ValueError, exit 3) is one line,
    exit 2, before any process group starts, for widen of a DCP checkpoint and for verify."""
    import os
    import subprocess

    from conftest import MUPSCALE
    from test_dcp import _small_dcp
    src = _small_dcp(tmp_path / "dcp")
    full = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    for args in (["widen", str(src), "-o", str(tmp_path / "out"), "--k", "2", "--spec", "mup-mlp"],
                 ["verify", str(src), "--spec", "mup-mlp", "--model-arg", "width=8", "--steps", "1"]):
        r = subprocess.run([*MUPSCALE, *args], capture_output=True, text=True, env={**full, **env}, timeout=120)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.splitlines()) == 1 and match in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
