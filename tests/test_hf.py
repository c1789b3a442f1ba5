"""Hugging Face model directories: widened by `mupscale widen DIR --k 2 -o OUT`, loaded by from_pretrained."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hf_tiny import FAMILIES, TIED_SP, load, logits, make, tokenizer


def widen(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "mupscale_cli", "widen", *map(str, args), "-q"], capture_output=True,
                       text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def rel(a, b) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_widens_exactly(tmp_path, family):
    base = make(family, tmp_path / "base")
    if family == "llama":
        tokenizer(tmp_path / "base")
    extra = ["--untie"] if family in TIED_SP else []
    widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", *extra)
    wide = load(tmp_path / "wide")
    assert rel(logits(base), logits(wide)) < 1e-5
    cb, cw = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("base", "wide"))
    width, heads = ("n_embd", "n_head") if family == "gpt2" else ("hidden_size", "num_attention_heads")
    assert cw[width] == 2 * cb[width] and cw[heads] == 2 * cb[heads]
    if "head_dim" in cb and cb["head_dim"] is not None:
        assert cw["head_dim"] == cb["head_dim"]
    if "num_key_value_heads" in cb:
        assert cw["num_key_value_heads"] == 2 * cb["num_key_value_heads"]
    if family == "granite":  # tied and still tied: the readout divides by logits_scaling, which grows by k
        assert cw["tie_word_embeddings"] is True and cw["logits_scaling"] == 2 * cb["logits_scaling"]
    if family in TIED_SP:
        assert cw["tie_word_embeddings"] is False and cb.get("tie_word_embeddings", True) is True
    assert (tmp_path / "wide" / "model.safetensors").is_file()  # one file in, one file out
    assert not list((tmp_path / "wide").glob("*.index.json"))
    names = {p.name for p in (tmp_path / "base").iterdir()} - {"config.json", "model.safetensors"}
    for n in names:  # generation_config.json, tokenizer files: copied as they are
        assert (tmp_path / "wide" / n).read_bytes() == (tmp_path / "base" / n).read_bytes(), n
    if family == "llama":
        assert {"tokenizer.json", "tokenizer_config.json"} <= names


def test_tied_standard_parametrization_refused_without_untie(tmp_path):
    make("llama", tmp_path / "base", tie_word_embeddings=True)
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--untie" in r.stderr and "lm_head.weight" in r.stderr
    assert not (tmp_path / "wide").exists() and not [p for p in tmp_path.iterdir() if p.name != "base"]
    base = load(tmp_path / "base")
    widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--untie")
    wide = load(tmp_path / "wide")
    assert rel(logits(base), logits(wide)) < 1e-5
    assert not torch.equal(wide.lm_head.weight, wide.model.embed_tokens.weight)
    # verify: the untied readout trains apart from the embedding, the tied BASE does not: one line, exit 2
    v = subprocess.run([sys.executable, "-m", "mupscale_cli", "verify", str(tmp_path / "base"), str(tmp_path / "wide"), "--optimizer", "adamw",
                        "--lr", "1e-3", "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert v.returncode == 2 and v.stdout == "", v.stderr
    assert len(v.stderr.strip().splitlines()) == 1 and "widened with --untie" in v.stderr, v.stderr


def test_sharded_in_sharded_out(tmp_path):
    base = make("qwen2", tmp_path / "base", shard="20KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--shard-size", "40KB")
    index = json.loads((tmp_path / "wide" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "wide" / "model.safetensors").exists()
    assert rel(logits(base), logits(load(tmp_path / "wide"))) < 1e-5


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    make("llama", tmp_path / "base")
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "stale.txt").write_text("old")
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", check=False)
    assert r.returncode == 2 and "--force" in r.stderr
    widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--force")
    assert not (tmp_path / "wide" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "wide"]


def test_widening_an_hf_directory_imports_no_transformers(tmp_path):
    make("llama", tmp_path / "base")
    code = ("import sys; from pathlib import Path; from mupscale_cli.commands.widen import WidenOptions, run_widen; "
            f"run_widen(WidenOptions(Path({str(tmp_path / 'base')!r}), Path({str(tmp_path / 'wide')!r}))); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_noise_relative_to_initializer_range(tmp_path):
    """σ̄ multiplies the family's own init std (config.json initializer_range), not μP's 1/sqrt(fan_in)."""
    from safetensors.torch import load_file
    make("llama", tmp_path / "base", initializer_range=0.05)
    widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "exact")
    widen(tmp_path / "base", "--k", "2", "--sigma", "0.5", "-o", tmp_path / "noised")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("exact", "noised"))
    for n in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert abs(float((b[n] - a[n]).std()) / (0.5 * 0.05) - 1) < 0.1, n
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])  # no init std given: not noised


def test_verify_builds_the_hf_model(tmp_path):
    """verify on a Hugging Face directory trains transformers' own model (from config.json) beside its widening;
    in float64 the steps transformers computes in float32 (RMSNorm) keep float64, so the default tolerance (1e-10)
    holds with the gap at round-off (docs/verify.md 'Hugging Face directories')."""
    import json
    make("llama", tmp_path / "base")
    cmd = [sys.executable, "-m", "mupscale_cli", "verify", str(tmp_path / "base"), "--k", "2", "--steps", "3",
           "--optimizer", "adamw", "--lr", "1e-3", "--json", str(tmp_path / "r.json")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "PASS" in r.stdout + r.stderr, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert max(rep["max"]["loss_rel"], rep["max"]["out_rel"]) < 1e-12, rep["max"]


@pytest.mark.parametrize("config,why", [
    ("[" * 100_000 + "]" * 100_000, "nested more than"),
    ('{"model_type": "llama", "hidden_size": ' + "7" * 5000 + "}", "digits"),
    ('{"model_type": "llama", "pad": "' + "x" * (17 << 20) + '"}', "more than a Hugging Face config holds"),
    ('{"model_type": "llama",', "not readable JSON"),
    ("[1, 2]", "expected a JSON object"),
], ids=["deep", "huge-int", "huge-file", "truncated", "list"])
def test_hostile_config_json_is_one_line_exit_2(tmp_path, config, why):
    """config.json is untrusted input too: read within the same bounds as every other JSON."""
    from safetensors.torch import save_file
    d = tmp_path / "m"
    d.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, d / "model.safetensors")
    (d / "config.json").write_text(config)
    r = widen(d, "--k", "2", "-o", tmp_path / "out", check=False)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr[-500:]
    assert "config.json" in r.stderr and why in r.stderr, r.stderr[-500:]
    assert not (tmp_path / "out").exists()
