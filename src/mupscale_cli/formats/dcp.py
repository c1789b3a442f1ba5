"""PyTorch distributed checkpoints (torch.distributed.checkpoint, "DCP"): a directory of `.distcp` files and
a `.metadata` file, as FSDP2 jobs (torchtitan and others) save them.

Reading plans with DCP's own machinery, tensor by tensor: a load plan from `create_read_items_for_chunk_list`
for just the rows wanted, so only the saved chunks that overlap them are read. Where a chunk's torch.save
record holds its bytes plainly (uncompressed, C-contiguous, this machine's byte order: found once per chunk
from the record's zip directory and a load onto the meta device), the rows are read from the file with one
pread; anything else goes through `FileSystemReader.read_data`, which loads the whole stored chunk. Two things
differ from `dcp.load`, both for untrusted inputs: `.metadata` is unpickled with an allow-list (DCP's own
reader calls `pickle.load`, which can run code), and non-tensor entries are read with
`torch.load(weights_only=True)`. Before any output is made, the metadata is checked: every chunk inside its
tensor, chunks tiling each tensor exactly, every stored item inside an existing file.

Layouts (`DcpLayout`): the model under `model.` (`dcp.save({"model": sd, "optim": osd})`) or at the top
(torchtitan flattens its ModelWrapper), the optimizer under `optim.` or `optimizer.`, its state either
nested (`state.<fqn>.<key>`, `param_groups.<i>.<hp>`, from `get_optimizer_state_dict`) or flattened
per tensor (`state.<fqn>.<key>`, `param_groups.<fqn>.<hp>`, from
`StateDictOptions(flatten_optimizer_state_dict=True)`, torchtitan's OptimizersContainer). Every other entry
(lr_scheduler, dataloader, train_state, ...) is carried over.

Writing: formats/dcp_save.py.

Over 500 lines: reading DCP safely (the exact unpickling allow-list, the tiling and storage checks, the
records read from the file) shares DCP's own types and planners; the layouts (model, optimizer, the rest)
are how those checked entries are read.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.direct import pread_all
from mupscale_cli.formats.target import check_inside
from mupscale_cli.formats.safetensors import TensorInfo

METADATA = ".metadata"
MODEL_ROOTS = ("model",)
OPTIM_ROOTS = ("optim", "optimizer")
PROVENANCE_KEY = "mupscale"  # top-level entry of our outputs: provenance JSON (a string)


def is_dcp(path: Path) -> bool:
    """A DCP checkpoint: a directory holding `.metadata` (or that file itself)."""
    path = Path(path)
    return (path.is_dir() and (path / METADATA).is_file()) or (path.name == METADATA and path.is_file())


def dcp_dir(path: Path) -> Path:
    path = Path(path)
    return path.parent if path.name == METADATA else path


# --- metadata, read safely -------------------------------------------------------------------------------

_METADATA_CLASSES = ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                     "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
# Exactly the (module, name) pairs DCP's metadata pickles name, and nothing reached through them: a name is
# looked up in this table as a whole, so a dotted name (protocol 4 resolves `os.system` in a module's globals,
# `Metadata.__init__.__globals__`, ...) never matches and nothing is imported or walked.
_ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


def _allowed_object(module: str, name: str):
    """The object an allowed (module, name) pair names: an attribute of an already imported module, read with
    the module's own __dict__ (no __getattr__ hooks), or None. torch dtypes (torch.float32, ...) by name."""
    import importlib
    import sys
    if module == "torch" and name.isidentifier() and isinstance(torch.__dict__.get(name), torch.dtype):
        return torch.__dict__[name]
    if (module, name) not in _ALLOWED:
        return None
    mod = sys.modules.get(module) or importlib.import_module(module)  # one of the modules named above
    return mod.__dict__.get(name)


def _buildable() -> dict[type, frozenset[str] | None]:
    """Classes whose instances BUILD may set: their dataclass fields (None: the class's own __setstate__)."""
    import dataclasses

    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as m
    out: dict[type, frozenset[str] | None] = {
        c: frozenset(f.name for f in dataclasses.fields(c))
        for c in (m.Metadata, m.MetadataIndex, m.ChunkStorageMetadata, m.TensorStorageMetadata,
                  m.BytesStorageMetadata, m.StorageMeta, fs._StorageInfo)}
    out[m.TensorProperties] = None  # TensorProperties.__setstate__ takes a tuple and checks its encoding
    return out


