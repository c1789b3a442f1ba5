"""Writing widened checkpoints: `.safetensors` (streamed, atomic), Hugging Face shards (streamed) and `.pt`
(the input's layout, in memory).

Streaming: every output tensor is an `OutTensor` whose bytes a function makes for any flat element
range. `stream_tensors` cuts large tensors into ranges of about `chunk_bytes`; a small thread pool makes
each range, hashes it and hands it to the writer at its place in the file (and at its tied aliases'); the
safetensors writer gathers the bytes in aligned windows that one thread writes to the disk in turn
(formats/direct.py). At most threads + 1 ranges are in flight and a few windows wait for the disk, so memory
stays bounded whatever the size of the model, of a tensor, or of k.

Over 500 lines: the streamed writer (worker threads, back-pressure, the scan beside it) and its three targets
(.safetensors, shards, .pt) share one cancellation and commit path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mupscale_cli.bounded import loads_json
from mupscale_cli.formats import digest
from mupscale_cli.formats.checkpoint import (META_DIGESTS, META_EXTRA, META_OPTIM, META_OPTIM_INDEX, META_PROV, OPTIM_NS,
                                         PROV_DIGESTS, Checkpoint, optimizer_prefix, strip_prefix)
from mupscale_cli.core.noise import CHUNK
from mupscale_cli.formats.safetensors import (INDEX_SUFFIX, ShardedWriter, StreamWriter, TensorInfo, _tensor_bytes,
                                              tensor_digest)
from mupscale_cli.formats.target import (OLD_MARKER, TMP_MARKER, atomic_dir, commit_path, env_error, temp_name,
                                         track, untrack)
from mupscale_cli.errors import Cancelled, MupscaleError, register_thread, unregister_thread
from mupscale_cli.libc import libc as c_library

from mupscale_cli.core.job import DEFAULT_CHUNK_BYTES  # noqa: E402,F401
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-\d{5}-of-\d{5}\.safetensors$")

TMP_PT = TMP_MARKER  # temporaries: .<dest name>.mupscale-tmp-<pid>-<random> (files and directories)
STALE_AGE_S = 3600


@contextmanager
def atomic_path(dest: Path, replace: bool = True) -> Iterator[Path]:
    """A temporary path beside `dest`; renamed onto it (after fsync) only if the block succeeds (over an
    existing `dest` only if `replace`)."""
    tmp = temp_name(dest)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    track(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        commit_path(tmp, dest, replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        untrack(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def clean_stale_temps(dest: Path, max_age_s: float = STALE_AGE_S,
                      also: Callable[[str], bool] | None = None) -> tuple[list[str], list[str]]:
    """Temporaries of earlier runs writing `dest` (`.<name>.mupscale-tmp-*`, files or whole output
    directories, and those of other names in its directory for which `also(name)` holds): remove those
    whose writer (pid in the name) is gone or, for files, that were not written to for `max_age_s`;
    (removed, kept) names. An output directory a killed run had moved aside (`.<name>.mupscale-old-*`, only
    where the swap needs two renames) is put back if `dest` is missing, else removed."""
    removed, kept = [], []

    def ours(name: str, marker: str = TMP_PT) -> str | None:
        """The text after the marker, if `name` is a temporary of `dest` (or of an `also` name)."""
        if not name.startswith(".") or marker not in name:
            return None
        base, _, rest = name[1:].partition(marker)
        return rest if base == dest.name or (also is not None and also(base)) else None

    try:
        entries = [p for p in dest.parent.iterdir() if ours(p.name) is not None or ours(p.name, OLD_MARKER)]
    except OSError:
        return removed, kept
    for p in sorted(entries):
        old_dir = ours(p.name) is None
        pid_text = (ours(p.name) or ours(p.name, OLD_MARKER) or "").split("-", 1)[0]
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        dead = pid_text.isdigit() and not _pid_alive(int(pid_text))
        old = time.time() - st.st_mtime > max_age_s and not p.is_dir()
        if old_dir and dead and not os.path.lexists(dest):
            try:
                os.rename(p, dest)
                removed.append(f"{p.name} (put back as {dest.name})")
                continue
            except OSError:
                pass
        if dead or old:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p.name)
                continue
            except OSError:
                pass
        kept.append(p.name)
    return removed, kept


def optimizer_refs(osd: dict | None) -> dict[str, tuple]:
    """An optimizer state_dict's tensor entries as `__optim__/<tensor name>/<state key>` -> (state dict,
    key) (names from param_names, prefixes stripped), without reading lazy entries: the layout of our
    safetensors files and the keys of recorded digests."""
    from mupscale_cli.formats.checkpoint import LazyTensors
    out: dict[str, tuple] = {}
    if osd is None:
        return out
    for g in osd["param_groups"]:
        for pid, n in zip(g["params"], g.get("param_names", [])):
            st = osd["state"].get(pid, {})
            for key in st:
                if isinstance(st, LazyTensors) or isinstance(st[key], torch.Tensor):
                    out[f"{OPTIM_NS}{strip_prefix(n)}/{key}"] = (st, key)
    return out


def optimizer_tensors(osd: dict | None) -> dict[str, torch.Tensor]:
    """optimizer_refs with every tensor read."""
    return {n: st[key] for n, (st, key) in optimizer_refs(osd).items()}


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
    """`osd` needs only its "param_groups"."""
    groups = []
    for g in osd["param_groups"]:
        ng = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        groups.append(ng)
    return {"kind": kind, "param_groups": groups}


@dataclass
class OutTensor:
    """One tensor of the output: `make(start, stop)` gives its flat elements [start, stop) as a 1-d tensor
    of `dtype`; or `copy_of` names another tensor of the same output whose bytes it repeats (a tied alias:
    each range made for that tensor is written at both places, never made twice)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[int, int], torch.Tensor] | None = None
    copy_of: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.dtype, tuple(self.shape))


