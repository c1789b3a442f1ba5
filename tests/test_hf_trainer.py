"""Hugging Face Trainer checkpoints and float64 lockstep of a widened standard-parametrization Llama."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tiny import load, make, reload_trainer, step as _step, trainer_checkpoint
from mupscale_cli.api import optimizer_groups

os.environ["HF_HUB_OFFLINE"] = "1"


def widen(*args):
    r = subprocess.run([sys.executable, "-m", "mupscale_cli", "widen", *map(str, args), "-q"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def targs(out: Path, steps: int):
    from transformers import TrainingArguments
    return TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             weight_decay=0.1, adam_epsilon=1e-6, warmup_steps=2, save_steps=3, report_to=[],
                             use_cpu=True, logging_steps=1, seed=0, disable_tqdm=True)


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_trainer_checkpoint_resumes_widened(tmp_path):
    from transformers import Trainer
    base = make("llama", tmp_path / "model")
    t = Trainer(model=base, args=targs(tmp_path / "run", 6), train_dataset=Tokens())
    t.train()
    ck = tmp_path / "run" / "checkpoint-3"
    widen(ck, "--k", "2", "-o", tmp_path / "wide" / "checkpoint-3")
    out = tmp_path / "wide" / "checkpoint-3"
    for n in ("rng_state.pth", "training_args.bin", "trainer_state.json"):  # copied as bytes, never unpickled
        assert (out / n).read_bytes() == (ck / n).read_bytes()
    osd = torch.load(out / "optimizer.pt", weights_only=True)
    sched = torch.load(out / "scheduler.pt", weights_only=True)
    assert len(sched["base_lrs"]) == len(osd["param_groups"]) > 2  # split for per-tensor factors
    assert sorted(set(sched["base_lrs"])) == [5e-4, 1e-3]  # matrices and the summing readout: lr / k

    class WidenedTrainer(Trainer):  # docs/formats.md 'Trainer checkpoints': the groups of the widened optimizer.pt
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                sd = torch.load(out / "optimizer.pt", weights_only=True)
                self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, sd))
            return self.optimizer

    wide = load(out)
    w = WidenedTrainer(model=wide, args=targs(tmp_path / "wide", 6), train_dataset=Tokens())
    w.train(resume_from_checkpoint=str(out))
    assert w.state.global_step == 6
    lb, lw = losses(t), losses(w)
    assert {4, 5, 6} <= set(lw)
    for s in (4, 5, 6):  # the widened run continues the base run (float32)
        assert abs(lw[s] - lb[s]) <= 1e-4 * abs(lb[s]), (s, lw[s], lb[s])


def _float64_rmsnorm(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("norm,tol", [("float64", 1e-12), ("hf", 1e-5)])
def test_float64_lockstep_llama_adamw(tmp_path, monkeypatch, norm, tol):
    """A standard-parametrization Llama trained with AdamW, widened with its optimizer state, then trained
    60 more steps beside the base. With an RMSNorm computed in float64 the logits agree to round-off
    (measured 4e-14); HF's LlamaRMSNorm computes in float32 even for float64 models, and its round-off grows
    with training (measured 3.1e-6 after 60 steps): docs/formats.md, 'Hugging Face', tolerance 1e-5."""
    if norm == "float64":
        from transformers.models.llama import modeling_llama
        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _float64_rmsnorm)
    torch.manual_seed(0)
    base = make("llama", tmp_path / "model", dtype=torch.float64).train()
    decay = [n for n, p in base.named_parameters() if p.dim() >= 2]
    groups = [{"params": [p for n, p in base.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in base.named_parameters() if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, eps=1e-6)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(65)]

    def step(model, o, x):
        o.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        o.step()
    for x in batches[:5]:
        step(base, opt, x)
    ck = tmp_path / "checkpoint-5"
    base.save_pretrained(ck)
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    widen(ck, "--k", "2", "-o", tmp_path / "wide")
    wide = load(tmp_path / "wide", dtype=torch.float64).train()
    sd = torch.load(tmp_path / "wide" / "optimizer.pt", weights_only=True)
    wopt = torch.optim.AdamW(optimizer_groups(wide, sd))
    wopt.load_state_dict(sd)
    probe = batches[-1]
    worst = 0.0
    for x in batches[5:65]:
        step(base, opt, x)
        step(wide, wopt, x)
        with torch.no_grad():
            a, b = base(probe).logits, wide(probe).logits
        worst = max(worst, float((a - b).norm() / a.norm()))
    print(json.dumps({"norm": norm, "lockstep_steps": 60, "max_rel_logit_gap": worst}))
    assert worst < tol


def _float64_gemma_rmsnorm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_untied_gemma_with_optimizer_state_widens_exactly(tmp_path, monkeypatch):
    """Issue 17: Gemma's embedding carries k^-0.5 (sqrt(hidden_size) in its forward), so its exp_avg_sq moves by
    (k^-1 · k^0.5)^2 = 1/k. Squaring the float k^-0.5 as a Fraction made 106-bit integers torch could not take
    (OverflowError, or SIGABRT with the scan thread alive). Now exact: 20 AdamW steps in lockstep, float64."""
    from transformers.models.gemma import modeling_gemma
    monkeypatch.setattr(modeling_gemma.GemmaRMSNorm, "forward", _float64_gemma_rmsnorm)
    _, _, _, batches = trainer_checkpoint(tmp_path / "checkpoint-3", "gemma", tie_word_embeddings=False)
    widen(tmp_path / "checkpoint-3", "--k", "2", "-o", tmp_path / "wide")
    # both from disk: from_pretrained computes RoPE's inv_freq in float32, .to(float64) in memory does not
    base, opt, order = reload_trainer(tmp_path / "checkpoint-3")
    wide = load(tmp_path / "wide", dtype=torch.float64).train()
    sd = torch.load(tmp_path / "wide" / "optimizer.pt", weights_only=True)
    wopt = torch.optim.AdamW(optimizer_groups(wide, sd))
    wopt.load_state_dict(sd)
    emb = "model.embed_tokens.weight"
    ids = {n: i for g in sd["param_groups"] for i, n in zip(g["params"], g["param_names"])}
    b_sq = opt.state_dict()["state"][order.index(emb)]["exp_avg_sq"]
    w_sq = sd["state"][ids[emb]]["exp_avg_sq"]
    # vector-like (g = 1/k) times k^0.5: g² = 1/k exactly (a power of two here: no rounding at all)
    assert torch.equal(w_sq, (b_sq / 2).repeat_interleave(2, dim=1))
    probe = batches[-1]
    worst = 0.0
    for x in batches[:20]:
        _step(base, opt, x)
        _step(wide, wopt, x)
        with torch.no_grad():
            a, b = base(probe).logits, wide(probe).logits
        worst = max(worst, float((a - b).norm() / a.norm()))
    print(json.dumps({"family": "gemma-untied", "lockstep_steps": 20, "max_rel_logit_gap": worst}))
    assert worst < 1e-12
