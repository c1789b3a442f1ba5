"""Relative logit gap |wide - base| / |base| of every bundled Hugging Face family, widened k = 2 by
`mupscale widen DIR --k 2 -o OUT` (plus --untie where tied), in float32 and in float64 files, evaluated with
transformers' own modules and, for float64, also with RMSNorm computed in float64 (HF's RMSNorm computes in
float32 even for float64 models). Prints the 'Hugging Face' table of docs/formats.md.

    python scripts/hf_exactness.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_tiny import FAMILIES, TIED_SP, load, logits, make  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


def exact_rmsnorm(on: bool) -> None:
    """RMSNorm of the Llama-like families computed in the input's dtype (float64) instead of float32."""
    from transformers.models.gemma import modeling_gemma
    from transformers.models.granite import modeling_granite
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3
    saved = exact_rmsnorm.__dict__.setdefault("saved", {})
    for mod, cls in [(modeling_llama, "LlamaRMSNorm"), (modeling_mistral, "MistralRMSNorm"),
                     (modeling_qwen2, "Qwen2RMSNorm"), (modeling_qwen3, "Qwen3RMSNorm"),
                     (modeling_granite, "GraniteRMSNorm"), (modeling_gemma, "GemmaRMSNorm")]:
        c = getattr(mod, cls)
        saved.setdefault(c, c.forward)
        if not on:
            c.forward = saved[c]
        elif cls == "GemmaRMSNorm":
            c.forward = lambda self, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)
        else:
            c.forward = lambda self, x: self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) +
                                                                      self.variance_epsilon))


def gap(a, b) -> float:
    return float((a - b).norm() / a.norm())


def main() -> None:
    print("| family | float32 | float64, HF modules | float64, RMSNorm in float64 |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for fam in FAMILIES:
            row = []
            for dtype in (torch.float32, torch.float64):
                base_dir, wide_dir = Path(d) / f"{fam}-{dtype}", Path(d) / f"{fam}-{dtype}-wide"
                make(fam, base_dir, dtype=dtype)
                r = subprocess.run([sys.executable, "-m", "mupscale_cli", "widen", str(base_dir), "--k", "2", "-o",
                                    str(wide_dir), "-q", *(["--untie"] if fam in TIED_SP else [])],
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
                for exact in ([False] if dtype == torch.float32 else [False, True]):
                    exact_rmsnorm(exact)
                    row.append(gap(logits(load(base_dir, dtype)), logits(load(wide_dir, dtype))))
                exact_rmsnorm(False)
            print(f"| {fam}{' (--untie)' if fam in TIED_SP else ''} | " + " | ".join(f"{g:.1e}" for g in row) + " |")


if __name__ == "__main__":
    main()