@dataclass
class Target:
    """Where `widen` writes: one file (.safetensors or .pt), or Hugging Face shards in `path` (a directory):
    `{prefix}-0000i-of-0000N.safetensors` + `{prefix}.safetensors.index.json`, optimizer state in
    `{optimizer prefix}-...` + its index."""
    kind: str  # safetensors | pt | sharded
    path: Path
    prefix: str = "model"
    shard_size: int | None = None

    @property
    def suffix(self) -> str:
        return ".pt" if self.kind == "pt" else ".safetensors"

    @property
    def index_path(self) -> Path:
        return self.path / f"{self.prefix}{INDEX_SUFFIX}"

    @property
    def optimizer_index_path(self) -> Path:
        return self.path / f"{optimizer_prefix(self.prefix)}{INDEX_SUFFIX}"

    @property
    def shown(self) -> Path:
        """The path to print and load: the file, or the model index."""
        return self.index_path if self.kind == "sharded" else self.path

    @property
    def directory(self) -> Path:
        return self.path if self.kind == "sharded" else self.path.parent


def chunk_elements(t: OutTensor, chunk_bytes: int) -> int:
    """Elements per range of `t`: about chunk_bytes of its float32/float64 working copy, a whole number of
    noise generator chunks when that is at least one (so no generator chunk is drawn twice)."""
    per = max(1, chunk_bytes // max(4, t.dtype.itemsize))
    return per // CHUNK * CHUNK if per >= CHUNK else per


def _tasks(tensors: list[OutTensor], chunk_bytes: int) -> Iterator[tuple[OutTensor, int, int]]:
    for t in tensors:
        n = t.numel
        if n == 0:
            yield t, 0, 0
            continue
        step = chunk_elements(t, chunk_bytes)
        for a in range(0, n, step):
            yield t, a, min(n, a + step)


def limit_heap_growth(threshold: int = 1 << 20) -> None:
    """glibc only (a no-op elsewhere): serve allocations of `threshold` bytes or more with their own mmap,
    returned to the system when freed. By default glibc raises that threshold up to 32 MiB as large
    blocks are freed, and blocks below it stay in per-thread heaps once freed: with ranges, noise chunks
    and read buffers of several sizes on several threads, peak memory then creeps up (measured: +500 MB
    widening with noise). Costs the kernel's zeroing of fresh pages (about 0.15 s per GB written).
    Process-wide: the CLI calls it, the library does not."""
    try:
        libc = c_library()
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)
    except (OSError, AttributeError, TypeError):
        pass


