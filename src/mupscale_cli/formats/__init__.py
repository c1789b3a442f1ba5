"""Checkpoint formats: one module per format, each with `claims(path)` and `read(path, lazy) -> Checkpoint`
(and a writer where mupscale writes it). `load_checkpoint` asks the rows of READERS in order; the first that
claims the path reads it. Adding a format: one module and one row here.

    pt.py           PyTorch .pt (nanoGPT, wrapped, state dicts)        write.write_pt
    st.py           one .safetensors file                              write.write_streamed
    shards.py       Hugging Face shards + *.safetensors.index.json     write.write_streamed
    hf.py           Hugging Face model / Trainer checkpoint directory  hf.write (+ hf_trainer.py: optimizer.pt,
                    scheduler.pt of a Trainer checkpoint-N/)
    dcp.py          torch.distributed.checkpoint directory (.metadata) commands/widen_dcp.py (dcp_save.save_lazy)

Beside the readers: checkpoint.py (the Checkpoint every reader returns, shared helpers), safetensors.py
(low-level reading and streamed writing), write.py (streaming tensors out), output.py (the -o target
checked), target.py (how an output appears at once: temporaries, swaps, locks), digest.py, direct.py
(writing around the page cache), torchsave.py (torch.save's record around bytes written elsewhere).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats import dcp, hf, pt, shards, st
from mupscale_cli.formats.checkpoint import Checkpoint, _check_path

READERS: list[tuple[str, Callable[[Path], bool], Callable]] = [
    ("dcp", dcp.is_dcp, dcp.load_dcp),  # a directory with .metadata (or that file)
    ("hf", hf.claims, hf.read),  # a directory with config.json (before shards: it may hold an index)
    ("sharded", shards.claims, shards.read),
    ("safetensors", st.claims, st.read),
    ("pt", pt.claims, pt.read),
    ("safetensors", st.sniff, st.read),  # another name, a safetensors header
    ("pt", lambda p: p.is_file(), pt.read),  # last resort: torch.load says what it is not
]


def reader_for(path: Path) -> Callable:
    for _, claims, read in READERS:
        if claims(path):
            return read
    raise MupscaleError(f"{path}: not a checkpoint mupscale reads (a .pt or .safetensors file, a directory of "
                        f"shards with their index, or a Hugging Face model directory with config.json, or a torch.distributed.checkpoint directory)")


def load_checkpoint(path: str | Path, lazy: bool = False) -> Checkpoint:
    """Read a checkpoint with the first reader of READERS that claims it. lazy=True: no tensor data is read
    (see formats/checkpoint.py)."""
    path = Path(path)
    if not path.is_dir():
        _check_path(path)
    return reader_for(path)(path, lazy)
