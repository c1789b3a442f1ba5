"""-o never equals, contains or lies inside the input, for every format, however it is spelled (issue 17 §2).

Each case builds a project directory holding the input and a file of the user's, runs the installed `mupscale
widen ... --force` in a subprocess, and requires exit 2, one line naming why, and every file of the project
unchanged (before the guard, `-o` an ancestor of the input replaced the directory: input and user files gone,
exit 0)."""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import MUPSCALE

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanogpt-tiny.pt"


@dataclass
class PathCase:
    id: str
    make: Callable[[Path, dict], list[str]]  # (case dir, inputs) -> argv after `widen`
    match: str


def _proj(d: Path, kind: str, inputs: dict) -> Path:
    """d/proj holding the input (as proj/model or proj/ckpt.pt) and proj/notes.txt."""
    proj = d / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("mine")
    src = inputs[kind]
    if src.is_file():
        shutil.copy(src, proj / src.name)
        return proj / src.name
    shutil.copytree(src, proj / "model")
    return proj / "model"


def _link(d: Path, target: Path) -> Path:
    (d / "link").symlink_to(target)
    return d / "link"


def _hardlink(d: Path, inputs: dict) -> list[str]:
    inp = _proj(d, "pt", inputs)
    os.link(inp, d / "same.pt")
    return [str(inp), "-o", str(d / "same.pt"), "--force"]


