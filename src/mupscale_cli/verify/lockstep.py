"""Train a base and a widened model on identical batches and measure how far apart they are."""
from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from mupscale_cli.core.plan import Plan
from mupscale_cli.core.widen import duplicate_dim, widen


@dataclass
class StepDiff:
    step: int  # 0: before training; t: after t optimizer steps
    loss: float  # base model's training loss at this step (nan at step 0)
    loss_rel: float  # |loss_wide - loss_base| / |loss_base|
    out_abs: float  # max |out_wide - out_base| on a fixed evaluation batch (eval mode); see `evaluated`
    out_rel: float  # out_abs / max |out_base|
    worst_tensor: str | None = None  # parameter/buffer furthest from the widened base (with a plan)
    worst_rel: float = 0.0
    hidden: dict[str, float] = field(default_factory=dict)  # per-module max relative difference
    train_out_rel: float = 0.0  # outputs of the training forward pass (train mode, this step's batch)
    evaluated: bool = True  # False: no eval-mode pass this step; out_abs/out_rel are the training outputs'

    @property
    def rel(self) -> float:
        """The function's distance: loss and outputs (tensors are a diagnostic, see norm_rel); NaN if any is
        NaN (Python's max keeps or drops a NaN by its position: a NaN output after a 0 loss gap passed)."""
        vals = (self.loss_rel, self.out_rel, self.train_out_rel)
        return math.nan if any(math.isnan(v) for v in vals) else max(vals)


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
    from mupscale_cli.verify.dist import full  # FSDP2 (verify under torchrun): gather the shards
    bsd, wsd = base.state_dict(), wide.state_dict()
    worst, worst_rel = None, 0.0
    for n, p in plan.tensors.items():
        if n not in bsd or n not in wsd or p.alias_of or not bsd[n].is_floating_point():
            continue
        r = norm_rel(widen(full(bsd[n]), p), full(wsd[n]))
        if not math.isnan(worst_rel) and not r <= worst_rel:  # a NaN is the worst (`r > worst` skipped it)
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


