"""Hugging Face sharded safetensors: `NAME-0000i-of-0000N.safetensors` + `NAME.safetensors.index.json` (a
directory holding one index, or the index file); our optimizer state in `optimizer-*` shards beside them."""
from __future__ import annotations

import json
from pathlib import Path

from mupscale_cli.bounded import shown
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.target import check_inside
from mupscale_cli.formats.checkpoint import (META_DIGESTS, loads_json, META_OPTIM, META_OPTIM_INDEX, Checkpoint, _from_reader,
                                             is_sharded, optimizer_prefix, sharded_index)


def claims(path: Path) -> bool:
    return path.exists() and is_sharded(path)


def read(path: Path, lazy: bool = False) -> Checkpoint:
    from mupscale_cli.formats.safetensors import INDEX_SUFFIX, open_sharded

    index = sharded_index(path)
    check_inside(index.parent, index)
    src = open_sharded(index)  # each shard checked inside the index's directory before it is opened
    meta = src.metadata() or {}
    files = list(src.shards)
    opt_src = None
    if META_OPTIM_INDEX in meta or META_OPTIM in meta:
        name = meta.get(META_OPTIM_INDEX) or (
            optimizer_prefix(index.name.removesuffix(INDEX_SUFFIX)) + INDEX_SUFFIX)
        opt_index = index.parent / name
        if Path(name).name != name or not opt_index.is_file():
            if META_OPTIM_INDEX in meta:
                raise MupscaleError(f"{index}: its optimizer state index {name} is missing from {index.parent}")
        else:
            opt_src = open_sharded(opt_index)
            files += [opt_index.name, *opt_src.shards]
    digests: dict[str, str] = {}
    for reader in [*src.shards.values(), *(opt_src.shards.values() if opt_src else [])]:
        d = reader.metadata().get(META_DIGESTS)
        if d is not None:
            try:
                digests.update(loads_json(d, f"{reader.path}: metadata {META_DIGESTS!r}"))
            except (json.JSONDecodeError, TypeError, ValueError):
                raise MupscaleError(f"{reader.path}: metadata {META_DIGESTS!r} is not a JSON object") from None
    meta = {k: v for k, v in meta.items() if k != META_DIGESTS}
    if digests:
        meta[META_DIGESTS] = json.dumps(digests, sort_keys=True)
    ckpt = _from_reader(src, index, "sharded", lazy, opt_src, meta)
    told = src.index_metadata.get("total_size")
    held = sum(r.info(n).nbytes for r in src.shards.values() for n in r.names())
    if told is not None and told != held:  # never used (an output's index records its own): said, not refused
        ckpt.notes.append(f"{index}: metadata total_size {shown(str(told))} is not the {held} bytes its shards "
                          f"hold; ignored (the output's index records its own)")
    ckpt.shard_files = files
    ckpt.readers = {r.path: r for r in [*src.shards.values(), *(opt_src.shards.values() if opt_src else [])]}
    return ckpt