class _Unpickler(pickle._Unpickler):
    """DCP's `.metadata` pickle with nothing but DCP's own metadata classes and the plain values they hold.

    The pure-Python unpickler, so that opcodes beyond find_class can be guarded too: the extension registry
    (EXT1/2/4: copyreg's cache hands out any object it once resolved, without asking find_class) is refused;
    REDUCE and NEWOBJ call only allowed objects; BUILD sets state only on instances of DCP's dataclasses and
    only their own fields (BUILD on a class or a function, `_get_layout.cache` say, would change it for the
    whole process). Work and memory stay linear in the file's size."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f):
        super().__init__(f)
        self._made: set = set()  # the objects find_class returned: the only ones REDUCE/NEWOBJ may call
        self._build = _buildable()

    def find_class(self, module: str, name: str):
        obj = _allowed_object(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"it needs {_shown_name(module, name)}")
        self._made.add(obj)
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id")

    def _ext(self):
        raise pickle.UnpicklingError("it uses the extension registry (EXT opcodes)")

    def _called(self, obj) -> None:
        try:
            ok = obj in self._made
        except TypeError:  # unhashable: nothing find_class returned
            ok = False
        if not ok:
            raise pickle.UnpicklingError(f"it calls a {type(obj).__name__}")

    def _reduce(self):
        self._called(self.stack[-2])
        pickle._Unpickler.load_reduce(self)

    def _newobj(self):
        self._called(self.stack[-2])
        pickle._Unpickler.load_newobj(self)

    def _newobj_ex(self):
        self._called(self.stack[-3])
        pickle._Unpickler.load_newobj_ex(self)

    def _build_checked(self):
        state, inst = self.stack[-1], self.stack[-2]
        fields = self._build.get(type(inst), False)
        if fields is False:
            raise pickle.UnpicklingError(f"it sets the state of a {type(inst).__name__}")
        if fields is not None and not (type(state) is dict and all(type(k) is str and k in fields for k in state)):
            raise pickle.UnpicklingError(f"it sets a {type(inst).__name__} from a {type(state).__name__} other "
                                         f"than its fields")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.EXT1[0]] = _ext
    dispatch[pickle.EXT2[0]] = _ext
    dispatch[pickle.EXT4[0]] = _ext
    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.NEWOBJ[0]] = _newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _newobj_ex
    dispatch[pickle.BUILD[0]] = _build_checked


def _shown_name(module: str, name: str) -> str:
    text = f"{module}.{name}"
    return repr(text[:80] + "...") if len(text) > 80 or not text.isprintable() else text


def read_metadata(root: Path):
    """The checkpoint's `Metadata`, unpickled with an allow-list of DCP's own classes."""
    from torch.distributed.checkpoint.metadata import Metadata
    path = root / METADATA
    try:
        with open(path, "rb") as f:
            md = _Unpickler(f).load()
    except pickle.UnpicklingError as e:
        raise MupscaleError(f"{path}: refusing to unpickle DCP metadata ({e}); it holds objects other than "
                            f"DCP's metadata classes") from None
    except RecursionError:
        raise MupscaleError(f"{path}: not readable DCP metadata (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - any failure of a foreign file is an input error
        raise MupscaleError(f"{path}: not readable DCP metadata ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or not isinstance(
            getattr(md, "storage_data", None), dict):
        raise MupscaleError(f"{path}: not DCP metadata (found {type(md).__name__}); is this a checkpoint saved "
                            f"by torch.distributed.checkpoint?")
    return md


def check_metadata(root: Path, md) -> None:
    """Everything a read relies on, before the first byte of output: each tensor's chunks lie inside it and
    tile it exactly, each stored item is named in storage_data and lies inside an existing file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    where = root / METADATA
    sizes: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        if type(idx) is not MetadataIndex or not isinstance(idx.fqn, str):
            raise MupscaleError(f"{where}: a storage key is a {type(idx).__name__}, expected a MetadataIndex")
        if type(info) is not _StorageInfo:
            raise MupscaleError(f"{where}: item {idx.fqn!r} is described by a {type(info).__name__}")
        rel = getattr(info, "relative_path", None)
        off, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or not rel or Path(rel).name != rel or rel in (".", ".."):
            raise MupscaleError(f"{where}: item {getattr(idx, 'fqn', idx)!r} is stored in {rel!r}, not a file "
                                f"name inside the checkpoint directory")
        if getattr(info, "transform_descriptors", None):
            raise MupscaleError(f"{where}: item {idx.fqn!r} is stored through transforms "
                                f"{list(info.transform_descriptors)[:4]!r} (compression); mupscale reads plain DCP "
                                f"items: save the checkpoint again without storage extensions")
        if rel not in sizes:
            f = root / rel
            check_inside(root, f)
            if not f.is_file():
                raise MupscaleError(f"{where}: names {rel}, which is missing from {root}; copy the whole "
                                    f"checkpoint directory")
            sizes[rel] = f.stat().st_size
        if not (isinstance(off, int) and isinstance(length, int) and off >= 0 and length >= 0):
            raise MupscaleError(f"{where}: item {idx.fqn!r} has offset {off!r} and length {length!r}")
        if off + length > sizes[rel]:
            raise MupscaleError(f"{root / rel}: is {sizes[rel]} bytes but item {idx.fqn!r} ends at byte "
                                f"{off + length}: the file is truncated; copy it again")
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise MupscaleError(f"{where}: a key is a {type(fqn).__name__}, expected a string")
        if isinstance(m, BytesStorageMetadata):
            if MetadataIndex(fqn) not in md.storage_data:
                raise MupscaleError(f"{where}: entry {fqn!r} has no stored item")
            continue
        if not isinstance(m, TensorStorageMetadata):
            raise MupscaleError(f"{where}: entry {fqn!r} is a {type(m).__name__}")
        props, size = getattr(m, "properties", None), getattr(m, "size", None)
        if (type(props) is not TensorProperties or not isinstance(props.dtype, torch.dtype)
                or not isinstance(size, torch.Size) or not all(d >= 0 for d in size)
                or math.prod(size) >= 1 << 62 or not isinstance(getattr(m, "chunks", None), list)):
            raise MupscaleError(f"{where}: tensor {fqn!r} has shape {str(size)[:80]}, dtype "
                                f"{str(getattr(props, 'dtype', None))[:40]} and chunks of type "
                                f"{type(getattr(m, 'chunks', None)).__name__}: not a tensor DCP saves")
        shape = tuple(size)
        covered = 0
        boxes = []
        for c in m.chunks:
            if type(c) is not ChunkStorageMetadata or not isinstance(c.offsets, torch.Size) or not isinstance(
                    c.sizes, torch.Size):
                raise MupscaleError(f"{where}: tensor {fqn!r} has a chunk {str(c)[:80]}, not DCP's chunk metadata")
            o, s = tuple(c.offsets), tuple(c.sizes)
            if len(o) != len(shape) or len(s) != len(shape) or any(
                    a < 0 or b < 0 or a + b > d for a, b, d in zip(o, s, shape)):
                raise MupscaleError(f"{where}: tensor {fqn!r} of shape {list(shape)} has a chunk at {list(o)} "
                                    f"of size {list(s)}, outside the tensor")
            info = md.storage_data.get(MetadataIndex(fqn, c.offsets))
            if info is None:
                raise MupscaleError(f"{where}: chunk {list(o)} of tensor {fqn!r} has no stored item")
            if info.length < math.prod(s) * props.dtype.itemsize:  # a torch.save record holds its bytes, and more
                raise MupscaleError(f"{root / info.relative_path}: the item of chunk {list(o)} of tensor {fqn!r} "
                                    f"is {info.length} bytes, too few for {math.prod(s)} {props.dtype} elements; "
                                    f"the metadata and the data disagree")
            covered += math.prod(s)
            boxes.append((o, s))
        why = _tiling_error(shape, boxes, covered)
        if why:
            raise MupscaleError(f"{where}: the chunks of tensor {fqn!r} do not tile its shape {list(shape)}: {why}")


