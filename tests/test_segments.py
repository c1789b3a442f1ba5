"""Fused dimensions whose parts duplicate with different blocks (spec `segments`, docs/spec-format.md): Phi-3's
qkv_proj rows [q | k | v] under GQA need query heads duplicated in whole query groups and key/value heads one
by one. Each segment is duplicated in place on its own; the streamed widening (any row range) gives the same
bits as the whole-tensor one."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from mupscale_cli.core.plan import make_plan
from mupscale_cli.core.spec import parse_spec
from mupscale_cli.core.widen import duplicate, source_rows, widen, widen_range
from mupscale_cli.errors import MupscaleError

SPEC = """
name: seg
readout: mup
sizes:
  q_dim: 12
  kv_dim: 4
tensors:
  qkv.weight: {axes: [{axis: heads, segments: [[q_dim, 6], [kv_dim, 2], [kv_dim, 2]]}, d_model]}
  o.weight: {axes: [d_model, {axis: heads, segments: [[q_dim, 6], [8, 1]]}]}
  v.bias: {axes: [{axis: heads, segments: [[q_dim, 6], [kv_dim, 2], [kv_dim, 2]]}]}
"""


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"qkv.weight": torch.randn(20, 5, generator=g, dtype=torch.float64),
            "o.weight": torch.randn(5, 20, generator=g, dtype=torch.float64),
            "v.bias": torch.randn(20, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_segment_is_duplicated_alone(k):
    ts = _tensors()
    plan = make_plan(parse_spec(SPEC, "seg.yaml"), {n: (tuple(t.shape), t.dtype) for n, t in ts.items()},
                     {"heads": k, "d_model": 1})
    w = widen(ts["qkv.weight"], plan.tensors["qkv.weight"])
    t = ts["qkv.weight"]
    want = torch.cat([duplicate(t[:12], 0, k, 6), duplicate(t[12:16], 0, k, 2), duplicate(t[16:], 0, k, 2)])
    assert torch.equal(w, want)
    o = widen(ts["o.weight"], plan.tensors["o.weight"])
    t = ts["o.weight"]
    assert torch.equal(o, torch.cat([duplicate(t[:, :12], 1, k, 6), duplicate(t[:, 12:], 1, k, 1)], 1) / k)  # matrix-like: 1/k_in
    if k > 1:  # not the same as one block for the whole dimension
        assert not torch.equal(w, duplicate(ts["qkv.weight"], 0, k, 2))


@pytest.mark.parametrize("power,sigma", [(0, 0.0), (0, 0.5), (1, 0.0), (2, 0.0)])
def test_streamed_ranges_are_the_whole_tensor_bit_for_bit(power, sigma):
    ts = _tensors()
    plan = make_plan(parse_spec(SPEC, "seg.yaml"), {n: (tuple(t.shape), t.dtype) for n, t in ts.items()},
                     {"heads": 3, "d_model": 2})
    for name, t in ts.items():
        p = plan.tensors[name]
        p.noise_unit = 1.0
        whole = widen_range(lambda a, b: t[a:b], p, 0, p.out_shape[0] * (p.out_shape[1] if t.dim() > 1 else 1),
                            power=power, sigma=sigma, seed=1).reshape(p.out_shape)
        if not sigma:
            f = p.s if power == 0 else p.g ** power
            assert torch.equal(whole, widen(t, p, power)), name
            assert f != 1 or power == 0
        n = whole.numel()
        for a in range(0, n, 7):
            for b in (a + 1, a + 13, min(n, a + 61)):
                b = min(b, n)
                r0, r1 = a // (whole.numel() // whole.shape[0]), -(-b // (whole.numel() // whole.shape[0]))
                i0, i1 = source_rows(p, r0, r1)
                got = widen_range(lambda x, y: t[x:y], p, a, b, power=power, sigma=sigma, seed=1)
                assert torch.equal(got, whole.reshape(-1)[a:b]), (name, a, b)
                assert 0 <= i0 < i1 <= t.shape[0]


def test_matrix_factors_are_those_of_blocks():
    ts = _tensors()
    plan = make_plan(parse_spec(SPEC, "seg.yaml"), {n: (tuple(t.shape), t.dtype) for n, t in ts.items()},
                     {"heads": 2, "d_model": 4})
    p = plan.tensors["qkv.weight"]
    assert (p.s, p.g) == (Fraction(1, 4), Fraction(1, 2)) and p.out_shape == (40, 20)


@pytest.mark.parametrize("axes,why", [
    ("[{axis: heads, block: 2, segments: [[12, 6]]}, null]", "not both"),
    ("[{axis: heads, segments: []}, null]", "[SIZE, BLOCK] pairs"),
    ("[{axis: heads, segments: [[12]]}, null]", "[SIZE, BLOCK] pairs"),
    ("[{axis: heads, segments: [[12, 0], [8, 2]]}, null]", "[SIZE, BLOCK] pairs"),
    ("[{axis: heads, segments: [[12, 6], [4, 2]]}, null]", "not the sum of its segments"),
    ("[{axis: heads, segments: [[12, 5], [8, 2]]}, null]", "not a multiple of its block size 5"),
    ("[{axis: heads, segments: [[q_dim, 6], [8, nope]]}, null]", "'nope' is unknown"),
])
def test_bad_segments_are_one_line_errors(axes, why):
    text = f"name: bad\nsizes: {{q_dim: 12}}\ntensors:\n  w: {{axes: {axes}}}\n"
    with pytest.raises(MupscaleError, match=why.replace("[", r"\[").replace("]", r"\]")):
        make_plan(parse_spec(text, "bad.yaml"), {"w": ((20, 3), torch.float64)}, {"heads": 2})


@pytest.mark.parametrize("kp", [-0.5, -0.25])
@pytest.mark.parametrize("power", [0, 1, 2])
def test_irrational_k_power_factors_stream_bit_for_bit(power, kp):
    """k_power -0.5 (Gemma's sqrt(hidden_size)): g = sqrt(k) as an exact fraction of a float. With -0.25, g²
    for exp_avg_sq (k^-1.5, no exact form) has a numerator beyond torch's integers (was an internal error).
    Applied as one float multiplication, the same in the whole-tensor and the streamed paths."""
    spec = parse_spec(f"name: kp\nreadout: sum\ntensors:\n  e: {{axes: [null, d], fan_in: 0, k_power: {kp}}}\n",
                      "kp.yaml")
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = make_plan(spec, {"e": ((6, 5), torch.float64)}, {"d": 2}).tensors["e"]
    whole = widen(t, p, power)  # an embedding: s 1, g 1/k, then weights × k^p and gradients × k^-p
    torch.testing.assert_close(whole, t.repeat_interleave(2, 1) * 2 ** (kp if power == 0 else power * (-1 - kp)),
                               rtol=4e-16, atol=0)
    for a in range(0, whole.numel(), 3):
        got = widen_range(lambda x, y: t[x:y], p, a, min(whole.numel(), a + 17), power=power)
        assert torch.equal(got, whole.reshape(-1)[a:a + 17])
