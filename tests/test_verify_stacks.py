"""`mupscale verify` against the user's own model file and training rule: --model FILE.py:Class, --lr-rule,
--grad-clip/--clip-mode, --optimizer module:fn. The model file is tests/stacks/verify_gpt.py, a nanoGPT-shaped
stand-in (tied readout; μP or standard parametrization)."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import mupscale
from mupscale_cli.commands.verify import Run, VerifyOptions, run_verify, schedule
from mupscale_cli.commands.widen import WidenOptions, prepare, run_widen
from mupscale_cli.errors import MupscaleError

SRC = str(Path(__file__).resolve().parents[1] / "src")
MODEL = Path(__file__).resolve().parent / "stacks" / "verify_gpt.py"
ARGS = dict(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
# nanoGPT's train.py config keys; decay_lr: the cosine schedule with warmup that --lr-rule follows
CONFIG = dict(learning_rate=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, decay_lr=True, warmup_iters=2,
              lr_decay_iters=60, min_lr=3e-4, grad_clip=1.0)


def stack():
    spec = importlib.util.spec_from_file_location("verify_gpt_stack", MODEL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["verify_gpt_stack"] = mod
    spec.loader.exec_module(mod)
    return mod


def two_groups(model, config=None):
    """Stock nanoGPT's configure_optimizers: decay (dim >= 2) and no-decay groups."""
    named = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.9, 0.95))


def make_stack_ck(tmp: Path, mup: bool, layout: str = "script", steps: int = 3, name: str | None = None) -> Path:
    """Train the stand-in in float64 as its train.py would (lr × lr_scale each iteration) and save a nanoGPT
    ckpt.pt. layout: script (its configure_optimizers: nanoGPT-mup's 3 groups with lr_scale when μP) or
    two (stock nanoGPT's 2 groups)."""
    vg = stack()
    args = {**ARGS, "mup_base_n_embd": 16 if mup else 0}
    torch.manual_seed(0)
    model = vg.GPT(vg.GPTConfig(**args)).double()
    opt = vg.configure(model, CONFIG) if layout == "script" else two_groups(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for group in opt.param_groups:
            group["lr"] = CONFIG["learning_rate"] * group.get("lr_scale", 1.0)
        x = torch.randint(32, (8, 8), generator=g)
        opt.zero_grad()
        model(x, torch.roll(x, 1, 1))[1].backward()
        opt.step()
    path = tmp / (name or f"{'mup' if mup else 'sp'}-{layout}.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": args, "iter_num": steps,
                "best_val_loss": 9.9, "config": CONFIG}, path)
    return path


def verify(base: Path, wide: Path | None = None, **kw) -> dict:
    kw.setdefault("device", "cpu")
    kw.setdefault("spec", "nanogpt-mup")
    kw.setdefault("model", f"{MODEL}:GPT")
    return run_verify(VerifyOptions(base=base, wide=wide, **kw))


def cli(*args: str):
    old = os.environ.copy()
    os.environ.update({"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"})
    try:
        return mupscale(*args)
    finally:
        os.environ.clear()
        os.environ.update(old)


def widen_to(src: Path, out: Path) -> Path:
    run_widen(WidenOptions(checkpoint=src, output=out, k="2", spec="nanogpt-mup", force=True))
    return out


def edit_groups(src: Path, out: Path, fn) -> Path:
    ck = torch.load(src, weights_only=True)
    for g in ck["optimizer"]["param_groups"]:
        fn(g)
    torch.save(ck, out)
    return out


