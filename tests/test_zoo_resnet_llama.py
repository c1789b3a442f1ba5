"""μP ResNet-18 and Llama zoo models, and their bundled specs, checked in float64 without the mupscale core.

`widen` below is a minimal reading of docs/spec-format.md (patterns, axes, blocks, sizes, model_args,
matrix-like / k_in): widening a model with it must reproduce the base logits exactly, and training both
with the corrected μP optimizers must stay in lockstep.
"""
import copy
import re
from pathlib import Path

import mup
import pytest
import torch
import yaml

from mupscale_cli.optim import MuAdam, MuAdamW, MuSGD
from mupscale_cli.zoo import llama, resnet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LLAMA = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=12, rope_theta=10000.0, rms_norm_eps=1e-6)


def spec(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def widen(sp: dict, sd: dict, args: dict, k: dict) -> tuple[dict, dict]:
    """Widen state dict `sd` (model_args `args`) by k[axis] per the spec: (new state dict, new model_args)."""
    sizes = dict(args)
    for name, expr in sp.get("sizes", {}).items():  # NAME|INT ((*|/) NAME|INT)*, left to right, exact
        v, *rest = [int(sizes.get(t, t)) if t not in ("*", "/") else t for t in re.findall(r"\w+|[*/]", str(expr))]
        for op, x in zip(rest[::2], rest[1::2]):
            assert op == "*" or v % x == 0, expr
            v = v * x if op == "*" else v // x
        sizes[name] = v
    out = {}
    for name, t in sd.items():
        rules = [r for pat, r in sp["tensors"].items()
                 if re.fullmatch(re.sub(r"\\\{\w+\\\}", r"\\d+", re.escape(pat)).replace(r"\*", "[^.]*"), name)]
        assert len(rules) == 1, f"{name} matches {len(rules)} rules"
        rule = rules[0] if isinstance(rules[0], dict) else {"axes": rules[0]}
        axes = [None if a is None else (a, 1) if isinstance(a, str) else (a["axis"], sizes.get(a["block"], a["block"]))
                for a in rule["axes"]]  # (axis, block) or None
        assert len(axes) == t.dim(), name
        for d, a in enumerate(axes):
            if a is not None:  # repeat whole blocks in place
                t = t.unflatten(d, (-1, a[1])).repeat_interleave(k[a[0]], d).flatten(d, d + 1)
        if sum(a is not None for a in axes) == 2 and not rule.get("buffer"):
            t = t / k[axes[rule.get("fan_in", 1)][0]]  # matrix-like: k_in^-1 dup(W)
        out[name] = t
    return out, {**args, **{a: args[a] * k[ax] for a, ax in sp["model_args"].items()}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def resnet_names() -> list[str]:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    names = ["conv1.weight"] + [f"bn1.{x}" for x in bn]
    for s in range(1, 5):
        for b in range(2):
            p = f"layer{s}.{b}."
            for c in (1, 2):
                names += [p + f"conv{c}.weight"] + [p + f"bn{c}.{x}" for x in bn]
            if s > 1 and b == 0:
                names += [p + "downsample.0.weight"] + [p + f"downsample.1.{x}" for x in bn]
    return names + ["fc.weight", "fc.bias"]


def llama_names(n_layer: int) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def test_resnet_build_names_shapes():
    base = {"width": 4}
    for w in (4, 8):
        m = resnet.build({"width": w}, base).double()
        assert list(m.state_dict()) == resnet_names()
        assert all(hasattr(p, "infshape") for p in m.parameters())
        assert isinstance(m.fc, mup.MuReadout) and m.fc.weight.shape == (10, 8 * w)
        assert m.layer4[0].downsample[0].weight.shape == (8 * w, 4 * w, 1, 1)
        assert m.fc.width_mult() == w / 4
        x, y = resnet.batch({"width": w}, 3, torch.Generator().manual_seed(0), torch.float64)
        assert x.shape == (3, 3, 8, 8) and y.shape == (3,)
        assert resnet.output(m, x).shape == (3, 10)
        resnet.loss(m, x, y).backward()
    x4, _ = resnet.batch({"width": 4}, 2, torch.Generator().manual_seed(1))
    x8, _ = resnet.batch({"width": 8}, 2, torch.Generator().manual_seed(1))
    assert torch.equal(x4, x8)  # batches do not depend on the width


def test_resnet_batchnorm_running_stats_update():
    m = resnet.build({"width": 4})
    before = m.bn1.running_mean.clone()
    m.train()
    m(resnet.batch({"width": 4}, 4, torch.Generator().manual_seed(0))[0])
    assert not torch.equal(before, m.bn1.running_mean) and m.bn1.num_batches_tracked.item() == 1


def test_llama_build_names_shapes_gqa():
    wide_args = {**LLAMA, "hidden_size": 32, "num_attention_heads": 8, "num_key_value_heads": 4}
    for args in (LLAMA, wide_args):
        m = llama.build(args, LLAMA).double()
        assert list(m.state_dict()) == llama_names(2)
        assert all(hasattr(p, "infshape") for p in m.parameters())
        attn = m.model.layers[0].self_attn
        assert attn.head_dim == 4 and attn.k_proj.weight.shape == (attn.n_kv * 4, args["hidden_size"])
        assert isinstance(m.lm_head, mup.MuReadout) and m.lm_head.bias is None
        x, y = llama.batch(args, 2, torch.Generator().manual_seed(0))
        assert x.shape == y.shape == (2, 12) and torch.equal(x[:, 1:], y[:, :-1])
        assert llama.output(m, x).shape == (2, 12, 32)
        llama.loss(m, x, y).backward()
    assert m.lm_head.width_mult() == 2 and m.model.layers[0].self_attn.q_proj.weight.infshape.ninf() == 2
    gate = m.model.layers[0].mlp.gate_proj.weight.infshape  # d_ff not widened: still a width dimension
    assert gate.ninf() == 2 and gate.width_mult() == 2 and gate.fanin_fanout_mult_ratio() == 2
    m = llama.build({"hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2})
    assert m(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 64)  # defaults


def test_llama_causal():
    m = llama.build(LLAMA).double()
    x, _ = llama.batch(LLAMA, 1, torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 1) % 32
    assert torch.equal(m(x)[:, :-1], m(x2)[:, :-1])


def build_resnet_pair(k: int):
    torch.manual_seed(0)
    args = {"width": 4}
    base = resnet.build(args).double()
    for n, p in base.named_parameters():
        if "bn" in n or "downsample.1" in n:
            p.data.uniform_(0.5, 1.5)  # non-trivial BatchNorm gains and biases
    with torch.no_grad():  # non-trivial running statistics
        for i in range(3):
            base(resnet.batch(args, 4, torch.Generator().manual_seed(10 + i), torch.float64)[0])
    sd, wide_args = widen(spec("resnet18-mup"), base.state_dict(), args, {"channels": k})
    assert wide_args == {"width": 4 * k}
    wide = resnet.build(wide_args, args).double()
    wide.load_state_dict(sd)
    return base, wide, args


def build_llama_pair(sp: dict, k: dict):
    torch.manual_seed(0)
    base = llama.build(LLAMA).double()
    for n, p in base.named_parameters():
        if "norm" in n:
            p.data.uniform_(0.5, 1.5)
    sd, wide_args = widen(sp, base.state_dict(), LLAMA, k)
    wide = llama.build(wide_args, LLAMA).double()
    wide.load_state_dict(sd)
    return base, wide


def test_resnet_spec_widening_is_exact():
    base, wide, args = build_resnet_pair(2)
    x, _ = resnet.batch(args, 4, torch.Generator().manual_seed(0), torch.float64)
    base.eval(), wide.eval()
    assert rel_err(resnet.output(base, x), resnet.output(wide, x)) <= 1e-12  # running statistics
    base.train(), wide.train()
    assert rel_err(resnet.output(base, x), resnet.output(wide, x)) <= 1e-12  # batch statistics
    assert torch.allclose(wide.layer2[0].bn1.running_var[::2], base.layer2[0].bn1.running_var, rtol=1e-12)


def test_llama_spec_widening_is_exact():
    k = {"d_model": 2, "heads": 2, "d_ff": 3}
    base, wide = build_llama_pair(spec("llama-mup"), k)
    attn = wide.model.layers[0].self_attn
    assert (attn.n_head, attn.n_kv, attn.head_dim) == (8, 4, 4)
    x, _ = llama.batch(LLAMA, 3, torch.Generator().manual_seed(0))
    assert rel_err(llama.output(base, x), llama.output(wide, x)) <= 1e-12
    # per-coordinate (not whole-head) duplication of the attention axes is not exact: the blocks matter
    naive = copy.deepcopy(spec("llama-mup"))
    for pat, axes in naive["tensors"].items():
        if isinstance(axes, list):
            naive["tensors"][pat] = [a["axis"] if isinstance(a, dict) else a for a in axes]
    base, wide = build_llama_pair(naive, k)
    assert rel_err(llama.output(base, x), llama.output(wide, x)) > 1e-3


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_lockstep_training_with_corrected_optimizers(name):
    """Widened at init, both trained with the same base hyper-parameters: same trajectory (paper Thm 2.5)."""
    if name == "sgd":
        base, wide, args = build_resnet_pair(2)
        mod, opt = resnet, lambda m: MuSGD(m, lr=0.01, momentum=0.9, weight_decay=0.01)
    else:  # a large eps and (for Adam) coupled weight decay: both need the paper's corrections
        base, wide = build_llama_pair(spec("llama-mup"), {"d_model": 2, "heads": 2, "d_ff": 3})
        mod, args = llama, LLAMA
        opt = lambda m: (MuAdam if name == "adam" else MuAdamW)(m, lr=1e-2, eps=1e-3, weight_decay=0.1)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    x0, _ = mod.batch(args, 4, gen, torch.float64)
    out0, opts = mod.output(base, x0).detach(), [opt(base), opt(wide)]
    for _ in range(5):
        x, y = mod.batch(args, 4, gen, torch.float64)
        for m, o in zip((base, wide), opts):
            o.zero_grad()
            mod.loss(m, x, y).backward()
            o.step()
    out_b = mod.output(base, x0)
    assert rel_err(out_b, mod.output(wide, x0)) <= 1e-10
    assert rel_err(out0, out_b) > 1e-3  # the models did move


def test_lockstep_fails_with_mup_1_0_0_adam():
    """mup 1.0.0's MuAdam leaves eps unscaled: the widened model drifts off the base trajectory."""
    base, wide = build_llama_pair(spec("llama-mup"), {"d_model": 2, "heads": 2, "d_ff": 3})
    opts, gen = [mup.MuAdam(m.parameters(), lr=1e-2, eps=1e-3) for m in (base, wide)], torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = llama.batch(LLAMA, 4, gen)
        for m, o in zip((base, wide), opts):
            o.zero_grad()
            llama.loss(m, x, y).backward()
            o.step()
    assert rel_err(llama.output(base, x), llama.output(wide, x)) > 1e-6
