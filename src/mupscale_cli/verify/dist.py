"""`mupscale verify` under torchrun: BASE and WIDE sharded with FSDP2 (`fully_shard`) across the ranks.

Every rank builds both models and optimizers as the single-process verify does (from any input, DCP
included), then `shard` wraps each model with `fully_shard` and rebuilds its optimizer over the sharded
parameters, loading the same state with `set_optimizer_state_dict(full_state_dict=True)` (each rank keeps
its shard). Every rank trains on the same batch, so FSDP2's gradient average is the single-process
gradient, and the figures are those of the single-process verify; tensor comparisons gather the shards
(`DTensor.full_tensor`, a collective every rank joins). gloo on CPU, NCCL on GPUs (one per rank)."""
from __future__ import annotations

import torch
from torch import nn


def dist_env(device: str) -> tuple[int, int]:
    """(rank, world size); with WORLD_SIZE > 1 the process group is started (gloo, or NCCL for cuda, each
    rank on GPU LOCAL_RANK): its environment checked, its rendezvous bounded (mupscale_cli.procgroup)."""
    from mupscale_cli.procgroup import check_env, start
    _, world, local = check_env()
    if world <= 1:
        return 0, 1
    cuda = device.startswith("cuda")
    return start("nccl" if cuda else "gloo", (local or 0) if cuda else None)


def full(t):
    """The whole tensor of a DTensor (collective), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`model` sharded with FSDP2 (one group: tied weights stay tied) and an optimizer of the same class,
    groups and state over its sharded parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    osd = opt.state_dict()
    whole: dict = {"state": {}, "param_groups": []}
    for g, ns in zip(osd["param_groups"], fqns):
        whole["param_groups"].append({**{k: v for k, v in g.items() if k not in ("params", "param_names")},
                                      "params": ns})
        for pid, n in zip(g["params"], ns):
            if pid in osd["state"]:
                whole["state"][n] = osd["state"][pid]
    for m in model.modules():  # mup's readouts read width_mult from the parameter's infshape, which the
        wm = getattr(m, "width_mult", None)  # sharded and gathered parameters do not carry: keep the value
        if callable(wm) and hasattr(getattr(m, "weight", None), "infshape"):
            m.width_mult = (lambda v=wm(): v)
    fully_shard(model)
    params = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k in opt.defaults}, "params": [params[n] for n in ns]}
              for g, ns in zip(opt.param_groups, fqns)]
    new = type(opt)(groups)
    set_optimizer_state_dict(model, new, whole, options=StateDictOptions(full_state_dict=True))
    return model, new
