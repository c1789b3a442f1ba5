"""Zero-noise widening is exact: bit for bit at k = 1, and in float64 the widened model follows the
base model's training trajectory to round-off (<= 1e-12 relative) over 200 steps."""
from __future__ import annotations

import pytest
import torch

from conftest import kind_of, load_wide, make_base
from mupscale_cli.commands.widen import WidenOptions, prepare, run_widen
from mupscale_cli.formats import load_checkpoint
from mupscale_cli.verify.lockstep import run_lockstep
from mupscale_cli.errors import MupscaleError
from mupscale_cli.zoo import gpt, mlp

TOL = 1e-12  # loss and outputs, relative
TENSOR_TOL = 1e-10  # normwise per tensor: gradient-free directions (key biases) carry Adam-amplified round-off
STEPS = 200
GPT_ARGS = dict(gpt.DEFAULT_ARGS)
GPT_FF = {**GPT_ARGS, "d_ff": 64}  # the zoo GPT's explicit MLP width, so d_ff can grow on its own
MLP_ARGS = dict(mlp.DEFAULT_ARGS)


def widen_file(src, out, k="2", **kw):
    return run_widen(WidenOptions(checkpoint=src, output=out, k=k, **kw))


def lockstep_exact(zoo, args, base, base_opt, out, kind, steps=STEPS, plan=None):
    wide, wide_opt, _ = load_wide(zoo, out, args, kind)
    diffs = run_lockstep(zoo, args, base, base_opt, wide, wide_opt, steps, seed=7, plan=plan)
    worst = max(diffs, key=lambda d: d.rel)
    assert len(diffs) == steps + 1
    assert worst.rel <= TOL, f"diverged: {worst}"
    assert max(d.worst_rel for d in diffs) <= TENSOR_TOL
    return diffs


@pytest.mark.parametrize("out_suffix", [".pt", ".safetensors"])
def test_k1_reproduces_every_tensor_bit_for_bit(tmp, out_suffix):
    src, model, opt = make_base(tmp, gpt, GPT_ARGS, "adam", "named")
    out = tmp / f"same{out_suffix}"
    widen_file(src, out, k="1")
    a, b = load_checkpoint(src), load_checkpoint(out)
    assert list(a.tensors) == list(b.tensors)
    for n, t in a.tensors.items():
        assert t.dtype == b.tensors[n].dtype and torch.equal(t, b.tensors[n]), n
        assert t.view(-1).view(torch.uint8).tolist() == b.tensors[n].view(-1).view(torch.uint8).tolist()
    sa, sb = a.optimizer, b.optimizer
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
    for pid, st in sa["state"].items():
        for key, v in st.items():
            assert torch.equal(v, sb["state"][pid][key]) and v.dtype == sb["state"][pid][key].dtype
    assert b.model_args == a.model_args and b.extra["iter_num"] == a.extra["iter_num"]


# (zoo, args, optimizer, id layout, k): every optimizer, every id layout, uniform and non-uniform k
CASES = [
    (mlp, MLP_ARGS, "sgd", "named", "4"),
    (mlp, MLP_ARGS, "sgd-nesterov", "single", "2"),
    (mlp, MLP_ARGS, "adam", "named", "3"),
    (mlp, MLP_ARGS, "adamw", "single", "4"),
    (mlp, MLP_ARGS, "sgd", "mup", "2"),
    (mlp, MLP_ARGS, "adamw", "mup", "2"),
    (mlp, MLP_ARGS, "adam", "corrected", "2"),
    (gpt, GPT_ARGS, "sgd", "named", "2"),
    (gpt, GPT_FF, "sgd-nesterov", "named", "d_model=2,d_ff=4"),
    (gpt, GPT_ARGS, "adam", "named", "2"),
    (gpt, GPT_FF, "adamw", "named", "d_model=2,d_ff=3"),
    (gpt, GPT_ARGS, "adamw", "nanogpt", "4"),
    (gpt, GPT_ARGS, "adam", "mup", "2"),
    (gpt, GPT_ARGS, "adamw", "mup", "2"),
    (gpt, GPT_ARGS, "sgd", "mup", "2"),
    (gpt, GPT_FF, "adamw", "corrected", "d_model=4,d_ff=2"),
]


@pytest.mark.parametrize("zoo,args,opt,layout,k", CASES,
                         ids=[f"{c[0].__name__.split('.')[-1]}-{c[2]}-{c[3]}-k{c[4]}" for c in CASES])
