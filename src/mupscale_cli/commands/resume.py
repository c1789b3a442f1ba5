"""The few lines a training script needs to resume from a widened file whose optimizer groups were split
(Table 1 gives tensors of one group different factors): printed once by `widen`, under `resume` in --json."""
from __future__ import annotations

import re
from pathlib import Path

CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def patterns(names: list[str], most: int = 4) -> str:
    """Tensor names with layer indices folded ({i}), at most `most` of them, then how many more."""
    seen: list[str] = []
    for n in names:
        p = re.sub(r"(?<=\.)\d+(?=\.)", "{i}", n)
        if p not in seen:
            seen.append(p)
    more = f", … ({len(seen) - most} more)" if len(seen) > most else ""
    return ", ".join(seen[:most]) + more


def _hparams(g: dict) -> str:
    shown = [(h, g[h]) for h in ("lr", "eps", "weight_decay", "momentum")
             if isinstance(g.get(h), (int, float)) and not isinstance(g.get(h), bool)]
    return ", ".join(f"{h} {v:.3g}" for h, v in shown)


def resume_snippet(out: Path | str | None, kind: str | None, groups: list[dict] | None,
                   base_groups: int) -> str | None:
    """Paste-ready Python for an output whose optimizer state has more groups than the input's (None when
    the groups were not split, or for outputs that are not one .safetensors/.pt file)."""
    if out is None or not groups or kind not in CLASSES or len(groups) == base_groups:
        return None
    out = str(out)
    if out.endswith(".pt"):
        load = [f"ck = torch.load({out!r}, weights_only=True)", 'model.load_state_dict(ck["model"])',
                f'optimizer = torch.optim.{CLASSES[kind]}(optimizer_groups(model, ck["optimizer"]))',
                'optimizer.load_state_dict(ck["optimizer"])']
        imports = "from mupscale_cli.api import optimizer_groups"
    elif out.endswith(".safetensors"):
        load = [f"w = load({out!r})", "model.load_state_dict(w.model)",
                f"optimizer = torch.optim.{CLASSES[kind]}(optimizer_groups(model, w.optimizer))",
                "optimizer.load_state_dict(w.optimizer)"]
        imports = "from mupscale_cli.api import load, optimizer_groups"
    else:
        return None
    lines = [f"# resume: the widened optimizer state has {len(groups)} param groups (the input's had "
             f"{base_groups}), so an optimizer built as before will not load it. `model` is your model built at "
             f"the new width; optimizer_groups puts each of its parameters in the group the state names:",
             "import torch", imports, *load]
    for i, g in enumerate(groups):
        names = g.get("param_names") or []
        lines.append(f"# group {i} ({_hparams(g)}): {patterns(names)}" if names else f"# group {i}: empty")
    return "\n".join(lines)
