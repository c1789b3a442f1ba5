"""Writing widened checkpoints: `.safetensors` (streamed, atomic) and `.pt` (the input's layout)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mupscale_cli.core.checkpoint import (META_DIGESTS, META_EXTRA, META_OPTIM, META_PROV, OPTIM_NS, Checkpoint,
                                         strip_prefix)
from mupscale_cli.core.safetensors_io import StreamWriter, TensorInfo, tensor_sha256
from mupscale_cli.errors import MupscaleError

TMP_PT = ".mupscale-tmp-"  # temporaries: .<dest name>.mupscale-tmp-<pid>-<random> (as StreamWriter's)
STALE_AGE_S = 3600


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest`; renamed onto it (after fsync) only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{TMP_PT}{os.getpid()}-", dir=dest.parent)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def clean_stale_temps(dest: Path, max_age_s: float = STALE_AGE_S) -> tuple[list[str], list[str]]:
    """Temporaries of earlier runs writing `dest` (`.<name>.mupscale-tmp-*`): remove those whose writer
    (pid in the name) is gone or that were not written to for `max_age_s`; (removed, kept) file names."""
    removed, kept = [], []
    prefix = f".{dest.name}{TMP_PT}"
    try:
        entries = [p for p in dest.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed, kept
    for p in sorted(entries):
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        dead = pid_text.isdigit() and not _pid_alive(int(pid_text))
        old = time.time() - st.st_mtime > max_age_s
        if (dead or old) and not p.is_dir():
            try:
                p.unlink()
                removed.append(p.name)
                continue
            except OSError:
                pass
        kept.append(p.name)
    return removed, kept


def optimizer_tensors(osd: dict | None) -> dict[str, torch.Tensor]:
    """An optimizer state_dict's tensors as `__optim__/<tensor name>/<state key>` (names from param_names,
    prefixes stripped): the layout of our safetensors files and the keys of recorded digests."""
    out: dict[str, torch.Tensor] = {}
    if osd is None:
        return out
    for g in osd["param_groups"]:
        for pid, n in zip(g["params"], g.get("param_names", [])):
            for key, v in osd["state"].get(pid, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"{OPTIM_NS}{strip_prefix(n)}/{key}"] = v
    return out


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
    Optimizer state goes under `__optim__/<tensor name>/<state key>`, its groups in the metadata.
    The sha256 of every tensor's bytes is recorded under `mupscale.sha256`: the header is written with
    same-length placeholders and rewritten in place once the last tensor is written."""
    infos = [TensorInfo(n, dt, tuple(sh)) for n, sh, dt in model]
    opt_tensors = optimizer_tensors(osd)
    infos += [TensorInfo(n, v.dtype, tuple(v.shape)) for n, v in opt_tensors.items()]
    meta = {"format": "pt", META_PROV: json.dumps(provenance, sort_keys=True)}
    if extra:
        meta[META_EXTRA] = json.dumps(jsonable(extra), sort_keys=True)
    if osd is not None:
        meta[META_OPTIM] = json.dumps(optimizer_meta(kind or "", osd), sort_keys=True)
    digests = {i.name: "0" * 64 for i in infos}
    meta[META_DIGESTS] = json.dumps(digests, sort_keys=True)
    with StreamWriter(dest, infos, meta) as w:
        for n, _, _ in model:
            t = produce(n)
            w.write(n, t)
            digests[n] = tensor_sha256(t)
            on_tensor(n, t.numel() * t.element_size())
        for n, v in opt_tensors.items():
            w.write(n, v)
            digests[n] = tensor_sha256(v)
            on_tensor(n, v.numel() * v.element_size())
        w.update_metadata({META_DIGESTS: json.dumps(digests, sort_keys=True)})


def write_pt(dest: Path, ckpt: Checkpoint, model: dict[str, torch.Tensor], osd: dict | None,
             extra: dict) -> None:
    """The input's layout: same keys (prefixes kept), other entries carried over, model_args updated.
    Tensor digests go into the provenance (`extra["mupscale"]["sha256"]`), keyed as in safetensors."""
    sd = {ckpt.original.get(n, n): t for n, t in model.items()}
    if isinstance(extra.get("mupscale"), dict):
        digests = {n: tensor_sha256(t) for n, t in {**model, **optimizer_tensors(osd)}.items()}
        extra = {**extra, "mupscale": {**extra["mupscale"], "sha256": digests}}
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
