"""`mupscale verify`: exact widenings of every zoo model pass over 200 float64 steps; every injected
defect fails at the step it takes effect, with the likely cause named."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import mupscale
from mupscale_cli.commands.verify import BATCHNORM_TOL, DEFAULT_TOL, VerifyOptions, default_tol, run_verify
from mupscale_cli.commands.widen import WidenOptions, prepare, run_widen
from mupscale_cli.errors import MupscaleError
from mupscale_cli.zoo import gpt, llama, mlp, resnet

SRC = str(Path(__file__).resolve().parents[1] / "src")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MLP = dict(mlp.DEFAULT_ARGS)
GPT = dict(gpt.DEFAULT_ARGS)
RESNET = {"width": 2, "num_classes": 10, "in_channels": 3, "image_size": 8}
LLAMA = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=12, rope_theta=10000.0, rms_norm_eps=1e-6)
ZOO = {"mlp": (mlp, MLP), "gpt": (gpt, GPT), "resnet": (resnet, RESNET), "llama": (llama, LLAMA)}
# SGD with momentum and dampening, Adam with amsgrad and coupled weight decay, AdamW: every rescaled
# hyper-parameter is non-zero. The tiny BatchNorm ResNet amplifies round-off (BatchNorm over few values
# per channel): with batch 32 it stays below 1e-13 over 200 float64 steps, with 16 it reaches 5e-11.
HP = {"sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
      "adam": (torch.optim.Adam, dict(lr=1e-3, eps=1e-6, amsgrad=True, weight_decay=1e-2)),
      "adamw": (torch.optim.AdamW, dict(lr=1e-3, eps=1e-6, weight_decay=0.1))}
BATCH = {"mlp": 16, "gpt": 16, "llama": 16, "resnet": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and immune to oversubscription when tests run side by side."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(*args: str):
    """The real `mupscale` command, running this working tree."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    old = os.environ.copy()
    os.environ.update(env)
    try:
        return mupscale(*args)
    finally:
        os.environ.clear()
        os.environ.update(old)


def make_ck(tmp: Path, name: str, opt: str = "adam", steps: int = 3, save_optimizer: bool = True,
            file: str | None = None) -> Path:
    """Train a zoo model a few steps in float64 and save it nanoGPT-style (model_args included)."""
    zoo, args = ZOO[name]
    torch.manual_seed(0)
    model = zoo.build(args).double()
    cls, hp = HP[opt]
    o = cls(model.named_parameters(), **hp)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = zoo.batch(args, BATCH[name], g, torch.float64)
        o.zero_grad()
        zoo.loss(model, x, y).backward()
        o.step()
    path = tmp / (file or f"{name}-{opt}.pt")
    ck = {"model": model.state_dict(), "model_args": args, "iter_num": steps, "config": {"parametrization": "mup"}}
    if save_optimizer:
        ck["optimizer"] = o.state_dict()
    torch.save(ck, path)
    return path


def widen_to(src: Path, out: Path, k: str = "2", **kw) -> Path:
    run_widen(WidenOptions(checkpoint=src, output=out, k=k, force=True, **kw))
    return out


def verify(base: Path, wide: Path | None = None, **kw) -> dict:
    kw.setdefault("batch_size", BATCH["resnet"] if "resnet" in base.name else 16)
    kw.setdefault("device", "cpu")
    return run_verify(VerifyOptions(base=base, wide=wide, **kw))


def edit_pt(src: Path, out: Path, fn) -> Path:
    ck = torch.load(src, weights_only=True)
    fn(ck)
    torch.save(ck, out)
    return out


def diagnosis(rep: dict) -> str:
    return " | ".join(rep["diagnosis"])


# ------------------------------------------------------------------------------------ exact widenings pass

@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "resnet", "llama"])
def test_exact_widening_passes_200_steps_float64(tmp, name, opt):
    src = make_ck(tmp, name, opt)
    wide = widen_to(src, tmp / "wide.safetensors")
    rep = verify(src, wide, steps=200)
    assert rep["result"] == "pass", rep["diagnosis"]
    assert rep["mode"] == "file" and rep["steps_run"] == 200 and len(rep["rows"]) == 201
    assert rep["issues"] == [] and rep["first_failure"] is None
    assert max(rep["max"]["loss_rel"], rep["max"]["out_rel"], rep["max"]["train_out_rel"]) <= 1e-12
    assert rep["optimizer"]["kind"] == opt and rep["optimizer"]["source"] == "checkpoint"
    assert set(rep["k"].values()) == {2}
    assert rep["rows"][200]["eval"] and rep["rows"][10]["eval"] and not rep["rows"][5]["eval"]


