"""Hugging Face Trainer checkpoints (`checkpoint-N/`): the model directory plus optimizer.pt, scheduler.pt,
trainer_state.json, rng_state.pth and training_args.bin.

optimizer.pt and scheduler.pt are read with torch.load(weights_only=True); training_args.bin (a pickle) and
rng_state.pth are never loaded, only copied as bytes. The Trainer's optimizer has two groups (weight decay,
then none), each in `model.named_parameters()` order, and stores no names: the order is taken from the
model transformers builds from config.json on the meta device (no weights, no memory), and the decay split
from `Trainer.get_decay_parameter_names` itself, so this one path imports transformers (the [hf] extra).

Widening splits a group whose tensors need different Table-1 factors; the Trainer's own `create_optimizer`
makes two groups and cannot load that. Resume with the few lines of docs/formats.md 'Trainer checkpoints':
a `create_optimizer` that builds the groups from the widened optimizer.pt (`mupscale_cli.api.optimizer_groups`).
The scheduler's `base_lrs` and `_last_lr` become the widened groups' `initial_lr` and `lr`."""
from __future__ import annotations

from pathlib import Path

import torch

from mupscale_cli.bounded import shown
from mupscale_cli.errors import MupscaleError

OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign file: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MupscaleError(f"{path}: not loadable with torch.load(weights_only=True) ({first})") from None


