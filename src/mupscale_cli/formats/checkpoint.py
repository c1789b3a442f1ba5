"""Reading checkpoints: nanoGPT `.pt`, plain state-dict `.pt`, `.safetensors` (ours included), and Hugging
Face sharded safetensors (a directory or its `*.safetensors.index.json`).

`load_checkpoint(path, lazy=True)` reads no tensor data: safetensors tensors come from a `LazyTensors`
mapping that reads each one (or a range of its rows) with pread when asked; `.pt` files are
memory-mapped (`torch.load(mmap=True)`). `lazy=False` (the default, for the Python API and `verify`)
gives plain dicts of tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mupscale_cli.bounded import check_tree, loads_json
from mupscale_cli.core.optstate import canonical_ids
from mupscale_cli.errors import MupscaleError, check_cancelled

PREFIXES = ("_orig_mod.", "module.")
MODEL_KEYS = ("model", "state_dict", "model_state_dict")
OPTIM_KEYS = ("optimizer", "optimizer_state_dict", "optim")
OPTIM_NS = "__optim__/"  # optimizer state tensors in our safetensors files: __optim__/<name>/<key>
META_OPTIM = "mupscale.optimizer"  # JSON: {"kind", "param_groups": [... "param_names" ...]}
META_PROV = "mupscale"  # JSON provenance
META_EXTRA = "mupscale.extra"  # JSON: other top-level entries of a .pt input (iter_num, config, ...)
META_DIGESTS = "mupscale.xxh3_128"  # JSON: tensor name -> xxh3-128 of its bytes (.pt: provenance "xxh3_128")
PROV_DIGESTS = "xxh3_128"  # the same in a .pt provenance
META_OPTIM_INDEX = "mupscale.optimizer_index"  # sharded output: file name of the optimizer shards' index


from mupscale_cli.core.source import LazyTensors, iter_chunks, read_rows, tensor_meta  # noqa: F401


@dataclass
class Checkpoint:
    path: Path
    kind: str  # nanogpt | wrapped | state_dict | safetensors | sharded
    tensors: Mapping[str, torch.Tensor]  # canonical (prefix-free) name -> tensor (LazyTensors when lazy)
    original: dict[str, str]  # canonical name -> key in the file
    optimizer: dict | None = None
    extra: dict = field(default_factory=dict)  # other top-level entries, kept for .pt output
    model_key: str | None = None
    optimizer_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    shard_files: list[str] = field(default_factory=list)  # sharded: the other files read, beside the index
    readers: dict = field(default_factory=dict)  # safetensors inputs: file path -> LazySafetensors
    hf: object | None = None  # a Hugging Face directory: formats.hf.HfDir (config.json, other files, Trainer)
    source: object = None  # DCP inputs: (DcpReader, DcpLayout), for the DCP writer
    notes: list[str] = field(default_factory=list)  # what the reader noticed and ignored (widen prints them)

    @property
    def model_args(self) -> dict | None:
        args = self.extra.get("model_args")
        return args if isinstance(args, dict) else None

    @property
    def config_json(self) -> dict | None:
        """A Hugging Face directory's config.json (evidence for the spec: its model_type)."""
        return getattr(self.hf, "config", None)

    def strip(self, name: str) -> str:
        return strip_prefix(name)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: tensor_meta(self.tensors, n) for n in self.tensors}

    @property
    def files(self) -> list[Path]:
        """The files this checkpoint was read from (a sharded one: its index and shards)."""
        return [self.path] + [self.path.parent / n for n in self.shard_files]


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
            check_cancelled()
            h.update(chunk)
    return h.hexdigest()


def _check_path(path: Path) -> None:
    if not path.exists():
        raise MupscaleError(f"{path}: no such file")
    import stat
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise MupscaleError(f"{path}: is {kind}; give a checkpoint file or directory")
    if path.stat().st_size == 0:
        raise MupscaleError(f"{path}: empty file")


def is_sharded(path: Path) -> bool:
    """A Hugging Face sharded checkpoint: a directory, or its `*.safetensors.index.json`."""
    return path.is_dir() or path.name.endswith(".safetensors.index.json")


def sharded_index(path: Path) -> Path:
    """The model index of a sharded checkpoint given as a directory or an index file."""
    from mupscale_cli.formats.safetensors import INDEX_SUFFIX
    if not path.is_dir():
        return path
    if (path / f"model{INDEX_SUFFIX}").is_file():
        return path / f"model{INDEX_SUFFIX}"
    found = [p for p in sorted(path.glob(f"*{INDEX_SUFFIX}")) if not p.name.endswith(f"optimizer{INDEX_SUFFIX}")]
    if len(found) != 1:
        raise MupscaleError(f"{path}: is a directory without a single *{INDEX_SUFFIX} (found "
                            f"{len(found)}); pass the checkpoint file or the index file")
    return found[0]


