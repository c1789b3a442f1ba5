"""`mupscale sweep`: grid, seeds, early scores, successive halving, noise schemes, hparams.yaml."""
from __future__ import annotations

import gc
import json
import math
import weakref

import mup
import pytest
import torch
import yaml

from conftest import mupscale
from mupscale_cli.commands.sweep import SweepOptions, run_sweep, spearman
from mupscale_cli.commands.widen import WidenOptions, prepare
from mupscale_cli.formats import load_checkpoint
from mupscale_cli.core.noise import noise
from mupscale_cli.core.schemes import effective_sigma, noised, spectral_norm
from mupscale_cli.core.widen import widen, widen_noised
from mupscale_cli.errors import MupscaleError
from mupscale_cli.zoo import mlp

ARGS = {**mlp.DEFAULT_ARGS, "width": 8}


@pytest.fixture
def proxy(tmp):
    torch.manual_seed(0)
    model = mlp.build(ARGS)
    opt = mup.MuAdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = mlp.batch(ARGS, 16, g)
        opt.zero_grad()
        mlp.loss(model, x, y).backward()
        opt.step()
    path = tmp / "proxy.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": ARGS,
                "config": {"learning_rate": 1e-2, "parametrization": "mup"}}, path)
    return path


def test_grid_with_seeds_writes_hparams(proxy, tmp):
    out = tmp / "hp.yaml"
    res = run_sweep(SweepOptions(proxy, k="2", sigmas=[0.0, 8.0], lrs=[1e-3, 1e-2], steps=30, seeds=2,
                                 batch_size=16, early=0.2, output=out))
    assert len(res["grid"]) == 4 and all(r["score"] is not None and r["score_se"] is not None for r in res["grid"])
    best = min(res["grid"], key=lambda r: r["score"])
    assert (res["sigma"], res["lr"]) == (best["sigma"], best["lr"])
    assert res["sigma"] == 0.0  # a huge σ̄ = 8 wrecks the warm start on this task
    assert "standard errors over 2 seeds" in res["confidence"]
    rho = res["rank_correlation_early_full"]
    assert rho == pytest.approx(spearman([r["early"] for r in res["grid"]], [r["score"] for r in res["grid"]]))
    assert rho >= 0.6  # σ̄ = 8 ranks last early as in full: at most the lr order within σ̄ flips
    assert res["total_train_steps"] == res["full_grid_steps"] == 4 * 30 * 2
    saved = yaml.safe_load(out.read_text())
    assert saved["sigma"] == res["sigma"] and saved["lr"] == res["lr"] and saved["base_lr"] == 1e-2


def test_halving_trains_at_most_half_the_steps_and_picks_a_trained_setting(proxy):
    grid = dict(sigmas=[0.0, 0.5, 2.0, 8.0], lrs=[3e-3, 1e-2], steps=32, batch_size=16)
    full = run_sweep(SweepOptions(proxy, k="2", **grid))
    halv = run_sweep(SweepOptions(proxy, k="2", halving=True, **grid))
    assert halv["total_train_steps"] <= full["full_grid_steps"] / 2
    assert [r["steps"] for r in halv["rungs"]] == [4, 8, 16, 32]
    assert [r["configs"] for r in halv["rungs"]] == [8, 4, 2, 1]
    assert halv["sigma"] in (0.0, 0.5) and full["sigma"] in (0.0, 0.5)


