"""Issue 18 §1/§2 and issue 17 §3 on Hugging Face directories: a spec is chosen only by config.json's own evidence
(model_type); a flag is never silently believed over the file; refusals are one short line naming the model_type
and the directory; every size a spec uses (head_dim × heads, intermediate_size, ...) is checked against the
weights, and the widened config against the widened weights, before anything is written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tiny import make
from mupscale_cli.core.plan import make_plan
from mupscale_cli.core.spec import load_spec, parse_spec
from mupscale_cli.errors import MupscaleError

torch.set_num_threads(1)


def widen(*args, quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mupscale_cli", "widen", *map(str, args), *(["-q"] if quiet else [])],
                          capture_output=True, text=True)


def refused(r: subprocess.CompletedProcess, tmp: Path, *words: str, keep: tuple = ()) -> str:
    """Exit 2, one stderr line holding `words`, nothing on stdout, nothing written beside the inputs."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith("mupscale: error: ") and all(w in lines[0] for w in words), (words, lines[0])
    assert not (tmp / "wide").exists() and not [p for p in tmp.iterdir() if p.name not in keep], list(tmp.iterdir())
    return lines[0]


def set_config(path: Path, **kv) -> None:
    c = json.loads((path / "config.json").read_text())
    for key, v in kv.items():
        if v is ...:
            c.pop(key)
        else:
            c[key] = v
    (path / "config.json").write_text(json.dumps(c))


@pytest.fixture(scope="module")
def helium(tmp_path_factory) -> Path:
    """A Llama-named model whose config.json says another model_type (Kyutai's helium: no bundled spec)."""
    d = tmp_path_factory.mktemp("helium") / "helium"
    make("llama", d, tie_word_embeddings=True)
    set_config(d, model_type="helium")
    return d


def test_no_bundled_spec_for_model_type_is_one_short_line(tmp_path, helium):
    r = widen(helium, "--k", "2", "-o", tmp_path / "wide")
    line = refused(r, tmp_path, "model_type 'helium' has no bundled spec", str(helium), "--spec FILE")
    # issue 18 §2: no list of unrelated specs, no weights-file name for a directory, no --untie nobody asked for,
    # and never 'if it is μP, pass --spec <the first spec that fits>'
    for word in ("hf-gemma", "hf-granite", "hf-llama", "resnet18-mup", "mup-mlp", "model.safetensors", "--untie"):
        assert word not in line, (word, line)
    assert len(line) < 300


@pytest.mark.parametrize("spec", ["hf-gemma", "hf-granite", "hf-llama"])
def test_spec_of_another_model_type_needs_the_risk_flag(tmp_path, helium, spec):
    """SmolLM3-style: a spec named by --spec whose model_type config.json contradicts is refused; the flag that
    overrides it says what it risks, and the output then carries a warning (never a silent exit 0)."""
    r = widen(helium, "--k", "2", "-o", tmp_path / "wide", "--spec", spec, "--untie")
    refused(r, tmp_path, f"--spec {spec}", "model_type 'helium'", "--risk-model-type-mismatch")
    r = widen(helium, "--k", "2", "-o", tmp_path / "wide", "--spec", "hf-llama", "--untie",
              "--risk-model-type-mismatch", quiet=False)
    assert r.returncode == 0 and "warning: --risk-model-type-mismatch" in r.stderr and "NOT known" in r.stderr


def test_bigcode_forced_through_gpt2_is_refused_even_at_risk(tmp_path):
    """GPT-BigCode's c_attn is an nn.Linear [3d, d]; hf-gpt2 reads it as Conv1D [d, 3d]: refused by model_type,
    and with --risk-model-type-mismatch still refused by the shapes config.json gives (was exit 0, gap 1.1)."""
    from hf_lockstep import build
    build("gpt_bigcode", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=None,
                              multi_query=False, tie_word_embeddings=False), dtype=torch.float32).save_pretrained(
        tmp_path / "base")
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--spec", "hf-gpt2")
    refused(r, tmp_path, "model_type 'gpt_bigcode'", keep=("base",))
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--spec", "hf-gpt2", "--risk-model-type-mismatch")
    refused(r, tmp_path, "transformer.h.0.", "is [96, 32]", "n_embd = 32, 3 * n_embd = 96", "does not describe its weights",
            keep=("base",))


