"""Hugging Face causal LMs for `mupscale verify` on a Hugging Face directory: the model transformers builds
from the checkpoint's config.json (its model_args), trained on random tokens. Needs the [hf] extra.

transformers' RMSNorm computes in float32 even for float64 models: float64 agreement is capped near 1e-7
statically and grows over training (3e-6 after 60 AdamW steps, docs/formats.md 'Hugging Face'); pass verify --tol
accordingly (1e-5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mupscale_cli.errors import MupscaleError

SEQ = 16


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MupscaleError("verify on a Hugging Face directory builds the model with transformers: "
                            "pip install 'mupscale[hf]'") from None
    return transformers


def build(model_args: dict, base_args: dict | None = None) -> nn.Module:
    tf = _transformers()
    args = {k: v for k, v in model_args.items() if k not in ("model_type", "transformers_version", "architectures")}
    cfg = tf.AutoConfig.for_model(model_args["model_type"], **args)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.config.use_cache = False
    if getattr(cfg, "tie_word_embeddings", False):  # verify loads strict state dicts: the file has no alias
        model._keys_to_ignore_on_load_missing = None
    return _Strict(model)


class _Strict(nn.Module):
    """The HF model, whose state dict leaves a tied lm_head out (as save_pretrained does)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.tied = model.get_output_embeddings() is not None and (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight)

    def state_dict(self, *a, **kw):
        sd = self.model.state_dict(*a, **kw)
        return sd

    def load_state_dict(self, sd, strict: bool = True, assign: bool = False):
        if self.tied and "lm_head.weight" not in sd:
            sd = {**sd, "lm_head.weight": sd[next(n for n, p in self.model.named_parameters()
                                                  if p is self.model.get_input_embeddings().weight)]}
        return self.model.load_state_dict(sd, strict=strict, assign=assign)

    def named_parameters(self, *a, **kw):
        return self.model.named_parameters(*a, **kw)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(input_ids=idx).logits


def batch(model_args: dict, batch_size: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    vocab = model_args["vocab_size"]
    tok = torch.randint(vocab, (batch_size, SEQ + 1), generator=generator)
    return tok[:, :-1], tok[:, 1:]


def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def output(model: nn.Module, inputs: Tensor) -> Tensor:
    return model(inputs)
