"""Property tests (hypothesis): spec parsing and pattern matching, block duplication, and the widening
invariants at σ̄ = 0: widening by a then by b equals widening by a·b, and averaging the duplicates of
a widening (then undoing the rescale) recovers the base tensor, for weights and optimizer state."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mupscale_cli.core.plan import make_plan, parse_k
from mupscale_cli.core.spec import SPEC_KEYS, compile_pattern, eval_size, parse_spec
from mupscale_cli.core.widen import duplicate, scale, widen, widen_noised
from mupscale_cli.errors import MupscaleError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORD = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
AXES = ("a", "b")


# ---------------------------------------------------------------------------------------------------
# Patterns and spec parsing


@st.composite
def pattern_and_name(draw):
    segs = draw(st.lists(st.one_of(WORD, st.just("{i}"), st.just("*"), st.just("{layer}")), min_size=1, max_size=5))
    fills = []
    for s in segs:
        if s.startswith("{"):
            fills.append(str(draw(st.integers(0, 10**6))))
        elif s == "*":
            fills.append(draw(st.from_regex(r"[A-Za-z0-9_]{0,6}", fullmatch=True)))
        else:
            fills.append(s)
    return ".".join(segs), ".".join(fills), fills


@SETTINGS
@given(pattern_and_name())
def test_pattern_matches_its_instances_and_never_crosses_dots(pn) -> None:
    pattern, name, fills = pn
    rx = compile_pattern(pattern)
    assert rx.fullmatch(name)
    assert not rx.fullmatch(name + ".x") and not rx.fullmatch("x." + name)
    # `{i}` and `*` never match a dot: a name with an extra dot inside a segment does not match
    broken = ".".join(f[:1] + "." + f[1:] for f in fills)
    assert not rx.fullmatch(broken)


@st.composite
def axis_entry(draw):
    kind = draw(st.sampled_from(["fixed", "axis", "block", "named-block"]))
    if kind == "fixed":
        return None
    axis = draw(st.sampled_from(AXES))
    if kind == "axis":
        return axis
    return {"axis": axis, "block": draw(st.integers(1, 64)) if kind == "block" else "head_dim"}


@st.composite
def spec_doc(draw):
    names = draw(st.lists(st.from_regex(r"[a-z]{1,5}(\.\{i\})?\.[a-z]{1,5}", fullmatch=True), min_size=1,
                          max_size=5, unique=True))
    tensors = {}
    for n in names:
        axes = draw(st.lists(axis_entry(), max_size=4))
        rule = {"axes": axes}
        if draw(st.booleans()):
            rule["fan_in"] = draw(st.integers(0, 3))
        for key in ("buffer", "optional"):
            if draw(st.booleans()):
                rule[key] = draw(st.booleans())
        noise = draw(st.one_of(st.none(), st.booleans(), st.floats(0, 10, allow_nan=False)))
        if noise is not None:
            rule["noise"] = noise
        tensors[n] = rule if len(rule) > 1 or draw(st.booleans()) else axes
    return {"name": draw(WORD), "readout": draw(st.sampled_from(["mup", "sum"])),
            "sizes": {"head_dim": "n_embd / n_head"}, "tensors": tensors}


@SETTINGS
@given(spec_doc())
def test_spec_round_trip(doc) -> None:
    spec = parse_spec(yaml.safe_dump(doc, sort_keys=False), "prop.yaml")
    assert spec.name == doc["name"] and spec.readout == doc["readout"]
    assert [r.pattern for r in spec.rules] == list(doc["tensors"])
    for r, (pattern, body) in zip(spec.rules, doc["tensors"].items()):
        body = body if isinstance(body, dict) else {"axes": body}
        dims = [None if d.axis is None else d.axis if d.block == 1 else {"axis": d.axis, "block": d.block}
                for d in r.dims]
        want = [x if not (isinstance(x, dict) and x["block"] == 1) else x["axis"] for x in body["axes"]]
        assert dims == want
        assert (r.fan_in, r.buffer, r.optional) == (body.get("fan_in", 1), body.get("buffer", False),
                                                    body.get("optional", False))
        noise = body.get("noise")
        assert r.noise == (noise if isinstance(noise, bool) or noise is None else float(noise))
    assert set(spec.axes) <= set(AXES)


@SETTINGS
@given(spec_doc(), st.from_regex(r"[a-z_]{2,12}", fullmatch=True), st.sampled_from(["top", "rule"]))
def test_spec_typos_are_errors(doc, key, where) -> None:
    if where == "top":
        if key in SPEC_KEYS:
            return
        doc[key] = 1
    else:
        if key in {"axes", "fan_in", "buffer", "noise", "optional"}:
            return
        first = next(iter(doc["tensors"]))
        body = doc["tensors"][first]
        doc["tensors"][first] = {**(body if isinstance(body, dict) else {"axes": body}), key: 1}
    with pytest.raises(MupscaleError, match=f"unknown key '{key}'") as e:
        parse_spec(yaml.safe_dump(doc), "prop.yaml")
    assert "\n" not in str(e.value)


@SETTINGS
@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), st.integers(1, 10**6),
                       min_size=1, max_size=5), st.integers(-5, 10**6))
def test_parse_k_round_trip(ks, single) -> None:
    assert parse_k(",".join(f"{a}={k}" for a, k in ks.items())) == ks
    assert parse_k(" , ".join(f"{a} = {k}" for a, k in ks.items())) == ks
    if single >= 1:
        assert parse_k(str(single)) == {"*": single}
    else:
        with pytest.raises(MupscaleError, match="--k"):
            parse_k(str(single))
        with pytest.raises(MupscaleError, match="--k"):
            parse_k(f"{next(iter(ks))}={single}")


@SETTINGS
@given(st.integers(1, 1000), st.integers(1, 1000), st.integers(2, 1000))
def test_eval_size_is_exact(x, y, z) -> None:
    assert eval_size("x * y / y", {"x": x, "y": y}) == x
    assert eval_size(f"x*{z}/x", {"x": x}) == z
    assert eval_size("x * y + z / z + 3", {"x": x, "y": y, "z": z}) == x * y + 4  # sums of products
    with pytest.raises(ValueError):
        eval_size("x +", {"x": x})
    if x % z:
        with pytest.raises(ValueError):
            eval_size(f"x / {z}", {"x": x})


# ---------------------------------------------------------------------------------------------------
# Duplication


@st.composite
def blocked_tensor(draw):
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(0, ndim - 1))
    block = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[dim] = block * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t, dim, block


@SETTINGS
@given(blocked_tensor(), st.integers(1, 5), st.integers(1, 5))
def test_duplicate_blocks(tb, a, b) -> None:
    t, dim, block = tb
    d = duplicate(t, dim, a, block)
    n = t.shape[dim]
    assert d.shape[dim] == n * a
    # block j of the output is block j // a of the input
    for j in range(n * a // block):
        src = t.narrow(dim, (j // a) * block, block)
        assert torch.equal(d.narrow(dim, j * block, block), src)
    assert torch.equal(duplicate(d, dim, b, block), duplicate(t, dim, a * b, block))
    if block == 1:
        assert torch.equal(d, t.repeat_interleave(a, dim))


# ---------------------------------------------------------------------------------------------------
# Widening invariants at σ̄ = 0, on random specs


@st.composite
def model(draw):
    """A spec (text), tensors and per-axis k's; every width dim is on axis a or b, maybe in blocks."""
    tensors, rules = {}, {}
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    for i in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(0, 3))
        nw = draw(st.integers(0, min(2, ndim)))
        wdims = sorted(draw(st.permutations(range(ndim)))[:nw])
        axes, shape = [], []
        for j in range(ndim):
            if j in wdims:
                axis, block = draw(st.sampled_from(AXES)), draw(st.sampled_from([1, 2, 3]))
                axes.append(axis if block == 1 else {"axis": axis, "block": block})
                shape.append(block * draw(st.integers(1, 3)))
            else:
                axes.append(None)
                shape.append(draw(st.integers(1, 3)))
        rule = {"axes": axes, "buffer": draw(st.integers(0, 4)) == 0}
        if ndim >= 2:
            rule["fan_in"] = draw(st.sampled_from(wdims)) if nw == 2 else draw(st.integers(0, ndim - 1))
        name = f"layer.{i}.weight"
        rules[name] = rule
        tensors[name] = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    text = yaml.safe_dump({"name": "prop", "readout": draw(st.sampled_from(["mup", "sum"])), "tensors": rules})
    return parse_spec(text, "prop.yaml"), tensors