def _out_layout(mod: nn.Module, name: str, plan: Plan | None):
    """(output axis, DimPlan) of a leaf module whose weight has a plan: how its activation was widened."""
    p = plan.tensors.get(f"{name}.weight") if plan else None
    if p is None or not p.dims:
        return None
    if isinstance(mod, nn.Embedding) and len(p.dims) == 2:
        return -1, p.dims[1]
    if isinstance(mod, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return 1, p.dims[0]
    if isinstance(mod, nn.Linear) or len(p.dims) == 1:  # Linear (MuReadout too), LayerNorm, RMSNorm
        return -1, p.dims[0]
    return None


def _hidden_diffs(zoo: ModuleType, base, wide, inputs, plan: Plan | None) -> dict[str, float]:
    """Per leaf module, in forward order: max relative difference of the wide model's activation and
    the base's widened like the module's weight (its output axis duplicated by the weight's rule); modules
    without a weight rule: the first axis that differs in size, duplicated per coordinate."""
    a = _hidden_outputs(base, lambda: zoo.output(base, inputs))
    b = _hidden_outputs(wide, lambda: zoo.output(wide, inputs))
    mods = dict(base.named_modules())
    out = {}
    for n, x in a.items():
        y = b.get(n)
        if y is None or x.dim() != y.dim():
            continue
        lay = _out_layout(mods[n], n, plan)
        if lay is not None and lay[1].axis is not None:
            ax, d = lay
            ax = ax % x.dim()
            fits = sum(a for a, _ in d.segments) == x.shape[ax] if d.segments else x.shape[ax] % d.block == 0
            if x.shape[ax] * d.k == y.shape[ax] and fits:
                x = duplicate_dim(x, ax, d)
        elif x.shape != y.shape:
            ax = next((i for i in range(x.dim()) if x.shape[i] != y.shape[i]), None)
            if ax is None or y.shape[ax] % x.shape[ax]:
                continue
            x = x.repeat_interleave(y.shape[ax] // x.shape[ax], dim=ax)
        if x.shape != y.shape:
            continue
        out[n] = rel_diff(x, y)[1]
    return out


def _as_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def run_lockstep(zoo: ModuleType, args: dict, base: nn.Module, base_opt: torch.optim.Optimizer,
                 wide: nn.Module, wide_opt: torch.optim.Optimizer, steps: int, batch_size: int = 8,
                 seed: int = 0, dtype: torch.dtype = torch.float64, plan: Plan | None = None,
                 hidden: bool = False, data: Callable[[int], tuple] | None = None,
                 on_step: Callable[[StepDiff], bool] | None = None, eval_every: int = 1,
                 tensor_tol: float | None = None,
                 before_step: Callable[[int, int, nn.Module, torch.optim.Optimizer], None] | None = None
                 ) -> list[StepDiff]:
    """Train both models on the same batches; after every step compare the loss, the training forward
    pass's outputs and (with a plan) every tensor; the eval-mode outputs on a fixed batch (and, with
    `hidden`, every layer's activations) at step 0, every `eval_every` steps, at the last step, and at any
    step where a tensor is further than `tensor_tol` from the widened base. `on_step` returning True
    stops early. `before_step(t, i, model, opt)` runs between backward and `opt.step()` (i: 0 base, 1 wide):
    the training script's per-step rule (learning-rate schedule, gradient clipping)."""
    device = next(base.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    def get_batch(t: int):
        x, y = data(t) if data else zoo.batch(args, batch_size, gen, dtype)
        x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
        return x, y.to(device)

    xe, _ = get_batch(-1)
    diffs = []
    captured: dict[int, torch.Tensor] = {}
    capturing = [False]

    def capture(m, i, o):
        if capturing[0] and (t := _as_tensor(o)) is not None:
            captured[id(m)] = t.detach()

    hooks = [m.register_forward_hook(capture) for m in (base, wide)]

    def measure(step: int, loss: float, loss_rel: float, train_out: tuple[float, float] | None) -> bool:
        worst, worst_rel = tensor_diffs(base, wide, plan) if plan else (None, 0.0)
        evaluate = (train_out is None or step % max(1, eval_every) == 0 or step == steps
                    or (tensor_tol is not None and not worst_rel <= tensor_tol))
        hid = {}
        if evaluate:
            base.eval(), wide.eval()
            with torch.no_grad():
                o_abs, o_rel = rel_diff(zoo.output(base, xe), zoo.output(wide, xe))
                hid = _hidden_diffs(zoo, base, wide, xe, plan) if hidden else {}
        else:
            o_abs, o_rel = train_out
        d = StepDiff(step, loss, loss_rel, o_abs, o_rel, worst, worst_rel, hid,
                     train_out[1] if train_out else 0.0, evaluate)
        diffs.append(d)
        return bool(on_step and on_step(d))

    try:
        if measure(0, float("nan"), 0.0, None):
            return diffs
        for t in range(1, steps + 1):
            x, y = get_batch(t)
            losses = []
            captured.clear()
            capturing[0] = True
            for i, (model, opt) in enumerate(((base, base_opt), (wide, wide_opt))):
                model.train()
                opt.zero_grad(set_to_none=True)
                loss = zoo.loss(model, x, y)
                loss.backward()
                if before_step is not None:
                    before_step(t, i, model, opt)
                opt.step()
                losses.append(loss.detach().double())
            capturing[0] = False
            _, l_rel = rel_diff(losses[0], losses[1])
            ob, ow = captured.get(id(base)), captured.get(id(wide))
            train_out = rel_diff(ob, ow) if ob is not None and ow is not None and ob.shape == ow.shape else None
            if measure(t, losses[0].item(), l_rel, train_out):
                break
    finally:
        for h in hooks:
            h.remove()
    return diffs
