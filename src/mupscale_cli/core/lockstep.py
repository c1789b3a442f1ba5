"""Train a base and a widened model on identical batches and measure how far apart they are."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from mupscale_cli.core.plan import Plan
from mupscale_cli.core.widen import widen


@dataclass
class StepDiff:
    step: int  # 0: before training; t: after t optimizer steps
    loss: float  # base model's training loss at this step (nan at step 0)
    loss_rel: float  # |loss_wide - loss_base| / |loss_base|
    out_abs: float  # max |out_wide - out_base| on a fixed evaluation batch (eval mode)
    out_rel: float  # out_abs / max |out_base|
    worst_tensor: str | None = None  # parameter/buffer furthest from the widened base (with a plan)
    worst_rel: float = 0.0
    hidden: dict[str, float] = field(default_factory=dict)  # per-module max relative difference

    @property
    def rel(self) -> float:
        """The function's distance: loss and outputs (tensors are a diagnostic, see norm_rel)."""
        return max(self.loss_rel, self.out_rel)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |a|) in float64."""
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).abs().max().item() if a.numel() else 0.0
    scale = a.abs().max().item() if a.numel() else 0.0
    return d, d / scale if scale > 0 else d


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a|| in float64 (normwise: a near-zero slice whose true gradient vanishes, such as
    attention key biases, only carries round-off that Adam normalises; it must not dominate)."""
    a, b = a.detach().double(), b.detach().double()
    n = a.norm().item()
    d = (a - b).norm().item()
    return d / n if n > 0 else d


def tensor_diffs(base: nn.Module, wide: nn.Module, plan: Plan) -> tuple[str | None, float]:
    """The tensor of `wide` furthest (normwise relative) from the exact widening of `base`'s."""
    bsd, wsd = base.state_dict(), wide.state_dict()
    worst, worst_rel = None, 0.0
    for n, p in plan.tensors.items():
        if n not in bsd or n not in wsd or p.alias_of or not bsd[n].is_floating_point():
            continue
        r = norm_rel(widen(bsd[n], p), wsd[n])
        if r > worst_rel:
            worst, worst_rel = n, r
    return worst, worst_rel


def _hidden_outputs(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    acts, hooks = {}, []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: acts.__setitem__(name, o) if isinstance(o, torch.Tensor) else None))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return acts


def _hidden_diffs(zoo: ModuleType, base, wide, inputs, plan: Plan | None) -> dict[str, float]:
    """Per leaf module: activations of the wide model against the base's duplicated along their last
    axis (the width axis of every activation in the zoo's models, when it differs in size)."""
    a = _hidden_outputs(base, lambda: zoo.output(base, inputs))
    b = _hidden_outputs(wide, lambda: zoo.output(wide, inputs))
    out = {}
    for n, x in a.items():
        y = b.get(n)
        if y is None or x.dim() != y.dim():
            continue
        if x.shape != y.shape:
            ax = next((i for i in range(x.dim()) if x.shape[i] != y.shape[i]), None)
            if ax is None or y.shape[ax] % x.shape[ax]:
                continue
            x = x.repeat_interleave(y.shape[ax] // x.shape[ax], dim=ax)
            if x.shape != y.shape:
                continue
        out[n] = rel_diff(x, y)[1]
    return out


def run_lockstep(zoo: ModuleType, args: dict, base: nn.Module, base_opt: torch.optim.Optimizer,
                 wide: nn.Module, wide_opt: torch.optim.Optimizer, steps: int, batch_size: int = 8,
                 seed: int = 0, dtype: torch.dtype = torch.float64, plan: Plan | None = None,
                 hidden: bool = False, data: Callable[[int], tuple] | None = None,
                 on_step: Callable[[StepDiff], bool] | None = None) -> list[StepDiff]:
    """Train both models on the same batches; after every step compare loss, eval outputs on a fixed
    batch and (with a plan) every tensor. `on_step` returning True stops early."""
    device = next(base.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    def get_batch(t: int):
        x, y = data(t) if data else zoo.batch(args, batch_size, gen, dtype)
        x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
        return x, y.to(device)

    xe, _ = get_batch(-1)
    diffs = []

    def measure(step: int, loss: float, loss_rel: float) -> bool:
        base.eval(), wide.eval()
        with torch.no_grad():
            o_abs, o_rel = rel_diff(zoo.output(base, xe), zoo.output(wide, xe))
            hid = _hidden_diffs(zoo, base, wide, xe, plan) if hidden else {}
        worst, worst_rel = tensor_diffs(base, wide, plan) if plan else (None, 0.0)
        d = StepDiff(step, loss, loss_rel, o_abs, o_rel, worst, worst_rel, hid)
        diffs.append(d)
        return bool(on_step and on_step(d))

    if measure(0, float("nan"), 0.0):
        return diffs
    for t in range(1, steps + 1):
        x, y = get_batch(t)
        losses = []
        for model, opt in ((base, base_opt), (wide, wide_opt)):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = zoo.loss(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().double())
        _, l_rel = rel_diff(losses[0], losses[1])
        if measure(t, losses[0].item(), l_rel):
            break
    return diffs
