"""PyTorch `.pt` checkpoints (nanoGPT `ckpt.pt`, wrapped dicts, plain state dicts): read memory-mapped with
`torch.load(weights_only=True)`; written whole by `write.write_pt`."""
from __future__ import annotations

import zipfile
from pathlib import Path

from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.checkpoint import (MODEL_KEYS, OPTIM_KEYS, Checkpoint, _canonical, _is_state_dict,
                                             canonical_ids, check_tree,
                                             _torch_load)
from mupscale_cli.formats.write import write_pt as write  # noqa: F401

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def claims(path: Path) -> bool:
    return path.is_file() and (path.suffix in SUFFIXES or zipfile.is_zipfile(path))


def read(path: Path, lazy: bool = False) -> Checkpoint:
    """A `.pt` checkpoint, memory-mapped (`lazy` changes nothing: tensors are mapped, not read)."""
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
    check_tree({k: v for k, v in obj.items() if k != model_key}, str(path))  # entries beside the tensors
    kind = "nanogpt" if "model_args" in obj and model_key == "model" else "wrapped"
    optimizer = canonical_ids(obj.get(opt_key)) if opt_key else None
    return Checkpoint(path, kind, tensors, original, optimizer, extra, model_key, opt_key)


