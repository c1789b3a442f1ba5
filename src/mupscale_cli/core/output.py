"""Writing widened checkpoints: `.safetensors` (streamed, atomic) and `.pt` (the input's layout)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mupscale_cli.core.checkpoint import META_EXTRA, META_OPTIM, META_PROV, OPTIM_NS, Checkpoint
from mupscale_cli.core.safetensors_io import StreamWriter, TensorInfo
from mupscale_cli.errors import MupscaleError

TMP_PT = ".mupscale-tmp-"


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest`; renamed onto it (after fsync) only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{TMP_PT}", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(d: dict) -> dict:
    """The entries of `d` that JSON can carry (others are dropped from safetensors metadata)."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def optimizer_meta(kind: str, osd: dict) -> dict:
    groups = []
    for g in osd["param_groups"]:
        ng = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        groups.append(ng)
    return {"kind": kind, "param_groups": groups}


def write_safetensors(dest: Path, model: list[tuple[str, tuple, torch.dtype]],
                      produce: Callable[[str], torch.Tensor], osd: dict | None, kind: str | None,
                      provenance: dict, extra: dict, on_tensor: Callable[[str, int], None] = lambda n, b: None
                      ) -> None:
    """Stream model tensors (made one at a time by `produce(name)`) and optimizer state to `dest`.
    Optimizer state goes under `__optim__/<tensor name>/<state key>`, its groups in the metadata."""
    infos = [TensorInfo(n, dt, tuple(sh)) for n, sh, dt in model]
    opt_tensors = {}
    if osd is not None:
        for g in osd["param_groups"]:
            for pid, n in zip(g["params"], g["param_names"]):
                for key, v in osd["state"].get(pid, {}).items():
                    if isinstance(v, torch.Tensor):
                        opt_tensors[f"{OPTIM_NS}{n}/{key}"] = v
        infos += [TensorInfo(n, v.dtype, tuple(v.shape)) for n, v in opt_tensors.items()]
    meta = {"format": "pt", META_PROV: json.dumps(provenance, sort_keys=True)}
    if extra:
        meta[META_EXTRA] = json.dumps(jsonable(extra), sort_keys=True)
    if osd is not None:
        meta[META_OPTIM] = json.dumps(optimizer_meta(kind or "", osd), sort_keys=True)
    with StreamWriter(dest, infos, meta) as w:
        for n, _, _ in model:
            t = produce(n)
            w.write(n, t)
            on_tensor(n, t.numel() * t.element_size())
        for n, v in opt_tensors.items():
            w.write(n, v)
            on_tensor(n, v.numel() * v.element_size())


def write_pt(dest: Path, ckpt: Checkpoint, model: dict[str, torch.Tensor], osd: dict | None,
             extra: dict) -> None:
    """The input's layout: same keys (prefixes kept), other entries carried over, model_args updated."""
    sd = {ckpt.original.get(n, n): t for n, t in model.items()}
    if ckpt.model_key is None and osd is None and not extra:
        obj = sd
    else:
        obj = {**extra, ckpt.model_key or "model": sd}
        if osd is not None:
            obj[ckpt.optimizer_key or "optimizer"] = osd
    with atomic_path(dest) as tmp:
        try:
            torch.save(obj, tmp)
        except OSError as e:
            raise MupscaleError(f"{dest}: cannot write: {e.strerror or e}") from None
