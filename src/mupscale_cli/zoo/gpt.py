"""μP GPT-2 in nanoGPT parameter names (the paper's): tied `MuSharedReadout`, attention scale 8/d.

`model_args` are nanoGPT's (n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout); the zoo
also accepts an optional `d_ff` (nanoGPT hard-wires 4 * n_embd) to test non-uniform widening.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from mup import MuSharedReadout, set_base_shapes
from torch import nn

DEFAULT_ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8, "bias": True,
                "vocab_size": 32, "dropout": 0.0}


class LayerNorm(nn.Module):
    def __init__(self, n: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, a: dict, attn: str):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head, self.n_embd = a["n_head"], a["n_embd"]
        hd = a["n_embd"] // a["n_head"]
        self.scale = 8.0 / hd if attn == "mup" else 1.0 / math.sqrt(hd)  # μP 1/d, or the usual 1/sqrt(d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        d_ff = a.get("d_ff") or 4 * a["n_embd"]
        self.c_fc = nn.Linear(a["n_embd"], d_ff, bias=a["bias"])
        self.c_proj = nn.Linear(d_ff, a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a: dict, attn: str):
        super().__init__()
        self.ln_1 = LayerNorm(a["n_embd"], a["bias"])
        self.attn = CausalSelfAttention(a, attn)
        self.ln_2 = LayerNorm(a["n_embd"], a["bias"])
        self.mlp = MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, a: dict, attn: str = "mup"):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]),
            wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            h=nn.ModuleList(Block(a, attn) for _ in range(a["n_layer"])),
            ln_f=LayerNorm(a["n_embd"], a["bias"]),
        ))
        self.lm_head = MuSharedReadout(self.transformer.wte.weight, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * a["n_layer"]))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build(model_args: dict, base_args: dict | None = None, attn: str = "mup") -> nn.Module:
    args = {**DEFAULT_ARGS, **model_args}
    base = {**args, **(base_args or model_args)}
    model = GPT(args, attn)
    wider = {**base, "n_embd": 2 * base["n_embd"]}
    if base.get("d_ff"):
        wider["d_ff"] = 2 * base["d_ff"]
    with torch.device("meta"):  # shapes only: the base, and a delta that marks the width axes
        base_model, delta = GPT(base, attn), GPT(wider, attn)
    set_base_shapes(model, base_model, delta=delta)
    return model


def configure_optimizers(model: nn.Module, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
    """nanoGPT's: AdamW with a decay group (dim >= 2) then a no-decay group, named_parameters() order."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def batch(model_args: dict, batch_size: int, generator: torch.Generator, dtype=torch.float32):
    a = {**DEFAULT_ARGS, **model_args}
    x = torch.randint(0, a["vocab_size"], (batch_size, a["block_size"]), generator=generator)
    y = torch.roll(x, 1, dims=1)  # predict the previous token: learnable through attention
    return x, y


def loss(model: nn.Module, inputs, targets) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def output(model: nn.Module, inputs) -> torch.Tensor:
    return model(inputs)