def test_in_memory_widening_with_non_uniform_k(tmp):
    src = make_ck(tmp, "gpt", "adamw")
    ck = torch.load(src, weights_only=True)
    ck["model_args"] = {**GPT, "d_ff": 4 * GPT["n_embd"]}
    torch.save(ck, src)
    rep = verify(src, k="d_model=2,d_ff=3", steps=30)
    assert rep["result"] == "pass" and rep["mode"] == "in-memory"
    assert rep["k"] == {"d_model": 2, "d_ff": 3} and rep["model_args"]["wide"]["d_ff"] == 3 * 64
    assert rep["optimizer"]["groups"]["wide"] > rep["optimizer"]["groups"]["base"]  # split by factors


def test_k1_in_memory_never_shares_state_between_the_optimizers(tmp):
    """k = 1: widen returns its input tensors; base and wide optimizers must still own their state."""
    src = make_ck(tmp, "mlp", "adam")
    rep = verify(src, k="1", steps=20)
    assert rep["result"] == "pass" and rep["max"]["out_rel"] == 0 and rep["max"]["loss_rel"] == 0


def test_hidden_activations_follow_block_duplication(tmp):
    """Llama widens whole heads (blocks): every layer's activation matches the block-duplicated base."""
    src = make_ck(tmp, "llama", "adamw")
    rep = verify(src, steps=3, hidden=True)
    assert rep["result"] == "pass"
    hid = rep["rows"][3]["hidden"]
    assert "model.layers.0.self_attn.q_proj" in hid and "lm_head" in hid
    assert max(hid.values()) <= 1e-12


# ----------------------------------------------------------------------------------- injected defects fail

@pytest.fixture
def gpt_pt(tmp):
    """(BASE, its exact widening as .pt) for AdamW with non-zero weight decay and a large eps."""
    src = make_ck(tmp, "gpt", "adamw")
    return src, widen_to(src, tmp / "wide.pt")


def _groups(ck):
    return ck["optimizer"]["param_groups"]


def test_one_weight_scaled_by_1e4_fails_at_step_0(tmp, gpt_pt):
    src, wide = gpt_pt
    name = "transformer.h.0.mlp.c_fc.weight"
    bad = edit_pt(wide, tmp / "bad.pt", lambda ck: ck["model"][name].mul_(1 + 1e-4))
    rep = verify(src, bad, steps=20, hidden=True)
    assert rep["result"] == "fail"
    f = rep["first_failure"]
    assert f["step"] == 0 and f["tensor"] == name and f["layer"] == "transformer.h.0.mlp.c_fc"
    assert f"{name!r} differs from the exact widening of BASE: it is the exact widening × 1.0001" in diagnosis(rep)
    assert any("modified after widening" in n for n in rep["notes"])  # the recorded digests say so too


@pytest.mark.parametrize("key,opt", [("eps", "adamw"), ("lr", "adamw"), ("weight_decay", "adamw"),
                                     ("lr", "sgd"), ("weight_decay", "adam")])
def test_hyper_parameter_not_rescaled_fails_at_step_1(tmp, key, opt):
    src = make_ck(tmp, "gpt", opt)
    wide = widen_to(src, tmp / "wide.pt")
    base_value = torch.load(src, weights_only=True)["optimizer"]["param_groups"][0][key]

    def unscale(ck):
        for g in _groups(ck):
            g[key] = base_value
    rep = verify(src, edit_pt(wide, tmp / "bad.pt", unscale), steps=20)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert f"{key} not rescaled for" in diagnosis(rep)


def test_step_reset_to_zero_fails_at_step_1(tmp, gpt_pt):
    src, wide = gpt_pt

    def reset(ck):
        for st in ck["optimizer"]["state"].values():
            st["step"] = torch.zeros_like(st["step"])
    rep = verify(src, edit_pt(wide, tmp / "bad.pt", reset), steps=20)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert "optimizer 'step' reset to 0 in WIDE" in diagnosis(rep)