CASES = [
    # -o an ancestor of the input (the reported data loss), each format
    PathCase("pt-sharded-out-ancestor", lambda d, i: [str(_proj(d, "pt", i)), "-o", str(d / "proj"),
                                                       "--shard-size", "1GB", "--force"], "contains the input"),
    PathCase("hf-out-parent", lambda d, i: [str(_proj(d, "hf", i)), "-o", str(d / "proj"), "--force"],
             "contains the input"),
    PathCase("hf-out-grandparent", lambda d, i: [str(_proj(d, "hf", i)), "-o", str(d), "--force"],
             "contains the input"),
    PathCase("dcp-out-parent", lambda d, i: [str(_proj(d, "dcp", i)), "-o", str(d / "proj"), "--force",
                                              "--spec", "mup-mlp"], "contains the input"),
    PathCase("dcp-metadata-file-out-parent", lambda d, i: [str(_proj(d, "dcp", i) / ".metadata"), "-o",
                                                            str(d / "proj"), "--force", "--spec", "mup-mlp"],
             "contains the input"),
    # spelled another way: a symlink to the ancestor, `..`, a relative path
    PathCase("hf-out-symlink-to-parent", lambda d, i: [str(_proj(d, "hf", i)), "-o",
                                                        str(_link(d, d / "proj")), "--force"], "contains the input"),
    PathCase("hf-out-dotdot", lambda d, i: [str(_proj(d, "hf", i)), "-o", str(d / "proj" / "model" / ".."),
                                             "--force"], "contains the input"),
    PathCase("hf-out-relative-dot", lambda d, i: [str(_proj(d, "hf", i).relative_to(d)), "-o", ".", "--force"],
             "contains the input"),
    # -o is the input, or inside it
    PathCase("hf-out-is-input-via-symlink", lambda d, i: [str(_proj(d, "hf", i)), "-o",
                                                           str(_link(d, d / "proj" / "model")), "--force"],
             "is the input"),
    PathCase("dcp-out-is-input", lambda d, i: [str(_proj(d, "dcp", i)), "-o", str(d / "proj" / "model"), "--force",
                                                "--spec", "mup-mlp"], "is the input"),
    PathCase("dcp-out-inside-input", lambda d, i: [str(_proj(d, "dcp", i)), "-o", str(d / "proj" / "model" / "w"),
                                                    "--spec", "mup-mlp"], "inside the input"),
    PathCase("hf-out-inside-input", lambda d, i: [str(_proj(d, "hf", i)), "-o", str(d / "proj" / "model" / "w")],
             "inside the input"),
    PathCase("pt-out-hard-link-of-input", _hardlink, "is the input"),
    # -o a symbolic link: to an earlier output directory (was a traceback, exit 1), to a file, dangling (was
    # "written meanwhile by another run?")
    PathCase("hf-out-link-to-earlier-output", lambda d, i: [str(_proj(d, "hf", i)), "-o",
                                                             str(_earlier_output_link(d)), "--force"],
             "is a symbolic link (to earlier)"),
    PathCase("pt-out-link-to-file", lambda d, i: [str(EXAMPLE), "-o", str(_file_link(d)), "--force"],
             "is a symbolic link"),
    PathCase("pt-out-dangling-link", lambda d, i: [str(EXAMPLE), "-o", str(_dangling(d))],
             "which does not exist"),
    PathCase("sharded-out-dangling-link", lambda d, i: [str(EXAMPLE), "-o", str(_dangling(d, "dang")),
                                                         "--shard-size", "1GB"], "which does not exist"),
    # the other input forms, -o their ancestor, each output form (issue 17 §1: every format)
    PathCase("st-sharded-out-ancestor", lambda d, i: [str(_proj(d, "st", i)), "-o", str(d / "proj"),
                                                       "--shard-size", "1GB", "--force"], "contains the input"),
    PathCase("st-dcp-out-ancestor", lambda d, i: [str(_proj(d, "st", i)), "-o", str(d / "proj"), "--format", "dcp",
                                                   "--force"], "contains the input"),
    PathCase("pt-hf-out-ancestor", lambda d, i: [str(_proj(d, "pt", i)), "-o", str(d / "proj"), "--format", "hf",
                                                  "--force"], "contains the input"),
    PathCase("sharded-in-out-ancestor", lambda d, i: [str(_proj(d, "sharded", i)), "-o", str(d / "proj"),
                                                       "--shard-size", "1GB", "--force"], "contains the input"),
    PathCase("sharded-index-in-out-ancestor", lambda d, i: [str(_proj(d, "sharded", i) / "model.safetensors.index.json"),
                                                             "-o", str(d / "proj"), "--shard-size", "1GB", "--force"],
             "contains the input"),
    PathCase("sharded-in-out-is-input", lambda d, i: [str(_proj(d, "sharded", i)), "-o", str(d / "proj" / "model"),
                                                       "--shard-size", "1GB", "--force"], "is the input"),
    PathCase("trainer-out-parent", lambda d, i: [str(_proj(d, "trainer", i)), "-o", str(d / "proj"), "--force"],
             "contains the input"),
    PathCase("hf-dcp-out-parent", lambda d, i: [str(_proj(d, "hf", i)), "-o", str(d / "proj"), "--format", "dcp",
                                                 "--force"], "contains the input"),
    PathCase("dcp-sharded-out-parent", lambda d, i: [str(_proj(d, "dcp", i)), "-o", str(d / "proj"),
                                                      "--shard-size", "1GB", "--force", "--spec", "mup-mlp"],
             "contains the input"),
    # -o that exists as a FIFO, a socket or a device: never replaced, --force or not, and never opened (a hang)
    PathCase("out-fifo-force", lambda d, i: [str(EXAMPLE), "-o", str(_fifo(d)), "--force"], "is a FIFO"),
    PathCase("out-socket-force", lambda d, i: [str(EXAMPLE), "-o", str(_socket(d)), "--force"], "is a socket"),
    PathCase("out-dev-null-sharded-force", lambda d, i: [str(EXAMPLE), "-o", "/dev/null", "--shard-size", "1GB",
                                                          "--force"], "is a device"),
    # -o spelled as a directory but naming a file; an existing directory for a file output
    PathCase("out-trailing-slash", lambda d, i: [str(EXAMPLE), "-o", str(d / "wide.safetensors") + "/"],
             "ends in '/'"),
    PathCase("out-existing-dir-for-file", lambda d, i: [str(EXAMPLE), "-o", str(_dir(d, "w.pt")), "--force"],
             "is a directory"),
    # control characters in -o stay escaped on one line
    PathCase("out-newline-escape", lambda d, i: [str(EXAMPLE), "-o", str(_file(d)) + "/new\nline\x1b[2J.pt"],
             "new\\nline\\x1b[2J.pt"),
    # what the operating system refuses is one line, exit 2 (was a traceback, exit 1)
    PathCase("out-name-too-long", lambda d, i: [str(EXAMPLE), "-o", str(d / ("x" * 300 + ".pt"))],
             "ENAMETOOLONG"),
    PathCase("input-name-too-long", lambda d, i: [str(d / ("y" * 300 + ".pt")), "-o", str(d / "w.pt")],
             "ENAMETOOLONG"),
    PathCase("out-in-proc", lambda d, i: [str(EXAMPLE), "-o", "/proc/self/x.pt"], "-o /proc/self/x.pt: cannot"),
    PathCase("out-in-proc-1", lambda d, i: [str(EXAMPLE), "-o", "/proc/1/x.pt"], "-o /proc/1/x.pt: cannot"),
    PathCase("dcp-out-name-too-long", lambda d, i: [str(_proj(d, "dcp", i)), "-o", str(d / ("x" * 300)),
                                                     "--spec", "mup-mlp"], "ENAMETOOLONG"),
    PathCase("dcp-out-parent-is-a-file", lambda d, i: [str(_proj(d, "dcp", i)), "-o", str(_file(d) / "x" / "w"),
                                                        "--spec", "mup-mlp"], "not a directory"),
    PathCase("input-through-a-file", lambda d, i: [str(_file(d) / "x.pt"), "-o", str(d / "w.pt")], "no such file"),
    PathCase("input-directory-named-pt", lambda d, i: [str(_dir(d, "in.pt")), "-o", str(d / "w.pt")],
             "in.pt"),
    PathCase("out-parent-is-a-file", lambda d, i: [str(EXAMPLE), "-o", str(_file(d) / "w.pt")], "not a directory"),
    # inputs that are not files: refused at once, never read (a FIFO would block, /dev/zero never end)
    PathCase("input-fifo", lambda d, i: [str(_fifo(d)), "-o", str(d / "w.pt")], "is a FIFO"),
    PathCase("input-dev-zero", lambda d, i: ["/dev/zero", "-o", str(d / "w.pt")], "is a device"),
    PathCase("input-socket", lambda d, i: [str(_socket(d)), "-o", str(d / "w.pt")], "is a socket"),
    PathCase("input-stdin", lambda d, i: ["/dev/stdin", "-o", str(d / "w.pt")], "is a device"),
]