K_POW2 = st.fixed_dictionaries({a: st.sampled_from([1, 2, 4]) for a in AXES})
K_ANY = st.fixed_dictionaries({a: st.integers(1, 5) for a in AXES})


def _widen_all(spec, tensors, k, power):
    plan = make_plan(spec, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, k)
    return {n: widen(t, plan.tensors[n], power) for n, t in tensors.items()}, plan


def _compose(spec, tensors, ka, kb, power):
    ka = {a: ka[a] for a in spec.axes}
    kb = {a: kb[a] for a in spec.axes}
    once, _ = _widen_all(spec, tensors, ka, power)
    twice, _ = _widen_all(spec, once, kb, power)
    direct, _ = _widen_all(spec, tensors, {a: ka[a] * kb[a] for a in spec.axes}, power)
    return twice, direct


@SETTINGS
@given(model(), K_POW2, K_POW2, st.sampled_from([0, 1, 2]))
def test_widening_by_a_then_b_is_widening_by_ab_exactly(m, ka, kb, power) -> None:
    """Powers of two: every rescale is exact, so the two routes agree bit for bit."""
    spec, tensors = m
    twice, direct = _compose(spec, tensors, ka, kb, power)
    for n in tensors:
        assert twice[n].shape == direct[n].shape
        assert torch.equal(twice[n], direct[n]), n


