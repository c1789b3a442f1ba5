"""`widen --hparams`: σ̄ and γ̄↑ from `mupscale sweep -o` carried to a wider model, and verify of the result."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mup
import pytest
import torch
import yaml

from conftest import mupscale
from mupscale_cli.api import load
from mupscale_cli.commands.widen import WidenOptions, prepare, run_widen
from mupscale_cli.core.noise import noise
from mupscale_cli.core.widen import widen
from mupscale_cli.zoo import mlp

PROXY = {**mlp.DEFAULT_ARGS, "width": 8}
TARGET = {**mlp.DEFAULT_ARGS, "width": 16}
GAMMA = 1e-2  # both trained with MuAdamW at this base learning rate (μTransfer: the same γ̄ at every width)


def _train_save(path, args, dtype, steps=20, config=True):
    torch.manual_seed(0)
    model = mlp.build(args, PROXY).to(dtype)  # μP with base shapes at the proxy's width
    opt = mup.MuAdamW(model.parameters(), lr=GAMMA)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = mlp.batch(args, 16, g, dtype)
        opt.zero_grad()
        mlp.loss(model, x, y).backward()
        opt.step()
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": args,
          "config": {"parametrization": "mup"}}
    if config:
        ck["config"] = {"learning_rate": GAMMA, "batch_size": 16, "parametrization": "mup"}
    torch.save(ck, path)
    return path


@pytest.fixture
def proxy(tmp):
    return _train_save(tmp / "proxy.pt", PROXY, torch.float32)


@pytest.fixture
def target(tmp):
    return _train_save(tmp / "target.pt", TARGET, torch.float64)


def _hp(tmp, **kw) -> Path:
    d = {"sigma": 0.5, "lr": 2 * GAMMA, "base_lr": GAMMA, "noise_scheme": "mup", "spec": "mup-mlp", **kw}
    path = tmp / "hp.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _noised_matrices(target):
    plan = prepare(WidenOptions(target, k="2", spec="mup-mlp")).plan
    return {n: p for n, p in plan.tensors.items() if p.noise_unit and p.alias_of is None and len(p.shape) >= 2}


def test_sweep_then_widen_hparams_then_verify(proxy, target, tmp):
    """The issue's end-to-end path through the installed command: tune on the 8 → 16 proxy, carry σ̄ and γ̄↑
    to 16 → 32, and verify that the result is the exact widening plus the recorded noise, with learning
    rates × γ̄↑/γ̄, training in lockstep with the base."""
    hp = tmp / "hp.yaml"
    r = mupscale("sweep", str(proxy), "--k", "2", "--sigma", "0.5", "--lr", "0.005,0.02", "--steps", "12",
                 "--batch-size", "8", "-o", str(hp), check=True)
    tuned = yaml.safe_load(hp.read_text())
    assert tuned["sigma"] == 0.5 and tuned["lr"] in (0.005, 0.02) and tuned["base_lr"] == GAMMA
    assert json.loads(r.stdout)["lr"] == tuned["lr"]

    plain, wide = tmp / "plain.safetensors", tmp / "wide.safetensors"
    mupscale("widen", str(target), "--k", "2", "--spec", "mup-mlp", "-q", "-o", str(plain), check=True)
    r = mupscale("widen", str(target), "--k", "2", "--hparams", str(hp), "--json", "-q", "-o", str(wide), check=True)
    res = json.loads(r.stdout)
    scale = tuned["lr"] / GAMMA
    assert res["lr_scale"] == pytest.approx(scale, rel=1e-15) and res["sigma"] == 0.5

    w, p = load(wide), load(plain)
    prov = w.provenance
    assert prov["hparams"]["lr"] == tuned["lr"] and prov["hparams"]["file"] == "hp.yaml"
    assert prov["lr_scale"] == res["lr_scale"] and prov["sigma"] == 0.5
    for gw, gp in zip(w.optimizer["param_groups"], p.optimizer["param_groups"]):
        assert gw["param_names"] == gp["param_names"]
        assert gw["lr"] == gp["lr"] * scale  # every group, with its own μP factor kept
        assert gw["weight_decay"] == gp["weight_decay"] and gw["eps"] == gp["eps"]
    noised = [n for n in w.model if not torch.equal(w.model[n], p.model[n])]
    assert noised and set(noised) <= set(prov["noise_std"])

    r = mupscale("verify", str(target), str(wide), "--steps", "60")
    assert r.returncode == 0, r.stderr
    assert "learning rates × 2" in r.stderr or "learning rates × 0.5" in r.stderr
    assert "equal bit for bit" in r.stderr


def test_verify_fails_when_the_recorded_lr_scale_is_not_what_the_groups_carry(target, tmp):
    """verify undoes exactly the recorded γ̄↑/γ̄: a file whose groups were scaled twice fails on lr."""
    wide = tmp / "wide.pt"
    run_widen(WidenOptions(target, wide, k="2", spec="mup-mlp", hparams=_hp(tmp)))
    ck = torch.load(wide, weights_only=True)
    for g in ck["optimizer"]["param_groups"]:
        g["lr"] *= 2
    torch.save(ck, wide)
    r = mupscale("verify", str(target), str(wide), "--steps", "5")
    assert r.returncode == 1 and "lr wrong" in r.stdout + r.stderr, r.stdout + r.stderr


def test_pt_output_gets_the_new_base_lr_in_config_and_groups(target, tmp):
    plain, out = tmp / "plain.pt", tmp / "wide.pt"
    run_widen(WidenOptions(target, plain, k="2", spec="mup-mlp"))
    res = run_widen(WidenOptions(target, out, k="2", spec="mup-mlp", hparams=_hp(tmp, lr=0.03)))
    assert res["lr_scale"] == pytest.approx(3.0, rel=1e-15)
    ck, ref = torch.load(out, weights_only=True), torch.load(plain, weights_only=True)
    assert ck["config"] == {**ref["config"], "learning_rate": 0.03}  # nanoGPT's schedule starts from it
    assert len({g["lr"] for g in ck["optimizer"]["param_groups"]}) > 1  # per-tensor μP factors kept
    for g, gr in zip(ck["optimizer"]["param_groups"], ref["optimizer"]["param_groups"]):
        assert g["lr"] == gr["lr"] * res["lr_scale"]
        assert {h: v for h, v in g.items() if h != "lr"} == {h: v for h, v in gr.items() if h != "lr"}


def test_base_lr_option_overrides_the_checkpoint(tmp):
    target = _train_save(tmp / "noconfig.pt", TARGET, torch.float64, steps=3, config=False)
    hp = _hp(tmp, lr=0.02)
    a = run_widen(WidenOptions(target, tmp / "a.safetensors", k="2", spec="mup-mlp", hparams=hp))
    assert a["lr_scale"] == pytest.approx(2.0) and any("records no base learning rate" in n for n in a["notes"])
    b = run_widen(WidenOptions(target, tmp / "b.safetensors", k="2", spec="mup-mlp", hparams=hp, base_lr=0.04))
    assert b["lr_scale"] == pytest.approx(0.5) and not any("records no base" in n for n in b["notes"])


def test_relative_scheme_applies_each_tensors_effective_sigma(target, tmp):
    mats = _noised_matrices(target)
    eff = {n: 0.25 * (i + 1) for i, n in enumerate(sorted(mats))}
    hp = str(_hp(tmp, noise_scheme="relative", sigma=1.0, effective_sigma=eff))
    wide = tmp / "wide.safetensors"
    r = mupscale("widen", str(target), "--k", "2", "--hparams", hp, "--seed", "3", "--json", "-q", "-o", str(wide),
                 check=True)
    res = json.loads(r.stdout)
    assert res["sigma_per_tensor"] == eff and res["sigma"] == 0.0
    w = load(wide)
    base = torch.load(target, weights_only=True)["model"]
    for n, p in mats.items():
        z = noise(n, p.out_shape, 3).double()
        expect = widen(base[n], p) + eff[n] * p.noise_unit * z
        assert torch.allclose(w.model[n], expect, rtol=0, atol=1e-15), n
        assert w.provenance["noise_std"][n] == pytest.approx(eff[n] * p.noise_unit, rel=1e-15)
    unnoised = [n for n in w.model if n not in mats and not n.startswith("__")]
    for n in unnoised:
        assert torch.equal(w.model[n], widen(base[n], prepare(WidenOptions(target, k="2", spec="mup-mlp"))
                                             .plan.tensors[n]))
    r = mupscale("verify", str(target), str(wide), "--steps", "40")
    assert r.returncode == 0, r.stderr
    assert "σ̄ per tensor" in r.stderr


@pytest.mark.parametrize("case, words", [
    ("sigma-too", "--sigma and --hparams"),
    ("missing", "cannot read"),
    ("not-yaml", "not valid YAML"),
    ("no-lr", "needs sigma, lr and base_lr"),
    ("negative-lr", "lr must be a finite number > 0"),
    ("masked", "does not transfer"),
    ("relative-missing", "has no entry for"),
    ("relative-unknown", "which this checkpoint has no noised matrix"),
    ("base-lr-alone", "does nothing alone"),
    ("base-lr-bad", "--base-lr must be a positive number"),
])
def test_bad_hparams_are_one_line_errors_and_write_nothing(target, tmp, case, words):
    mats = sorted(_noised_matrices(target))
    args = ["--hparams", str(_hp(tmp))]
    if case == "sigma-too":
        args += ["--sigma", "0.5"]
    elif case == "missing":
        args = ["--hparams", str(tmp / "nope.yaml")]
    elif case == "not-yaml":
        (tmp / "hp.yaml").write_text("sigma: [unclosed\n")
    elif case == "no-lr":
        (tmp / "hp.yaml").write_text("sigma: 0.5\nbase_lr: 0.01\n")
    elif case == "negative-lr":
        args = ["--hparams", str(_hp(tmp, lr=-1.0))]
    elif case == "masked":
        args = ["--hparams", str(_hp(tmp, noise_scheme="masked"))]
    elif case == "relative-missing":
        args = ["--hparams", str(_hp(tmp, noise_scheme="relative", effective_sigma={mats[0]: 0.5}))]
    elif case == "relative-unknown":
        args = ["--hparams", str(_hp(tmp, noise_scheme="relative",
                                     effective_sigma={**{n: 0.5 for n in mats}, "blocks.9.weight": 0.5}))]
    elif case == "base-lr-alone":
        args = ["--base-lr", "0.01"]
    elif case == "base-lr-bad":
        args += ["--base-lr", "nan"]
    out = tmp / "wide.safetensors"
    r = mupscale("widen", str(target), "--k", "2", *args, "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ""
    assert {p.name for p in tmp.iterdir()} <= {"target.pt", "hp.yaml"}  # no output, no temporary


def test_hparams_k_mismatch_is_noted(target, tmp):
    k2 = prepare(WidenOptions(target, k="2", spec="mup-mlp")).plan.k
    res = run_widen(WidenOptions(target, tmp / "w.safetensors", k="4", spec="mup-mlp", hparams=_hp(tmp, k=k2)))
    assert any("tuned for k" in n for n in res["notes"])
    assert math.isclose(res["lr_scale"], 2.0)
