"""Issue 18 §2/§3: the Hugging Face families added to the bundled specs, each widened exactly with its AdamW
state and trained 20 steps in float64 lockstep beside the base (hf_lockstep.py), its noise measured against the
family's own init; the families that cannot be widened exactly are refused in one line naming model_type."""
from __future__ import annotations

import importlib

import pytest
import torch

from hf_lockstep import (build, check_noise, float64_layernorm, float64_norm, float64_router, lockstep, noise_vs_init,
                         widen_cli)

torch.set_num_threads(1)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=None, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=False)

# case (model_type[-variant]) -> (tiny config, [(modeling module, norm class, one_plus | "layernorm")] that
# transformers computes in float32)
FAMILIES = {
    "smollm3": ({**TINY, "no_rope_layer_interval": 2}, [("smollm3", "SmolLM3RMSNorm", False)]),
    "phi3": ({**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
             [("phi3", "Phi3RMSNorm", False)]),
    "olmo2": ({**TINY, "attention_bias": True}, [("olmo2", "Olmo2RMSNorm", False)]),
    "stablelm": ({**TINY, "use_qkv_bias": True, "use_parallel_residual": True,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
                 []),  # LayerNorm computes in the input's dtype
    "gpt_neox": ({**{k: v for k, v in TINY.items() if k != "num_key_value_heads"},
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
                 []),
    "gpt_neox-sequential": ({**{k: v for k, v in TINY.items() if k != "num_key_value_heads"},
                             "use_parallel_residual": False}, []),
    # bundled before issue 18; here for its optimizer state: k_power's sqrt(k) squared (exp_avg_sq) was an
    # internal error (an integer too big for torch) before widening applied such factors as one float
    "gemma": ({**TINY, "head_dim": 8}, [("gemma", "GemmaRMSNorm", True)]),
    "gemma2": ({**TINY, "head_dim": 8, "query_pre_attn_scalar": 6, "sliding_window": 4,
                "final_logit_softcapping": 3.0, "attn_logit_softcapping": 2.0}, [("gemma2", "Gemma2RMSNorm", True)]),
    "gemma3_text": ({**TINY, "head_dim": 8, "query_pre_attn_scalar": 6, "sliding_window": 4,
                     "final_logit_softcapping": 3.0, "attn_logit_softcapping": 2.0,
                     "layer_types": ["sliding_attention", "full_attention"]}, [("gemma3", "Gemma3RMSNorm", True)]),
    "minicpm3": ({**TINY, "num_key_value_heads": 4, "tie_word_embeddings": True, "q_lora_rank": 12,
                  "kv_lora_rank": 10, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5,
                  "scale_emb": 3.0, "scale_depth": 1.4, "dim_model_base": 8}, [("minicpm3", "MiniCPM3RMSNorm", False)]),
    "minicpm3-untied": ({**TINY, "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 10,
                         "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "scale_emb": 3.0, "dim_model_base": 8},
                        [("minicpm3", "MiniCPM3RMSNorm", False)]),
    "cohere": ({**TINY, "tie_word_embeddings": True, "logit_scale": 0.25, "use_qk_norm": True},
               [("cohere", "CohereLayerNorm", "layernorm")]),
    "cohere-untied": ({**TINY, "logit_scale": 0.5}, [("cohere", "CohereLayerNorm", "layernorm")]),
    "opt": ({**{k: v for k, v in TINY.items() if k not in ("intermediate_size", "num_key_value_heads")},
             "ffn_dim": 48, "dropout": 0.0, "init_std": 0.05}, []),
    "opt-post-ln-proj": ({**{k: v for k, v in TINY.items() if k not in ("intermediate_size", "num_key_value_heads")},
                          "ffn_dim": 48, "dropout": 0.0, "do_layer_norm_before": False, "word_embed_proj_dim": 16,
                          "tie_word_embeddings": True}, []),
    "falcon": ({**{k: v for k, v in TINY.items() if k != "num_key_value_heads"}, "new_decoder_architecture": True,
                "num_kv_heads": 2, "bias": True, "ffn_hidden_size": 48, "alibi": False}, []),
    "falcon-mha-sequential": ({**{k: v for k, v in TINY.items() if k != "num_key_value_heads"},
                               "multi_query": False, "parallel_attn": False, "alibi": False}, []),
    "gpt_bigcode": (dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, multi_query=False,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=False), []),
    "granite_swa": ({**TINY, "embedding_multiplier": 3.0, "attention_multiplier": 0.1, "residual_multiplier": 0.5,
                     "logits_scaling": 2.0, "tie_word_embeddings": True, "sliding_window": 4,
                     "layer_types": ["sliding_attention", "full_attention"]},
                    [("granite_swa", "GraniteSWARMSNorm", False)]),
    "mixtral": ({**TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
                [("mixtral", "MixtralRMSNorm", False), ("mixtral", "MixtralTopKRouter", "router")]),
    "qwen3_moe": ({**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8,
                   "mlp_only_layers": [1], "norm_topk_prob": True},
                  [("qwen3_moe", "Qwen3MoeRMSNorm", False), ("qwen3_moe", "Qwen3MoeTopKRouter", "router-norm")]),
    "stablelm-seq": ({**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}}, []),
}
EXACT = 1e-12  # float64 round-off; never loosened


def _patched(model_type: str):
    restore = []
    for mod, cls, one_plus in FAMILIES[model_type][1]:
        m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        patch = {"layernorm": float64_layernorm, "router": lambda c: float64_router(c, None),
                 "router-norm": float64_router}.get(one_plus, lambda c: float64_norm(c, one_plus))
        restore.append(patch(getattr(m, cls)))
    return restore


@pytest.fixture(params=list(FAMILIES))
def family(request):
    restore = _patched(request.param)
    yield request.param
    for r in restore:
        r()


def test_family_exact_with_adamw_state_through_20_steps(tmp_path, family):
    cfg = FAMILIES[family][0]
    family = family.partition("-")[0]  # case name -> model_type
    r = lockstep(tmp_path, family, cfg)
    assert r["static"] < EXACT and r["lockstep_max"] < EXACT, r
    cb, cw = r["base_config"], r["wide_config"]
    assert cw["model_type"] == family
    width, heads = ("n_embd", "n_head") if "n_embd" in cb else ("hidden_size", "num_attention_heads")
    assert cw[width] == 2 * cb[width] and cw[heads] == 2 * cb[heads]
    if family == "cohere":  # a tied readout kept exact by its multiplier
        assert cw["logit_scale"] == cb["logit_scale"] / 2 and cw["tie_word_embeddings"] == cb["tie_word_embeddings"]


def test_family_noise_is_its_own_init(tmp_path, family):
    check_noise(noise_vs_init(tmp_path, family.partition("-")[0], FAMILIES[family][0]))


def test_smollm3_tied_needs_untie(tmp_path):
    """SmolLM3 ties lm_head to the embeddings by default: refused in one line, exact with --untie."""
    from hf_lockstep import load, rel
    base = build("smollm3", {**FAMILIES["smollm3"][0], "tie_word_embeddings": True})
    base.save_pretrained(tmp_path / "base")
    r = widen_cli(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--untie" in r.stderr, r.stderr
    assert not (tmp_path / "wide").exists()
    restore = _patched("smollm3")
    try:
        widen_cli(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--untie")
        x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert rel(base.eval()(x).logits, load(tmp_path / "wide").eval()(x).logits) < EXACT
    finally:
        for f in restore:
            f()


# case -> (model_type, tiny config, words the one-line refusal must hold besides "model_type <model_type>")
REFUSED = {
    "stablelm-qk-layernorm": ("stablelm", {**TINY, "qk_layernorm": True}, ["qk_layernorm", "norms.{h}"]),
    "falcon-alibi": ("falcon", {**TINY, "alibi": True, "multi_query": False}, ["alibi", "slope"]),
    "falcon-multi-query": ("falcon", {**TINY, "multi_query": True}, ["multi_query", "one key/value head"]),
    "gpt_bigcode-multi-query": ("gpt_bigcode", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     multi_query=True, bos_token_id=0, eos_token_id=0),
                                ["multi_query", "one key/value head"]),
    "minicpm3-no-base": ("minicpm3", {**FAMILIES["minicpm3"][0], "config_json": {"dim_model_base": None}},
                         ["dim_model_base null"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_family_refused_in_one_line_naming_model_type(tmp_path, case):
    import json
    model_type, cfg, words = REFUSED[case]
    edit = cfg.pop("config_json", {}) if "config_json" in cfg else {}
    build(model_type, cfg, dtype=torch.float32).save_pretrained(tmp_path / "base")
    if edit:  # values save_pretrained never writes (a hand-edited config.json)
        c = json.loads((tmp_path / "base" / "config.json").read_text())
        (tmp_path / "base" / "config.json").write_text(json.dumps({**c, **edit}))
    for extra in ([], ["--untie"]):
        r = widen_cli(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", *extra, check=False)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mupscale: error: "), r.stderr
        assert f"model_type {model_type}" in lines[0] and all(w in lines[0] for w in words), lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("saved,why", [
    ("[a, b]", "mapping PARAMETER_NAME"),
    ("{a: a}", "two different names"),
    ("{a: x, b: x}", "each file name once"),
    ("{a: b, b: c}", "both a parameter and a file name"),
    ("{'l.{i}.g': 'm.g'}", "same {word} placeholders"),
    ("{'l.*.g': 'm.*.g'}", "no '\\*'"),
])
def test_saved_as_is_checked(saved, why):
    from mupscale_cli.core.spec import parse_spec
    from mupscale_cli.errors import MupscaleError
    with pytest.raises(MupscaleError, match=why):
        parse_spec(f"name: s\nsaved_as: {saved}\ntensors:\n  w: [d]\n", "s.yaml")


def test_saved_as_maps_both_ways_per_layer():
    from mupscale_cli.core.spec import parse_spec, saved_name
    spec = parse_spec("name: s\nsaved_as: {'l.{i}.mlp.gate.weight': 'l.{i}.moe.gate.weight', a: b}\n"
                      "tensors:\n  w: [d]\n", "s.yaml")
    assert saved_name(spec, "l.12.mlp.gate.weight") == "l.12.moe.gate.weight"
    assert saved_name(spec, "l.12.moe.gate.weight", reverse=True) == "l.12.mlp.gate.weight"
    assert saved_name(spec, "a") == "b" and saved_name(spec, "b", reverse=True) == "a"
    assert saved_name(spec, "l.x.mlp.gate.weight") == "l.x.mlp.gate.weight"  # {i} is a layer index only
    assert saved_name(spec, "l.1.mlp.gate.weightX") == "l.1.mlp.gate.weightX"


def test_mixtral_trainer_checkpoint_state_by_model_names(tmp_path):
    """A Trainer-style optimizer.pt (no names: mupscale takes them from the model transformers builds) of Mixtral:
    the fused experts and the renamed router are matched, widened, and the output names them as the model does."""
    restore = _patched("mixtral")
    try:
        r = lockstep(tmp_path, "mixtral", FAMILIES["mixtral"][0], steps=5, trainer=True)
    finally:
        for f in restore:
            f()
    assert r["static"] < EXACT and r["lockstep_max"] < EXACT, r
    sd = torch.load(tmp_path / "wide" / "optimizer.pt", weights_only=True)
    names = {n for g in sd["param_groups"] for n in g["param_names"]}
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.gate.weight"} <= names
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "mupscale_cli", "inspect", str(tmp_path / "base"), "--k", "2"],
                       capture_output=True, text=True)  # its optimizer groups' factors (was an internal error)
    assert r.returncode == 0 and "41 tensors" in r.stdout, r.stderr[-400:]


def test_moe_router_is_a_readout(tmp_path):
    """The router ([experts, hidden]) reads a fixed expert axis from the width: duplicated and divided by k, so
    its logits, the experts chosen and their weights do not change."""
    from safetensors.torch import load_file
    build("mixtral", FAMILIES["mixtral"][0], dtype=torch.float32).save_pretrained(tmp_path / "base")
    widen_cli(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("base", "wide"))
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(b[gate], a[gate].repeat_interleave(2, 1) / 2)


@pytest.mark.parametrize("key", ["state_only", "state"])
def test_state_flags_are_booleans(key):
    from mupscale_cli.core.spec import parse_spec
    from mupscale_cli.errors import MupscaleError
    with pytest.raises(MupscaleError, match=f"'{key}' must be true or false"):
        parse_spec(f"name: s\ntensors:\n  w: {{axes: [d], {key}: 1}}\n", "s.yaml")


def test_a_forced_spec_never_widens_another_layout(tmp_path):
    """--spec NAME on a Hugging Face directory whose config.json contradicts the spec's markers (a multi_query
    Falcon forced through the multi-head spec, whose shapes happen to fit): one line, exit 2, nothing written;
    a refusing spec given by name still refuses."""
    build("falcon", {**TINY, "multi_query": True}, dtype=torch.float32).save_pretrained(tmp_path / "base")
    for spec, words in (("hf-falcon-mha", ["--spec hf-falcon-mha", "multi_query True", "omit --spec"]),
                        ("hf-falcon-mq", ["model_type falcon with multi_query"]),
                        ("hf-llama", ["--spec hf-llama", "model_type 'falcon'"])):
        r = widen_cli(tmp_path / "base", "--k", "2", "-o", tmp_path / "wide", "--spec", spec, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    build("falcon", {**TINY, "multi_query": False, "alibi": False}, dtype=torch.float32).save_pretrained(
        tmp_path / "mha")
    widen_cli(tmp_path / "mha", "--k", "2", "-o", tmp_path / "wide", "--spec", "hf-falcon-mha")  # its own: fine