def hidden(g: dict) -> bool:
    return any(n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")) for n in g["param_names"])


@pytest.fixture(scope="module")
def mup_ck(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    src = make_stack_ck(tmp, True)
    return src, widen_to(src, tmp / "wide.pt")


# ---------------------------------------------------------------------------------- --model FILE.py:Class

def test_model_file_class_passes_exact_widenings(mup_ck, tmp):
    """GPT(GPTConfig(**model_args)) from a file: the in-memory widening and the written one pass; the wide
    model is built from WIDE's own model_args."""
    src, wide = mup_ck
    rep = verify(src, steps=30)
    assert rep["result"] == "pass" and rep["model_code"] == "user" and rep["model"] == f"{MODEL}:GPT"
    assert rep["max"]["loss_rel"] <= 1e-12 and rep["max"]["out_rel"] <= 1e-12
    assert rep["model_args"]["wide"]["n_embd"] == 32
    r = cli("verify", str(src), str(wide), "--model", f"{MODEL}:GPT", "--steps", "20", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PASS: 20 steps") and f"model: {MODEL}:GPT" in r.stdout


def test_standard_parametrization_tied_readout_fails_at_step_0_naming_the_readout(tmp):
    """Stock nanoGPT (tied, plain readout, 1/sqrt(d) attention) forced through --spec nanogpt-mup: exit 1 at
    step 0; the readout is named and its ×k logits measured."""
    src = make_stack_ck(tmp, False)
    r = cli("verify", str(src), "--spec", "nanogpt-mup", "--model", f"{MODEL}:GPT", "--steps", "5")
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("FAIL: diverged at step 0: output relative difference")
    assert "readout 'lm_head.weight' gives" in r.stdout
    rep = verify(src, steps=5)
    assert rep["first_failure"]["step"] == 0 and rep["first_failure"]["readout"] == "lm_head.weight"
    assert 1.5 < rep["first_failure"]["output_ratio"] < 2.5  # logits about doubled at k = 2
    assert "sums over the widened axis (standard parametrization" in " | ".join(rep["diagnosis"])


def test_without_model_the_line_names_the_bundled_model(tmp):
    from test_verify import make_ck
    src = make_ck(tmp, "gpt", "adamw")
    r = cli("verify", str(src), "--spec", "nanogpt-mup", "--steps", "3", "-q")
    assert r.returncode == 0, r.stderr
    assert "model: bundled mupscale_cli.zoo.gpt, not your training code" in r.stdout


def test_model_reference_errors_exit_2(tmp):
    src = make_stack_ck(tmp, True)
    for ref, msg in ((f"{tmp}/nope.py:GPT", "no such file"), (f"{MODEL}:Nope", "has no function or class 'Nope'"),
                     ("a b:GPT", "expected 'package.module[:name]'")):
        r = cli("verify", str(src), "--spec", "nanogpt-mup", "--model", ref, "--steps", "1")
        assert r.returncode == 2 and msg in r.stderr, (ref, r.stderr)
    bad = tmp / "badcfg.py"
    bad.write_text(MODEL.read_text().replace("    mup_base_n_embd: int = 0  # 0: standard parametrization\n", ""))
    with pytest.raises(MupscaleError, match="GPTConfig\\(\\*\\*model_args\\) failed .*mup_base_n_embd"):
        verify(src, model=f"{bad}:GPT", steps=1)


# ------------------------------------------------------------------------------------------------ --lr-rule

def test_lr_rule_lr_scale_needs_lr_scale_rescaled(mup_ck, tmp):
    """nanoGPT-mup's train.py sets lr = schedule × lr_scale each iteration: exact when WIDE's hidden
    lr_scale is BASE's / k; the copied lr_scale fails at step 1, named; --lr-rule uniform (stock nanoGPT) too."""
    src, wide = mup_ck
    good = edit_groups(wide, tmp / "good.pt", lambda g: g.update(lr_scale=0.5 if hidden(g) else 1.0))
    rep = verify(src, good, lr_rule="lr_scale", steps=20)
    assert rep["result"] == "pass", rep["diagnosis"]
    copied = edit_groups(wide, tmp / "copied.pt", lambda g: g.update(lr_scale=1.0))
    rep = verify(src, copied, lr_rule="lr_scale", steps=20)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert "lr_scale not rescaled for 8 tensor(s)" in " | ".join(rep["diagnosis"])
    rep = verify(src, good, lr_rule="uniform", steps=20)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert "--lr-rule uniform gives every group the same lr" in " | ".join(rep["diagnosis"])
    # the stored per-group lrs (Table 1) pass whatever lr_scale says
    assert verify(src, copied, steps=5)["result"] == "pass"


def test_lr_rule_follows_the_checkpoints_schedule(mup_ck, tmp):
    """The schedule is nanoGPT's (warmup, cosine) from BASE's config at iter_num: a wrong schedule on one side
    would fail, so run the rule with --lr too and check both pass, and that the lrs set differ from the stored."""
    src, wide = mup_ck
    good = edit_groups(wide, tmp / "good.pt", lambda g: g.update(lr_scale=0.5 if hidden(g) else 1.0))
    rep = verify(src, good, lr_rule="lr_scale", steps=3)
    assert rep["result"] == "pass"
    r = Run(VerifyOptions(base=src, lr_rule="lr_scale"), 0.0, torch.device("cpu"), torch.float64, 1e-10, 1e-8, None)
    r.prep = prepare(WidenOptions(checkpoint=src, spec="nanogpt-mup"))
    lr = schedule(r)
    # iter_num 3 onwards, warmup 2, decay to 60: cosine from 3e-3 towards 3e-4
    assert lr(1) == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * 1 / 58)) * 2.7e-3, rel=1e-15)
    assert lr(1) > lr(2) > lr(3)
    assert verify(src, good, lr_rule="lr_scale", lr=1e-3, steps=5)["result"] == "pass"


