"""Python API: load a widened file back into a model state dict and an optimizer state dict.

    from mupscale_cli.api import load, optimizer_groups
    w = load("wide.safetensors")
    model.load_state_dict(w.model)                       # strict: tied aliases are present
    opt = torch.optim.AdamW(optimizer_groups(model, w.optimizer))
    opt.load_state_dict(w.optimizer)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mupscale_cli.formats import load_checkpoint
from mupscale_cli.formats.checkpoint import provenance_of
from mupscale_cli.errors import MupscaleError


@dataclass
class Widened:
    model: dict[str, torch.Tensor]
    optimizer: dict | None  # torch state_dict: ids in group order, groups with param_names
    kind: str | None  # sgd | adam | adamw
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # model_args, iter_num, ... of a nanoGPT input


def load(path: str | Path) -> Widened:
    """Read a `.safetensors` (or `.pt`) written by `mupscale widen`; tied aliases share storage."""
    ck = load_checkpoint(path)
    prov = provenance_of(ck)
    model = dict(ck.tensors)
    tied = prov.get("tied")
    for alias, canon in (tied if isinstance(tied, dict) else {}).items():
        if alias in model and canon in model:
            model[alias] = model[canon]
    kind = prov.get("optimizer")
    return Widened(model, ck.optimizer, kind, prov, {k: v for k, v in ck.extra.items() if k != "mupscale"})


def optimizer_groups(model: nn.Module, optimizer_sd: dict, names: list[list[str]] | None = None) -> list[dict]:
    """Param groups for a new optimizer that `load_state_dict(optimizer_sd)` accepts: the saved groups'
    hyper-parameters, with the model's parameters looked up by name: `names` per group, else the saved
    `param_names`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = []
    for i, g in enumerate(optimizer_sd["param_groups"]):
        if names is None and "param_names" not in g:
            raise MupscaleError("the optimizer state has no param_names; it was not written by mupscale "
                                "from a named checkpoint: rebuild groups by hand")
        ns = names[i] if names is not None else g["param_names"]
        missing = [n for n in ns if n not in params]
        if missing:
            raise MupscaleError(f"the model has no parameter {missing[0]!r} that the optimizer state names; is it "
                                f"the widened architecture?")
        drop = ("params",) if names is None else ("params", "param_names")  # given names replace saved ones
        groups.append({**{k: v for k, v in g.items() if k not in drop}, "params": [params[n] for n in ns]})
    return groups


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    """A torch optimizer of `kind` (sgd, adam, adamw) over `groups` (hyper-parameters per group)."""
    groups = [{k: v for k, v in g.items() if k != "decoupled_weight_decay"} for g in groups]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"])
    if kind in ("adam", "adamw"):
        return torch.optim.Adam(groups, lr=groups[0]["lr"], decoupled_weight_decay=kind == "adamw")
    raise MupscaleError(f"unknown optimizer kind {kind!r}")


def grad_scales(w: Widened | str | Path, spec: str | None = None) -> dict[str, tuple[float, int]]:
    """{parameter name: (gradient scale g, copies)} of a widened file, for
    `mupscale_cli.optim.clip_grad_norm_equivalent` (exact gradient clipping). Derived from the spec, k and
    sizes its provenance records and the widened shapes; `spec` (a name or file) when the spec is not bundled."""
    from mupscale_cli.core.clip import grad_scales as scales_of
    from mupscale_cli.core.plan import make_plan
    from mupscale_cli.core.spec import load_spec
    if not isinstance(w, Widened):
        w = load(w)
    prov = w.provenance or {}
    name = spec or prov.get("spec")
    k = prov.get("k")
    if not name or not isinstance(k, dict) or not k:
        raise MupscaleError("the file records no spec or k (not written by mupscale widen): gradient scales "
                            "cannot be derived; pass spec= and widen it with mupscale")
    tied = set((prov.get("tied") or {}))
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in w.model.items()}
    sizes = {n: v for n, v in (prov.get("sizes") or {}).items() if isinstance(v, int)}
    # the rules, k and block sizes fix every tensor's g and copies; the widened shapes are multiples of the blocks
    text = prov.get("spec_text")
    if spec is None and isinstance(text, str) and text:  # the output records its spec's text
        from mupscale_cli.core.spec import parse_spec
        sp = parse_spec(text, f"recorded:{name}", name=str(name))
    else:
        sp = load_spec(name)
    plan = make_plan(sp, shapes, dict(k), w.extra.get("model_args"), sizes, w.model)
    return {n: v for n, v in scales_of(plan).items() if n not in tied}
