"""Tiny random Hugging Face models, made with transformers and saved with save_pretrained (as a user would)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": COMMON,
    "mistral": COMMON,
    "qwen2": COMMON,  # q/k/v biases
    "qwen3": {**COMMON, "head_dim": 8},  # per-head q_norm/k_norm
    "gemma": {**COMMON, "head_dim": 8},  # embeddings × sqrt(hidden_size), tied
    "granite": {**COMMON, "embedding_multiplier": 3.0, "attention_multiplier": 0.1, "residual_multiplier": 0.5,
                "logits_scaling": 2.0, "tie_word_embeddings": True},
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
}
TIED_SP = {"gemma", "gpt2"}  # tied and standard parametrization: need --untie


def make(family: str, path: Path, dtype=torch.float32, shard: str | None = None, **over):
    """Save a random `family` model at `path`; returns the model (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(family, **{**FAMILIES[family], **over})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # trained-looking norms and biases (init leaves them 1 and 0)
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return model


def tokenizer(path: Path) -> None:
    """A tiny word-level tokenizer saved beside the model (tokenizer.json, tokenizer_config.json, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(63)} | {"[UNK]": 63}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def load(path: Path, dtype=torch.float32):
    """from_pretrained, asserting no missing, unexpected or resized keys."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, bad
    return model.eval()


def trainer_checkpoint(path: Path, family: str = "llama", steps: int = 3, sched: bool = True, **over):
    """A Trainer-style checkpoint made without running a Trainer (fast): save_pretrained (float64) beside
    optimizer.pt (AdamW, the Trainer's decay / no-decay groups in named_parameters order), scheduler.pt,
    trainer_state.json, rng_state.pth and training_args.bin. Returns (model, optimizer, scheduler, batches)."""
    from transformers import Trainer
    base = make(family, path, dtype=torch.float64, **over).train()
    decay = set(Trainer.get_decay_parameter_names(None, base))
    named = list(base.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, eps=1e-6)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(steps + 21)]
    for x in batches[:steps]:
        step(base, opt, x)
        sch.step()
    base.save_pretrained(path)
    torch.save(opt.state_dict(), path / "optimizer.pt")
    if sched:
        torch.save(sch.state_dict(), path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": []}))
    torch.save({"python": [1, 2]}, path / "rng_state.pth")
    (path / "training_args.bin").write_bytes(b"training arguments (a pickle: copied, never loaded)")
    return base, opt, sch, batches[steps:]


def reload_trainer(path: Path):
    """(model, AdamW with optimizer.pt loaded, parameter names in id order) of a trainer_checkpoint, from disk."""
    from transformers import Trainer
    model = load(path, dtype=torch.float64).train()
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    order = [n for n, _ in named if n in decay] + [n for n, _ in named if n not in decay]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if n in decay]},
                             {"params": [p for n, p in named if n not in decay]}])
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return model, opt, order


def step(model, o, x):
    o.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    o.step()
