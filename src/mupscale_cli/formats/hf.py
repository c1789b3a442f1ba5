"""Hugging Face model directories: `config.json` + `model.safetensors` (or shards + index), tokenizer and
other files; a Trainer's `checkpoint-N/` adds `optimizer.pt`, `scheduler.pt`, `trainer_state.json`,
`rng_state.pth`, `training_args.bin`.

Reading: the weights through st.py / shards.py (lazy), `config.json` as the checkpoint's model_args (every
size comes from it). Writing: the widened weights, `config.json` rewritten, every other file copied as
bytes (never unpickled), into a temporary directory beside the target that is then renamed. No
transformers import: JSON and safetensors only."""
from __future__ import annotations

import json
import re
import shutil
from fnmatch import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mupscale_cli.bounded import shown
from mupscale_cli.errors import MupscaleError, one_line
from mupscale_cli.formats import shards, st
from mupscale_cli.formats.checkpoint import Checkpoint
from mupscale_cli.formats.target import atomic_dir, check_inside

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"


@dataclass
class HfDir:
    path: Path
    config: dict
    weights: list[str]  # file names of the weights (one file, or index + shards)
    others: list[str] = field(default_factory=list)  # every other file, copied as bytes
    trainer: bool = False  # a Trainer checkpoint (optimizer.pt / scheduler.pt / trainer_state.json)


def claims(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KiB; a larger one is not one


def read_config(path: Path) -> dict:
    from mupscale_cli.bounded import loads_json
    where = path / CONFIG
    try:
        if where.stat().st_size > MAX_CONFIG_BYTES:
            raise MupscaleError(f"{where}: {where.stat().st_size} bytes, more than a Hugging Face config holds "
                                f"(at most {MAX_CONFIG_BYTES})")
        config = loads_json(where.read_text(), str(where))  # bounded: depth and integer digits
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MupscaleError(f"{where}: not readable JSON ({e}); is it a Hugging Face config?") from None
    if not isinstance(config, dict):
        raise MupscaleError(f"{path / CONFIG}: expected a JSON object")
    bad = _nonfinite(config)
    if bad is not None:
        raise MupscaleError(f"{where}: {one_line(bad[0][:80])} is {bad[1]} (NaN and Infinity are not JSON, and no "
                            f"model has them); fix config.json")
    for key in ("torch_dtype", "dtype"):
        v = config.get(key)
        if v is not None and not (isinstance(v, str) and (v == "auto" or _is_dtype(v))):
            raise MupscaleError(f"{where}: {key} {shown(repr(v))} is not a torch dtype name (e.g. \"float32\", "
                                f"\"bfloat16\"); fix config.json")
    return config


def _is_dtype(name: str) -> bool:
    import torch
    return name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype)


