"""A summing readout (standard parametrization, plain nn.Linear): the readout weight is divided by k,
its gradient is unchanged (s = 1/k, g = 1). A user spec file says so with `readout: sum`."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mupscale_cli.api import load, make_optimizer, optimizer_groups
from mupscale_cli.commands.widen import WidenOptions, run_widen
from mupscale_cli.verify.lockstep import run_lockstep

SPEC = """
name: sp-mlp
readout: {readout}
model_args: {{width: h}}
tensors:
  "0.weight": [h, null]
  "0.bias": [h]
  "2.weight": [h, h]
  "2.bias": [h]
  "4.weight": [null, h]
  "4.bias": [null]
"""


def build(args: dict, base_args: dict | None = None) -> nn.Module:
    w = args["width"]
    return nn.Sequential(nn.Linear(6, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 3))


def batch(args, n, g, dtype=torch.float32):
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


zoo = types.SimpleNamespace(build=build, batch=batch, output=lambda m, x: m(x),
                            loss=lambda m, x, y: F.cross_entropy(m(x), y))


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_summing_readout_is_exact(tmp, kind):
    args = {"width": 8}
    torch.manual_seed(0)
    base = build(args).double()
    hp = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3), "adam": dict(lr=1e-3, weight_decay=1e-2),
          "adamw": dict(lr=1e-3, weight_decay=0.1)}[kind]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    opt = cls(base.named_parameters(), **hp)
    run_lockstep(zoo, args, base, opt, base, opt, 3)  # a few steps of state
    torch.save({"model": base.state_dict(), "optimizer": opt.state_dict(), "model_args": args}, tmp / "b.pt")
    for readout, exact in [("mup", False), ("sum", True)]:  # static check first: lockstep trains base
        (tmp / "s.yaml").write_text(SPEC.format(readout=readout))
        out = tmp / f"{readout}.safetensors"
        run_widen(WidenOptions(checkpoint=tmp / "b.pt", output=out, k="4", spec=str(tmp / "s.yaml")))
        w = load(out)
        wide = build(w.extra["model_args"]).double()
        wide.load_state_dict(w.model)
        wopt = make_optimizer(w.kind, optimizer_groups(wide, w.optimizer))
        wopt.load_state_dict(w.optimizer)
        if exact:
            diffs = run_lockstep(zoo, args, base, opt, wide, wopt, 200)
            assert max(d.rel for d in diffs) <= 1e-12
        else:  # the wrong convention changes the function at once
            assert run_lockstep(zoo, args, base, opt, wide, wopt, 0)[0].out_rel > 0.1
