"""Every unpickler in mupscale against pickles that name a callable through an allowed module (issue 17).

Protocol 4 resolves a dotted name by walking attributes: `torch.distributed.checkpoint.metadata` + `os.system`
reaches `os.system` through that module's globals. Each payload below calls `os.system("touch MARKER")` (or a
file write) if the unpickler resolves its name; the allow-lists must name exact classes, so every payload is
refused and the marker never appears. The payloads are raw opcodes, so the same name reaches the unpickler
whichever opcode carries it (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT)."""
from __future__ import annotations

import copyreg
import io
import pickle
import shlex
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import mupscale
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats import dcp as dcp_format
from mupscale_cli.formats.checkpoint import _SizeProbe, check_pt_records

DCPM = "torch.distributed.checkpoint.metadata"

# (module, name) pairs: each resolves to something that runs code when called with one string argument
NAMES = [
    (DCPM, "os.system"), (DCPM, "torch.load"), (DCPM, "pickle.loads"), (DCPM, "__builtins__.eval"),
    (DCPM, "Metadata.__init__.__globals__.os.system"), (DCPM, "dataclasses.sys.modules.os.system"),
    (DCPM, "os"), (DCPM, "torch"), (DCPM, "eval"),
    ("torch.distributed.checkpoint.filesystem", "os.system"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo.__init__.__globals__.os.system"),
    ("torch.serialization", "os.system"), ("torch.serialization", "_get_layout.__globals__.os.system"),
    ("torch", "load"), ("torch", "_C._get_tracing_state"), ("torch", "os.system"), ("torch", "float32.__class__"),
    ("torch", "Size.__class__"),
    ("pathlib", "os.system"), ("pathlib", "PosixPath.write_text"), ("pathlib", "Path"),
    ("collections", "OrderedDict.__init__.__globals__.sys"), ("collections", "_sys.modules.os.system"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("builtins", "open"), ("builtins", "set.__class__"), ("__builtin__", "eval"),
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "getoutput"), ("pty", "spawn"),
    ("functools", "partial"), ("operator", "attrgetter"), ("copyreg", "_reconstructor"),
    ("torch._utils", "_rebuild_tensor"), ("numpy", "load"),
]


def _str(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b if len(b) < 256 else pickle.BINUNICODE + len(b).to_bytes(4, "little") + b


def payloads(module: str, name: str, cmd: str) -> dict[str, bytes]:
    """The same call `module.name(cmd)` through each opcode that names a global."""
    arg = _str(cmd)
    return {
        "p4-stack-global": b"\x80\x04" + _str(module) + _str(name) + pickle.STACK_GLOBAL + arg + pickle.TUPLE1
                           + pickle.REDUCE + pickle.STOP,
        "p4-global": b"\x80\x04" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + arg + pickle.TUPLE1
                     + pickle.REDUCE + pickle.STOP,
        "p2-global": b"\x80\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + arg + pickle.TUPLE1
                     + pickle.REDUCE + pickle.STOP,
        "p0-inst": pickle.MARK + f"V{cmd}\n".encode() + pickle.INST + f"{module}\n{name}\n".encode() + pickle.STOP,
        "p1-obj": pickle.MARK + pickle.GLOBAL + f"{module}\n{name}\n".encode() + arg + pickle.OBJ + pickle.STOP,
        "p4-ext1": b"\x80\x04" + pickle.EXT1 + bytes([0xF1]) + arg + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
    }


@pytest.fixture
def ext_registered():
    """EXT1 code 0xF1 names the pair under test (the registry is global: restored afterwards)."""
    added = []

    def register(module: str, name: str) -> None:
        copyreg.add_extension(module, name, 0xF1)
        added.append((module, name))
    yield register
    for module, name in added:
        copyreg.remove_extension(module, name, 0xF1)


def test_payload_opcodes_are_live(tmp_path: Path, ext_registered) -> None:
    """An unrestricted unpickler runs every form (so the refusals below mean something)."""
    ext_registered("os", "system")
    for form, data in payloads("os", "system", f"touch {shlex.quote(str(tmp_path / 'm'))}").items():
        (tmp_path / "m").unlink(missing_ok=True)
        pickle.loads(data)
        assert (tmp_path / "m").exists(), form
    # and a dotted name through an allowed module resolves to os.system under protocol 4: the attack itself
    (tmp_path / "m").unlink()
    pickle.loads(payloads(DCPM, "os.system", f"touch {shlex.quote(str(tmp_path / 'm'))}")["p4-stack-global"])
    assert (tmp_path / "m").exists()


@pytest.mark.parametrize("module,name", NAMES, ids=[f"{m}:{n}" for m, n in NAMES])
def test_dcp_metadata_unpickler_refuses(tmp_path: Path, module: str, name: str, ext_registered) -> None:
    ext_registered(module, name)
    marker = tmp_path / "PWNED"
    for form, data in payloads(module, name, f"touch {shlex.quote(str(marker))}").items():
        d = tmp_path / form
        d.mkdir()
        (d / dcp_format.METADATA).write_bytes(data)
        with pytest.raises(MupscaleError) as e:
            dcp_format.read_metadata(d)
        assert "\n" not in str(e.value), form
        assert not marker.exists(), f"{form}: the payload ran"


@pytest.mark.parametrize("module,name", NAMES, ids=[f"{m}:{n}" for m, n in NAMES])
def test_pt_storage_probe_never_calls(tmp_path: Path, module: str, name: str, ext_registered) -> None:
    """`_SizeProbe` reads a .pt's pickle for its storage records only: every global is a do-nothing stand-in."""
    ext_registered(module, name)
    marker = tmp_path / "PWNED"
    for form, data in payloads(module, name, f"touch {shlex.quote(str(marker))}").items():
        try:
            _SizeProbe(io.BytesIO(data)).load()
        except pickle.UnpicklingError:
            pass
        assert not marker.exists(), f"{form}: the payload ran"


def _pt_with_pickle(path: Path, data: bytes) -> Path:
    """A torch.save zip whose data.pkl is replaced by `data`."""
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i, raw in items:
            z.writestr(i, data if i.filename.endswith("/data.pkl") else raw)
    return path


def test_pt_payload_refused_by_both_readers(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for form, data in payloads(DCPM, "os.system", f"touch {shlex.quote(str(marker))}").items():
        if form == "p4-ext1":
            continue
        p = _pt_with_pickle(tmp_path / f"{form}.pt", data)
        check_pt_records(p)  # the probe: nothing called (it may or may not be able to tell sizes)
        with pytest.raises(Exception):
            torch.load(p, weights_only=True)
        assert not marker.exists(), form


@pytest.mark.parametrize("command", ["widen", "inspect"])
def test_dcp_payload_through_the_command(tmp_path: Path, command: str) -> None:
    """The reported attack, end to end: exit 2, one line naming the refused name, no payload, nothing written."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / dcp_format.METADATA).write_bytes(payloads(DCPM, "os.system", f"touch {shlex.quote(str(marker))}")["p4-stack-global"])
    out = tmp_path / "out"
    args = [command, str(d), "--k", "2"] + (["-o", str(out)] if command == "widen" else [])
    r = mupscale(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: ") and "os.system" in lines[0], r.stderr
    assert not marker.exists() and not out.exists()