@SETTINGS
@given(model(), K_ANY, K_ANY, st.sampled_from([0, 1, 2]))
def test_widening_by_a_then_b_is_widening_by_ab(m, ka, kb, power) -> None:
    """Any k: the same up to the rounding of one division (x/a/b vs x/(ab))."""
    spec, tensors = m
    twice, direct = _compose(spec, tensors, ka, kb, power)
    for n in tensors:
        assert twice[n].shape == direct[n].shape
        torch.testing.assert_close(twice[n], direct[n], rtol=4e-16, atol=0)


def _undo(w: torch.Tensor, p, power: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(one copy of every duplicated block, the average of the copies), both with the rescale undone;
    asserts that the copies are identical."""
    first, avg = w, w
    for i, d in enumerate(p.dims):
        if d.axis is None:
            continue
        n = first.shape[i] // d.k
        shape = (*first.shape[:i], n // d.block, d.k, d.block, *first.shape[i + 1:])
        v, va = first.reshape(shape), avg.reshape(shape)
        assert torch.equal(v, v.narrow(i + 1, 0, 1).expand_as(v)), "duplicates differ"
        first = v.select(i + 1, 0).reshape(*first.shape[:i], n, *first.shape[i + 1:])
        avg = va.mean(dim=i + 1).reshape(*avg.shape[:i], n, *avg.shape[i + 1:])
    f = Fraction(1) if p.buffer else (p.s if power == 0 else p.g ** power)
    return scale(first, 1 / f), scale(avg, 1 / f)


@SETTINGS
@given(model(), K_POW2, st.sampled_from([0, 1, 2]))
def test_averaging_duplicates_recovers_the_base_exactly(m, k, power) -> None:
    spec, tensors = m
    wide, plan = _widen_all(spec, tensors, {a: k[a] for a in spec.axes}, power)
    for n, t in tensors.items():
        p = plan.tensors[n]
        assert wide[n].shape == p.out_shape
        first, avg = _undo(wide[n], p, power)
        assert torch.equal(first, t), n
        torch.testing.assert_close(avg, t, rtol=1e-15, atol=0)


@SETTINGS
@given(model(), K_ANY, st.sampled_from([0, 1, 2]))
def test_averaging_duplicates_recovers_the_base(m, k, power) -> None:
    spec, tensors = m
    wide, plan = _widen_all(spec, tensors, {a: k[a] for a in spec.axes}, power)
    for n, t in tensors.items():
        p = plan.tensors[n]
        first, avg = _undo(wide[n], p, power)
        torch.testing.assert_close(first, t, rtol=1e-15, atol=0)
        torch.testing.assert_close(avg, t, rtol=1e-15, atol=0)
        # scale factors follow Table 1
        if p.buffer:
            continue
        kin = p.dims[p.fan_in].k if p.fan_in is not None and p.dims[p.fan_in].axis else None
        if p.n_width == 2:
            assert p.s == Fraction(1, kin)
        elif p.n_width == 1 and not (p.readout_like and spec.readout == "sum"):
            assert p.s == 1 and p.g == Fraction(1, math.prod(d.k for d in p.dims if d.axis))
        elif p.n_width == 0:
            assert p.s == p.g == 1


@SETTINGS
@given(model(), K_ANY)
def test_zero_noise_is_exact_widening(m, k) -> None:
    spec, tensors = m
    plan = make_plan(spec, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, {a: k[a] for a in spec.axes})
    for n, t in tensors.items():
        assert torch.equal(widen_noised(t, plan.tensors[n], 0.0, 123), widen(t, plan.tensors[n]))


def test_pattern_regex_is_anchored_by_fullmatch() -> None:
    g = compile_pattern("h.{i}.w")  # an automaton now (linear time): test what it matches, anchored
    assert g.fullmatch("h.12.w") and not g.fullmatch("xh.12.w") and not g.fullmatch("h.12.wx")
    assert not g.fullmatch("h.a.w") and not g.fullmatch("h..w") and not g.fullmatch("hx12.w")


def test_widen_keeps_the_tensor_on_its_device() -> None:
    """verify widens tensors on the GPU: the result must live where the input does (the meta device stands
    in for CUDA here; a CPU-allocated result failed `verify --device cuda` at step 0)."""
    spec = parse_spec(yaml.safe_dump({"name": "dev", "tensors": {
        "w": {"axes": ["d", "d"], "fan_in": 1}, "b": {"axes": ["d"]}}}), "dev.yaml")
    tensors = {"w": torch.empty(4, 4, dtype=torch.float64, device="meta"),
               "b": torch.empty(4, dtype=torch.float64, device="meta")}
    wide, _ = _widen_all(spec, tensors, {"d": 2}, 0)
    assert {n: (t.device.type, tuple(t.shape)) for n, t in wide.items()} == {"w": ("meta", (8, 8)),
                                                                              "b": ("meta", (8,))}