def parameter_names(config: dict, where: Path) -> tuple[list[str], set[str]]:
    """(named_parameters() order, the names the Trainer decays) of the model config.json describes."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, Trainer
    except ImportError:
        raise MupscaleError(f"{where}: a Trainer checkpoint's optimizer ids follow the model's parameter order, "
                            f"which needs transformers: pip install 'mupscale[hf]'") from None
    kind = config.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise MupscaleError(f"{where / 'config.json'}: no model_type string ({shown(str(kind))}); the optimizer ids of a "
                            f"Trainer checkpoint follow the parameter order of the model config.json names")
    args = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        cfg = AutoConfig.for_model(kind, **args)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - transformers on a foreign config: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MupscaleError(f"{where / 'config.json'}: transformers cannot build model_type {shown(str(kind))} from it "
                            f"({type(e).__name__}: {first})") from None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return names, set(Trainer.get_decay_parameter_names(None, model))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_structure(sd, path: Path) -> None:
    """A torch optimizer state_dict: {"state": {id: {...}}, "param_groups": [{"params": [id, ...], ...}]}, every
    id an integer in exactly one group, every state entry keyed by one of them and a dict; `param_names`, where
    a group has them, one string per id; lr / initial_lr numbers."""
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) or not isinstance(sd.get("state"), dict):
        raise MupscaleError(f"{path}: not a torch optimizer state_dict (a dict with 'state' and 'param_groups')")
    seen: set[int] = set()
    for i, g in enumerate(sd["param_groups"]):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise MupscaleError(f"{path}: param group {i} is not a dict with a 'params' list (found "
                                f"{type(g).__name__}); not a torch optimizer state_dict")
        ids = g["params"]
        if not all(_is_int(x) for x in ids):
            raise MupscaleError(f"{path}: param group {i}'s params are not all integer ids; not a torch optimizer "
                                f"state_dict")
        twice = sorted({x for x in ids if ids.count(x) > 1} | (seen & set(ids)))
        if twice:
            raise MupscaleError(f"{path}: parameter id {twice[0]} appears twice in param_groups; not the state of "
                                f"one optimizer")
        seen |= set(ids)
        names = g.get("param_names")
        if names is not None and (not isinstance(names, list) or len(names) != len(ids)
                                  or not all(isinstance(n, str) for n in names)):
            raise MupscaleError(f"{path}: param group {i}'s param_names is not one name per parameter id")
        for h in ("lr", "initial_lr"):
            if h in g and not _is_real(g[h]):
                raise MupscaleError(f"{path}: param group {i}'s {h} is {type(g[h]).__name__}, not a number")
    stray = [k for k in sd["state"] if not _is_int(k) or k not in seen]
    if stray:
        raise MupscaleError(f"{path}: optimizer state for {len(stray)} id(s) in no param group (e.g. "
                            f"{shown(repr(stray[0]))}); not the state of one optimizer")
    bad = [k for k, v in sd["state"].items() if not isinstance(v, dict)]
    if bad:
        raise MupscaleError(f"{path}: the state of parameter id {bad[0]} is not a dict")


def read_optimizer(directory: Path, config: dict) -> dict | None:
    """optimizer.pt with `param_names` added to its groups (decay, then no decay, named_parameters order)."""
    path = directory / OPTIMIZER
    if not path.is_file():
        return None
    sd = _load(path)
    check_structure(sd, path)
    groups = sd["param_groups"]
    if all("param_names" in g for g in groups):
        return sd
    names, decay = parameter_names(config, directory)
    cand = [[n for n in names if n in decay], [n for n in names if n not in decay]]
    if len(groups) == 1:
        cand = [names]
    sizes = [len(g["params"]) for g in groups]
    if len(groups) > 2 or sizes != [len(c) for c in cand]:
        raise MupscaleError(f"{path}: groups of {sizes} parameters, the Trainer's decay/no-decay groups of this "
                            f"model have {[len(c) for c in cand]}; a custom create_optimizer: save its state with "
                            f"param_names (torch.optim.AdamW(model.named_parameters(), ...))")
    return {**sd, "param_groups": [{**g, "param_names": c} for g, c in zip(groups, cand)]}


def check_scheduler(sd, path: Path, base_groups: list[dict]) -> None:
    """scheduler.pt belongs to optimizer.pt: `base_lrs` are its groups' initial_lr, `_last_lr` their lr, one per
    group, and `last_epoch` an integer. Otherwise the scheduler was saved with another optimizer (or at another
    step), and the widened one would resume from learning rates the base never had."""
    if not isinstance(sd, dict) or not isinstance(sd.get("base_lrs"), list):
        raise MupscaleError(f"{path}: not an LR scheduler state_dict with a base_lrs list")
    if "last_epoch" in sd and not _is_int(sd["last_epoch"]):
        raise MupscaleError(f"{path}: last_epoch is {type(sd['last_epoch']).__name__}, not an integer")
    n = len(base_groups)
    for key, group_key in (("base_lrs", "initial_lr"), ("_last_lr", "lr")):
        if key not in sd:
            continue
        v = sd[key]
        if not isinstance(v, list) or len(v) != n or not all(_is_real(x) for x in v):
            raise MupscaleError(f"{path}: {key} is not a list of {n} numbers, one per param group of {OPTIMIZER}")
        for i, (x, g) in enumerate(zip(v, base_groups)):
            want = g.get(group_key)
            if want is None or not _is_real(want):
                continue
            a, b = float(x), float(want)
            if not (a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))):
                raise MupscaleError(f"{path}: {key}[{i}] is {a:g} but param group {i} of {OPTIMIZER} has "
                                    f"{group_key} {b:g}: scheduler.pt and optimizer.pt were not saved together "
                                    f"(resuming would change the learning rates); use the pair of one checkpoint")


def widen_scheduler(directory: Path, groups: list[dict], base_groups: list[dict]) -> dict:
    """scheduler.pt with base_lrs / _last_lr of the widened groups (their initial_lr and lr), once checked against
    the base's groups (`check_scheduler`)."""
    path = directory / SCHEDULER
    sd = _load(path)
    check_scheduler(sd, path, base_groups)
    out = dict(sd)
    out["base_lrs"] = [g.get("initial_lr", g["lr"]) for g in groups]
    if "_last_lr" in sd:
        out["_last_lr"] = [g["lr"] for g in groups]
    if isinstance(sd.get("lr_lambdas"), list):
        lams = sd["lr_lambdas"]
        if any(x is not None for x in lams) and len(set(map(repr, lams))) > 1:
            raise MupscaleError(f"{path}: per-group lr_lambdas with state differ; mupscale widens a scheduler whose "
                                f"groups share one lambda")
        out["lr_lambdas"] = [lams[0] if lams else None] * len(groups)
    return out