def test_shared_step_tensor_fails_at_step_1(tmp, gpt_pt):
    src, wide = gpt_pt

    def share(ck):
        one = next(iter(ck["optimizer"]["state"].values()))["step"]
        for st in ck["optimizer"]["state"].values():
            st["step"] = one
    rep = verify(src, edit_pt(wide, tmp / "bad.pt", share), steps=20)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert "shares one 'step' tensor" in diagnosis(rep)


def test_optimizer_state_not_rescaled_is_named(tmp, gpt_pt):
    src, wide = gpt_pt
    name = "transformer.h.1.attn.c_attn.weight"

    def unscale(ck):
        pid = next(p for g in _groups(ck) for p, n in zip(g["params"], g["param_names"]) if n == name)
        ck["optimizer"]["state"][pid]["exp_avg"].mul_(2)
    rep = verify(src, edit_pt(wide, tmp / "bad.pt", unscale), steps=20)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 1
    assert f"optimizer state 'exp_avg' of {name!r} differs: it is the widened BASE state × 2" in diagnosis(rep)


def test_batchnorm_running_var_zeroed_fails_at_step_0(tmp):
    src = make_ck(tmp, "resnet", "sgd")
    wide = widen_to(src, tmp / "wide.pt")
    name = "layer2.0.bn1.running_var"
    bad = edit_pt(wide, tmp / "bad.pt", lambda ck: ck["model"][name].zero_())
    rep = verify(src, bad, steps=10)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 0
    assert rep["first_failure"]["tensor"] == name
    assert f"BatchNorm buffer {name!r} zeroed: BatchNorm statistics were not carried over" in diagnosis(rep)


def test_readout_convention_mismatch_is_diagnosed(tmp):
    """WIDE made with `readout: sum` (readout weight / k) for a MuReadout model."""
    src = make_ck(tmp, "mlp", "adam")
    text = (CONFIGS / "mup-mlp.yaml").read_text().replace("readout: mup", "readout: sum").replace(
        "name: mup-mlp", "name: mlp-sum")
    (tmp / "sum.yaml").write_text(text)
    wide = widen_to(src, tmp / "wide.safetensors", spec=str(tmp / "sum.yaml"))
    rep = verify(src, wide, spec="mup-mlp", steps=5)
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 0
    assert "'readout.weight' differs from the exact widening of BASE: it is the exact widening × 1/2: a readout " \
           "convention mismatch" in diagnosis(rep)


# ------------------------------------------------------------------------------------------ user factories

SQRT_GPT = '''
from mupscale_cli.zoo import gpt

def build(model_args, base_args=None):
    return gpt.build(model_args, base_args, attn="sqrt")
'''


def _user_spec(tmp: Path, base_spec: str, factory: str, inputs: str | None) -> Path:
    text = (CONFIGS / f"{base_spec}.yaml").read_text()
    head, _, _ = text.partition("\nmodel:")
    model = f"\nmodel:\n  factory: {factory}\n" + (f"  inputs: {inputs}\n" if inputs else "")
    path = tmp / f"{base_spec}-user.yaml"
    path.write_text(head.replace(f"name: {base_spec}", f"name: {base_spec}-user") + model)
    return path


@pytest.mark.parametrize("base_spec,passes", [("nanogpt-mup", False), ("nanogpt-mup-heads", True)])
def test_user_factory_sqrt_attention(tmp, monkeypatch, base_spec, passes):
    """A user factory (tokens inputs): 1/sqrt(d) attention is exact when whole heads are duplicated and
    fails at step 0, diagnosed, when head_dim grows."""
    (tmp / "sqrtgpt_user.py").write_text(SQRT_GPT)
    monkeypatch.syspath_prepend(str(tmp))
    spec = _user_spec(tmp, base_spec, "sqrtgpt_user:build",
                      "{kind: tokens, vocab_size: vocab_size, seq_len: block_size}")
    src = make_ck(tmp, "gpt", "adamw")
    rep = verify(src, spec=str(spec), steps=10, trust_code=True)
    assert rep["model"] == "sqrtgpt_user:build"
    if passes:
        assert rep["result"] == "pass"
    else:
        assert rep["result"] == "fail" and rep["first_failure"]["step"] == 0
        assert "1/sqrt(d) attention with a widened head_dim" in diagnosis(rep)