def test_lockstep_float64(tmp, zoo, args, opt, layout, k):
    src, base, base_opt = make_base(tmp, zoo, args, opt, layout, steps=5)
    out = tmp / "wide.safetensors"
    res = widen_file(src, out, k=k)
    expected = {"named": "named", "single": "single", "nanogpt": "nanogpt", "mup": "mup", "corrected": "named"}
    assert res["optimizer"]["layout"] == expected[layout]
    assert res["optimizer"]["kind"] == kind_of(opt)
    plan = prepare(WidenOptions(checkpoint=src, k=k)).plan
    lockstep_exact(zoo, args, base, base_opt, out, kind_of(opt), plan=plan)


def test_lockstep_from_pt_output(tmp):
    """The .pt output (input's layout, mup MuAdamW groups) resumes into the user's own wide optimizer."""
    import mup
    src, base, base_opt = make_base(tmp, gpt, GPT_ARGS, "adamw", "mup")
    out = tmp / "wide.pt"
    widen_file(src, out, k="2")
    ck = torch.load(out, weights_only=True)
    wide = gpt.build(ck["model_args"], GPT_ARGS).double()
    wide.load_state_dict(ck["model"], strict=True)
    wide_opt = mup.MuAdamW(wide.parameters(), lr=1.0)  # hyper-parameters come from the state dict
    wide_opt.load_state_dict(ck["optimizer"])
    diffs = run_lockstep(gpt, GPT_ARGS, base, base_opt, wide, wide_opt, STEPS, seed=3)
    assert max(d.rel for d in diffs) <= TOL


@pytest.mark.parametrize("attn", ["mup", "sqrt"])
def test_head_duplication_is_exact_for_either_attention_scale(tmp, attn, monkeypatch):
    monkeypatch.setattr(gpt, "build", lambda a, b=None, _f=gpt.build: _f(a, b, attn=attn))
    src, base, base_opt = make_base(tmp, gpt, GPT_ARGS, "adamw", "named")
    out = tmp / "wide.safetensors"
    res = widen_file(src, out, k="2", spec="nanogpt-mup-heads")
    assert res["model_args"]["n_head"] == 2 * GPT_ARGS["n_head"]
    assert res["model_args"]["n_embd"] == 2 * GPT_ARGS["n_embd"]
    lockstep_exact(gpt, GPT_ARGS, base, base_opt, out, "adamw", steps=50)


def test_growing_head_dim_with_sqrt_attention_is_not_exact(tmp, monkeypatch):
    """The trap of FACTS §3: head_dim grows, 1/sqrt(d) scale -> the function changes."""
    monkeypatch.setattr(gpt, "build", lambda a, b=None, _f=gpt.build: _f(a, b, attn="sqrt"))
    src, base, base_opt = make_base(tmp, gpt, GPT_ARGS, "adamw", "named")
    out = tmp / "wide.safetensors"
    widen_file(src, out, k="4")
    wide, wide_opt, _ = load_wide(gpt, out, GPT_ARGS, "adamw")
    d = run_lockstep(gpt, GPT_ARGS, base, base_opt, wide, wide_opt, 0)[0]
    assert d.out_rel > 1e-5  # eight orders of magnitude above round-off


def test_mup_bsh_spec_with_tied_alias(tmp):
    import mup
    src, base, base_opt = make_base(tmp, gpt, GPT_ARGS, "adamw", "named")
    bsh = tmp / "gpt.bsh"
    mup.shape.save_base_shapes(mup.make_base_shapes(gpt.build(GPT_ARGS), gpt.build({**GPT_ARGS, "n_embd": 32})),
                               bsh)
    out = tmp / "wide.safetensors"
    res = widen_file(src, out, k="2", spec=str(bsh))
    assert res["spec"] == "gpt"
    # every width axis of a .bsh is named after its base size; both axes get k = 2
    assert set(res["k"].values()) == {2}
    lockstep_exact(gpt, GPT_ARGS, base, base_opt, out, "adamw", steps=50)


def test_widening_twice_continues_the_trajectory(tmp):
    """Widen 2x, train, widen the widened file again (our own .safetensors as input)."""
    src, base, base_opt = make_base(tmp, mlp, MLP_ARGS, "adam", "named")
    mid = tmp / "mid.safetensors"
    widen_file(src, mid, k="2")
    out = tmp / "wide.safetensors"
    widen_file(mid, out, k="2")
    lockstep_exact(mlp, MLP_ARGS, base, base_opt, out, "adam", steps=100)


