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
    # a /proc 'regular file' of size 0 whose read blocks (/proc/kmsg, readable by root): the input digest thread
    # read it and the command hung after its error; /proc/self/environ elsewhere (size 0, reads content)
    PathCase("input-proc-size-0", lambda d, i: ["/proc/kmsg" if os.access("/proc/kmsg", os.R_OK) else
                                                "/proc/self/environ", "-o", str(d / "w.pt")], "empty file"),
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


class Inputs(dict):
    """The inputs of the cases, each made on first use (only the selected tests' inputs are built)."""

    def __init__(self, d: Path):
        super().__init__(pt=EXAMPLE)
        self.d = d

    def __missing__(self, kind: str) -> Path:
        from hf_tiny import make
        from test_dcp import _small_dcp
        d = self.d
        if kind == "hf":
            make("llama", d / "hf")
        elif kind == "dcp":
            _small_dcp(d / "dcp")
        elif kind in ("st", "sharded"):
            out, more = (d / "st.safetensors", []) if kind == "st" else (d / "sharded", ["--shard-size", "100KB"])
            subprocess.run([*MUPSCALE, "widen", str(EXAMPLE), "--k", "1", "-o", str(out), "-q", *more], check=True,
                           capture_output=True, timeout=120)
        elif kind == "trainer":
            self[kind] = _trainer_checkpoint(d)
            return self[kind]
        self[kind] = {"st": d / "st.safetensors"}.get(kind, d / kind)
        return self[kind]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