GRID_CELLS_PER_CHUNK = 8  # DCP's layouts (FSDP rows, TP columns, both) cut a tensor into a grid of its chunks


def _tiling_error(shape: tuple[int, ...], boxes: list[tuple[tuple, tuple]], covered: int) -> str | None:
    """Why `boxes` (offsets, sizes), already inside `shape`, do not tile it exactly, or None. Every tensor,
    whatever its chunk count, in time linear in its chunks: the chunk edges cut each axis into intervals, and
    each cell of that grid must be covered by exactly one chunk. A layout that is not a grid of its chunks
    (more than GRID_CELLS_PER_CHUNK cells a chunk) is refused rather than checked slowly."""
    total = math.prod(shape)
    if covered != total:
        return f"{covered} elements in {len(boxes)} chunks for {total}"
    if total == 0:
        return None
    cuts = [sorted({0, d, *(o[i] for o, _ in boxes), *(o[i] + s[i] for o, s in boxes)}) for i, d in enumerate(shape)]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > GRID_CELLS_PER_CHUNK * len(boxes) + 1024:
        return (f"its {len(boxes)} chunks cut it into {cells} pieces, not a grid of chunks as DCP lays tensors out; "
                f"save it again with torch.distributed.checkpoint")
    where = [{x: j for j, x in enumerate(c)} for c in cuts]
    strides = [math.prod(len(c) - 1 for c in cuts[i + 1:]) for i in range(len(cuts))]
    seen = bytearray(cells)
    for o, s in boxes:
        if not math.prod(s):
            continue
        ranges = [range(where[i][o[i]], where[i][o[i] + s[i]]) for i in range(len(shape))]
        starts = [0]
        for r, st in zip(ranges, strides):
            starts = [a + j * st for a in starts for j in r]
        for c in starts:
            if seen[c]:
                return f"chunks at {list(o)} and another overlap, so part of it is never read"
            seen[c] = 1
    return None if all(seen) else "part of it lies in no chunk"


def check_paths(root: Path, md) -> dict[str, tuple]:
    """key -> its path in the saved state dict (planner_data), checked: a tuple of strings and list indices
    whose dotted form is the key (how DCP flattens), indices below the number of entries (a list in the
    checkpoint cannot be longer), no path both a value and a container, no container both a list and a dict.
    A checkpoint without planner_data (saved unflattened) has each key as its own path."""
    where = root / METADATA
    pd = getattr(md, "planner_data", None)
    if pd is None:
        pd = {}
    if not isinstance(pd, dict):
        raise MupscaleError(f"{where}: planner_data is a {type(pd).__name__}, expected DCP's dict of key paths")
    n = len(md.state_dict_metadata)
    paths: dict[str, tuple] = {}
    kinds: dict[tuple, str] = {}  # path prefix -> "leaf" | "list" | "dict"
    for k in md.state_dict_metadata:
        p = pd.get(k, (k,))
        if not isinstance(p, tuple) or not p or not isinstance(p[0], str) or not all(
                type(x) is str or (type(x) is int and 0 <= x < n) for x in p):
            raise MupscaleError(f"{where}: entry {k!r} has the path {str(p)[:120]} in planner_data; expected a "
                                f"tuple of names and list indices (below {n}, the number of entries)")
        if ".".join(map(str, p)) != k:
            raise MupscaleError(f"{where}: entry {k!r} has the path {str(p)[:120]} in planner_data, which "
                                f"names another key")
        for i in range(1, len(p) + 1):
            kind = "leaf" if i == len(p) else ("list" if type(p[i]) is int else "dict")
            old = kinds.setdefault(p[:i], kind)
            if old != kind:
                raise MupscaleError(f"{where}: entry {k!r} (path {str(p)[:120]}) clashes with another entry's "
                                    f"path")
        paths[k] = p
    return paths


# --- reading ----------------------------------------------------------------------------------------------

class _Into:
    """Where DCP's reader copies one stored chunk (the region `dest` of the output): the stored tensor must be
    the chunk the metadata describes, its dtype and its whole shape (DCP's reader would convert another
    dtype silently, and read a part of a larger stored tensor)."""

    def __init__(self, dest: torch.Tensor, sizes: tuple[int, ...] | None, dtype: torch.dtype, where: str):
        self.dest, self.sizes, self.dtype, self.where = dest, sizes, dtype, where

    def detach(self):
        return self

    def size(self):
        return self.dest.size()

    def copy_(self, t: torch.Tensor) -> None:
        stored = t if t._base is None else t._base  # DCP's reader narrows the stored tensor to the rows wanted
        if stored.dtype != self.dtype or tuple(stored.shape) != self.sizes:
            raise MupscaleError(f"{self.where}: holds a {stored.dtype} tensor of shape {list(stored.shape)} where "
                                f"the metadata names a {self.dtype} chunk of size {list(self.sizes or ())}; the "
                                f"metadata and the data disagree")
        self.dest.copy_(t)