def optimizer_prefix(prefix: str) -> str:
    """Shard prefix of the optimizer state beside model shards named `prefix`."""
    return "optimizer" if prefix == "model" else f"{prefix}-optimizer"




def source_sha256(ckpt: Checkpoint, on_piece: Callable[[Path, str, torch.Tensor], None] | None = None,
                  hashing: bool = True) -> str:
    """sha256 of the input file; for a sharded input, of the lines "<sha256>  <file>" (sha256sum's format)
    for its index and then each shard in name order. With `on_piece`, safetensors files are read tensor
    by tensor and `on_piece(file, name in file, values)` sees every piece of their data (one read of the
    input serves both the digest and the value checks); returns None if it cannot (a .pt input), "" if
    `hashing` is False (only the values are looked at)."""
    if on_piece is not None and not ckpt.readers:
        return None  # type: ignore[return-value]

    def one(p: Path) -> str:
        r = ckpt.readers.get(p)
        if r is None or on_piece is None:
            return sha256_file(p)
        return r.scan(lambda name, values: on_piece(p, name, values), hashing=hashing)
    if ckpt.kind not in ("sharded", "dcp"):
        return one(ckpt.path)
    if not hashing:
        for p in ckpt.files:
            if p in ckpt.readers:
                one(p)
        return ""
    lines = "".join(f"{one(p)}  {p.name}\n" for p in ckpt.files)
    return hashlib.sha256(lines.encode()).hexdigest()


class _Any:
    """Stands for every object of a pickle while `_storage_sizes` reads it (nothing is called or imported)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setitem__(self, key, value):
        pass

    def __setstate__(self, state):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageType:
    def __init__(self, itemsize: int):
        self.itemsize = itemsize


class _SizeProbe(pickle._Unpickler):
    """Reads a torch.save pickle only for its storage records: key -> bytes its tensors need. Every global is
    `_Any` (or a storage type): nothing is imported or called. The pure-Python unpickler, so that two opcodes
    can be replaced: the extension registry (EXT1/2/4; copyreg's cache hands out any object without asking
    find_class) is refused, and BUILD sets state only on `_Any` instances (on a class it would change it
    for the whole process)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def _ext(self):
        raise pickle.UnpicklingError("it uses the extension registry (EXT opcodes)")

    def _build(self):
        if type(self.stack[-2]) is not _Any:
            raise pickle.UnpicklingError(f"it sets the state of a {type(self.stack[-2]).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.EXT1[0]] = _ext
    dispatch[pickle.EXT2[0]] = _ext
    dispatch[pickle.EXT4[0]] = _ext
    dispatch[pickle.BUILD[0]] = _build

    def __init__(self, f):
        super().__init__(f)
        self.sizes: dict[str, int] = {}

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dtype = getattr(getattr(torch, name, None), "dtype", None)
            if name != "UntypedStorage" and not isinstance(dtype, torch.dtype):
                raise pickle.UnpicklingError(f"unknown storage type {name}")
            return _StorageType(1 if dtype is None else dtype.itemsize)
        return _Any

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        key = str(pid[2])
        self.sizes[key] = max(self.sizes.get(key, 0), pid[4] * pid[1].itemsize)
        return _Any()


def check_pt_records(path: Path) -> bool:
    """Before a `.pt` is read through mmap (which skips torch's own check): every storage record in the zip
    is stored uncompressed, lies inside the file and is at least as long as the tensors it backs need.
    Raises a one-line error naming the record; False if the file cannot be checked this way (then it must
    be read without mmap)."""
    import io
    import struct
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return False
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1] or (
            ["data.pkl"] if "data.pkl" in zf.namelist() else [])
        if len(pkls) != 1:
            return False
        prefix = pkls[0][:-len("data.pkl")]
        try:
            probe = _SizeProbe(io.BytesIO(zf.read(pkls[0])))
            probe.load()
        except Exception:  # noqa: BLE001 - not a pickle this probe understands: no mmap
            return False
        size = path.stat().st_size
        with open(path, "rb") as f:
            for key, need in probe.sizes.items():
                name = f"{prefix}data/{key}"
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    raise MupscaleError(f"{path}: storage record {name!r} is missing from the archive; the file is "
                                        f"damaged") from None
                f.seek(info.header_offset)
                head = f.read(30)
                n, m = struct.unpack("<HH", head[26:30]) if len(head) == 30 else (0, size)
                start = info.header_offset + 30 + n + m  # the record's data, after its local header
                if info.compress_type != zipfile.ZIP_STORED:
                    raise MupscaleError(f"{path}: storage record {name!r} is compressed; torch.save never does "
                                        f"that: re-save the checkpoint with torch.save")
                if info.file_size < need or start + info.file_size > size:
                    raise MupscaleError(f"{path}: storage record {name!r} holds {info.file_size} bytes but its "
                                        f"tensors need {need}; the file is damaged or was edited")
    return True