def _nonfinite(v, at: str = ""):
    """(the dotted key, the value) of the first NaN or ±Infinity in a parsed config, else None."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return at or "the value", v
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        found = _nonfinite(x, f"{at}.{k}" if at else str(k))
        if found is not None:
            return found
    return None


def check_trainer_state(path: Path) -> None:
    """trainer_state.json (copied as bytes) is what the Trainer resumes from: a JSON object, global_step an
    integer. A broken one would be published into an output no Trainer can resume."""
    from mupscale_cli.bounded import loads_json
    where = path / TRAINER_STATE
    if not where.is_file():
        return
    try:
        if where.stat().st_size > 4 * MAX_CONFIG_BYTES:
            raise MupscaleError(f"{where}: {where.stat().st_size} bytes, more than a trainer state holds "
                                f"(at most {4 * MAX_CONFIG_BYTES})")
        state = loads_json(where.read_text(), str(where))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise MupscaleError(f"{where}: not readable JSON ({first}); a Trainer could not resume from it") from None
    if not isinstance(state, dict):
        raise MupscaleError(f"{where}: expected a JSON object (the Trainer's TrainerState)")
    step = state.get("global_step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise MupscaleError(f"{where}: global_step {shown(repr(step))} is not a non-negative integer")


STALE_WEIGHTS = ("pytorch_model*.bin", "model*.bin", "tf_model.h5", "flax_model.msgpack", "*.safetensors",
                 "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin", "scaler.pt")


def read(path: Path, lazy: bool = False) -> Checkpoint:
    for p in path.iterdir():
        check_inside(path, p)
    config = read_config(path)
    if (path / INDEX).is_file():
        ckpt = shards.read(path / INDEX, lazy)
    elif (path / WEIGHTS).is_file():
        ckpt = st.read(path / WEIGHTS, lazy)
    else:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors*"))
        hint = (" (pytorch_model.bin is a pickle mupscale does not load: re-save with "
                "save_pretrained(..., safe_serialization=True))") if found else ""
        raise MupscaleError(f"{path}: a Hugging Face directory without {WEIGHTS} or {INDEX}{hint}")
    weights = [f.name for f in ckpt.files]
    others = sorted(p.name for p in path.iterdir() if p.name not in weights and p.name != CONFIG)
    stale = [n for n in others if any(fnmatch(n, g) for g in STALE_WEIGHTS)
             and not any(fnmatch(n, g) for g in TRAINER_FILES)]
    if stale:
        which = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise MupscaleError(f"{path}: besides its weights ({', '.join(weights[:2])}{', ...' if len(weights) > 2 else ''}) "
                            f"it holds {which}, weights mupscale would not widen (copied, they would be the narrow "
                            f"model's, or a second model): remove or move them aside")
    check_layers(path, config, list(ckpt.tensors))
    trainer = any((path / n).is_file() for n in (OPTIMIZER, SCHEDULER, TRAINER_STATE))
    if trainer:
        check_trainer_state(path)
    ckpt.extra = {**ckpt.extra, "model_args": config}
    ckpt.hf = HfDir(path, config, weights, others, trainer)
    if trainer:
        from mupscale_cli.formats import hf_trainer
        ckpt.optimizer = hf_trainer.read_optimizer(path, config)
    return ckpt


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def check_layers(path: Path, config: dict, names: list[str]) -> None:
    """config.json's layer count is the one the weights hold (layers 0..N-1), before anything is built from
    it: a config claiming 100000 layers made transformers build them for minutes; one claiming fewer would
    describe another model."""
    key = next((k for k in LAYER_KEYS if k in config), None)
    if key is None:
        return
    n = config[key]
    found = {int(m.group(1)) for name in names if (m := _LAYER.search(name))}
    if not found:
        return  # no layer-indexed names this reader knows: the spec's own checks decide
    if not isinstance(n, int) or isinstance(n, bool) or found != set(range(n)):
        have = f"layers 0..{max(found)}" if found == set(range(max(found) + 1)) else f"{len(found)} layer indices"
        raise MupscaleError(f"{path / CONFIG}: {key} is {shown(str(n))} but the weights hold {have}; the config "
                            f"does not describe these weights")


def write(dest: Path, weights: Callable[[Path], None], config: dict, src: HfDir,
          files: dict[str, Callable[[Path], None]] | None = None, skip: set[str] = frozenset(),
          replace: bool = False, before_commit: Callable[[], None] = lambda: None) -> list[str]:
    """Write a Hugging Face directory at `dest`, whole or not at all (target.atomic_dir): `weights(tmp)`
    writes the weights into the temporary directory, then config.json, then `files` (name -> writer of that
    file), then every other file of the source copied as bytes (names in `skip` left out); `before_commit()`
    may still stop it. Returns notes."""
    files = files or {}
    notes = []
    with atomic_dir(dest, replace) as tmp:
        weights(tmp)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, make in files.items():
            make(tmp / name)
        for name in src.others:
            if name in files or name in skip:
                continue
            p = src.path / name
            if p.is_file():
                shutil.copyfile(p, tmp / name)
            elif p.is_dir():
                notes.append(f"{p}: a directory, not copied")
        before_commit()
    return notes


def out_config(config: dict, dtype: str | None) -> dict:
    """The widened config.json: `config` (sizes already rewritten by the spec) with --dtype recorded."""
    out = dict(config)
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in out or key == "dtype":
                out[key] = dtype
    return out
