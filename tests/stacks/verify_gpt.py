"""A nanoGPT-shaped model file, standing in for a user's own `model.py` in verify tests (our code, written
after reading karpathy/nanoGPT and EleutherAI/nanoGPT-mup; not theirs).

`GPT(GPTConfig(**model_args))`, nanoGPT's parameter names, tied `lm_head`/`wte`, MLP width 4 n_embd,
`forward(idx, targets=None) -> (logits, loss)` (logits of the last position only without targets).
`mup_base_n_embd = 0`: standard parametrization (stock nanoGPT: 1/sqrt(d) attention, plain tied readout).
`mup_base_n_embd = B`: μP with width multiplier n_embd / B derived from the widened n_embd (1/d attention,
readout input × 1/multiplier); `configure_optimizers` then makes nanoGPT-mup's 3 groups with `lr_scale`.
`mup_enabled = True` (nanoGPT-mup's own fields): the same μP model with the multiplier taken from
`mup_width_multiplier` and nanoGPT-mup's input/output alphas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = True
    mup_base_n_embd: int = 0  # 0: standard parametrization
    mup_enabled: bool = False  # nanoGPT-mup's fields
    mup_width_multiplier: float = 1.0
    mup_input_alpha: float = 1.0
    mup_output_alpha: float = 1.0
    mup_disable_attention_scaling: bool = False
    mup_disable_hidden_lr_scaling: bool = False

    @property
    def mup(self) -> bool:
        return self.mup_base_n_embd > 0 or self.mup_enabled


class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd, self.mup = c.n_head, c.n_embd, c.mup and not c.mup_disable_attention_scaling

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        hs = k.size(-1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / hs if self.mup else 1.0 / math.sqrt(hs))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]), ln_f=LayerNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        for n, p in self.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)

    @property
    def width_mult(self) -> float:
        c = self.config
        return c.n_embd / c.mup_base_n_embd if c.mup_base_n_embd else c.mup_width_multiplier if c.mup_enabled else 1.0

    def forward(self, idx, targets=None):
        t = idx.size(1)
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
        if self.config.mup_enabled:
            x = x * self.config.mup_input_alpha
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.config.mup:
            x = x * (self.config.mup_output_alpha / self.width_mult)  # μP readout: divides by the width multiplier
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type="cpu"):
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.config.mup and not self.config.mup_disable_hidden_lr_scaling:
            hidden = ("c_attn.weight", "c_fc.weight", "c_proj.weight")
            groups = [{"params": [(n, p) for n, p in named if p.dim() >= 2 and n.endswith(hidden)],
                       "weight_decay": weight_decay, "lr_scale": 1 / self.width_mult},
                      {"params": [(n, p) for n, p in named if p.dim() >= 2 and not n.endswith(hidden)],
                       "weight_decay": weight_decay, "lr_scale": 1},
                      {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1}]
        else:
            groups = [{"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def configure(model: GPT, config: dict) -> torch.optim.Optimizer:
    """The training script's optimizer, for `verify --optimizer FILE.py:configure`."""
    return model.configure_optimizers(config.get("weight_decay", 0.1), config.get("learning_rate", 1e-3),
                                      (config.get("beta1", 0.9), config.get("beta2", 0.95)))