def test_lr_rule_without_a_learning_rate_is_a_usage_error(tmp):
    src = make_stack_ck(tmp, True)
    ck = torch.load(src, weights_only=True)
    del ck["config"]
    torch.save(ck, tmp / "nocfg.pt")
    with pytest.raises(MupscaleError, match="has no config.learning_rate: pass --lr X"):
        verify(tmp / "nocfg.pt", lr_rule="uniform", steps=1)
    with pytest.raises(MupscaleError, match="--lr-rule 'cosine': choose one of stored, lr_scale, uniform"):
        verify(src, lr_rule="cosine", steps=1)


# --------------------------------------------------------------------------------------------- --grad-clip

def test_grad_clip_plain_fails_and_equivalent_passes(mup_ck):
    """Active clipping (BASE's norm above C every step): torch's clip_grad_norm_ on both diverges at the first
    clipped step, named; clip_grad_norm_equivalent on the wide model stays exact."""
    src, wide = mup_ck
    rep = verify(src, wide, grad_clip=0.05, steps=10)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert rep["first_failure"]["value"] > 1e-6
    assert "gradient clipping was active from step 1" in " | ".join(rep["diagnosis"])
    rep = verify(src, wide, grad_clip=0.05, clip_mode="equivalent", steps=30)
    assert rep["result"] == "pass" and rep["grad_clip"]["active_steps"] == 30
    assert max(rep["max"]["loss_rel"], rep["max"]["out_rel"]) <= 1e-12
    # inactive clipping (C above every norm) changes nothing in either mode
    assert verify(src, wide, grad_clip=100.0, steps=5)["grad_clip"]["active_steps"] == 0


# ------------------------------------------------------------------------------- --optimizer module:fn

def test_optimizer_builder_loads_and_trains(mup_ck):
    """The training script's own configure_optimizers (fn(model, config)): both states load into it and
    the models train in lockstep with the user's optimizers."""
    src, wide = mup_ck
    rep = verify(src, wide, optimizer=f"{MODEL}:configure", steps=10)
    assert rep["result"] == "pass", rep["diagnosis"]
    assert rep["optimizer"]["source"].startswith(f"{MODEL}:configure (your builder)")


