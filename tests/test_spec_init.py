"""`mupscale spec init CKPT` (issue 19): a skeleton spec from a checkpoint's names, shapes and model_args that,
unedited, widens the checkpoint it came from exactly (verify PASS with the model code given on the command
line), through the real command."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import MUPSCALE, make_base
from mupscale_cli.zoo import mlp

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MUPSCALE, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["nanogpt-tiny", "mlp"])
def test_spec_init_skeleton_widens_its_checkpoint_exactly(tmp_path: Path, case: str) -> None:
    if case == "mlp":  # mup's MuAdamW groups (ids without names): the built-in layouts must map them
        src, _, _ = make_base(tmp_path, mlp, dict(mlp.DEFAULT_ARGS), "adamw", "mup", steps=3)
        model, axis = "mupscale_cli.zoo.mlp", "width"
    else:  # nanoGPT names, tied lm_head, fused c_attn 3 × n_embd, MLP 4 × n_embd
        src, model, axis = ROOT / "examples" / "nanogpt-tiny.pt", "mupscale_cli.zoo.gpt", "n_embd"
    spec = tmp_path / "mine.yaml"
    r = run("spec", "init", str(src), "-o", str(spec))
    assert r.returncode == 0 and r.stdout == f"{spec}\n", r.stderr
    assert len(r.stderr.splitlines()) == 1 and f"width axes {axis}" in r.stderr, r.stderr
    text = spec.read_text()
    assert f"  {axis}: {axis}" in text and "detect: false" in text
    if case == "nanogpt-tiny":
        assert "lm_head.weight: transformer.wte.weight" in text  # found by equal values
        assert '"transformer.h.{i}.attn.c_attn.weight": [n_embd, n_embd]' in text
        assert "transformer.wte.weight: {axes: [null, n_embd], fan_in: 0}" in text
    assert run("spec", "init", str(src)).stdout == text  # stdout without -o: the same text
    r = run("spec", "init", str(src), "-o", str(spec))
    assert r.returncode == 2 and "--force" in r.stderr and spec.read_text() == text
    wide = tmp_path / "wide.safetensors"
    r = run("widen", str(src), "--spec", str(spec), "--k", "2", "-o", str(wide))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    r = run("verify", str(src), str(wide), "--steps", "10", "--model", model, "--quiet")
    assert r.returncode == 0 and r.stdout.startswith("PASS: 10 steps"), r.stdout + r.stderr


def test_spec_init_refuses_to_overwrite_its_checkpoint(tmp_path: Path) -> None:
    src, _, _ = make_base(tmp_path, mlp, dict(mlp.DEFAULT_ARGS), "adamw", "named", steps=1)
    before = src.read_bytes()
    r = run("spec", "init", str(src), "-o", str(src), "--force")
    assert r.returncode == 2 and "that is the checkpoint" in r.stderr and src.read_bytes() == before
