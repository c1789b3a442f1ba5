"""Hugging Face causal LMs for `mupscale verify` on a Hugging Face directory: the model transformers builds
from the checkpoint's config.json (its model_args), trained on random tokens. Needs the [hf] extra.

The tensors are loaded as `from_pretrained` loads the directory (they are written with the config to a temporary
directory and loaded from it): transformers' own weight conversion on load applies, so families that save
tensors under other names than the model's parameters load as they do for a user (GPT-NeoX's lm_head saved as
embed_out, Mixtral / Qwen3-MoE experts saved per expert and fused into 3-D parameters on load, Mixtral's router
saved as block_sparse_moe.gate). Loading is strict: a missing, unexpected, resized or unconvertible tensor is an
error. `state_dict()` gives the tensors back under the names save_pretrained writes (the file's).

transformers computes some steps in float32 even for float64 models (RMSNorm, Cohere's LayerNorm, the MoE
routers' softmax): with `float64_internals`, verify's float64 runs make those casts no-ops (docs/verify.md),
so float64 agreement is at round-off; without it, it is capped near 1e-7."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mupscale_cli.errors import MupscaleError

SEQ = 16


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MupscaleError("verify on a Hugging Face directory builds the model with transformers: "
                            "pip install 'mupscale[hf]'") from None
    return transformers


def _config(model_args: dict):
    tf = _transformers()
    args = {k: v for k, v in model_args.items() if k not in ("model_type", "transformers_version", "architectures")}
    cfg = tf.AutoConfig.for_model(model_args["model_type"], **args)
    cfg.use_cache = False
    return cfg


def build(model_args: dict, base_args: dict | None = None) -> nn.Module:
    tf = _transformers()
    model = tf.AutoModelForCausalLM.from_config(_config(model_args), attn_implementation="eager",
                                                experts_implementation="eager")
    return _Loaded(model)


@contextmanager
def _quiet():
    """from_pretrained without its progress bar and loading report (verify prints its own table)."""
    from transformers.utils import logging as tf_logging
    bar, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bar:
            tf_logging.enable_progress_bar()


class _Loaded(nn.Module):
    """The HF model; load_state_dict loads a save_pretrained-style state dict as from_pretrained does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def state_dict(self, *a, **kw):
        from transformers.core_model_loading import revert_weight_conversion
        return revert_weight_conversion(self.model, self.model.state_dict(*a, **kw))

    def load_state_dict(self, sd, strict: bool = True, assign: bool = False):
        old = self.model
        p = next(old.parameters())
        cls = type(old)
        with tempfile.TemporaryDirectory(prefix="mupscale-verify-") as tmp:
            from safetensors.torch import save_file
            old.config.save_pretrained(tmp)
            save_file({n: t.detach().to("cpu").clone().contiguous() for n, t in sd.items()},
                      str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            with _quiet():
                model, info = cls.from_pretrained(tmp, config=old.config, dtype=p.dtype, output_loading_info=True,
                                                  attn_implementation="eager", experts_implementation="eager")
        bad = {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items() if v}
        if strict and bad:
            what = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v))[:300]}" for k, v in bad.items())
            raise RuntimeError(f"Error(s) in loading state_dict for {cls.__name__} (as from_pretrained loads it): "
                               f"{what}")
        model.config.use_cache = False
        self.model = model.to(p.device).train(old.training)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    def named_parameters(self, *a, **kw):
        return self.model.named_parameters(*a, **kw)

    def forward(self, idx: Tensor) -> Tensor:
        if next(self.model.parameters()).dtype != torch.float64:
            return self.model(input_ids=idx).logits
        with _Float64Internals():
            return self.model(input_ids=idx).logits


class _Float64Internals(TorchFunctionMode):
    """In a float64 model's forward, transformers' casts of float64 tensors to float32 (RMSNorm's variance,
    Cohere's LayerNorm, the MoE routers' and attention's softmax(dtype=float32)) keep float64: those steps are
    computed in float32 so that half-precision training is stable, which in a float64 model rounds to float32
    and caps verify's agreement near 1e-7. Casts of other dtypes, and every other op, are unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        src = args[0] if args and isinstance(args[0], Tensor) else None
        if src is not None and src.dtype == torch.float64:
            if func is Tensor.float:
                return src
            if func in (Tensor.to, Tensor.type):
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def batch(model_args: dict, batch_size: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
    vocab = model_args["vocab_size"]
    tok = torch.randint(vocab, (batch_size, SEQ + 1), generator=generator)
    return tok[:, :-1], tok[:, 1:]


def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def output(model: nn.Module, inputs: Tensor) -> Tensor:
    return model(inputs)