def test_user_factory_errors_are_input_errors(tmp):
    src = make_ck(tmp, "mlp", "adam")
    spec = _user_spec(tmp, "mup-mlp", "no_such_module_xyz:build", "{kind: vectors, dim: d_in, classes: d_out}")
    with pytest.raises(MupscaleError, match="cannot import 'no_such_module_xyz'") as e:
        verify(src, spec=str(spec), steps=1, trust_code=True)
    assert e.value.exit_code == 2
    spec = _user_spec(tmp, "mup-mlp", "mupscale_cli.zoo.mlp:MLP", "{kind: pictures}")
    with pytest.raises(MupscaleError, match="inputs.kind must be one of tokens, vectors, images"):
        verify(src, spec=str(spec), steps=1)
    # a zoo module given as module:function keeps its own batch/loss/output (no opt-in: it is mupscale's code)
    spec = _user_spec(tmp, "mup-mlp", "mupscale_cli.zoo.mlp:build", None)
    assert verify(src, spec=str(spec), steps=3)["result"] == "pass"


MARKED = '''
import pathlib
pathlib.Path(__file__).with_suffix(".imported").write_text("ran")
from mupscale_cli.zoo.mlp import build, batch, loss, output
'''


def test_spec_code_runs_only_with_trust_spec_code(tmp):
    """A spec naming a factory outside mupscale_cli: verify and sweep refuse (exit 2, one line naming
    --trust-spec-code) without importing it; with the flag (or the factory given as --model) it runs."""
    (tmp / "marked_user.py").write_text(MARKED)
    marker = tmp / "marked_user.imported"
    src = make_ck(tmp, "mlp", "adam")
    spec = _user_spec(tmp, "mup-mlp", "marked_user", None)
    env_cwd = os.getcwd()
    os.chdir(tmp)  # the factory is looked up from the current directory, as an attacker would arrange
    try:
        for cmd in (["verify", str(src), "--steps", "1"], ["sweep", str(src), "--steps", "4", "--sigma", "0",
                                                            "--lr", "0.001", "--base-lr", "0.001"]):
            r = cli(*cmd, "--spec", str(spec))
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert "--trust-spec-code" in r.stderr and "'marked_user'" in r.stderr, r.stderr
            assert not marker.exists()
        rep = verify(src, spec=str(spec), steps=1, trust_code=True)
        assert rep["result"] == "pass" and marker.exists()
        marker.unlink()
        sys.modules.pop("marked_user", None)  # imported once already in this process: import it afresh
        assert verify(src, spec=str(spec), steps=1, model="marked_user")["result"] == "pass" and marker.exists()
    finally:
        os.chdir(env_cwd)


# ------------------------------------------------------------------------------------------------- noise

def test_noised_widening_verifies_and_an_altered_tensor_fails(tmp):
    src = make_ck(tmp, "gpt", "adamw")
    noised = widen_to(src, tmp / "noised.safetensors", sigma=0.75, seed=5)
    rep = verify(src, noised, steps=20)
    assert rep["result"] == "pass" and rep["mode"] == "noised", rep["diagnosis"]
    assert rep["noise"]["ok"] and rep["noise"]["sigma"] == 0.75 and rep["noise"]["seed"] == 5
    assert "noised" in rep["noise"]["tensors"].values() and "exact" in rep["noise"]["tensors"].values()
    assert rep["lockstep"] == "pass"

    pt = widen_to(src, tmp / "noised.pt", sigma=0.75, seed=5)
    name = "transformer.h.1.mlp.c_proj.weight"
    bad = edit_pt(pt, tmp / "bad.pt", lambda ck: ck["model"][name].__setitem__((0, 0), ck["model"][name][0, 0] + 1e-6))
    rep = verify(src, bad, steps=20)
    assert rep["result"] == "fail" and not rep["noise"]["ok"]
    assert rep["noise"]["tensors"][name].startswith("differs")
    assert sum(v.startswith("differs") for v in rep["noise"]["tensors"].values()) == 1
    assert rep["lockstep"] == "pass"  # both parts are reported: the noise-free reconstruction is exact
    assert f"{name!r} is not the exact widening of BASE plus the recorded noise" in diagnosis(rep)

    r = cli("verify", str(src), str(bad), "--steps", "3")
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith(f"FAIL: noise check failed for 1 tensor(s) (first {name!r})")
    assert "lockstep on the noise-free reconstruction passed" in r.stdout