def test_weights_only_checkpoint(tmp):
    torch.manual_seed(0)
    model = mlp.build(MLP_ARGS).double()
    src = tmp / "sd.pt"
    torch.save(model.state_dict(), src)
    out = tmp / "wide.pt"
    res = run_widen(WidenOptions(checkpoint=src, output=out, k="4", spec="mup-mlp"))  # a bare state dict shows no evidence
    assert res["optimizer"] is None and res["notes"]
    wide_sd = torch.load(out, weights_only=True)
    assert set(wide_sd) == set(model.state_dict())  # a plain state dict stays a plain state dict
    wide = mlp.build({**MLP_ARGS, "width": 4 * MLP_ARGS["width"]}, MLP_ARGS).double()
    wide.load_state_dict(wide_sd, strict=True)
    x = torch.randn(5, MLP_ARGS["d_in"], dtype=torch.float64)
    torch.testing.assert_close(wide(x), model(x), rtol=1e-13, atol=0)


def test_compiled_prefixes_are_kept_in_pt_and_stripped_in_safetensors(tmp):
    src, base, _ = make_base(tmp, mlp, MLP_ARGS, "adamw", "named")
    ck = torch.load(src, weights_only=True)
    ck["model"] = {f"_orig_mod.{k}": v for k, v in ck["model"].items()}
    for g in ck["optimizer"]["param_groups"]:
        g["param_names"] = [f"_orig_mod.{n}" for n in g["param_names"]]
    torch.save(ck, src)
    widen_file(src, tmp / "w.pt")
    pt = torch.load(tmp / "w.pt", weights_only=True)
    assert all(k.startswith("_orig_mod.") for k in pt["model"])
    assert all(n.startswith("_orig_mod.") for g in pt["optimizer"]["param_groups"] for n in g["param_names"])
    widen_file(src, tmp / "w.safetensors")
    assert set(load_checkpoint(tmp / "w.safetensors").original.values()) == set(base.state_dict())


def test_optimizer_ids_that_fit_no_layout_are_refused_not_mapped_silently(tmp):
    torch.manual_seed(0)
    model = mlp.build(MLP_ARGS).double()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
              {"params": [p for p in model.parameters() if p.dim() < 2]}]
    opt = torch.optim.Adam(groups, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = mlp.batch(MLP_ARGS, 4, g, torch.float64)
    mlp.loss(model, x, y).backward()
    opt.step()
    sd = opt.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": sd, "model_args": MLP_ARGS}, tmp / "ok.pt")
    assert prepare(WidenOptions(checkpoint=tmp / "ok.pt", k="2", spec="mup-mlp")).omap.layout == "nanogpt"
    # ids in an order no known layout produces: shapes contradict every candidate -> refuse
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][::-1]
    torch.save({"model": model.state_dict(), "optimizer": sd, "model_args": MLP_ARGS}, tmp / "bad.pt")
    with pytest.raises(MupscaleError, match="cannot match optimizer ids.*param_names"):
        prepare(WidenOptions(checkpoint=tmp / "bad.pt", k="2", spec="mup-mlp"))
    with pytest.raises(MupscaleError, match="single: 1 groups expected, the checkpoint has 2"):
        prepare(WidenOptions(checkpoint=tmp / "ok.pt", k="2", spec="mup-mlp", opt_layout="single"))


def test_adam_vs_adamw_must_be_told_when_the_state_cannot(tmp):
    src, _, _ = make_base(tmp, mlp, MLP_ARGS, "adamw", "named")
    ck = torch.load(src, weights_only=True)
    for g in ck["optimizer"]["param_groups"]:
        del g["decoupled_weight_decay"]
    torch.save(ck, src)
    with pytest.raises(MupscaleError, match="--optimizer adam or --optimizer adamw"):
        prepare(WidenOptions(checkpoint=src, k="2"))
    assert prepare(WidenOptions(checkpoint=src, k="2", optimizer="adamw")).omap.kind == "adamw"


def test_groups_are_split_only_where_factors_differ(tmp):
    src, _, _ = make_base(tmp, gpt, GPT_ARGS, "adamw", "nanogpt")
    res = widen_file(src, tmp / "w.safetensors", k="2")
    # decay group: vector-like embeddings (lr x1) and matrices (lr x1/2) -> split; no-decay: one factor set
    assert res["optimizer"]["groups"] == {"base": 2, "widened": 3}
    src2, _, _ = make_base(tmp, gpt, GPT_ARGS, "adamw", "mup", name="b2.pt")
    res2 = widen_file(src2, tmp / "w2.safetensors", k="2")
    assert res2["optimizer"]["groups"] == {"base": 2, "widened": 2}
