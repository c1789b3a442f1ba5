"""Stand-in of EleutherAI/nanoGPT-mup's model.py (written from its conventions): nanoGPT plus
GPTConfig.init_std and mup_* fields; with mup_enabled: input × mup_input_alpha, tied readout of
x × mup_output_alpha / mup_width_multiplier, 1/head_dim attention, hidden init std
init_std/sqrt(multiplier) (c_proj init_std/sqrt(2 n_layer multiplier)); configure_optimizers -> three
groups: hidden matrices {weight_decay, lr_scale: 1/multiplier}, the other 2-D tensors {weight_decay,
lr_scale: 1}, 1-D tensors {weight_decay: 0, lr_scale: 1}. Its train.py sets, every iteration,
group['lr'] = lr * group.get('lr_scale', 1.0)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from tests.stacks.nanogpt_model import Block, LayerNorm

HIDDEN = ("c_attn.weight", "c_fc.weight", "c_proj.weight")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02
    mup_enabled: bool = False
    mup_disable_attention_scaling: bool = False
    mup_disable_hidden_lr_scaling: bool = False
    mup_width_multiplier: float = 1
    mup_input_alpha: float = 1
    mup_output_alpha: float = 1


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        mup_attn = config.mup_enabled and not config.mup_disable_attention_scaling
        scale = (lambda hd: 1.0 / hd) if mup_attn else None
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, scale) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        m = config.mup_width_multiplier
        for pn, p in self.named_parameters():
            if config.mup_enabled:
                if pn.endswith("c_attn.weight") or pn.endswith("c_fc.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(m))
                elif pn.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer * m))
            elif pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx, targets=None):
        c = self.config
        b, t = idx.size()
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(0, t, dtype=torch.long))
        if c.mup_enabled:
            x = x * c.mup_input_alpha
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if c.mup_enabled:
            x = x * (c.mup_output_alpha / c.mup_width_multiplier)
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type="cpu", impl=torch.optim.AdamW):
        """`impl`: AdamW as nanoGPT-mup builds it; the tests also run torch.optim.Adam over the same groups."""
        params = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        c = self.config
        if c.mup_enabled and not c.mup_disable_hidden_lr_scaling:
            hidden = [p for n, p in params.items() if p.dim() >= 2 and n.endswith(HIDDEN)]
            other = [p for n, p in params.items() if p.dim() >= 2 and not n.endswith(HIDDEN)]
            groups = [{"params": hidden, "weight_decay": weight_decay, "lr_scale": 1 / c.mup_width_multiplier},
                      {"params": other, "weight_decay": weight_decay, "lr_scale": 1},
                      {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1}]
        else:
            groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
        return impl(groups, lr=learning_rate, betas=betas)
