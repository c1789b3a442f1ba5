"""Symmetry-breaking noise: reproducible, μP-scaled as documented, absent where the spec says so."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_base
from mupscale_cli.commands.widen import WidenOptions, prepare, run_widen
from mupscale_cli.formats import load_checkpoint
from mupscale_cli.core.noise import CHUNK, noise
from mupscale_cli.core.spec import bundled_paths
from mupscale_cli.core.widen import widen
from mupscale_cli.zoo import mlp

ARGS = {**mlp.DEFAULT_ARGS, "width": 64, "depth": 4}


@pytest.fixture
def base(tmp):
    return make_base(tmp, mlp, ARGS, "adamw", "named")[0]


def widen_to(base, out, **kw):
    run_widen(WidenOptions(checkpoint=base, output=out, k="4", **kw))
    return load_checkpoint(out).tensors


def test_same_seed_same_bytes_other_seed_different(base, tmp):
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    widen_to(base, a, sigma=0.75, seed=3)
    widen_to(base, b, sigma=0.75, seed=3)
    assert a.read_bytes() == b.read_bytes()  # the whole file, metadata included
    c = widen_to(base, tmp / "c.safetensors", sigma=0.75, seed=4)
    ta = load_checkpoint(a).tensors
    assert not torch.equal(ta["hidden.0.weight"], c["hidden.0.weight"])
    assert torch.equal(ta["hidden.0.bias"], c["hidden.0.bias"])  # biases carry no noise


def test_noise_std_matches_the_documented_convention(base, tmp):
    sigma = 0.75
    noised = widen_to(base, tmp / "n.safetensors", sigma=sigma, seed=0)
    prep = prepare(WidenOptions(checkpoint=base, k="4"))
    src = load_checkpoint(base).tensors
    checked = 0
    for n, p in prep.plan.tensors.items():
        delta = noised[n] - widen(src[n], p)
        if p.noise_unit == 0:
            assert torch.equal(delta, torch.zeros_like(delta)), n
            continue
        if p.role == "matrix":  # N(0, sigma^2 / N_in), N_in the widened fan-in
            assert p.noise_unit == pytest.approx(1 / math.sqrt(p.out_shape[1]))
        elif p.readout_like:  # mean readout: N(0, sigma^2)
            assert p.noise_unit == 1.0
        else:  # input layer, fixed fan-in: N(0, sigma^2 / fan_in)
            assert p.noise_unit == pytest.approx(1 / math.sqrt(p.shape[1]))
        std = delta.std().item()
        assert std == pytest.approx(sigma * p.noise_unit, rel=0.05), n
        assert abs(delta.mean().item()) < 0.05 * sigma * p.noise_unit
        checked += 1
    assert checked == 4  # input, two hidden matrices, readout


def test_spec_switches_noise_off_and_scales_it(base, tmp):
    spec = (tmp / "s.yaml")
    text = next(p for p in bundled_paths() if p.stem == "mup-mlp").read_text()
    text = text.replace("name: mup-mlp", "name: quiet-mlp")
    text = text.replace("readout.weight: [null, width]", "readout.weight: {axes: [null, width], noise: false}")
    text = text.replace('"hidden.{i}.weight": [width, width]', '"hidden.{i}.weight": {axes: [width, width], noise: 0.5}')
    text = text.replace("input.bias: {axes: [width], optional: true}", "input.bias: {axes: [width], noise: true}")
    spec.write_text(text)
    loud = widen_to(base, tmp / "loud.safetensors", sigma=1.0, seed=1)
    quiet = widen_to(base, tmp / "quiet.safetensors", sigma=1.0, seed=1, spec=str(spec))
    exact = widen_to(base, tmp / "exact.safetensors", sigma=0.0)
    assert torch.equal(quiet["readout.weight"], exact["readout.weight"])
    assert not torch.equal(loud["readout.weight"], exact["readout.weight"])
    d_loud = loud["hidden.0.weight"] - exact["hidden.0.weight"]
    d_quiet = quiet["hidden.0.weight"] - exact["hidden.0.weight"]
    assert d_quiet.std().item() == pytest.approx(0.5 * d_loud.std().item(), rel=0.02)
    assert (quiet["input.bias"] - exact["input.bias"]).std().item() == pytest.approx(1.0, rel=0.2)


@pytest.fixture
def threads():
    """torch's thread count, restored after the test changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_noise_depends_only_on_seed_name_shape_not_threads_or_chunks(threads):
    shape = (3, CHUNK + 5)  # spans two generator chunks
    torch.set_num_threads(1)
    a = noise("w", shape, 7)
    torch.set_num_threads(2)
    b = noise("w", shape, 7)
    assert torch.equal(a, b)
    assert not torch.equal(noise("v", shape, 7), a)  # another name: other noise
    assert not torch.equal(noise("w", shape, 8), a)
    assert abs(a.std().item() - 1) < 0.01


def test_tied_alias_gets_the_same_noise(tmp):
    from mupscale_cli.zoo import gpt
    src = make_base(tmp, gpt, gpt.DEFAULT_ARGS, "adamw", "named")[0]
    t = widen_to(src, tmp / "g.safetensors", sigma=1.0, seed=0)
    assert torch.equal(t["lm_head.weight"], t["transformer.wte.weight"])
