"""Print how far a widened model drifts from its base with gradient clipping active (float64, k = 2, the
nanoGPT-shaped μP stand-in of tests/stacks/verify_gpt.py, AdamW as its configure_optimizers builds it, C = 0.05):
torch's clip_grad_norm_ on both vs mupscale_cli.optim.clip_grad_norm_equivalent on the wide model.

    python scripts/clip_equivalence.py [--steps 200]
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402

from test_clip import lockstep  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for mode in ("plain", "equivalent"):
        with tempfile.TemporaryDirectory() as d:
            gap, active = lockstep(Path(d), mode, a.steps)
        print(f"{mode:10s} clipping active {active}/{a.steps} steps, max relative loss/logit gap {gap:.2e}")