def _earlier_output_link(d: Path) -> Path:
    (d / "earlier").mkdir()
    (d / "earlier" / "config.json").write_text("{}")
    (d / "latest").symlink_to("earlier")
    return d / "latest"


def _file_link(d: Path) -> Path:
    (d / "target.pt").write_bytes(b"old")
    (d / "link.pt").symlink_to("target.pt")
    return d / "link.pt"


def _dangling(d: Path, name: str = "dang.pt") -> Path:
    (d / name).symlink_to("nowhere")
    return d / name


def _file(d: Path) -> Path:
    (d / "afile").write_text("x")
    return d / "afile"


def _dir(d: Path, name: str) -> Path:
    (d / name).mkdir()
    (d / name / "keep.txt").write_text("mine")
    return d / name


def _socket(d: Path) -> Path:
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock.pt"))  # the file stays after the socket closes
    s.close()
    return d / "sock.pt"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "fifo.pt")
    return d / "fifo.pt"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() if not p.is_symlink() else os.readlink(p).encode()
            for p in sorted(d.rglob("*")) if (p.is_file() and not _special(p)) or p.is_symlink()}


def _special(p: Path) -> bool:
    import stat
    return not stat.S_ISREG(p.stat().st_mode)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    from hf_tiny import make
    from test_dcp import _small_dcp
    d = tmp_path_factory.mktemp("inputs")
    make("llama", d / "hf")
    _small_dcp(d / "dcp")
    for out, more in ((d / "st.safetensors", []), (d / "sharded", ["--shard-size", "100KB"])):
        subprocess.run([*MUPSCALE, "widen", str(EXAMPLE), "--k", "1", "-o", str(out), "-q", *more], check=True,
                       capture_output=True, timeout=120)
    return {"pt": EXAMPLE, "hf": d / "hf", "dcp": d / "dcp", "st": d / "st.safetensors", "sharded": d / "sharded",
            "trainer": _trainer_checkpoint(d)}


def _trainer_checkpoint(d: Path) -> Path:
    """A real checkpoint-N/ of transformers' Trainer (tiny Llama, 3 steps)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import Trainer

    from hf_tiny import make
    from test_hf_trainer import Tokens, targs
    Trainer(model=make("llama", d / "trainer-model"), args=targs(d / "run", 3), train_dataset=Tokens()).train()
    return d / "run" / "checkpoint-3"


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("paths")
    runs = []
    for c in CASES:
        d = root / c.id
        d.mkdir()
        argv = c.make(d, inputs)
        runs.append((c, d, argv, _snapshot(d)))

    def run(item):
        c, d, argv, snap = item
        p = subprocess.run([*MUPSCALE, "widen", *argv, "--k", "2"], capture_output=True, text=True, cwd=d,
                           stdin=subprocess.DEVNULL,
                           timeout=120)
        return c.id, (p, snap, d)
    with ThreadPoolExecutor(max_workers=4) as ex:  # a hang (a FIFO opened) fails by subprocess's timeout
        return dict(ex.map(run, runs))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_output_over_input_refused(case: PathCase, results) -> None:
    p, snap, d = results[case.id]
    where = f"{p.args}\nstderr: {p.stderr!r}"
    assert p.returncode == 2, where
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: ") and case.match in lines[0], where
    assert _snapshot(d) == snap, where  # the input and the user's notes are untouched, nothing added
