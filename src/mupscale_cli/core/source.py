"""What the widening math reads: tensors by name, their shapes and dtypes, and ranges of their rows,
from a plain dict or a lazily read mapping (`LazyTensors`) that any format's reader can provide."""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch

from mupscale_cli.errors import check_cancelled


class Source(Protocol):
    """What the widening math reads of a checkpoint: its tensors by canonical name (a dict or `LazyTensors`)
    and its optimizer state dict, if any. `formats.checkpoint.Checkpoint` is one; core never imports formats."""
    tensors: Mapping[str, torch.Tensor]
    optimizer: dict | None


class LazyTensors(Mapping):
    """name -> tensor, read from a safetensors reader (file or shards) on each access, never cached.

    `info(name)` gives dtype and shape without reading; `rows(name, r0, r1)` reads only rows [r0, r1).
    `reads` counts tensor reads (whole or rows), for tests and diagnostics."""

    def __init__(self, reader, keys: dict[str, str]):
        self.reader = reader
        self.keys_in_file = keys  # our name -> name in the file
        self.reads = 0
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.keys_in_file[name]
        self._count()
        return self.reader.read(key).reshape(self.reader.info(key).shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_in_file)

    def __len__(self) -> int:
        return len(self.keys_in_file)

    def __contains__(self, name: object) -> bool:
        return name in self.keys_in_file

    def info(self, name: str):
        return self.reader.info(self.keys_in_file[name])

    def rows(self, name: str, r0: int, r1: int, alloc=None) -> torch.Tensor:
        self._count()
        return self.reader.read_rows(self.keys_in_file[name], r0, r1, alloc)

    def location(self, name: str) -> tuple[Path, str]:
        """(file, name in that file) of tensor `name`."""
        return self.reader.location(self.keys_in_file[name])

    def materialize(self) -> dict[str, torch.Tensor]:
        return {n: self[n] for n in self}

    def _count(self) -> None:
        with self._lock:
            self.reads += 1


def tensor_meta(m: Mapping, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of m[name] without reading a lazy tensor."""
    if isinstance(m, LazyTensors):
        info = m.info(name)
        return tuple(info.shape), info.dtype
    t = m[name]
    return tuple(t.shape), t.dtype


def read_rows(m: Mapping, name: str, r0: int, r1: int, alloc=None) -> torch.Tensor:
    """Rows [r0, r1) (first dimension) of m[name]; the whole tensor if it is 0-d. A lazy tensor is read into
    `alloc(shape, dtype)` if given."""
    if isinstance(m, LazyTensors):
        return m.rows(name, r0, r1, alloc)
    t = m[name]
    return t if t.dim() == 0 else t[r0:r1]


def iter_chunks(m: Mapping, name: str, max_elements: int) -> Iterator[torch.Tensor]:
    """m[name] flattened, in pieces of whole rows of about `max_elements` elements (at least one row)."""
    shape, _ = tensor_meta(m, name)
    if len(shape) == 0:
        yield read_rows(m, name, 0, 1).reshape(1)
        return
    row = max(1, math.prod(shape[1:]))
    step = max(1, max_elements // row)
    for r0 in range(0, shape[0], step):
        check_cancelled()
        yield read_rows(m, name, r0, min(shape[0], r0 + step)).reshape(-1)
