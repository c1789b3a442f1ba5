"""A torchtitan-style Llama3 job for the DCP tests, run under torchrun (FSDP2, gloo on CPU, float64).

    python titan_job.py base OUT_DIR TRAJ.pt --qkv fused|split [--steps 4] [--after 20]
        trains the model for --steps, saves it as torchtitan's CheckpointManager does, trains --after more
        steps and records the global loss and the logits of a probe batch at each step.
    python titan_job.py wide IN_DIR TRAJ.pt --qkv fused|split [--k 2] [--after 20]
        builds the model k times wider (dim, n_heads, n_kv_heads, hidden_dim; head_dim kept), loads IN_DIR as
        torchtitan resumes (model.load_state_dict(strict=False), the optimizer from its flattened state),
        trains --after steps on the same batches and records the same figures.

A stand-in that follows torchtitan's conventions (read from pytorch/torchtitan): module names
(tok_embeddings, layers.<i>.attention.qkv_linear, wo, feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm,
lm_head), 1/sqrt(head_dim) attention with GQA and RoPE, a summing lm_head (standard parametrization).
`--qkv fused` is FusedQKVLinear: one `wqkv` parameter whose rows are laid out per KV group as
[n_kv_heads, n_heads/n_kv_heads + 2, head_dim] (the group's query heads, its key head, its value head), and
state-dict hooks that save it as split wq/wk/wv and merge them back on load; the optimizer's state stays
keyed by `wqkv`. The checkpoint: the model's state dict at the top level (ModelWrapper), `optimizer` as
torchtitan's get_flat_optim_state_dict makes it (`state.<fqn>.<key>`, `param_groups.<fqn>.<hp>`, the optimizer
built from named parameters, one group per ParamGroupConfig pattern, first match wins), `lr_scheduler`
(last_epoch only), `dataloader`, `train_state`. The global batch is split evenly over the ranks."""
from __future__ import annotations

import argparse
import gc
import re
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate

