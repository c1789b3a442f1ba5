"""Reading checkpoints: nanoGPT `.pt`, plain state-dict `.pt`, `.safetensors` (ours included)."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mupscale_cli.errors import MupscaleError

PREFIXES = ("_orig_mod.", "module.")
MODEL_KEYS = ("model", "state_dict", "model_state_dict")
OPTIM_KEYS = ("optimizer", "optimizer_state_dict", "optim")
OPTIM_NS = "__optim__/"  # optimizer state tensors in our safetensors files: __optim__/<name>/<key>
META_OPTIM = "mupscale.optimizer"  # JSON: {"kind", "param_groups": [... "param_names" ...]}
META_PROV = "mupscale"  # JSON provenance
META_EXTRA = "mupscale.extra"  # JSON: other top-level entries of a .pt input (iter_num, config, ...)
META_DIGESTS = "mupscale.sha256"  # JSON: tensor name -> sha256 of its bytes (.pt: provenance "sha256")


@dataclass
class Checkpoint:
    path: Path
    kind: str  # nanogpt | wrapped | state_dict | safetensors
    tensors: dict[str, torch.Tensor]  # canonical (prefix-free) name -> tensor
    original: dict[str, str]  # canonical name -> key in the file
    optimizer: dict | None = None
    extra: dict = field(default_factory=dict)  # other top-level entries, kept for .pt output
    model_key: str | None = None
    optimizer_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def model_args(self) -> dict | None:
        args = self.extra.get("model_args")
        return args if isinstance(args, dict) else None

    def strip(self, name: str) -> str:
        return strip_prefix(name)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(t.shape), t.dtype) for n, t in self.tensors.items()}


def strip_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name.removeprefix(p), True
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_path(path: Path) -> None:
    if not path.exists():
        raise MupscaleError(f"{path}: no such file")
    if path.is_dir():
        raise MupscaleError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise MupscaleError(f"{path}: empty file")


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    _check_path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _load_pt(path)
    if len(head) == 8 and int.from_bytes(head, "little") < path.stat().st_size:
        return _load_safetensors(path)
    return _load_pt(path)


def _torch_load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        if glob is None:  # not a pickle we could read at all (random bytes, garbage)
            why = text.split("WeightsUnpickler error:")[1].strip().split("\n")[0][:160] if (
                "WeightsUnpickler error:" in text) else ""
            why = why or "not a pickle torch.load accepts"
            raise MupscaleError(f"{path}: not a readable PyTorch checkpoint (unpickling stopped: {why}); "
                                f"is it really a torch.save file?") from None
        found = f"it needs {glob.group(1)}"
        raise MupscaleError(f"{path}: refusing to unpickle: the checkpoint holds objects other than tensors "
                            f"and plain containers ({found}); re-save it as tensors with "
                            f"torch.save({{'model': model.state_dict(), 'optimizer': opt.state_dict()}}) "
                            f"or as .safetensors") from None
    except Exception as e:  # noqa: BLE001 - any failure of a foreign file is an input error
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        first = f"{type(e).__name__}: {first}" if len(first) < 12 else first
        raise MupscaleError(f"{path}: not a readable PyTorch checkpoint ({first}); is it really a torch.save "
                            f"file?") from None


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _canonical(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict]:
    tensors, original = {}, {}
    for key, t in sd.items():
        n = strip_prefix(key)
        if n in tensors:
            raise MupscaleError(f"{path}: tensors {original[n]!r} and {key!r} have the same name without "
                                f"their '_orig_mod.'/'module.' prefixes")
        tensors[n], original[n] = t, key
    return tensors, original


def _load_pt(path: Path) -> Checkpoint:
    obj = _torch_load(path)
    if _is_state_dict(obj):
        tensors, original = _canonical(obj, path)
        return Checkpoint(path, "state_dict", tensors, original)
    if not isinstance(obj, dict):
        raise MupscaleError(f"{path}: expected a dict (state dict or checkpoint), found {type(obj).__name__}")
    model_key = next((k for k in MODEL_KEYS if _is_state_dict(obj.get(k))), None)
    if model_key is None:
        raise MupscaleError(f"{path}: no model state dict found (looked for a tensor dict at the top level or "
                            f"under {', '.join(repr(k) for k in MODEL_KEYS)})")
    opt_key = next((k for k in OPTIM_KEYS if k in obj), None)
    tensors, original = _canonical(obj[model_key], path)
    extra = {k: v for k, v in obj.items() if k not in (model_key, opt_key)}
    kind = "nanogpt" if "model_args" in obj and model_key == "model" else "wrapped"
    return Checkpoint(path, kind, tensors, original, obj.get(opt_key) if opt_key else None, extra,
                      model_key, opt_key)


def _load_safetensors(path: Path) -> Checkpoint:
    from mupscale_cli.core.safetensors_io import LazySafetensors

    src = LazySafetensors(path)
    meta = src.metadata() or {}
    model, optim = {}, {}
    for name in src.names():
        if name.startswith(OPTIM_NS):
            pname, _, key = name.removeprefix(OPTIM_NS).rpartition("/")
            optim.setdefault(pname, {})[key] = src.get(name)
        else:
            model[name] = src.get(name)
    if not model:
        raise MupscaleError(f"{path}: holds no model tensors")
    tensors, original = _canonical(model, path)
    extra = {}
    if META_EXTRA in meta:
        extra = _json(meta[META_EXTRA], META_EXTRA, path)
    optimizer = None
    if META_OPTIM in meta:
        info = _json(meta[META_OPTIM], META_OPTIM, path)
        optimizer = _optimizer_from_names(info, optim, path)
    elif optim:
        raise MupscaleError(f"{path}: has optimizer tensors but no '{META_OPTIM}' metadata")
    return Checkpoint(path, "safetensors", tensors, original, optimizer, extra, metadata=meta)


def _json(text: str, key: str, path: Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise MupscaleError(f"{path}: metadata {key!r} is not valid JSON") from None


def _optimizer_from_names(info: dict, state_by_name: dict, path: Path) -> dict:
    """Rebuild a torch optimizer state_dict (ids in group order) from our name-keyed layout."""
    groups, state, nid = [], {}, 0
    try:
        for g in info["param_groups"]:
            ng = {k: v for k, v in g.items() if k != "param_names"}
            ng["params"] = []
            for n in g["param_names"]:
                if n in state_by_name:
                    state[nid] = state_by_name[n]
                ng["params"].append(nid)
                nid += 1
            ng["param_names"] = list(g["param_names"])
            groups.append(ng)
    except (KeyError, TypeError):
        raise MupscaleError(f"{path}: metadata '{META_OPTIM}' lacks param_groups/param_names") from None
    if "betas" in groups[0] if groups else False:
        for g in groups:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
