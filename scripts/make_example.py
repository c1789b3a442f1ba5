"""Make the bundled example: a tiny μP GPT (nanoGPT names and checkpoint layout) trained 40 steps with
mup's MuAdamW on a synthetic copy task. Deterministic; writes examples/nanogpt-tiny.pt."""
from __future__ import annotations

import sys
from pathlib import Path

import mup
import torch

from mupscale_cli.zoo import gpt

ARGS = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "bias": True, "vocab_size": 64, "dropout": 0.0}


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = gpt.build(ARGS)
    opt = mup.MuAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for it in range(40):
        x = torch.randint(0, ARGS["vocab_size"], (16, ARGS["block_size"]), generator=g)
        y = torch.roll(x, 1, dims=1)  # predict the previous token
        loss = gpt.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": ARGS,
                "iter_num": 40, "best_val_loss": loss.item(), "config": {"learning_rate": 3e-3, "parametrization": "mup"}}, out)
    print(f"{out}: loss after 40 steps {loss.item():.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/nanogpt-tiny.pt"))
