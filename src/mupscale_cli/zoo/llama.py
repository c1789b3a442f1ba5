"""μP Llama-style decoder with Hugging Face parameter names.

RMSNorm, SwiGLU MLP, rotary embeddings (rotate-half), grouped-query attention (query head h reads kv
head h // (n_heads // n_kv_heads)), causal, no biases, untied `lm_head` (`mup.MuReadout`, bias=False).
Attention scale is μP's 1/head_dim. head_dim = hidden_size // num_attention_heads.

model_args: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads (default: num_attention_heads), max_position_embeddings, rope_theta, rms_norm_eps.
The spec `configs/llama-mup.yaml` widens by duplicating whole heads (and whole query groups), which keeps
head_dim and hence RoPE and the attention scale unchanged.
"""
import mup
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DEFAULT_ARGS = {"vocab_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 16,
                "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
WIDTH_ARGS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
MAX_BATCH_SEQ = 64  # synthetic batches use min(max_position_embeddings, this) tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        d, self.n_head = a["hidden_size"], a["num_attention_heads"]
        self.n_kv = a.get("num_key_value_heads", self.n_head)
        assert self.n_head % self.n_kv == 0, "num_key_value_heads must divide num_attention_heads"
        self.head_dim = d // self.n_head
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        g = self.n_head // self.n_kv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        d, f = a["hidden_size"], a["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a["hidden_size"], a["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(a["hidden_size"], a["rms_norm_eps"])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(a["vocab_size"], a["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a["num_hidden_layers"]))
        self.norm = RMSNorm(a["hidden_size"], a["rms_norm_eps"])


class Llama(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.max_pos = a["max_position_embeddings"]
        self.rope_theta = a["rope_theta"]
        self.head_dim = a["hidden_size"] // a["num_attention_heads"]
        self.model = LlamaModel(a)
        self.lm_head = mup.MuReadout(a["hidden_size"], a["vocab_size"], bias=False)

    def rope(self, T: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        inv_freq = self.rope_theta ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        assert T <= self.max_pos, f"sequence length {T} > max_position_embeddings {self.max_pos}"
        x = self.model.embed_tokens(idx)  # (B, T, d)
        cos, sin = self.rope(T, x.dtype, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)


def build(model_args: dict, base_args: dict | None = None) -> nn.Module:
    """Llama for model_args with μP base shapes taken from base_args (default: model_args).

    A delta model with every width arg doubled (head_dim fixed) marks the width dimensions, so a width
    axis that is not widened (e.g. intermediate_size) stays a width dimension with multiplier 1.
    """
    args = {**DEFAULT_ARGS, **model_args}
    b = {**args, **(base_args or {})}
    model = Llama(args)
    with torch.device("meta"):  # only shapes are needed
        base, delta = Llama(b), Llama({**b, **{a: 2 * b[a] for a in WIDTH_ARGS if a in b}})
    return mup.set_base_shapes(model, base, rescale_params=True, delta=delta)


def batch(model_args: dict, batch_size: int, generator: torch.Generator,
          dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Random token ids (B, T) and next-token targets (B, T); tokens carry no dtype."""
    a = {**DEFAULT_ARGS, **model_args}
    T = min(a["max_position_embeddings"], MAX_BATCH_SEQ)
    tok = torch.randint(a["vocab_size"], (batch_size, T + 1), generator=generator)
    return tok[:, :-1], tok[:, 1:]


def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def output(model: nn.Module, inputs: Tensor) -> Tensor:
    return model(inputs)  # logits (B, T, vocab)