def test_relative_scheme_exports_sigmas_that_reproduce_it_as_mup_noise(proxy):
    prep = prepare(WidenOptions(checkpoint=proxy, k="4"))
    t = load_checkpoint(proxy).tensors
    p = prep.plan.tensors["hidden.0.weight"]
    w = widen(t["hidden.0.weight"], p)
    rel = noised(t["hidden.0.weight"], p, "relative", 0.5, seed=3)
    assert spectral_norm(rel - w) == pytest.approx(0.5 * spectral_norm(w), rel=1e-5)
    s_eff = effective_sigma(w, p, 0.5, seed=3)
    torch.testing.assert_close(widen_noised(t["hidden.0.weight"], p, s_eff, seed=3), rel, rtol=1e-6, atol=1e-7)
    inter0 = noised(t["hidden.0.weight"], p, "interpolate", 0.0, seed=3)
    assert torch.equal(inter0, w)
    inter1 = noised(t["hidden.0.weight"], p, "interpolate", 1.0, seed=3)
    assert spectral_norm(inter1) == pytest.approx(spectral_norm(w), rel=1e-5)
    masked = noised(t["hidden.0.weight"], p, "masked", 0.1, seed=3)
    z = noise("hidden.0.weight", p.out_shape, 3)
    torch.testing.assert_close(masked, w + 0.1 * (w / float(p.s)).abs() * z)  # t·|W ⊗ 11ᵀ| ⊙ z


def test_relative_sweep_exports_effective_sigma(proxy, tmp):
    res = run_sweep(SweepOptions(proxy, k="2", sigmas=[0.1, 0.3], lrs=[1e-2], steps=8, batch_size=8,
                                 scheme="relative", output=tmp / "hp.yaml"))
    eff = res["effective_sigma"]
    assert set(eff) == {"input.weight", "hidden.0.weight", "readout.weight"}
    assert all(v > 0 for v in eff.values())


def test_bad_options_are_one_line_errors(proxy):
    with pytest.raises(MupscaleError, match="--noise-scheme"):
        run_sweep(SweepOptions(proxy, scheme="loud"))
    with pytest.raises(MupscaleError, match="--early"):
        run_sweep(SweepOptions(proxy, early=1.5))
    r = mupscale("sweep", str(proxy), "--sigma", "a,b")
    assert r.returncode == 2 and "expected comma-separated numbers" in r.stderr


def test_sweep_command_prints_the_best_pair(proxy, tmp):
    r = mupscale("sweep", str(proxy), "--k", "2", "--sigma", "0,1", "--lr", "0.01", "--steps", "8",
                 "--batch-size", "8", "-o", str(tmp / "hp.yaml"), check=True)
    res = json.loads(r.stdout)
    assert res["lr"] == 0.01 and res["sigma"] in (0, 1) and "σ̄" in r.stderr
    assert yaml.safe_load((tmp / "hp.yaml").read_text())["sigma"] == res["sigma"]


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    # tied values share their mean rank: [0.5, 0.5, 2] against [0, 1, 2] (sequential ranks would give 1)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert spearman([5, 5, 5, 1], [4, 3, 2, 1]) == pytest.approx(spearman([2, 2, 2, 1], [4, 3, 2, 1]))


def test_grid_without_halving_holds_one_setting_in_memory(proxy, monkeypatch):
    """Without --halving each setting is built, trained and dropped before the next is built."""
    from mupscale_cli.commands import sweep
    live, most = weakref.WeakSet(), [0]
    start = sweep.Proxy.start

    def counting(self, *a):
        gc.collect()
        most[0] = max(most[0], len(live))
        r = start(self, *a)
        live.add(r.model)
        return r
    monkeypatch.setattr(sweep.Proxy, "start", counting)
    res = run_sweep(SweepOptions(proxy, k="2", sigmas=[0.0, 1.0], lrs=[1e-3, 1e-2], steps=4, batch_size=4))
    assert len(res["grid"]) == 4 and most[0] == 0  # no model alive when the next one is built


def test_seeds_zero_names_seeds(proxy):
    with pytest.raises(MupscaleError, match="--seeds must be >= 1"):
        run_sweep(SweepOptions(proxy, seeds=0))
    r = mupscale("sweep", str(proxy), "--seeds", "0")
    assert r.returncode == 2 and "--seeds must be >= 1" in r.stderr and "--steps" not in r.stderr