# ---------------------------------------------------------------------------------------- float32 drift

@pytest.mark.parametrize("name,opt", [("mlp", "sgd"), ("gpt", "adamw"), ("llama", "adam")])
def test_float32_drift_over_200_steps_is_far_below_the_default_tolerance(tmp, name, opt):
    """Measured 3e-7 .. 4.4e-6 (scripts/bench_verify.py); the default float32 tolerance is 1e-3."""
    src = make_ck(tmp, name, opt)
    rep = verify(src, steps=200, dtype="float32")
    assert rep["result"] == "pass"
    worst = max(rep["max"]["loss_rel"], rep["max"]["out_rel"], rep["max"]["train_out_rel"])
    assert 0 < worst <= 5e-5 <= DEFAULT_TOL["float32"] / 10


def test_chaotic_float32_drift_is_diagnosed_as_roundoff(tmp):
    """The tiny BatchNorm ResNet amplifies float32 round-off: a failure late in training, with every
    static check clean and the first steps at round-off, is called round-off growth, not a defect."""
    src = make_ck(tmp, "resnet", "sgd")
    rep = verify(src, steps=200, dtype="float32")
    assert rep["result"] == "fail"  # measured 0.84-2.1 relative by step 200, against a tolerance of 1e-3
    assert rep["first_failure"]["step"] >= 5
    assert "grew gradually from round-off" in diagnosis(rep)


# ------------------------------------------------------------------------------- inputs, data, optimizers

def test_data_file_batches(tmp):
    src = make_ck(tmp, "mlp", "sgd")
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(40, MLP["d_in"], generator=g), "targets": torch.randint(0, 5, (40,))},
               tmp / "data.pt")
    rep = verify(src, steps=10, data=tmp / "data.pt")
    assert rep["result"] == "pass" and rep["data"].endswith("data.pt")
    torch.save({"inputs": torch.randn(4, MLP["d_in"])}, tmp / "bad.pt")
    with pytest.raises(MupscaleError, match="expected tensors 'inputs' and 'targets'"):
        verify(src, steps=1, data=tmp / "bad.pt")


def test_base_without_optimizer_needs_optimizer_and_lr(tmp):
    src = make_ck(tmp, "mlp", "adam", save_optimizer=False)
    with pytest.raises(MupscaleError, match="pass --optimizer sgd\\|adam\\|adamw and --lr X"):
        verify(src, steps=1)
    rep = verify(src, steps=20, optimizer="adamw", lr=1e-2)
    assert rep["result"] == "pass" and rep["optimizer"]["source"].startswith("fresh adamw")
    assert any("no optimizer state" in n for n in rep["notes"])


def test_weights_only_wide_uses_the_widened_base_optimizer(tmp):
    src = make_ck(tmp, "mlp", "adamw")
    wide = widen_to(src, tmp / "w.safetensors", no_optimizer=True)
    rep = verify(src, wide, steps=10)
    assert rep["result"] == "pass" and any("WIDE has no optimizer state" in n for n in rep["notes"])


def test_wide_with_another_k_is_a_structural_failure(tmp):
    src = make_ck(tmp, "mlp", "adam")
    wide = widen_to(src, tmp / "w4.safetensors", k="4")
    rep = verify(src, wide, k="2", steps=5)
    assert rep["result"] == "fail" and rep["issues"][0]["kind"] == "structure"
    assert "was it widened with another --k or --spec?" in diagnosis(rep)
    assert verify(src, wide, steps=5)["result"] == "pass"  # its recorded k is the default


# ------------------------------------------------------------------------------------------------ the CLI