def test_optimizer_builder_that_cannot_load_the_widened_state_fails(tmp):
    """Stock nanoGPT's 2 groups mix embeddings (lr × 1) and hidden matrices (lr × 1/k): widen splits the group,
    so WIDE's 3 groups do not load into the script's 2-group optimizer: exit 1. Without the builder, verify
    (torch optimizers from the file's groups) passes the same file."""
    src = make_stack_ck(tmp, True, layout="two")
    wide = widen_to(src, tmp / "wide.pt")
    assert len(torch.load(wide, weights_only=True)["optimizer"]["param_groups"]) == 3
    builder = tmp / "builders.py"
    builder.write_text("import torch\n\n"
                       "def two_groups(model):\n"
                       "    named = list(model.named_parameters())\n"
                       "    return torch.optim.AdamW([{'params': [p for n, p in named if p.dim() >= 2], "
                       "'weight_decay': 0.1},\n"
                       "                              {'params': [p for n, p in named if p.dim() < 2], "
                       "'weight_decay': 0.0}], lr=3e-3, betas=(0.9, 0.95))\n\n"
                       "def reversed_order(model):\n"
                       "    opt = two_groups(model)\n"
                       "    for g in opt.param_groups:\n"
                       "        g['params'].reverse()\n"
                       "    return opt\n")
    assert verify(src, wide, steps=5)["result"] == "pass"
    r = cli("verify", str(src), str(wide), "--model", f"{MODEL}:GPT", "--optimizer", f"{builder}:two_groups",
            "--steps", "5")
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("FAIL: WIDE's optimizer state does not load into the optimizer")
    assert "different number of parameter groups" in r.stdout and "3 groups of" in r.stdout
    # same group sizes, another order: load_state_dict would pair tensors with others' state
    with pytest.raises(MupscaleError, match="load_state_dict matches by position") as e:
        verify(src, wide, optimizer=f"{builder}:reversed_order", steps=1)
    assert e.value.exit_code == 2
    # a builder of another optimizer type
    other = tmp / "sgd_builder.py"
    other.write_text("import torch\n\ndef sgd(model):\n    return torch.optim.SGD(model.parameters(), lr=0.1)\n")
    with pytest.raises(MupscaleError, match="BASE's optimizer state is adamw, the optimizer .* builds is sgd"):
        verify(src, wide, optimizer=f"{other}:sgd", steps=1)


# ------------------------------------------------------------- nanoGPT-mup's own fields, widened with no flags

EL_ARGS = {**ARGS, "mup_enabled": True, "mup_width_multiplier": 1.0, "mup_input_alpha": 1.0, "mup_output_alpha": 2.0,
           "mup_disable_attention_scaling": False, "mup_disable_hidden_lr_scaling": False}


def make_eleuther_ck(tmp: Path, steps: int = 3) -> Path:
    """As nanoGPT-mup's train.py writes it: its 3 groups with lr_scale, no param_names, mup_* in model_args."""
    vg = stack()
    torch.manual_seed(0)
    model = vg.GPT(vg.GPTConfig(**EL_ARGS)).double()
    opt = vg.configure(model, CONFIG)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for group in opt.param_groups:
            group["lr"] = CONFIG["learning_rate"] * group.get("lr_scale", 1.0)
        x = torch.randint(32, (8, 8), generator=g)
        opt.zero_grad()
        model(x, torch.roll(x, 1, 1))[1].backward()
        opt.step()
    osd = opt.state_dict()
    for group in osd["param_groups"]:
        del group["param_names"]
    path = tmp / "eleuther.pt"
    torch.save({"model": model.state_dict(), "optimizer": osd, "model_args": EL_ARGS, "iter_num": steps,
                "best_val_loss": 9.9, "config": {**CONFIG, **EL_ARGS}}, path)
    return path