def test_rewrite_of_a_missing_key_is_an_error(tmp_path):
    """Granite without logits_scaling in config.json: the spec's `logits_scaling: {times: d_model}` had nothing
    to rewrite, transformers' default 1.0 stayed at every width: logits × 2, exit 0."""
    make("granite", tmp_path / "base")
    set_config(tmp_path / "base", logits_scaling=...)
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide")
    refused(r, tmp_path, "no 'logits_scaling'", "hf-granite", keep=("base",))


SIZE_LIES = [  # (family, built with, config.json then says, words)
    ("qwen3", {"head_dim": 16}, {"head_dim": 8}, "[head_dim = 8]"),  # head_dim × heads != rows
    ("llama", {}, {"intermediate_size": 24}, "intermediate_size = 24"),  # divides 48: passed the divisibility check
    ("llama", {}, {"num_key_value_heads": 1}, "num_key_value_heads * head_dim = 8"),
    ("gemma", {"head_dim": 8}, {"head_dim": 4}, "num_key_value_heads * head_dim = 8"),
    ("granite", {}, {"num_attention_heads": 2}, "num_key_value_heads * head_dim = 32"),
    ("gpt2", {"n_inner": 64}, {"n_inner": 32}, "n_inner = 32"),
    ("gpt2", {}, {"n_positions": 32}, "n_positions = 32"),
]


@pytest.mark.parametrize("family,built,says,words", SIZE_LIES, ids=[f"{f}-{next(iter(s))}" for f, _, s, _ in SIZE_LIES])
def test_config_sizes_checked_against_the_weights(tmp_path, family, built, says, words):
    make(family, tmp_path / "base", **built)
    set_config(tmp_path / "base", **says)
    extra = ["--untie"] if family in ("gemma", "gpt2") else []
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", *extra)
    refused(r, tmp_path, words, "does not describe its weights", keep=("base",))


def test_widened_config_checked_against_the_widened_weights(tmp_path):
    """A spec whose model_args rules forget an axis (num_key_value_heads kept while k_proj doubles): the widened
    config.json would describe other shapes than the weights written; refused before anything is written."""
    text = load_spec("hf-llama").text
    bad = text.replace("  num_key_value_heads: heads\n", "", 1)
    assert bad != text
    (tmp_path / "s.yaml").write_text(bad.replace("name: hf-llama", "name: my-llama"))
    make("llama", tmp_path / "base")
    r = widen(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--spec", tmp_path / "s.yaml")
    refused(r, tmp_path, "k_proj.weight' widens to [32, 64]", "rules do not describe its widening",
            keep=("base", "s.yaml"))


@pytest.mark.parametrize("shape,why", [("[hidden_size]", "one size expression"), ("[h idden, 2]", "not a size"),
                                       ("[hidden_size, 2 ** 3]", "not a size"), ("[a, true]", "not a size"),
                                       ("7", "one size expression")])
def test_rule_shape_is_checked_when_the_spec_is_read(shape, why):
    with pytest.raises(MupscaleError, match=why):
        parse_spec(f"name: s\ntensors:\n  w: {{axes: [d, null], shape: {shape}}}\n", "s.yaml")


def test_rule_shape_names_must_be_given():
    spec = parse_spec("name: s\nmodel_args: {width: d}\ntensors:\n  w: {axes: [d, null], shape: [width, 3]}\n", "s.yaml")
    shapes = {"w": ((4, 3), torch.float32)}
    assert make_plan(spec, shapes, {"*": 2}, {"width": 4}).tensors["w"].out_shape == (8, 3)
    with pytest.raises(MupscaleError, match="'width'.*--size width=N"):
        make_plan(spec, shapes, {"*": 2}, {})
    with pytest.raises(MupscaleError, match=r"is \[4, 3\].*width = 2"):  # divides 4: only the shape tells
        make_plan(spec, shapes, {"*": 2}, {"width": 2})