def test_cli_pass_table_and_json(tmp):
    src = make_ck(tmp, "mlp", "adamw")
    wide = widen_to(src, tmp / "wide.safetensors")
    r = cli("verify", str(src), str(wide), "--steps", "30", "--json", str(tmp / "r.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PASS: 30 steps in lockstep") and r.stdout.count("\n") == 1
    assert "Δout rel" in r.stderr and "spec mup-mlp" in r.stderr
    rep = json.loads((tmp / "r.json").read_text())
    assert rep["result"] == "pass" and rep["steps_run"] == 30 and rep["tolerance"]["loss_output"] == 1e-10


def test_cli_divergence_exits_1_naming_the_step(tmp, gpt_pt):
    src, wide = gpt_pt

    def unscale(ck):
        for g in _groups(ck):
            g["eps"] = 1e-6
    bad = edit_pt(wide, tmp / "bad.pt", unscale)
    r = cli("verify", str(src), str(bad), "--steps", "5", "--json", str(tmp / "r.json"))
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("FAIL: diverged at step 1: ")
    assert "diagnosis: eps not rescaled" in r.stderr and "FAIL" in r.stderr
    assert json.loads((tmp / "r.json").read_text())["first_failure"]["step"] == 1


@pytest.mark.parametrize("args,msg", [
    (["--dtype", "float16"], "--dtype 'float16': choose one of float64, float32, bfloat16"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--tol", "0"], "--tol must be a positive number"),
    (["--data", "/nonexistent.pt"], "--data /nonexistent.pt: no such file"),
])
def test_cli_usage_errors_exit_2(tmp, args, msg):
    src = make_ck(tmp, "mlp", "adam")
    r = cli("verify", str(src), *args)
    assert r.returncode == 2 and msg in r.stderr and r.stdout == ""


def test_cli_cuda_without_a_gpu_exits_2(tmp):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    src = make_ck(tmp, "mlp", "adam")
    r = cli("verify", str(src), "--device", "cuda", "--steps", "1")
    assert r.returncode == 2 and "no CUDA device" in r.stderr


# ------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,steps", [("float64", 200), ("float32", 50), ("bfloat16", 10)])
def test_gpu_suite(tmp, dtype, steps):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for name, opt in [("mlp", "sgd"), ("gpt", "adamw"), ("llama", "adam"), ("resnet", "adamw")]:
        src = make_ck(tmp, name, opt)
        wide = widen_to(src, tmp / f"{name}.safetensors")
        rep = verify(src, wide, steps=steps if name != "resnet" or dtype == "float64" else 5, dtype=dtype,
                     device="cuda")
        assert rep["device"].startswith("cuda")
        assert rep["result"] == "pass", (name, dtype, rep["max"], rep["diagnosis"])
    bad = edit_pt(widen_to(src, tmp / "w.pt"), tmp / "bad.pt",
                  lambda ck: ck["model"]["layer1.0.bn1.running_var"].zero_())
    assert verify(src, bad, steps=3, dtype=dtype, device="cuda")["first_failure"]["step"] == 0


def test_wide_stored_in_another_dtype_is_rederived_bit_for_bit(tmp):
    """`widen --dtype float32` of a float64 BASE: WIDE must equal the cast exact widening bit for bit;
    the lockstep then runs on the exact (uncast) reconstruction."""
    src = make_ck(tmp, "mlp", "adamw")
    wide = widen_to(src, tmp / "w32.pt", dtype="float32", sigma=0.5, seed=2)
    rep = verify(src, wide, steps=20)
    assert rep["result"] == "pass" and rep["mode"] == "noised" and rep["noise"]["dtype"] == "float32"
    wide = widen_to(src, tmp / "c32.pt", dtype="float32")
    rep = verify(src, wide, steps=20)
    assert rep["result"] == "pass" and rep["mode"] == "cast", rep["diagnosis"]
    bad = edit_pt(wide, tmp / "bad.pt", lambda ck: ck["model"]["hidden.0.weight"].mul_(1 + 1e-3))
    rep = verify(src, bad, steps=5)
    assert rep["result"] == "fail" and rep["noise"]["tensors"]["hidden.0.weight"].startswith("differs")


# ------------------------------------------------------------------------------------ default tolerances

@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "resnet", "llama"])
def test_defaults_pass_every_zoo_model_and_optimizer(tmp, name, opt):
    """verify's defaults (batch 8, in-memory k 2, default --tol) pass every exact zoo widening; 40 steps here,
    the full 200 for the worst case below (all 200-step figures: docs/verify.md)."""
    src = make_ck(tmp, name, opt)
    rep = run_verify(VerifyOptions(base=src, steps=40, device="cpu"))
    assert rep["result"] == "pass", (rep["max"], rep["diagnosis"])
    at = rep["tolerance"]["loss_output_at"]
    assert at[0] == at[1] / 10 ** (1 / 20) == DEFAULT_TOL["float64"] if name == "resnet" else set(at.values()) == {
        DEFAULT_TOL["float64"]}