@contextmanager
def _torch_threads(n: int):
    """Our own threads do the parallel work: torch's intra-op pool would only oversubscribe the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class BufferPool:
    """Reused buffers for the large tensors of the ranges in flight. Fresh memory costs the kernel a page
    fault and the zeroing of every page, range after range: a fifth of all CPU time at k = 4 before.
    `alloc` hands out 64-byte aligned views of pooled byte buffers and records them for the calling
    thread's current range (`begin`/`end`); `release` gives them back once the range is written."""

    MIN_BYTES = 1 << 20  # smaller tensors come from torch as usual

    def __init__(self, keep: int):
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()
        self._local = threading.local()

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        taken = getattr(self._local, "taken", None)
        if taken is not None:
            taken.append(buf)
        return buf[:nbytes].view(dtype).view(shape)

    def begin(self) -> None:
        self._local.taken = []

    def end(self) -> list[torch.Tensor]:
        taken, self._local.taken = getattr(self._local, "taken", None) or [], None
        return taken

    def release(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(bufs)
            if len(self._free) > self._keep:  # keep the largest
                self._free.sort(key=lambda b: b.numel())
                del self._free[:len(self._free) - self._keep]


def _split_taken(taken: list[torch.Tensor], data: torch.Tensor) -> tuple[list, list]:
    """(buffers `data` lives in, the others)."""
    ptr = data.untyped_storage().data_ptr()
    mine = [b for b in taken if b.untyped_storage().data_ptr() == ptr]
    return mine, [b for b in taken if b.untyped_storage().data_ptr() != ptr]


class _Chain:
    """One tensor's checksum (formats/digest.py), fed its ranges in order by whichever threads made them."""

    def __init__(self) -> None:
        self.hash = digest.new()
        self.next = 0  # first element not hashed yet
        self.size = 0  # elements of the tensor
        self.failed = False
        self.turn = threading.Condition()

    def feed(self, a: int, b: int, data: torch.Tensor) -> None:
        with self.turn:
            self.turn.wait_for(lambda: self.next == a or self.failed)
            if self.failed:
                raise MupscaleError("internal: an earlier range of this tensor failed")
        self.hash.update(_tensor_bytes(data))  # only the thread whose turn it is gets here
        with self.turn:
            self.next = b
            self.turn.notify_all()

    def fail(self) -> None:
        with self.turn:
            self.failed = True
            self.turn.notify_all()



def stream_tensors(writer, tensors: list[OutTensor], threads: int = 2, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   on_bytes: Callable[[str, int], None] = lambda n, b: None,
                   poll: Callable[[], None] | None = None) -> dict[str, str]:
    """Make, hash and write every tensor range by range; returns the checksum of each tensor's bytes.

    `threads` worker threads (0: this thread alone) each make a range, feed it to its tensor's hash in
    order and write it at its place in the file, and at the same place of each tied alias (`copy_of`: the
    same bytes, never made twice nor read back). This thread hands out the ranges in file order, at most
    `threads` + 1 at a time, reports progress and polls (`poll()` may raise to stop early; an error in a
    worker, an OSError of a write included, is raised here as it is). The same bytes whatever `threads` or
    `chunk_bytes`."""
    names = {t.name: t for t in tensors}

    def root(t: OutTensor) -> str:
        seen = set()
        while t.copy_of is not None:
            if t.copy_of not in names or t.name in seen:
                raise MupscaleError(f"internal: tensor {t.name!r} copies {t.copy_of!r}, which is not made")
            seen.add(t.name)
            t = names[t.copy_of]
        return t.name
    aliases: dict[str, list[str]] = {t.name: [] for t in tensors if t.copy_of is None}
    for t in tensors:
        if t.copy_of is not None:
            aliases[root(t)].append(t.name)
    digests: dict[str, str] = {}
    chains = {name: _Chain() for name in aliases}

    def made(t: OutTensor, a: int, b: int) -> tuple[torch.Tensor, list]:
        chain = chains[t.name]
        pool.begin()
        try:
            data = t.make(a, b, pool.alloc) if t.make is not None else None
            if data is None or data.dtype != t.dtype or data.numel() != b - a:
                raise MupscaleError(f"internal: range [{a}, {b}) of {t.name!r} came out as "
                                    f"{None if data is None else (data.dtype, data.numel())}")
            chain.feed(a, b, data)
        except BaseException:
            pool.end()
            chain.fail()
            raise
        if b == t.numel:
            digests[t.name] = chain.hash.hexdigest()
        held, done = _split_taken(pool.end(), data)
        pool.release(done)  # temporaries now; the range's own buffer once it is written
        return data, held

    def work(t: OutTensor, a: int, b: int) -> None:
        data, held = made(t, a, b)
        try:
            for name in (t.name, *aliases[t.name]):
                writer.write_chunk(name, a, data)
        finally:
            del data
            pool.release(held)

    def put(t: OutTensor, a: int, b: int) -> None:
        for name in (t.name, *aliases[t.name]):
            on_bytes(name, (b - a) * t.dtype.itemsize)
        if poll is not None:
            poll()

    for t in tensors:
        if t.copy_of is None:
            chains[t.name].size = t.numel
    tasks = list(_tasks([t for t in tensors if t.copy_of is None], chunk_bytes))
    pool = BufferPool(keep=4 * (max(threads, 1) + 1))
    with _torch_threads(1):
        if threads <= 0:
            for t, a, b in tasks:
                work(t, a, b)
                put(t, a, b)
        else:
            pending: deque[tuple[OutTensor, int, int, Future]] = deque()
            with ThreadPoolExecutor(threads, thread_name_prefix="mupscale") as executor:
                try:
                    for t, a, b in tasks:  # FIFO: a range starts only after every earlier one has started
                        pending.append((t, a, b, executor.submit(work, t, a, b)))
                        while len(pending) > threads:
                            t0, a0, b0, f0 = pending.popleft()
                            f0.result()
                            put(t0, a0, b0)
                    while pending:
                        t0, a0, b0, f0 = pending.popleft()
                        f0.result()
                        put(t0, a0, b0)
                except BaseException:
                    for *_, f in pending:
                        f.cancel()
                    for c in chains.values():
                        c.fail()
                    raise
    for name, copies in aliases.items():
        for alias in copies:
            digests[alias] = digests[name]
    return digests


class Background:
    """`compute()` on a thread: the input's sha256, or the value checks, while the output is written.
    `poll()` raises its error as soon as there is one (to stop early); `result()` waits and returns or raises;
    `stop()` asks it to stop (its loops call `errors.check_cancelled()`) and waits: the owner calls it on
    every path out, so no thread is inside torch when the interpreter exits (that aborts the process)."""

    def __init__(self, compute: Callable[[], object], name: str = "mupscale-background"):
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(compute,), daemon=True, name=name)
        self._thread.mupscale_stop = threading.Event()
        register_thread(self._thread.mupscale_stop, self._thread)  # stopped on every exit path (cli.guard)
        self._thread.start()

    def _run(self, compute) -> None:
        try:
            self._value = compute()
        except BaseException as e:  # noqa: BLE001 - re-raised in poll()/result()
            self._error = e

    def poll(self) -> None:
        if self._error is not None:
            raise self._error

    def result(self):
        self._thread.join()
        self.poll()
        return self._value

    def stop(self) -> None:
        self._thread.mupscale_stop.set()
        self._thread.join()
        unregister_thread(self._thread)
        if isinstance(self._error, Cancelled):
            self._error = MupscaleError("internal: background work was stopped")