VOCAB, DIM, N_HEADS, N_KV, HIDDEN, LAYERS, SEQ, BATCH = 32, 16, 4, 2, 24, 2, 8, 4
HEAD_DIM = DIM // N_HEADS
# OptimizersContainer's ParamGroupConfigs: one group per widening role (lr, eps, weight_decay scale by role)
GROUPS = [(r"^lm_head\.", {"lr": 0.02}), (r"(norm|tok_embeddings)\.", {"lr": 0.02}), (r".*", {"lr": 0.01})]
ADAMW = {"betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1}


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, T, heads, head_dim), pairs (2i, 2i+1) rotated by t / 10000^(2i/head_dim)."""
    b, t, h, d = x.shape
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
    ang = torch.arange(t, dtype=x.dtype)[:, None] * freq[None, :]  # (T, d/2)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).reshape(b, t, h, d)


class QKVLinear(nn.Module):
    """torchtitan's QKVLinear: three projections."""

    def __init__(self, dim: int, n_heads: int, n_kv: int):
        super().__init__()
        self.wq = nn.Linear(dim, n_heads * HEAD_DIM, bias=False)
        self.wk = nn.Linear(dim, n_kv * HEAD_DIM, bias=False)
        self.wv = nn.Linear(dim, n_kv * HEAD_DIM, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        return (self.wq(x).view(b, t, -1, HEAD_DIM), self.wk(x).view(b, t, -1, HEAD_DIM),
                self.wv(x).view(b, t, -1, HEAD_DIM))


class FusedQKVLinear(nn.Module):
    """torchtitan's FusedQKVLinear: one `wqkv`, rows per KV group [its query heads | its key | its value];
    saved as wq/wk/wv (state-dict post hook), merged back on load (load pre hook), as torchtitan does."""

    def __init__(self, dim: int, n_heads: int, n_kv: int):
        super().__init__()
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv) * HEAD_DIM, bias=False)
        self.hpk = n_heads // n_kv
        self.r = self.hpk + 2
        self.register_state_dict_post_hook(self._split_on_save)
        self.register_load_state_dict_pre_hook(self._merge_on_load)

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, -1, self.r, HEAD_DIM)
        q, k, v = torch.split(qkv, [self.hpk, 1, 1], dim=-2)
        return (q.reshape(b, t, -1, HEAD_DIM), k.reshape(b, t, -1, HEAD_DIM), v.reshape(b, t, -1, HEAD_DIM))

    @staticmethod
    def _split_on_save(module, state_dict, prefix, local_metadata) -> None:
        key = f"{prefix}wqkv.weight"
        if key not in state_dict:
            return
        w = state_dict.pop(key)
        if isinstance(w, DTensor):  # gathered so the n_kv-leading reshape is local; stays a DTensor
            w = w.redistribute(w.device_mesh, [Replicate()] * w.device_mesh.ndim)
        n_kv = w.shape[0] // (module.r * HEAD_DIM)
        w = w.reshape(n_kv, module.r, HEAD_DIM, w.shape[1])
        state_dict[f"{prefix}wq.weight"] = w[:, :module.hpk].reshape(-1, w.shape[-1]).contiguous()
        state_dict[f"{prefix}wk.weight"] = w[:, module.hpk].reshape(-1, w.shape[-1]).contiguous()
        state_dict[f"{prefix}wv.weight"] = w[:, module.hpk + 1].reshape(-1, w.shape[-1]).contiguous()

    @staticmethod
    def _merge_on_load(module, state_dict, prefix, *args) -> None:
        keys = [f"{prefix}{w}.weight" for w in ("wq", "wk", "wv")]
        if not all(k in state_dict for k in keys):
            return
        wq, wk, wv = (state_dict.pop(k) for k in keys)
        if isinstance(wq, DTensor):
            wq, wk, wv = (t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim) for t in (wq, wk, wv))
        n_kv, tail = wk.shape[0] // HEAD_DIM, wq.shape[1]
        parts = [wq.reshape(n_kv, module.hpk, HEAD_DIM, tail), wk.reshape(n_kv, 1, HEAD_DIM, tail),
                 wv.reshape(n_kv, 1, HEAD_DIM, tail)]
        state_dict[f"{prefix}wqkv.weight"] = torch.cat(parts, dim=1).reshape(-1, tail)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv: int, fused: bool):
        super().__init__()
        self.qkv_linear = (FusedQKVLinear if fused else QKVLinear)(dim, n_heads, n_kv)
        self.wo = nn.Linear(n_heads * HEAD_DIM, dim, bias=False)

    def forward(self, x):
        q, k, v = self.qkv_linear(x)
        q, k = rope(q), rope(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, heads, T, head_dim)
        rep = q.shape[1] // k.shape[1]  # query head h uses key/value head h // rep (enable_gqa)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # 1/sqrt(head_dim)
        return self.wo(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv, hidden, fused):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv, fused)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama3(nn.Module):
    def __init__(self, k: int, fused: bool):
        super().__init__()
        dim = DIM * k
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, N_HEADS * k, N_KV * k, HIDDEN * k, fused)
                                     for i in range(LAYERS)})
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.lm_head(self.norm(h))


# --- torchtitan's optimizer state conventions (components/optimizer/utils.py), written out -----------------

def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """OptimizersContainer: named parameters, each in the group of the first pattern it matches."""
    claimed, groups = set(), []
    for pattern, hp in GROUPS:
        rx = re.compile(pattern)
        named = [(n, p) for n, p in model.named_parameters() if n not in claimed and rx.search(n)]
        claimed.update(n for n, _ in named)
        groups.append({"params": [p for _, p in named], "param_names": [n for n, _ in named], **hp})
    return torch.optim.AdamW(groups, **ADAMW)


def init_optim_state(opt: torch.optim.Optimizer) -> None:
    """A zero-gradient, zero-lr step makes the state (torchtitan's init_optim_state)."""
    if opt.state:
        return
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def flat_optim_state(opt: torch.optim.Optimizer) -> dict:
    """get_flat_optim_state_dict: `state.<fqn>.<key>`, `param_groups.<fqn>.<hp>` (param_names dropped)."""
    sd = opt.state_dict()
    fqn = {}
    flat: dict = {}
    for g in sd["param_groups"]:
        fqn.update(zip(g["params"], g["param_names"]))
        for name in g["param_names"]:
            for key, v in g.items():
                if key not in ("params", "param_names"):
                    flat[f"param_groups.{name}.{key}"] = v
    for pid, st in sd["state"].items():
        for key, v in st.items():
            flat[f"state.{fqn[pid]}.{key}"] = v
    return flat


def load_flat_optim_state(opt: torch.optim.Optimizer, flat: dict) -> None:
    """load_flat_optim_state_dict: ids from the live groups, each group's hyper-parameters from its first fqn."""
    state, groups, pid = {}, [], 0
    for g in opt.param_groups:
        ids = []
        for name, p in zip(g["param_names"], g["params"]):
            ids.append(pid)
            if p in opt.state:
                state[pid] = {key: flat[f"state.{name}.{key}"] for key in opt.state[p]}
            pid += 1
        new = {"params": ids}
        for key in g:
            if key not in ("params", "param_names"):
                new[key] = flat[f"param_groups.{g['param_names'][0]}.{key}"]
        groups.append(new)
    opt.load_state_dict({"state": state, "param_groups": groups})


# --- the job ------------------------------------------------------------------------------------------------

def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    per = BATCH // world
    x = x[rank * per:(rank + 1) * per]
    return x[:, :-1], x[:, 1:]


PROBE = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def train(model, opt, sched, steps: int, start: int, rank: int, world: int, record: list | None = None):
    for s in range(start, start + steps):
        x, y = batch(s, rank, world)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if record is not None:
            total = loss.detach().clone()
            dist.all_reduce(total)
            with torch.no_grad():
                out = model(PROBE)
            record.append((float(total) / world, out.full_tensor() if isinstance(out, DTensor) else out.detach()))


def make(k: int, fused: bool):
    torch.manual_seed(0)
    model = Llama3(k, fused).double()
    for layer in model.layers.values():
        fully_shard(layer)
    fully_shard(model)
    opt = build_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    return model, opt, sched


def state(model, opt, sched, step: int) -> dict:
    """CheckpointManager's flat dict: the model at the top level, then the other states."""
    return {**model.state_dict(), "optimizer": flat_optim_state(opt), "lr_scheduler": {"last_epoch": sched.last_epoch},
            "dataloader": {"sample": step * BATCH}, "train_state": {"step": step}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["base", "wide"])
    ap.add_argument("ckpt")
    ap.add_argument("traj")
    ap.add_argument("--qkv", required=True, choices=["fused", "split"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--after", type=int, default=20)
    ap.add_argument("--k", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: list = []
    fused = a.qkv == "fused"
    if a.mode == "base":
        model, opt, sched = make(1, fused)
        train(model, opt, sched, a.steps, 0, rank, world)
        dcp.save(state(model, opt, sched, a.steps), checkpoint_id=a.ckpt)
        train(model, opt, sched, a.after, a.steps, rank, world, record)
    else:
        model, opt, sched = make(a.k, fused)
        init_optim_state(opt)  # CheckpointManager.load: the state exists before dcp.load fills it
        sd = state(model, opt, sched, 0)
        dcp.load(sd, checkpoint_id=a.ckpt)
        model.load_state_dict({k: v for k, v in sd.items() if k not in (
            "optimizer", "lr_scheduler", "dataloader", "train_state")}, strict=False)
        load_flat_optim_state(opt, sd["optimizer"])
        sched.last_epoch = sd["lr_scheduler"]["last_epoch"]  # torchtitan saves only this; the scheduler
        sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]  # restarts from the loaded groups
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        start = int(sd["train_state"]["step"])
        del sd  # DTensors: released before the process group
        train(model, opt, sched, a.after, start, rank, world, record)
    if rank == 0:
        torch.save({"loss": [r[0] for r in record], "out": torch.stack([r[1] for r in record]),
                    "lr": [g["lr"] for g in opt.param_groups], "world": world}, a.traj)
    # released while the process group is alive (tests/dcp_job.py: destructors after destroy_process_group
    # aborted a rank now and then)
    del model, opt, sched, record
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