def test_nanogpt_mup_checkpoint_verified_with_its_own_model_rule_and_optimizer(tmp):
    """widen with no flags (the spec chosen by mup_enabled), then verify as train.py resumes: the model file
    from WIDE's model_args (mup_width_multiplier × k), configure_optimizers, lr = schedule × lr_scale."""
    src = make_eleuther_ck(tmp)
    r = cli("widen", str(src), "--k", "2", "-o", str(tmp / "wide.pt"))
    assert r.returncode == 0, r.stderr
    wide = torch.load(tmp / "wide.pt", weights_only=True)
    assert wide["model_args"]["mup_width_multiplier"] == 2.0 and wide["model_args"]["n_embd"] == 32
    r = cli("verify", str(src), str(tmp / "wide.pt"), "--model", f"{MODEL}:GPT", "--optimizer", f"{MODEL}:configure",
            "--lr-rule", "lr_scale", "--grad-clip", "0.05", "--clip-mode", "equivalent", "--steps", "30",
            "--json", str(tmp / "rep.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("PASS: 30 steps") and f"model: {MODEL}:GPT" in r.stdout
    rep = __import__("json").loads((tmp / "rep.json").read_text())
    assert rep["grad_clip"]["active_steps"] == 30 and rep["lr_rule"] == "lr_scale"
    assert max(rep["max"]["loss_rel"], rep["max"]["out_rel"]) <= 1e-12
    # the bundled model is not this stack's: verify says so, whatever the outcome
    r = cli("verify", str(src), str(tmp / "wide.pt"), "--steps", "2", "-q")
    assert "not your training code" in r.stdout


def test_output_of_a_non_bundled_spec_verifies_without_spec(mup_ck, tmp):
    """WIDE records its spec's text: verify (and grad_scales) need no --spec when the spec is not bundled."""
    src, _ = mup_ck
    text = (Path(SRC).parent / "configs" / "nanogpt-mup.yaml").read_text()
    spec = tmp / "my-gpt.yaml"
    spec.write_text(text.replace("name: nanogpt-mup", "name: my-gpt", 1))
    r = cli("widen", str(src), "--k", "2", "--spec", str(spec), "-o", str(tmp / "wide.pt"))
    assert r.returncode == 0, r.stderr
    spec.unlink()
    rep = run_verify(VerifyOptions(base=src, wide=tmp / "wide.pt", device="cpu", model=f"{MODEL}:GPT", steps=5))
    assert rep["result"] == "pass" and rep["spec"] == "my-gpt"
    from mupscale_cli.api import grad_scales
    assert grad_scales(tmp / "wide.pt")["transformer.h.0.attn.c_attn.weight"] == (0.5, 4)


# ------------------------------------------- the nanoGPT / nanoGPT-mup stand-ins of tests/stacks (model.py as is)

STACKS = Path(__file__).resolve().parent / "stacks"
BUILDER = '''
def configure(model, config):
    """train.py's optimizer: model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device)."""
    return model.configure_optimizers(config["weight_decay"], config["learning_rate"],
                                      (config["beta1"], config["beta2"]), "cpu")
'''


def test_stock_nanogpt_model_py_forced_through_the_mup_spec_fails_at_step_0(tmp):
    from test_stacks_nanogpt import _stock_nanogpt
    src = _stock_nanogpt(tmp)
    rep = run_verify(VerifyOptions(base=src, spec="nanogpt-mup", model=f"{STACKS / 'nanogpt_model.py'}:GPT",
                                   device="cpu", steps=3))
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 0
    assert rep["first_failure"]["readout"] == "lm_head.weight"


def test_nanogpt_mup_model_py_widened_with_no_flags_passes_with_its_rule_and_optimizer(tmp):
    from test_stacks_nanogpt import mup_base
    mup_base(tmp, torch.optim.AdamW)
    assert cli("widen", str(tmp / "ckpt.pt"), "--k", "2", "-o", str(tmp / "wide.pt")).returncode == 0
    (tmp / "train_opt.py").write_text(BUILDER)
    rep = run_verify(VerifyOptions(base=tmp / "ckpt.pt", wide=tmp / "wide.pt", device="cpu", steps=20,
                                   model=f"{STACKS / 'nanogpt_mup_model.py'}:GPT",
                                   optimizer=f"{tmp / 'train_opt.py'}:configure", lr_rule="lr_scale",
                                   grad_clip=0.05, clip_mode="equivalent"))
    assert rep["result"] == "pass", rep["diagnosis"]
    assert rep["grad_clip"]["active_steps"] == 20 and rep["model_args"]["wide"]["mup_width_multiplier"] == 4.0
    assert max(rep["max"]["loss_rel"], rep["max"]["out_rel"]) <= 1e-12
