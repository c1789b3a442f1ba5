"""Stand-ins of microsoft/mup's examples (examples/Transformer, examples/MLP), as their scripts build them:
μP via mup (MuReadout / MuSharedReadout, base shapes from make_base_shapes), MuAdam / MuSGD over
model.parameters(). The Transformer keeps the example's traits that matter to widening: a sinusoidal
positional-encoding buffer `pos_encoder.pe` of shape [max_len, 1, d_model] (a buffer: not in a .bsh),
1/d attention, post-norm layers, an optional (tied) readout bias; sequence-first tensors [T, B, d]."""
from __future__ import annotations

import math
from pathlib import Path

import mup
import torch
import torch.nn as nn
import torch.nn.functional as F


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 64):
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        pos = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))  # [max_len, 1, d_model]

    def forward(self, x):  # x [T, B, d]
        return x + self.pe[:x.size(0), :]


class Layer(nn.Module):
    """Post-norm encoder layer; attention scores × attn_mult / head_dim (μP)."""

    def __init__(self, d: int, nhead: int, nhid: int, bias: bool, attn_mult: float = 1.0):
        super().__init__()
        self.nhead, self.attn_mult = nhead, attn_mult
        self.in_proj = nn.Linear(d, 3 * d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)
        self.linear1 = nn.Linear(d, nhid, bias=bias)
        self.linear2 = nn.Linear(nhid, d, bias=bias)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        for lin in (self.in_proj, self.out_proj, self.linear1, self.linear2):
            nn.init.normal_(lin.weight, std=(1 / lin.in_features) ** 0.5)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.in_proj.weight[:d].zero_()  # zero query (the example's μP recipe)

    def forward(self, x, mask):  # x [T, B, d]
        T, B, d = x.shape
        hd = d // self.nhead
        q, k, v = self.in_proj(x).split(d, dim=-1)
        q, k, v = (t.reshape(T, B * self.nhead, hd).transpose(0, 1) for t in (q, k, v))  # [B*h, T, hd]
        att = (q @ k.transpose(1, 2)) * (self.attn_mult / hd) + mask
        y = (att.softmax(-1) @ v).transpose(0, 1).reshape(T, B, d)
        x = self.norm1(x + self.out_proj(y))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class Transformer(nn.Module):
    def __init__(self, ntoken: int = 32, d: int = 16, nhead: int = 2, nhid: int = 32, nlayers: int = 2,
                 bias: bool = True, tied: bool = False, max_len: int = 64, output_mult: float = 1.0):
        super().__init__()
        self.pos_encoder = PositionalEncoding(d, max_len)
        self.encoder = nn.Embedding(ntoken, d)
        self.layers = nn.ModuleList(Layer(d, nhead, nhid, bias) for _ in range(nlayers))
        if tied:
            self.decoder = mup.MuSharedReadout(self.encoder.weight, bias=bias, output_mult=output_mult)
        else:
            self.decoder = mup.MuReadout(d, ntoken, bias=bias, output_mult=output_mult)
            nn.init.zeros_(self.decoder.weight)
            if bias:
                nn.init.zeros_(self.decoder.bias)

    def forward(self, src):  # src [T, B] token ids -> log-probs [T, B, ntoken]
        T = src.size(0)
        mask = torch.full((T, T), float("-inf"), dtype=self.encoder.weight.dtype).triu(1)
        x = self.pos_encoder(self.encoder(src))
        for layer in self.layers:
            x = layer(x, mask)
        return F.log_softmax(self.decoder(x), dim=-1)


class MLP(nn.Module):
    """The MLP example: fc_1 (3072 -> width), fc_2, MuReadout fc_3; biases optional."""

    def __init__(self, width: int = 16, d_in: int = 12, num_classes: int = 10, bias: bool = False,
                 output_mult: float = 1.0):
        super().__init__()
        self.fc_1 = nn.Linear(d_in, width, bias=bias)
        self.fc_2 = nn.Linear(width, width, bias=bias)
        self.fc_3 = mup.MuReadout(width, num_classes, bias=bias, output_mult=output_mult)
        nn.init.kaiming_normal_(self.fc_1.weight, a=1, mode="fan_in")
        nn.init.kaiming_normal_(self.fc_2.weight, a=1, mode="fan_in")
        nn.init.zeros_(self.fc_3.weight)

    def forward(self, x):
        return self.fc_3(torch.tanh(self.fc_2(torch.tanh(self.fc_1(x)))))


def build(kind: str, width: int, **kw) -> nn.Module:
    if kind == "transformer":
        return Transformer(d=width, nhid=2 * width, **kw)
    return MLP(width=width, **kw)


def make_bsh(kind: str, base_width: int, path: Path, **kw) -> Path:
    """A base-shape file as the examples write it (`make_base_shapes(base, delta, savefile)`)."""
    mup.make_base_shapes(build(kind, base_width, **kw), build(kind, 2 * base_width, **kw), savefile=str(path))
    return path


def model(kind: str, width: int, bsh: Path, dtype=torch.float64, **kw) -> nn.Module:
    """The example's model at `width`, base shapes set (before any load_state_dict: mup rescales then)."""
    m = build(kind, width, **kw)
    mup.set_base_shapes(m, str(bsh))
    return m.to(dtype)


def batch(kind: str, g: torch.Generator, dtype=torch.float64, ntoken: int = 32, T: int = 8, B: int = 4,
          d_in: int = 12):
    if kind == "transformer":
        x = torch.randint(0, ntoken, (T + 1, B), generator=g)
        return x[:-1], x[1:]
    return torch.randn(B * 2, d_in, generator=g, dtype=dtype), torch.randint(0, 10, (B * 2,), generator=g)


def loss(kind: str, m: nn.Module, x, y):
    out = m(x)
    if kind == "transformer":
        return F.nll_loss(out.reshape(-1, out.size(-1)), y.reshape(-1))
    return F.cross_entropy(out, y)


def optimizer(name: str, m: nn.Module, lr: float = None):
    """What the examples build: MuAdam / MuSGD over model.parameters()."""
    if name == "muadam":
        return mup.MuAdam(m.parameters(), lr=lr or 1e-2, eps=1e-4, weight_decay=1e-3)
    return mup.MuSGD(m.parameters(), lr=lr or 0.05, momentum=0.9, weight_decay=1e-4)
