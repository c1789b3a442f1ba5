"""Spec mistakes a user makes writing a spec for their own model (issue 19): a fixed (null) dimension that has
a width's size is warned about, an optimizer-id mismatch names the spec (or optimizer.layouts) before anything
else, and a layout with a catch-all group describes a script's own groups."""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from conftest import MUPSCALE, make_base, train
from mupscale_cli.zoo import mlp

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(mlp.DEFAULT_ARGS)  # width 16, d_out 5


def spec_with(tmp: Path, old: str, new: str, extra: str = "") -> Path:
    text = (ROOT / "configs" / "mup-mlp.yaml").read_text()
    assert old in text
    path = tmp / "my-mlp.yaml"
    path.write_text(text.replace(old, new).replace("name: mup-mlp", "name: my-mlp") + extra)
    return path


def without_model_args(src: Path) -> Path:
    """The checkpoint without model_args: nothing for widen to check the spec's axes against but the tensors
    (with model_args, a width axis whose dimensions the width does not divide is an error already)."""
    ck = torch.load(src, weights_only=True)
    del ck["model_args"]
    out = src.with_name("no-args.pt")
    torch.save(ck, out)
    return out


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MUPSCALE, *args], capture_output=True, text=True, timeout=300)


def test_null_axis_with_a_width_size_is_warned(tmp_path: Path) -> None:
    src, _, _ = make_base(tmp_path, mlp, ARGS, "adamw", "mup", steps=2)
    bad = spec_with(tmp_path, "readout.weight: [null, width]", "readout.weight: [width, null]")
    r = run("widen", str(src), "--spec", str(bad), "-o", str(tmp_path / "w.safetensors"))
    assert r.returncode == 2 and "model_args['width']" in r.stderr, r.stderr  # model_args show the mistake
    src = without_model_args(src)
    r = run("widen", str(src), "--spec", str(bad), "-o", str(tmp_path / "w.safetensors"))
    assert r.returncode == 0, r.stderr  # a warning: the spec is the user's to fix
    warn = [x for x in r.stderr.splitlines() if "warning: spec my-mlp" in x]
    assert len(warn) == 1 and "'readout.weight' dimension 1 (size 16) is fixed (null)" in warn[0], r.stderr
    assert "width axis 'width'" in warn[0]
    good = spec_with(tmp_path, "readout.weight: [null, width]", "readout.weight: [null, width]")
    r = run("widen", str(src), "--spec", str(good), "-o", str(tmp_path / "g.safetensors"))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_optimizer_mismatch_from_a_wrong_spec_names_the_spec_first(tmp_path: Path) -> None:
    """mup's MuAdamW groups by role (matrices, then the rest): an input layer written [width, width] (its
    fan-in is d_in 12, no multiple of width 16) becomes matrix-like, no layout fits, and the error names the
    spec's suspect dimension, not the training script."""
    src, _, _ = make_base(tmp_path, mlp, ARGS, "adamw", "mup", steps=2)
    src = without_model_args(src)
    bad = spec_with(tmp_path, "input.weight: [width, null]", "input.weight: [width, width]")
    r = run("widen", str(src), "--spec", str(bad), "-o", str(tmp_path / "w.safetensors"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "the spec looks wrong" in r.stderr and "'input.weight' dimension 1 (size 12) is width axis" in r.stderr
    assert "optimizer.layouts" not in r.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_unknown_group_layout_points_at_optimizer_layouts_whose_catch_all_describes_it(tmp_path: Path) -> None:
    """A script's own groups without param_names (ids only): the error points at the spec's optimizer.layouts;
    a layout of one named group and a catch-all `{}` then describes them and the widening is exact."""
    torch.manual_seed(0)
    model = mlp.build(ARGS).double()
    p = dict(model.named_parameters())
    first = ["input.weight", "readout.bias"]
    opt = torch.optim.AdamW([{"params": [p[n] for n in first]},
                             {"params": [v for n, v in p.items() if n not in first], "lr": 2e-3}], lr=1e-3)
    train(mlp, ARGS, model, opt, 2)
    src = tmp_path / "own.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": ARGS,
                "config": {"parametrization": "mup"}}, src)
    r = run("widen", str(src), "-o", str(tmp_path / "w.safetensors"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "optimizer.layouts" in r.stderr and "empty filter {}" in r.stderr and "spec looks wrong" not in r.stderr
    spec = spec_with(tmp_path, "readout.bias: {axes: [null], optional: true}", "readout.bias: {axes: [null], optional: true}",
                     "optimizer:\n  layouts:\n    my-script:\n      - match: [input.weight, readout.bias]\n      - {}\n")
    out = tmp_path / "w.safetensors"
    r = run("widen", str(src), "--spec", str(spec), "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = run("verify", str(src), str(out), "--steps", "5", "--quiet")
    assert r.returncode == 0 and r.stdout.startswith("PASS"), r.stdout + r.stderr