def write_streamed(target: Target, model: list[OutTensor], optim: list[OutTensor], kind: str | None,
                   optim_groups: list[dict] | None, provenance: dict, extra: dict,
                   source_sha256: Callable[[], str] | None = None, threads: int = 2,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   on_bytes: Callable[[str, int], None] = lambda n, b: None,
                   poll: Callable[[], None] | None = None, replace: bool = True,
                   before_commit: Callable[[], None] | None = None) -> None:
    """Stream model tensors and optimizer state into `target` (.safetensors file or shards).

    Atomic: a single file is written beside the target and renamed; shards are written into a new
    directory beside the target directory, which replaces it as a whole (`target.atomic_dir`).
    `replace=False`: the commit fails if the target appeared meanwhile. `before_commit()` runs last before
    the commit and may raise (e.g. an input changed: `InputWatch.check`).
    Optimizer state goes under `__optim__/<tensor name>/<state key>` (in the same file, or in its own
    shards), its groups in the metadata. The checksum (xxh3-128) of every tensor's bytes is recorded under
    `mupscale.xxh3_128` (per shard for shards), and the input's sha256 (computed meanwhile by
    `source_sha256()`, which may raise: validation running meanwhile) in the provenance: the header is
    written with same-length placeholders and rewritten in place once the last tensor is written; nothing
    is committed before source_sha256() returns. `poll()`, called after each range, may raise to stop
    early (temporaries are removed)."""
    prov = dict(provenance)
    if source_sha256 is not None:
        prov["source_sha256"] = "0" * 64
    meta = {"format": "pt", META_PROV: json.dumps(prov, sort_keys=True)}
    if extra:
        meta[META_EXTRA] = json.dumps(jsonable(extra), sort_keys=True)
    if optim_groups is not None:
        meta[META_OPTIM] = json.dumps(optimizer_meta(kind or "", {"param_groups": optim_groups}), sort_keys=True)

    def digests_of(infos: list[TensorInfo], digests: dict[str, str]) -> dict[str, str]:
        placeholder = "0" * digest.HEX_LEN  # same length: the header is rewritten in place
        return {META_DIGESTS: json.dumps({i.name: digests.get(i.name, placeholder) for i in infos}, sort_keys=True)}

    def final_meta() -> dict[str, str]:
        if source_sha256 is None:
            return {}
        return {META_PROV: json.dumps({**prov, "source_sha256": source_sha256()}, sort_keys=True)}

    if target.kind == "safetensors":
        infos = [t.info for t in model + optim]
        with StreamWriter(target.path, infos, {**meta, **digests_of(infos, {})}, writeback=True,
                          direct=True, replace=replace) as w:
            digests = stream_tensors(w, model + optim, threads, chunk_bytes, on_bytes, poll)
            w.update_metadata({**final_meta(), **digests_of(infos, digests)})
            if before_commit is not None:
                before_commit()
        return
    if target.kind != "sharded" or not target.shard_size:
        raise MupscaleError(f"internal: cannot stream into a {target.kind} target")
    model_meta = dict(meta)
    if optim:
        model_meta[META_OPTIM_INDEX] = target.optimizer_index_path.name
    writers: list[ShardedWriter] = []
    with atomic_dir(target.path, replace=replace) as tmp:  # the whole directory appears at once
        try:
            writers.append(ShardedWriter(tmp, [t.info for t in model], model_meta, target.shard_size,
                                         target.prefix, shard_metadata=lambda infos: digests_of(infos, {}),
                                         writeback=True, direct=True))
            if optim:
                writers.append(ShardedWriter(tmp, [t.info for t in optim], meta, target.shard_size,
                                             optimizer_prefix(target.prefix),
                                             shard_metadata=lambda infos: digests_of(infos, {}), writeback=True, direct=True))
            digests = stream_tensors(_Both(writers), model + optim, threads, chunk_bytes, on_bytes, poll)
            fm = final_meta()
            for w in writers:
                w.update_metadata(fm, lambda infos: digests_of(infos, digests))
            for w in reversed(writers):  # inside the temporary directory: nothing is visible yet
                w.commit()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        if before_commit is not None:
            before_commit()


