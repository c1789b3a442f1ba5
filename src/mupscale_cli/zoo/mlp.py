"""The paper's μP MLP: ReLU, biases, `MuReadout` (mean readout)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mup import MuReadout, set_base_shapes
from torch import nn

DEFAULT_ARGS = {"d_in": 12, "d_out": 5, "width": 16, "depth": 3, "bias": True}


class MLP(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int, depth: int, bias: bool = True):
        super().__init__()
        self.input = nn.Linear(d_in, width, bias=bias)
        self.hidden = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(depth - 2))
        self.readout = MuReadout(width, d_out, bias=bias)

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        x = F.relu(self.input(x))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.readout(x)


def build(model_args: dict, base_args: dict | None = None) -> nn.Module:
    args = {**DEFAULT_ARGS, **model_args}
    base = {**args, **(base_args or model_args)}
    model = MLP(**args)
    with torch.device("meta"):  # shapes only: the base, and a delta that marks the width axes
        base_model, delta = MLP(**base), MLP(**{**base, "width": 2 * base["width"]})
    set_base_shapes(model, base_model, delta=delta)
    return model


def batch(model_args: dict, batch_size: int, generator: torch.Generator, dtype=torch.float32):
    """Gaussian inputs labelled by a fixed random two-layer teacher (a learnable, width-free task)."""
    args = {**DEFAULT_ARGS, **model_args}
    t = torch.Generator().manual_seed(1234)
    w1 = torch.randn(args["d_in"], 32, generator=t, dtype=torch.float64)
    w2 = torch.randn(32, args["d_out"], generator=t, dtype=torch.float64)
    x = torch.randn(batch_size, args["d_in"], generator=generator, dtype=torch.float64)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x.to(dtype), y


def loss(model: nn.Module, inputs, targets) -> torch.Tensor:
    return F.cross_entropy(model(inputs), targets)


def output(model: nn.Module, inputs) -> torch.Tensor:
    return model(inputs)