def _trainer_checkpoint(d: Path) -> Path:
    """A real checkpoint-N/ of transformers' Trainer (tiny Llama, 3 steps)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import Trainer

    from hf_tiny import make
    from test_hf_trainer import Tokens, targs
    Trainer(model=make("llama", d / "trainer-model"), args=targs(d / "run", 3), train_dataset=Tokens()).train()
    return d / "run" / "checkpoint-3"


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory, request) -> dict:
    root = tmp_path_factory.mktemp("paths")
    runs = []
    chosen = {it.callspec.params["case"].id for it in request.session.items
              if hasattr(it, "callspec") and isinstance(it.callspec.params.get("case"), PathCase)}
    for c in CASES:
        if c.id not in chosen:
            continue
        d = root / c.id
        d.mkdir()
        argv = c.make(d, inputs)
        runs.append((c, d, argv, _snapshot(d)))

    def run(item):
        c, d, argv, snap = item
        try:
            p = subprocess.run([*MUPSCALE, "widen", *argv, "--k", "2"], capture_output=True, text=True, cwd=d,
                               stdin=subprocess.DEVNULL, timeout=120)
        except subprocess.TimeoutExpired as e:  # a hang: this case fails, the others still run
            p = subprocess.CompletedProcess(e.cmd, None, "", f"timed out after {e.timeout} s")
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


# --- outputs that need their own set-up ---------------------------------------------------------------

def _widen(*argv, cwd=None, limit: int | None = None) -> subprocess.CompletedProcess:
    import resource

    def fsize():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([*MUPSCALE, "widen", *map(str, argv), "--k", "2"], capture_output=True, text=True,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=120, preexec_fn=fsize if limit else None)


def _one_line(p: subprocess.CompletedProcess, match: str, code: int = 2) -> None:
    lines = p.stderr.splitlines()
    assert p.returncode == code and len(lines) == 1 and match in lines[0], (p.args, p.stderr)


@pytest.mark.parametrize("form", ["dcp", "safetensors"])
def test_dcp_output_creates_missing_parents_and_removes_them_on_failure(inputs, tmp_path, form) -> None:
    """README: '-o into a directory that does not exist creates it (and removes it if the write fails)', DCP too
    (it said 'directory ... does not exist'), and a single file."""
    src, name, more = (inputs["dcp"], "dcp", ["--spec", "mup-mlp"]) if form == "dcp" else (EXAMPLE, "w.safetensors", [])
    out = tmp_path / "runs" / "wide" / name
    p = _widen(src, "-o", out, *more)
    assert p.returncode == 0 and (out / ".metadata" if form == "dcp" else out).is_file(), p.stderr
    assert f"created directory {tmp_path / 'runs'}" in p.stderr
    # a write that fails (over `ulimit -f`) leaves no directory behind
    out2 = tmp_path / "again" / "wide" / name
    p = _widen(src, "-o", out2, *more, limit=4096)
    _one_line(p, "-o " + str(out2))
    assert not (tmp_path / "again").exists(), list((tmp_path / "again").rglob("*"))


def _mount(args: list[str], where: Path) -> bool:
    where.mkdir(exist_ok=True)
    return subprocess.run(["mount", *args, str(where)], capture_output=True).returncode == 0


@pytest.mark.parametrize("form", ["pt", "sharded", "hf", "dcp"])
def test_read_only_file_system_is_one_line(inputs, tmp_path, form) -> None:
    ro = tmp_path / "ro"
    if not _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        src, out, more = {"pt": (EXAMPLE, ro / "w.pt", []), "sharded": (EXAMPLE, ro / "x" / "w", ["--shard-size", "1GB"]),
                          "hf": (inputs["hf"], ro / "w", []),
                          "dcp": (inputs["dcp"], ro / "x" / "w", ["--spec", "mup-mlp"])}[form]
        p = _widen(src, "-o", out, *more)
        _one_line(p, "read-only file system")
        assert not any(ro.iterdir())
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_output_on_another_file_system_is_written_beside_it(tmp_path) -> None:
    """-o on tmpfs (/dev/shm) while the input and cwd are elsewhere: the temporary is made beside the destination
    (a rename across devices would fail or copy), the bytes are those of an output on the input's file system,
    and --force replaces a sharded directory there whole."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no separate /dev/shm file system here")
    import tempfile
    with tempfile.TemporaryDirectory(dir=shm) as d:
        d = Path(d)
        ref = _widen(EXAMPLE, "-o", tmp_path / "ref.safetensors")
        p = _widen(EXAMPLE, "-o", d / "w.safetensors")
        assert ref.returncode == 0 and p.returncode == 0, p.stderr
        assert (d / "w.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
        _widen(EXAMPLE, "-o", d / "sh", "--shard-size", "100KB")
        p = _widen(EXAMPLE, "-o", d / "sh", "--shard-size", "200KB", "--force")
        assert p.returncode == 0, p.stderr
        names = sorted(x.name for x in (d / "sh").iterdir())
        assert names and all("-of-" in n or n.endswith(".index.json") for n in names), names
        assert sorted(x.name for x in d.iterdir()) == ["sh", "w.safetensors"]  # no temporaries, no lock files


def test_bind_mount_of_an_ancestor_is_refused(inputs, tmp_path) -> None:
    """The same directory reached through a bind mount (another path, same device and inode)."""
    inp = _proj(tmp_path, "hf", inputs)
    b = tmp_path / "b"
    if not _mount(["--bind", str(tmp_path / "proj")], b):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        snap = _snapshot(tmp_path / "proj")
        p = _widen(inp, "-o", b, "--force")
        _one_line(p, "contains the input")
        assert _snapshot(tmp_path / "proj") == snap
    finally:
        subprocess.run(["umount", str(b)], check=True)


# --- exit 1 means 'verify failed' and nothing else ---------------------------------------------------

FAULT = """
import sys
from mupscale_cli.commands import widen
from mupscale_cli.errors import Cancelled, MupscaleError
def fault(*a, **k):
    {body}
widen.run_widen = fault
sys.argv = ["mupscale", "widen", "x.pt", "-o", "y.pt"]
from mupscale_cli.cli import main
main()
"""


@pytest.mark.parametrize("body,match", [
    ("sys.exit(1)", "internal error: SystemExit: 1"),
    ("sys.exit('some library gave up')", "internal error: SystemExit: some library gave up"),
    ("raise Cancelled()", "internal error: Cancelled"),
    ("raise MupscaleError('x', exit_code=1)", "internal error: exit status 1 outside a failed verify"),
    ("raise RuntimeError('boom')", "internal error: RuntimeError: boom"),
])
def test_no_exit_1_outside_verify(tmp_path, body, match) -> None:
    """A fault injected into widen's work (the real program's entry point, in a subprocess): whatever escapes, the
    status is 3 with the internal-error line last, never 1 and never a traceback."""
    import sys
    p = subprocess.run([sys.executable, "-c", FAULT.format(body=body)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, env={**os.environ, "MUPSCALE_DEBUG": ""})
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"mupscale: {match}"), p.stderr
