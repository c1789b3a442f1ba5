"""End to end through the installed `mupscale` command, and the CLI's manners (CliRunner)."""
from __future__ import annotations

import json

import mup
import torch
from typer.testing import CliRunner

from conftest import make_base, mupscale, train
from mupscale_cli import __version__
from mupscale_cli.api import load, make_optimizer, optimizer_groups
from mupscale_cli.cli import app
from mupscale_cli.verify.lockstep import run_lockstep
from mupscale_cli.zoo import gpt

ARGS = dict(gpt.DEFAULT_ARGS)
NANOGPT_FIELDS = {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
runner = CliRunner()


def test_nanogpt_checkpoint_to_pt_resumes_in_the_wider_model(tmp):
    src, base, base_opt = make_base(tmp, gpt, ARGS, "adamw", "mup", steps=10)
    out = tmp / "wide.pt"
    r = mupscale("widen", str(src), "--k", "4", "-o", str(out), check=True)
    assert r.stdout.strip() == str(out)  # stdout carries the path and nothing else
    ck = torch.load(out, weights_only=True)
    assert set(ck) >= {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert set(ck["model_args"]) == NANOGPT_FIELDS and ck["model_args"]["n_embd"] == 4 * ARGS["n_embd"]
    assert ck["iter_num"] == 10 and ck["best_val_loss"] == 1.5
    assert ck["config"] == {"batch_size": 8, "parametrization": "mup"}
    wide = gpt.build(ck["model_args"], ARGS).double()
    wide.load_state_dict(ck["model"], strict=True)
    wide_opt = mup.MuAdamW(wide.parameters(), lr=1.0)  # the training script's own optimizer
    wide_opt.load_state_dict(ck["optimizer"])
    # training continues exactly where the base model is going
    diffs = run_lockstep(gpt, ARGS, base, base_opt, wide, wide_opt, 20, seed=5)
    assert max(d.rel for d in diffs) <= 1e-12


def test_noised_safetensors_loads_back_through_the_api_and_trains(tmp):
    src, _, _ = make_base(tmp, gpt, ARGS, "adamw", "named")
    out = tmp / "wide.safetensors"
    r = mupscale("widen", str(src), "--k", "2", "--sigma", "0.75", "--seed", "9", "-o", str(out), "--json",
                 check=True)
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and summary["sigma"] == 0.75 and summary["k"] == {"d_model": 2, "d_ff": 2}
    w = load(out)
    assert w.kind == "adamw" and w.provenance["seed"] == 9 and w.provenance["noise"] == "mupscale-noise-v1"
    assert w.provenance["spec"] == "nanogpt-mup" and len(w.provenance["source_sha256"]) == 64
    wide = gpt.build(w.extra["model_args"], ARGS).double()
    wide.load_state_dict(w.model, strict=True)
    opt = make_optimizer(w.kind, optimizer_groups(wide, w.optimizer))
    opt.load_state_dict(w.optimizer)
    before = [p.detach().clone() for p in wide.parameters()]
    train(gpt, ARGS, wide, opt, 3)
    assert all(torch.isfinite(p).all() for p in wide.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, wide.parameters()))
    assert all(int(s["step"]) == 5 + 3 for s in opt.state_dict()["state"].values())


def test_inspect_reports_roles_and_validates_without_writing(tmp):
    src, _, _ = make_base(tmp, gpt, ARGS, "adamw", "nanogpt")
    r = runner.invoke(app, ["inspect", str(src), "--k", "2", "--sigma", "1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    rows = {x["name"]: x for x in rep["rows"]}
    assert rows["transformer.h.0.attn.c_attn.weight"]["role"] == "matrix"
    assert rows["transformer.h.0.attn.c_attn.weight"]["widened"] == [96, 32]
    assert rows["transformer.h.0.ln_1.weight"]["role"] == "vector"
    assert rows["lm_head.weight"]["tied_to"] == "transformer.wte.weight"
    assert rows["transformer.h.0.attn.c_attn.bias"]["noise_std"] == 0
    assert rep["optimizer_map"]["layout"] == "nanogpt" and rep["optimizer_map"]["kind"] == "adamw"
    assert list(tmp.iterdir()) == [src]
    r = runner.invoke(app, ["inspect", str(src)])
    assert r.exit_code == 0 and r.stdout.startswith("ok: 29 tensors")
    assert "c_attn.weight" in r.stderr and "group 0" in r.stderr


def test_errors_are_one_line_with_exit_2(tmp):
    src, _, _ = make_base(tmp, gpt, ARGS, "adamw", "named")
    for args, needle in [(["--k", "0"], "must be >= 1"), (["--k", "d_model=2"], "no k for axis 'd_ff'"),
                         (["--k", "width=2"], "does not have"), (["--sigma", "-1"], "--sigma"),
                         (["--spec", "nope"], "no bundled spec")]:
        r = runner.invoke(app, ["widen", str(src), *args, "-o", str(tmp / "o.safetensors")])
        assert r.exit_code == 2, (args, r.output)
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert not (tmp / "o.safetensors").exists()
    (tmp / "o.pt").write_bytes(b"keep")
    r = runner.invoke(app, ["widen", str(src), "-o", str(tmp / "o.pt")])
    assert r.exit_code == 2 and "--force" in r.stderr and (tmp / "o.pt").read_bytes() == b"keep"


def test_autodetect_names_candidates_when_none_fits(tmp):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp / "x.pt")
    r = mupscale("widen", str(tmp / "x.pt"), "-o", str(tmp / "y.pt"))
    assert r.returncode == 2 and "no bundled spec covers x.pt" in r.stderr and "'encoder.weight'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "nanogpt-mup" not in r.stderr and len(r.stderr) < 200  # no list of unrelated specs (issue 18 §2)


def test_version_help_and_specs():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"mupscale {__version__}"
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "Exit codes" in r.stdout and "130" in r.stdout
    r = runner.invoke(app, ["specs", "--json"])
    names = {s["name"] for s in json.loads(r.stdout)}
    assert {"mup-mlp", "nanogpt-mup", "nanogpt-mup-heads", "resnet18-mup", "llama-mup"} <= names


def test_click_usage_errors_are_one_line_too(tmp):
    for args, needle in [(["widen", "x.pt", "--sigma", "abc"], "Invalid value for '--sigma'"),
                         (["--bogus"], "No such option: --bogus"), (["widen"], "Missing argument")]:
        r = mupscale(*args)
        assert r.returncode == 2 and r.stdout == "", args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mupscale: error:") and needle in lines[0], r.stderr


def test_absurd_k_and_string_widths_are_one_line_errors(tmp):
    src, _, _ = make_base(tmp, gpt, ARGS, "adamw", "named", steps=1)
    r = mupscale("widen", str(src), "--k", str(10**30), "-o", str(tmp / "w.pt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "use a smaller --k" in r.stderr
    assert "more than 1048576" in r.stderr and len(max(r.stderr.split(), key=len)) < 40  # no 60-digit figure
    r = mupscale("widen", str(src), "--k", str(2**20), "-o", str(tmp / "w.pt"))  # allowed k, absurd size
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "PiB but" in r.stderr and "smaller --k" in r.stderr
    ck = torch.load(src, weights_only=True)
    ck["model_args"]["n_embd"] = "16"  # k × "16" would be "1616"
    torch.save(ck, tmp / "s.pt")
    r = mupscale("widen", str(tmp / "s.pt"), "--k", "2", "-o", str(tmp / "w.pt"))
    assert r.returncode == 2 and "model_args['n_embd'] is '16' (str), not an integer width" in r.stderr
    assert not (tmp / "w.pt").exists()


def test_fmt_bytes():
    from mupscale_cli.formats.safetensors import fmt_bytes
    assert fmt_bytes(512) == "512 B" and fmt_bytes(3 * 2**20 // 2) == "1.5 MiB" and fmt_bytes(2**60) == "1.0 EiB"
    assert fmt_bytes(10**40) == "8.7e+21 EiB"


def test_model_arg_values_and_manners(tmp):
    """--model-arg KEY=VALUE: integers, floats, booleans, strings; a malformed or non-finite one is exit 2,
    one line naming it; one that replaces a different stored value says so, and the output records it."""
    from mupscale_cli.core.job import parse_model_args
    assert parse_model_args(["n=-3", "lr=2.5e-3", "bias=false", "name=gpt", "x=null", "n_embd=64"]) == {
        "n": -3, "lr": 2.5e-3, "bias": False, "name": "gpt", "x": None, "n_embd": 64}
    src, _, _ = make_base(tmp, gpt, ARGS, "adamw", "mup")
    for bad, why in [("3=4", "expected KEY=VALUE"), ("n_embd", "expected KEY=VALUE"), ("dropout=1e999", "finite"),
                     ("dropout=nan", "finite"), ("n_embd=" + "9" * 5000, "digits")]:
        r = runner.invoke(app, ["widen", str(src), "-o", str(tmp / "x.pt"), "--model-arg", bad])
        assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, (bad, r.stderr)
        assert "--model-arg" in r.stderr and why in r.stderr, (bad, r.stderr)
    assert not (tmp / "x.pt").exists()
    r = mupscale("widen", str(src), "-o", str(tmp / "w.pt"), "--model-arg", "dropout=0.25", "--json", check=True)
    assert any(f"--model-arg dropout=0.25 replaces the checkpoint's model_args dropout = {ARGS['dropout']!r}" in n
               for n in json.loads(r.stdout)["notes"]), r.stdout
    assert torch.load(tmp / "w.pt", weights_only=True)["model_args"]["dropout"] == 0.25
