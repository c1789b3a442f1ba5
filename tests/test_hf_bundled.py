"""Issue 18 §3 for the Hugging Face families bundled before issue 18 (hf-llama: Llama, Mistral, Qwen2, Qwen3;
hf-granite; hf-gpt2; hf-gemma is in test_hf_families.py): trajectory, not just the first logits. Each family as a
Trainer checkpoint (AdamW, decay / no-decay groups as the Trainer builds them, no names stored), widened k = 2 by
the `mupscale` subprocess, loaded with from_pretrained and the widened optimizer state, then 20 AdamW steps in
float64 lockstep beside the base (RMSNorm in float64, where transformers forces float32): relative logit gap
<= 1e-12 at every step. And the noise of `--sigma` against the family's own init of each tensor (_init_weights:
initializer_range, GPT-2's c_proj / sqrt(2 n_layer)). Harness: tests/hf_lockstep.py."""
from __future__ import annotations

import importlib

import pytest
import torch

from hf_lockstep import check_noise, float64_norm, lockstep, noise_vs_init

torch.set_num_threads(1)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=None, bos_token_id=0, eos_token_id=0,
            tie_word_embeddings=False)
# family (model_type) -> (tiny config, [(modeling module, RMSNorm class)] that transformers computes in float32)
BUNDLED = {
    "llama": (TINY, [("llama", "LlamaRMSNorm")]),
    "mistral": (TINY, [("mistral", "MistralRMSNorm")]),
    "qwen2": (TINY, [("qwen2", "Qwen2RMSNorm")]),  # q/k/v biases
    # head_dim given by config.json and not hidden_size / heads (= 8): the spec's size must come from the file
    "qwen3": ({**TINY, "head_dim": 16}, [("qwen3", "Qwen3RMSNorm")]),
    # tied, μP readout: logits_scaling grows by k
    "granite": ({**TINY, "embedding_multiplier": 3.0, "attention_multiplier": 0.1, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0, "tie_word_embeddings": True}, [("granite", "GraniteRMSNorm")]),
    "gpt2": (dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False), []),  # LayerNorm
}
EXACT = 1e-12  # float64 round-off; never loosened


@pytest.fixture(params=list(BUNDLED))
def family(request):
    restore = [float64_norm(getattr(importlib.import_module(f"transformers.models.{m}.modeling_{m}"), cls))
               for m, cls in BUNDLED[request.param][1]]
    yield request.param
    for r in restore:
        r()


def test_trainer_checkpoint_widened_trains_in_lockstep(tmp_path, family):
    cfg = BUNDLED[family][0]
    r = lockstep(tmp_path, family, cfg, trainer=True)
    assert r["static"] < EXACT and r["lockstep_max"] < EXACT, r
    cb, cw = r["base_config"], r["wide_config"]
    width, heads = ("n_embd", "n_head") if family == "gpt2" else ("hidden_size", "num_attention_heads")
    assert cw["model_type"] == family and cw[width] == 2 * cb[width] and cw[heads] == 2 * cb[heads]
    if "head_dim" in cfg:
        assert cw["head_dim"] == cb["head_dim"] == cfg["head_dim"]
    if family == "granite":
        assert cw["logits_scaling"] == 2 * cb["logits_scaling"] and cw["tie_word_embeddings"] is True


def test_noise_is_the_familys_own_init(tmp_path, family):
    figures = noise_vs_init(tmp_path, family, BUNDLED[family][0])
    check_noise(figures)
    if family == "gpt2":  # the residual projections' own std: initializer_range / sqrt(2 n_layer)
        n = "transformer.h.0.mlp.c_proj.weight"
        assert abs(figures[n][0] / (0.02 / 2) - 1) < 0.15, figures[n]