def test_cli_defaults_pass_the_worst_case_resnet_batch_8_200_steps(tmp):
    """The case that failed with a single float64 tolerance (1.08e-10 > 1e-10): BatchNorm, batch 8."""
    src = make_ck(tmp, "resnet", "sgd")
    r = cli("verify", str(src), "--device", "cpu", "--json", str(tmp / "r.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp / "r.json").read_text())
    assert rep["steps_run"] == 200 and rep["batch_size"] == 8 and rep["mode"] == "in-memory"
    tol_at = default_tol("float64", prepare(WidenOptions(checkpoint=src, k="2")).plan)
    assert tol_at(0) == DEFAULT_TOL["float64"] and tol_at(200) == BATCHNORM_TOL["float64"][1]
    for row in rep["rows"]:  # a margin of at least 10x at every step
        assert max(row["loss_rel"] or 0, row["out_rel"], row["train_out_rel"] or 0) <= tol_at(row["step"]) / 10


def test_float64_diagnosis_never_advises_float64(tmp):
    """A float64 run that fails late (tolerance below the round-off growth) is told to verify fewer steps
    or loosen --tol, never to use the float64 it already uses."""
    src = make_ck(tmp, "resnet", "sgd")
    rep = verify(src, steps=60, batch_size=4, tol=1e-15)
    assert rep["result"] == "fail"
    text = diagnosis(rep)
    assert "--dtype float64" not in text and ("--tol" in text or "diverged" in text)


# ------------------------------------------------------------------ NaN differences fail (issue 17)

@pytest.mark.parametrize("steps", ["0", "3"])
def test_a_nan_weight_in_wide_fails(tmp_path, steps):
    """A NaN in one weight of WIDE makes the outputs NaN: verify FAILs (exit 1), also before any training
    (--steps 0: the outputs' NaN came after a 0 loss gap and Python's max dropped it: PASS, exit 0)."""
    src = make_ck(tmp_path, "mlp", "adamw")
    wide = widen_to(src, tmp_path / "wide.pt")

    def poison(ck):
        ck["model"]["hidden.0.weight"][0, 0] = float("nan")
    bad = edit_pt(wide, tmp_path / "nan.pt", poison)
    r = mupscale("verify", str(src), str(bad), "--steps", steps, "--json", str(tmp_path / "r.json"))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.startswith("FAIL"), r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["result"] == "fail" and rep["first_failure"]["step"] == 0, rep["first_failure"]
    assert rep["first_failure"]["tensor"] == "hidden.0.weight"


def test_a_run_that_blows_up_fails(tmp_path):
    """BASE's own SGD lr is huge (widened exactly, lr × Table 1): both runs overflow to Inf/NaN in their first
    step and the differences are NaN, which `rel > tol` would let pass: verify FAILs (exit 1) at step 1."""
    src = make_ck(tmp_path, "mlp", "sgd")

    def hot(ck):
        for g in ck["optimizer"]["param_groups"]:
            g["lr"] = 1e200
    base = edit_pt(src, tmp_path / "hot.pt", hot)
    wide = widen_to(base, tmp_path / "wide.pt")
    r = mupscale("verify", str(base), str(wide), "--steps", "10", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    rep = json.loads((tmp_path / "r.json").read_text())
    fail = rep["first_failure"]
    assert rep["result"] == "fail" and fail["step"] == 1 and fail["value"] is None, fail  # None: NaN in JSON
    assert rep["rows"][0]["out_rel"] is not None  # finite before training
    assert "non-finite loss or outputs at step 1" in r.stdout + r.stderr
