"""One `.safetensors` file (ours, with optimizer state and provenance in its metadata, or anyone's): read
lazily with pread; written streamed by `write.write_streamed` (low-level format code: `safetensors.py`)."""
from __future__ import annotations

from pathlib import Path

from mupscale_cli.formats.checkpoint import Checkpoint, _from_reader


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def sniff(path: Path) -> bool:
    """A file of another name whose first 8 bytes read as a plausible safetensors header length."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and int.from_bytes(head, "little") < path.stat().st_size


def read(path: Path, lazy: bool = False) -> Checkpoint:
    from mupscale_cli.formats.safetensors import LazySafetensors

    src = LazySafetensors(path)
    ckpt = _from_reader(src, path, "safetensors", lazy)
    ckpt.readers = {path: src}
    return ckpt