class _Both:
    """Model and optimizer shard writers behind one write_chunk interface."""

    def __init__(self, writers: list[ShardedWriter]):
        self._of: dict[str, ShardedWriter] = {}
        for w in writers:
            for name in w._by_name:
                self._of[name] = w

    def write_chunk(self, name: str, offset: int, data: torch.Tensor) -> None:
        self._of[name].write_chunk(name, offset, data)


def sharded_files(target: Target) -> set[str]:
    """File names of an existing sharded output at `target` (its indexes and the shards they list)."""
    out = set()
    for index in (target.index_path, target.optimizer_index_path):
        if index.is_file():
            out.add(index.name)
            try:
                wm = loads_json(index.read_text(), str(index)).get("weight_map", {})
                out.update(v for v in wm.values() if isinstance(v, str) and Path(v).name == v)
            except (OSError, ValueError, AttributeError, MupscaleError):
                pass
    return out


def write_pt(dest: Path, ckpt: Checkpoint, model: dict[str, torch.Tensor], osd: dict | None,
             extra: dict, replace: bool = True, before_commit: Callable[[], None] | None = None) -> None:
    """The input's layout: same keys (prefixes kept), other entries carried over, model_args updated.
    Tensor digests go into the provenance (`extra["mupscale"]["xxh3_128"]`), keyed as in safetensors."""
    sd = {ckpt.original.get(n, n): t for n, t in model.items()}
    if isinstance(extra.get("mupscale"), dict):
        digests = {n: tensor_digest(t) for n, t in {**model, **optimizer_tensors(osd)}.items()}
        extra = {**extra, "mupscale": {**extra["mupscale"], PROV_DIGESTS: digests}}
    if ckpt.model_key is None and osd is None and not extra:
        obj = sd
    else:
        obj = {**extra, ckpt.model_key or "model": sd}
        if osd is not None:
            obj[ckpt.optimizer_key or "optimizer"] = osd
    with atomic_path(dest, replace) as tmp:
        save_torch(obj, tmp, dest)
        if before_commit is not None:
            before_commit()


def save_torch(obj, path: Path, shown) -> None:
    """torch.save(obj) into `path`; a failed write (disk full, `ulimit -f`, ...) is the one-line environment
    error it is, naming `shown`, not torch's RuntimeError ("unexpected pos ...", which was exit 3)."""
    f = None
    try:
        with open(path, "wb") as raw:
            f = _Recording(raw)
            torch.save(obj, f)
    except OSError as e:
        raise env_error(e, shown) or MupscaleError(f"{shown}: cannot write: {e.strerror or e}") from None
    except RuntimeError:  # torch's zip writer turns a failed write into "unexpected pos ..."
        if f is None or f.error is None:
            raise
        raise env_error(f.error, shown) or MupscaleError(f"{shown}: cannot write: {f.error.strerror}") from None


class _Recording:
    """A file for torch.save that keeps the OSError of a failed write (torch reports only a position)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise
