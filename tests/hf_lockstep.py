"""Exactness of a bundled Hugging Face family, end to end (issue 18 §3): a tiny float64 model of the family
(transformers' own class, random weights, save_pretrained), trained a few AdamW steps, saved with its optimizer
state, widened by the installed `mupscale widen` (a subprocess), loaded back with from_pretrained, then trained
in lockstep beside the base. Norms that transformers computes in float32 even for float64 models are patched
to float64 in this process only (the widening never runs the model)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from mupscale_cli.api import optimizer_groups

VOCAB = 64


def widen_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "mupscale_cli", "widen", *map(str, args), "-q"], capture_output=True,
                       text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def float64_norm(cls, one_plus: bool = False):
    """Make an RMSNorm class compute in its input's dtype (transformers casts to float32): w * x / rms(x),
    or (1 + w) * x / rms(x) for Gemma's norms. Undo with the returned restore()."""
    old = cls.forward

    def forward(self, h):
        e = getattr(self, "variance_epsilon", None) or self.eps
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + e)
        return (1 + self.weight) * n if one_plus else self.weight * n
    cls.forward = forward
    return lambda: setattr(cls, "forward", old)


def float64_layernorm(cls):
    """Cohere's bias-free LayerNorm (transformers casts to float32) in its input's dtype."""
    old = cls.forward

    def forward(self, h):
        c = h - h.mean(-1, keepdim=True)
        return self.weight * (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    cls.forward = forward
    return lambda: setattr(cls, "forward", old)


def build(model_type: str, cfg: dict, dtype=torch.float64, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    # built in `dtype` (constants such as Gemma's embed_scale buffer are made in it, not rounded to float32 first)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype,
                                             experts_implementation="eager").to(dtype)
    with torch.no_grad():  # trained-looking norms and biases (init leaves them 1 and 0)
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def load(path: Path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                       experts_implementation="eager",
                                                       attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v}
    assert not bad, bad
    return model


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 12), generator=g) for _ in range(n)]


def _step(model, opt, x) -> None:
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def adamw(model, trainer: bool = False) -> torch.optim.AdamW:
    """AdamW over two groups, decay / no decay. trainer: as the Trainer builds them (its decay names, no names
    stored: mupscale takes them from the model); else named groups by dimension (param_names stored)."""
    named = list(model.named_parameters())
    if trainer:
        from transformers import Trainer
        decay = set(Trainer.get_decay_parameter_names(None, model))
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    else:
        groups = [{"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-3, eps=1e-6, betas=(0.9, 0.95))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def lockstep(tmp: Path, model_type: str, cfg: dict, pre: int = 3, steps: int = 20,
             widen_args: tuple = (), trainer: bool = False) -> dict:
    """Train `pre` AdamW steps, save model + optimizer.pt (named groups: decay / no decay), widen k=2, train
    both `steps` more steps on the same batches. Returns the figures: static and worst lockstep relative
    logit gap, config.json before and after."""
    base = build(model_type, cfg).train()
    opt = adamw(base, trainer)
    batches = _batches(pre + steps + 1)
    probe = batches[-1]
    for x in batches[:pre]:
        _step(base, opt, x)
    ck = tmp / "base"
    base.save_pretrained(ck)
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    widen_cli(ck, "--k", "2", "-o", tmp / "wide", *widen_args)
    wide = load(tmp / "wide").train()
    sd = torch.load(tmp / "wide" / "optimizer.pt", weights_only=True)
    wopt = torch.optim.AdamW(optimizer_groups(wide, sd))
    wopt.load_state_dict(sd)
    with torch.no_grad():
        static = rel(base(probe).logits, wide(probe).logits)
    worst = 0.0
    for x in batches[pre:pre + steps]:
        _step(base, opt, x)
        _step(wide, wopt, x)
        with torch.no_grad():
            worst = max(worst, rel(base(probe).logits, wide(probe).logits))
    cb, cw = (json.loads((tmp / d / "config.json").read_text()) for d in ("base", "wide"))
    out = {"family": model_type, "static": static, "lockstep_steps": steps, "lockstep_max": worst,
           "base_config": cb, "wide_config": cw, "wide_groups": len(sd["param_groups"])}
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_config")}))
    return out


def noise_vs_init(tmp: Path, model_type: str, cfg: dict, sigma: float = 0.5, widen_args: tuple = ()) -> dict:
    """Widen exactly and with --sigma; per tensor, the added noise's std / sigma against the std of the same
    tensor in a fresh model of the widened config, initialized by the family's own _init_weights.
    Returns {name: (noise std / sigma, fresh init std)}."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    base = build(model_type, cfg, dtype=torch.float32)
    base.save_pretrained(tmp / "nbase")
    widen_cli(tmp / "nbase", "--k", "2", "-o", tmp / "nexact", *widen_args)
    widen_cli(tmp / "nbase", "--k", "2", "--sigma", str(sigma), "--seed", "3", "-o", tmp / "nnoised", *widen_args)
    a, b = (load_file(tmp / d / "model.safetensors") for d in ("nexact", "nnoised"))
    cw = json.loads((tmp / "nexact" / "config.json").read_text())
    wcfg = {k: v for k, v in cw.items() if k not in ("model_type", "transformers_version", "architectures")}
    from transformers import AutoModelForCausalLM
    torch.manual_seed(5)  # saved, so its tensors carry the file's names (GPT-NeoX: lm_head saved as embed_out)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **wcfg)).save_pretrained(tmp / "nfresh")
    fresh = load_file(tmp / "nfresh" / "model.safetensors")
    base_sd = load_file(tmp / "nbase" / "model.safetensors")
    out = {}
    for n in a:
        noise = float((b[n].double() - a[n].double()).std()) / sigma if a[n].numel() > 1 else 0.0
        widened = n not in base_sd or base_sd[n].shape != a[n].shape
        # a tensor with no width axis is copied, never noised (nothing of it is new)
        out[n] = (noise, float(fresh[n].double().std()) if n in fresh and widened else float("nan"))
    return out


def check_noise(figures: dict, tol: float = 0.15) -> None:
    """Each widened tensor's noise std / sigma is the family's own init std of that tensor (within `tol`, sampling
    error of a few hundred draws); a tensor the family initializes to a constant (norm gains, zero biases), or
    one with no width axis, gets no noise."""
    for n, (noise, init) in figures.items():
        if init == 0.0 or math.isnan(init):
            assert noise == 0.0, (n, noise, init)
        else:
            assert abs(noise / init - 1) < tol, (n, noise, init)


def float64_router(cls, renormalize: str | None = "norm_topk_prob"):
    """Make a top-k MoE router compute its softmax in its input's dtype (transformers uses float32): softmax of
    x W^T, the top k probabilities, renormalized to sum 1 when `renormalize` is true on the module (or None:
    always, as Mixtral). Undo with the returned restore()."""
    old = cls.forward

    def forward(self, h):
        h = h.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(h, self.weight)
        top, idx = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if renormalize is None or getattr(self, renormalize):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, idx
    cls.forward = forward
    return lambda: setattr(cls, "forward", old)