def _planner(dest: torch.Tensor | None = None, out: dict | None = None, chunks: dict | None = None,
             where: str = ""):
    """A load planner that puts tensor reads into `dest` (each stored chunk checked against `chunks`: its
    offsets -> sizes) and byte reads into `out` (weights_only)."""
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Into(DefaultLoadPlanner):
        def resolve_tensor(self, read_item):
            region = narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)
            off = read_item.storage_index.offset
            return _Into(region, chunks.get(tuple(off) if off is not None else ()), dest.dtype,
                         f"{where} chunk {list(off or ())}")

        def commit_tensor(self, read_item, tensor) -> None:
            pass

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            out[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
    return Into()


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a file of their own (read, seek, tell)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self._length, self._pos = f.fileno(), offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, off: int, whence: int = 0) -> int:
        self._pos = max(0, off if whence == 0 else self._pos + off if whence == 1 else self._length + off)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        got = os.preadv(self._fd, [memoryview(b)[:n]], self._offset + self._pos) if n else 0
        self._pos += got
        return got


class DcpReader:
    """The tensors and entries of one DCP checkpoint, read on demand (the reader interface of LazyTensors:
    info, read, read_rows, location)."""

    def __init__(self, root: Path):
        from torch.distributed.checkpoint import FileSystemReader
        self.root = Path(root)
        self.md = read_metadata(self.root)
        check_metadata(self.root, self.md)
        self._fs = FileSystemReader(self.root)
        self._fs.storage_data = self.md.storage_data
        self.paths = check_paths(self.root, self.md)
        self._chunks: dict[str, dict] = {}
        self._places: dict = {}  # storage index -> (file, byte of element 0, sizes) or None (DCP reads it)

    def tensors(self) -> list[str]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        return [k for k, m in self.md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)]

    def is_tensor(self, key: str) -> bool:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        return isinstance(self.md.state_dict_metadata.get(key), TensorStorageMetadata)

    def info(self, key: str) -> TensorInfo:
        m = self.md.state_dict_metadata[key]
        return TensorInfo(key, m.properties.dtype, tuple(m.size))

    def files(self) -> list[str]:
        return sorted({i.relative_path for i in self.md.storage_data.values()})

    def location(self, key: str) -> tuple[Path, str]:
        return self.root / METADATA, key

    def read_rows(self, key: str, r0: int, r1: int, alloc=None) -> torch.Tensor:
        """Rows [r0, r1) of tensor `key` (the whole of a 0-d one), reading only the chunks that overlap."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
        info = self.info(key)
        shape = info.shape
        want = () if not shape else (r1 - r0, *shape[1:])
        dest = alloc(want, info.dtype) if alloc is not None else torch.empty(want, dtype=info.dtype)
        if dest.numel() == 0:
            return dest
        offsets = () if not shape else (r0,) + (0,) * (len(shape) - 1)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(want))
        items = create_read_items_for_chunk_list(key, self.md.state_dict_metadata[key], [chunk])
        chunks = self._chunks.get(key)
        if chunks is None:
            chunks = self._chunks[key] = {tuple(c.offsets): tuple(c.sizes) for c in self.md.state_dict_metadata[
                key].chunks}
        items = [it for it in items if not self._pread(it, dest, chunks)]
        if items:
            self._read(LoadPlan(items), _planner(dest=dest, chunks=chunks, where=f"{self.root / METADATA}: "
                                                                                f"tensor {key!r}"), key)
        return dest

    def _place(self, index, sizes: tuple[int, ...] | None, dtype: torch.dtype):
        """Where the bytes of the stored chunk `index` lie: (its file, the byte of its element 0, its sizes),
        when its torch.save record holds exactly the chunk the metadata names (dtype, shape), C-contiguous,
        in this machine's byte order, stored uncompressed in a data record of exactly its storage's size
        (torch's zip reader refuses a directory whose records run past the item); else None (DCP's reader
        reads it, and names what is wrong). Found from the record's zip directory and a load onto the meta
        device (no data read); cached per chunk."""
        if index in self._places:
            return self._places[index]
        import zipfile

        from mupscale_cli.formats.torchsave import data_start
        info, place = self.md.storage_data[index], None
        path = self.root / info.relative_path
        try:
            with open(path, "rb") as f:
                zf = zipfile.ZipFile(_Slice(f, info.offset, info.length))
                records = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
                data = [i for n, i in records.items() if n.startswith("data/")]
                order = zf.read(records["byteorder"]).decode() if "byteorder" in records else None
                rec = data[0] if len(data) == 1 and data[0].compress_type == zipfile.ZIP_STORED else None
                at = data_start(lambda o, n: os.pread(f.fileno(), n, info.offset + o), rec) if rec else None
                # torch.load onto the meta device byteswaps a record of the other byte order: a crash (torch
                # 2.13), so only a record in this machine's order is loaded so
                t = (torch.load(_Slice(f, info.offset, info.length), map_location="meta", weights_only=True)
                     if rec is not None and order == sys.byteorder else None)
            st = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if (st is not None and t.dtype == dtype
                    and sizes is not None and tuple(t.shape) == sizes and t.is_contiguous()
                    and getattr(st, "_checkpoint_offset", None) == at and st.nbytes() == rec.file_size
                    and (t.storage_offset() + t.numel()) * t.element_size() <= st.nbytes()):
                place = (path, info.offset + at + t.storage_offset() * t.element_size(), sizes)
        except Exception:  # noqa: BLE001 - DCP's own reader reads this record, and names what is wrong with it
            place = None
        self._places[index] = place
        return place

    def _pread(self, item, dest: torch.Tensor, chunks: dict) -> bool:
        """Read one ReadItem's elements straight from its file into `dest` when they are one contiguous
        region of `dest` in a record whose bytes lie plainly in the file (`_place`): `dest` is whole rows of
        the tensor, so a contiguous region of it is whole rows of the stored chunk too, or part of one row.
        False: DCP's reader must read it (torch.load of the whole stored chunk: the same values, more bytes
        read)."""
        from torch.distributed._shard._utils import narrow_tensor_by_index
        off = tuple(item.storage_index.offset) if item.storage_index.offset is not None else ()
        place = self._place(item.storage_index, chunks.get(off), dest.dtype)
        if place is None:
            return False
        path, start, sizes = place
        region = narrow_tensor_by_index(dest, item.dest_offsets, item.lengths) if sizes else dest
        if not region.is_contiguous():
            return False  # columns of the tensor (a column-sharded chunk): DCP's reader
        first = sum(o * math.prod(sizes[i + 1:]) for i, o in enumerate(item.storage_offsets)) if sizes else 0
        fd = os.open(path, os.O_RDONLY)
        try:
            whole = pread_all(fd, memoryview(region.reshape(-1).view(torch.uint8).numpy()),
                              start + first * dest.element_size())
        finally:
            os.close(fd)
        if not whole:
            raise MupscaleError(f"{path}: file ended while reading {item.storage_index.fqn!r} (truncated or changed "
                                f"since it was opened)")
        return True

    def read(self, key: str, start: int = 0, count: int | None = None, alloc=None) -> torch.Tensor:
        shape = self.info(key).shape
        t = self.read_rows(key, 0, shape[0] if shape else 1).reshape(-1)
        return t[start:] if count is None else t[start:start + count]

    def get(self, key: str) -> torch.Tensor:
        shape = self.info(key).shape
        return self.read_rows(key, 0, shape[0] if shape else 1)

    def value(self, key: str):
        """A non-tensor entry (param group values, train_state, ...), read with weights_only."""
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
        from torch.distributed.checkpoint.metadata import MetadataIndex
        if self.is_tensor(key):
            return self.get(key)
        out: dict = {}
        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key), dest_offsets=torch.Size([0]),
                        storage_index=MetadataIndex(key), storage_offsets=torch.Size([0]),
                        lengths=torch.Size([0]))
        self._read(LoadPlan([item]), _planner(out=out), key)
        return out[key]

    def _read(self, plan, planner, key: str) -> None:
        try:
            self._fs.read_data(plan, planner).wait()
        except MupscaleError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
            files = sorted({self.md.storage_data[i.storage_index].relative_path for i in plan.items})
            text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
                text = "not a torch.save record torch.load(weights_only=True) accepts"
            raise MupscaleError(f"{self.root}/{files[0] if files else '?'}: cannot read {key!r} "
                                f"({type(e).__name__}: {text}); the checkpoint is damaged") from None


# --- layout: which entries are model, optimizer, other ----------------------------------------------------

@dataclass
class DcpLayout:
    model_root: str | None  # "model", or None: model tensors at the top (torchtitan)
    optim_root: str | None  # "optim" | "optimizer" | None
    flat_optim: bool  # per-tensor param groups (flatten_optimizer_state_dict=True)
    model: dict[str, str] = field(default_factory=dict)  # fqn -> key
    state: dict[str, dict[str, str]] = field(default_factory=dict)  # fqn -> {state key -> key}
    groups: list[dict] = field(default_factory=list)  # {"hp": {name: key}, "params": [fqn]} (nested)
    flat_hp: dict[str, dict[str, str]] = field(default_factory=dict)  # fqn -> {hp -> key} (flattened)
    other: list[str] = field(default_factory=list)  # keys carried over


def layout_of(reader: DcpReader) -> DcpLayout:
    paths = reader.paths
    where = reader.root / METADATA
    nested_model = any(len(p) == 2 and p[0] in MODEL_ROOTS and reader.is_tensor(k) for k, p in paths.items())
    roots = {p[0] for p in paths.values()}
    optim_root = next((r for r in OPTIM_ROOTS if r in roots), None)
    lay = DcpLayout("model" if nested_model else None, optim_root, False)
    groups: dict[int, dict] = {}
    for k, p in paths.items():
        if nested_model and p[0] == "model" and len(p) == 2 and reader.is_tensor(k):
            lay.model[str(p[1])] = k
        elif not nested_model and len(p) == 1 and reader.is_tensor(k) and p[0] != PROVENANCE_KEY:
            lay.model[str(p[0])] = k
        elif optim_root is not None and p[0] == optim_root:
            rest = p[1:]
            if len(rest) == 1 and isinstance(rest[0], str) and rest[0].startswith("state."):
                fqn, _, sk = rest[0].removeprefix("state.").rpartition(".")
                lay.state.setdefault(fqn, {})[sk] = k
                continue
            if len(rest) == 1 and isinstance(rest[0], str) and rest[0].startswith("param_groups."):
                fqn, _, hp = rest[0].removeprefix("param_groups.").rpartition(".")
                lay.flat_hp.setdefault(fqn, {})[hp] = k
                lay.flat_optim = True
                continue
            if len(rest) == 3 and rest[0] == "state":
                lay.state.setdefault(str(rest[1]), {})[str(rest[2])] = k
                continue
            if len(rest) == 3 and rest[0] == "param_groups" and isinstance(rest[1], int):
                groups.setdefault(rest[1], {"hp": {}})["hp"][str(rest[2])] = k
                continue
            raise MupscaleError(f"{where}: optimizer entry {k!r} is neither state.<name>.<key> nor "
                                f"param_groups.<...>; mupscale reads torch optimizer state dicts "
                                f"(get_optimizer_state_dict)")
        elif p[0] != PROVENANCE_KEY:
            lay.other.append(k)
    if not lay.model:
        raise MupscaleError(f"{where}: no model tensors (looked under 'model.' and at the top level)")
    if groups and lay.flat_optim:
        raise MupscaleError(f"{where}: mixes per-tensor (flattened) and per-group optimizer param_groups")
    for i in sorted(groups):
        g = groups[i]
        pk = g["hp"].pop("params", None)
        if pk is None:
            raise MupscaleError(f"{where}: optimizer param group {i} has no 'params'")
        params = reader.value(pk)
        if not isinstance(params, list) or not all(isinstance(x, str) for x in params):
            raise MupscaleError(f"{where}: optimizer param group {i}'s params is not a list of tensor names")
        g["params"] = params
        g["params_key"] = pk
        lay.groups.append(g)
    return lay


def optimizer_state_dict(reader: DcpReader, lay: DcpLayout, lazy_state) -> dict | None:
    """A torch optimizer state dict (ids in group order, `param_names` = fqns) whose state entries are
    `lazy_state({state key: dcp key})` mappings; None without optimizer state."""
    if lay.optim_root is None:
        return None
    where = reader.root / METADATA
    groups: list[dict] = []
    if lay.flat_optim:  # one group per run of tensors with the same hyper-parameters, in saved order
        for fqn, hps in lay.flat_hp.items():
            vals = {hp: reader.value(k) for hp, k in hps.items()}
            vals.pop("params", None)
            vals.pop("param_names", None)
            if groups and _same(groups[-1]["hp"], vals):
                groups[-1]["params"].append(fqn)
            else:
                groups.append({"hp": vals, "params": [fqn]})
    else:
        for g in lay.groups:
            vals = {hp: reader.value(k) for hp, k in g["hp"].items()}
            vals.pop("param_names", None)
            groups.append({"hp": vals, "params": list(g["params"])})
    named = {fqn for g in groups for fqn in g["params"]}
    for fqn in lay.state:
        if fqn not in named:
            raise MupscaleError(f"{where}: optimizer state of {fqn!r} has no param group")
    out_groups, state, nid = [], {}, 0
    for g in groups:
        ng = dict(g["hp"])
        if isinstance(ng.get("betas"), list):
            ng["betas"] = tuple(ng["betas"])
        ng["params"], ng["param_names"] = [], []
        for fqn in g["params"]:
            if fqn in lay.state:
                state[nid] = lazy_state(dict(lay.state[fqn]))
            ng["params"].append(nid)
            ng["param_names"].append(fqn)
            nid += 1
        out_groups.append(ng)
    return {"state": state, "param_groups": out_groups}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_eq(a[k], b[k]) for k in a)


def _eq(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and bool(
            torch.equal(x, y))
    return type(x) is type(y) and x == y


def load_dcp(path: Path, lazy: bool):
    """A `Checkpoint` of a DCP directory: model tensors (canonical names), optimizer state dict (param_names
    = fqns, lazy state), `source` = (reader, layout) for the DCP writer."""
    from mupscale_cli.core.source import LazyTensors
    from mupscale_cli.formats.checkpoint import Checkpoint, _canonical
    root = dcp_dir(path)
    reader = DcpReader(root)
    lay = layout_of(reader)
    _, original = _canonical({fqn: fqn for fqn in lay.model}, root)
    if lazy:
        tensors = LazyTensors(reader, {n: lay.model[fqn] for n, fqn in original.items()})
        osd = optimizer_state_dict(reader, lay, lambda keys: LazyTensors(reader, keys))
    else:
        tensors = {n: reader.get(lay.model[fqn]) for n, fqn in original.items()}
        osd = optimizer_state_dict(reader, lay, lambda keys: {sk: reader.get(k) for sk, k in keys.items()})
    ckpt = Checkpoint(root / METADATA, "dcp", tensors, original, osd, model_key=lay.model_root,
                      optimizer_key=lay.optim_root)
    ckpt.shard_files = reader.files()
    ckpt.source = (reader, lay)
    if PROVENANCE_KEY in reader.paths and not reader.is_tensor(PROVENANCE_KEY):  # one of our outputs
        from mupscale_cli.formats.checkpoint import META_PROV
        prov = reader.value(PROVENANCE_KEY)
        if not isinstance(prov, str):
            raise MupscaleError(f"{root / METADATA}: entry {PROVENANCE_KEY!r} is a {type(prov).__name__}, "
                                f"expected mupscale's provenance (a JSON string)")
        ckpt.metadata = {META_PROV: prov}
        from mupscale_cli.formats.checkpoint import provenance_of
        args = provenance_of(ckpt).get("model_args")
        if isinstance(args, dict):  # DCP has no place for them: our output records them (widen it again)
            ckpt.extra = {"model_args": args}
    return ckpt


def source_files(root: Path) -> list[str]:
    """`.metadata` then the data files, for the input digest."""
    md = read_metadata(root)
    return [METADATA] + sorted({i.relative_path for i in md.storage_data.values()})
