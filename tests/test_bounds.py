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