def _torch_load(path: Path):
    try:
        try:
            if zipfile.is_zipfile(path) and not check_pt_records(path):
                return torch.load(path, map_location="cpu", weights_only=True)  # torch checks every record
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


def _from_reader(src, path: Path, kind: str, lazy: bool, opt_src=None, meta: dict | None = None) -> Checkpoint:
    meta = (src.metadata() or {}) if meta is None else meta
    model, optim = {}, {}
    for reader in [src] + ([opt_src] if opt_src is not None else []):
        for name in reader.names():
            if name.startswith(OPTIM_NS):
                pname, _, key = name.removeprefix(OPTIM_NS).rpartition("/")
                optim.setdefault(pname, {})[key] = (reader, name)
            elif reader is src:
                model[name] = name
            else:
                raise MupscaleError(f"{reader.path}: optimizer shards hold a tensor {name!r} outside "
                                    f"'{OPTIM_NS}'")
    if not model:
        raise MupscaleError(f"{path}: holds no model tensors")
    _, original = _canonical(model, path)
    if lazy:
        tensors = LazyTensors(src, {n: original[n] for n in original})
        state = {p: LazyTensors(_Several(ks), {k: k for k in ks}) for p, ks in optim.items()}
    else:
        tensors = {n: src.get(original[n]) for n in original}
        state = {p: {k: r.get(name) for k, (r, name) in ks.items()} for p, ks in optim.items()}
    extra = {}
    if META_EXTRA in meta:
        extra = _json(meta[META_EXTRA], META_EXTRA, path)
    optimizer = None
    if META_OPTIM in meta:
        info = _json(meta[META_OPTIM], META_OPTIM, path)
        optimizer = _optimizer_from_names(info, state, path)
    elif optim:
        raise MupscaleError(f"{path}: has optimizer tensors but no '{META_OPTIM}' metadata")
    return Checkpoint(path, kind, tensors, original, optimizer, extra, metadata=meta)


class _Several:
    """A reader over named (reader, file name) pairs: one optimizer state dict's entries."""

    def __init__(self, keys: dict[str, tuple]):
        self._keys = keys

    def info(self, key: str):
        r, name = self._keys[key]
        return r.info(name)

    def read(self, key: str, start: int = 0, count: int | None = None, alloc=None) -> torch.Tensor:
        r, name = self._keys[key]
        return r.read(name, start, count, alloc)

    def read_rows(self, key: str, r0: int, r1: int, alloc=None) -> torch.Tensor:
        r, name = self._keys[key]
        return r.read_rows(name, r0, r1, alloc)

    def location(self, key: str) -> tuple[Path, str]:
        r, name = self._keys[key]
        return r.location(name)


def _json(text: str, key: str, path: Path, kind: type | None = dict):
    """Metadata entry `key` parsed (bounded: formats of untrusted files), checked to be a `kind`."""
    try:
        value = loads_json(text, f"{path}: metadata {key!r}")
    except ValueError:
        raise MupscaleError(f"{path}: metadata {key!r} is not valid JSON") from None
    if kind is not None and not isinstance(value, kind):
        raise MupscaleError(f"{path}: metadata {key!r} is a JSON {_json_type(value)}, expected an object")
    return value


def _json_type(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def provenance_of(ckpt: Checkpoint) -> dict:
    """A widened checkpoint's provenance (metadata 'mupscale' or a .pt's 'mupscale' entry), {} if none;
    an error unless it is a JSON object / dict."""
    if META_PROV in ckpt.metadata:
        return _json(ckpt.metadata[META_PROV], META_PROV, ckpt.path)
    prov = ckpt.extra.get("mupscale", {})
    if not isinstance(prov, dict):
        raise MupscaleError(f"{ckpt.path}: its 'mupscale' entry is a {type(prov).__name__}, expected a dict")
    return prov


def _optimizer_from_names(info: dict, state_by_name: dict, path: Path) -> dict:
    """Rebuild a torch optimizer state_dict (ids in group order) from our name-keyed layout."""
    groups, state, nid = [], {}, 0
    bad = MupscaleError(f"{path}: metadata '{META_OPTIM}' must be an object with 'param_groups', a list of "
                        f"objects each with 'param_names', a list of tensor names")
    if not isinstance(info.get("param_groups"), list) or not all(
            isinstance(g, dict) and isinstance(g.get("param_names"), list) and all(
                isinstance(n, str) for n in g["param_names"]) for g in info["param_groups"]):
        raise bad
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
    listed = {n for g in groups for n in g["param_names"]}
    if extra := [n for n in state_by_name if n not in listed]:
        raise MupscaleError(f"{path}: optimizer state of {extra[0]!r} belongs to no parameter of "
                            f"'{META_OPTIM}' ({len(extra)} such tensor(s)); the file was edited or mixed")
    if "betas" in groups[0] if groups else False:
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
