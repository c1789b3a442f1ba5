"""Killing `mupscale widen` mid-write (through the installed command) never leaves a file at the output
path: SIGINT exits 130 and SIGTERM 143 without a traceback and remove their temporary file; a SIGKILL
may leave a temporary, which the next run removes (and says so).

The checkpoint is a μP MLP state dict of width 2048 (32 MiB), widened by k=4 into a 512 MiB file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import MUPSCALE
from mupscale_cli.formats.write import TMP_PT

WIDTH, DEPTH, K = 2048, 4, 4


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    sd = {"input.weight": torch.randn(WIDTH, 12, generator=g), "input.bias": torch.randn(WIDTH, generator=g)}
    for i in range(DEPTH - 2):
        sd[f"hidden.{i}.weight"] = torch.randn(WIDTH, WIDTH, generator=g)
        sd[f"hidden.{i}.bias"] = torch.randn(WIDTH, generator=g)
    sd["readout.weight"] = torch.randn(5, WIDTH, generator=g)
    sd["readout.bias"] = torch.randn(5, generator=g)
    torch.save(sd, d / "big.pt")
    yield d / "big.pt"
    shutil.rmtree(d, ignore_errors=True)


def temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if TMP_PT in p.name]


def start_and_signal(ckpt: Path, out: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start a widening, wait until its temporary file holds data on disk (its first blocks written: the file
    is sized in advance, so its allocated blocks tell), stop it there (SIGSTOP, so it cannot finish meanwhile
    however fast the disk), send `sig` and let it go on (SIGCONT) to handle it."""
    argv = [*MUPSCALE, "widen", str(ckpt), "--k", str(K), "--spec", "mup-mlp", "-o", str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def written() -> bool:
        try:
            return any(t.stat().st_blocks > 0 for t in temps(out.parent))
        except FileNotFoundError:
            return False
    try:
        deadline = time.monotonic() + 120
        while not written():
            assert p.poll() is None, f"exited {p.returncode} before writing: {p.stderr.read()}"
            assert time.monotonic() < deadline, "no data written to a temporary file"
            time.sleep(0.001)
        p.send_signal(signal.SIGSTOP)
        assert p.poll() is None and not out.exists(), "the widening finished before the signal; make it larger"
        p.send_signal(sig)
        if sig != signal.SIGKILL:
            p.send_signal(signal.SIGCONT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(argv, p.returncode, stdout, stderr)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_cleans_up(big: Path, tmp_path: Path, sig: signal.Signals, code: int) -> None:
    out = tmp_path / "wide.safetensors"
    r = start_and_signal(big, out, sig)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.splitlines()) <= 1
    assert not out.exists()
    assert temps(tmp_path) == []


def test_sigkill_leaves_nothing_at_the_output_and_next_run_cleans(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "wide.safetensors"
    r = start_and_signal(big, out, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()
    left = temps(tmp_path)
    assert len(left) == 1  # the killed writer's temporary (its pid is in the name)
    r2 = subprocess.run([*MUPSCALE, "widen", str(big), "--k", str(K), "--spec", "mup-mlp", "-o", str(out)],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    assert f"removed stale temporary {left[0]}" in r2.stderr
    assert out.is_file() and temps(tmp_path) == []
    out.unlink()


# ---------------------------------------------------------------------------------------------------
# Signals at any moment, kills during a sharded commit, concurrent writers, a failing environment and
# inputs that change under the run (issue 10). k = 2: a 128 MiB output.

def widen_argv(ckpt: Path, out: Path, *more: str) -> list[str]:
    return [*MUPSCALE, "widen", str(ckpt), "--k", "2", "--spec", "mup-mlp", "-o", str(out), *more]


def leftovers(directory: Path) -> list[str]:
    """Temporaries, moved-aside outputs and lock files."""
    return sorted(p.name for p in directory.iterdir() if ".mupscale-" in p.name)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and "terminate called" not in stderr, stderr
    return lines[0]


def wait_for(p: subprocess.Popen, cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert p.poll() is None, f"exited {p.returncode} before {what}: {p.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def handles(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(mask >> (int(sig) - 1) & 1)


def wait_for_handlers(p: subprocess.Popen) -> None:
    """Until mupscale's first code has run (`mupscale_cli._early_signals` catches SIGTERM, which Python leaves
    at its default): a signal before that, during the interpreter's own start-up, ends the process the
    default way (killed by the signal; a shell shows 130/143), which no code of the program can change."""
    wait_for(p, lambda: handles(p.pid, signal.SIGTERM), "mupscale's signal handlers")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_at_any_moment_never_aborts_and_leaves_nothing(big: Path, tmp_path: Path, sig, code) -> None:
    """From Python start-up through imports, loading, the background digest and value checks, to the
    write: the exit code is 130/143 (or 0 if it finished first), one line, never an abort (-6/134)."""
    out = tmp_path / "wide.safetensors"
    t0 = time.monotonic()  # the whole run's length on this machine: the signals land at fractions of it
    subprocess.run(widen_argv(big, out), check=True, capture_output=True)
    whole = time.monotonic() - t0
    out.unlink()
    landed = []
    for delay in (0.1 * whole, 0.45 * whole, 0.8 * whole):
        p = subprocess.Popen(widen_argv(big, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_handlers(p)  # the signals land from mupscale's first line of code on, at fractions of the run
        time.sleep(delay)
        writing = bool(temps(tmp_path))
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
        where = f"signal after {delay:.2f} s of {whole:.2f} s: exit {p.returncode}, stderr {stderr!r}"
        if p.returncode == 0:  # finished before the signal
            out.unlink()
            continue
        landed.append(writing)
        assert p.returncode == code, where
        assert one_line(stderr) in ("mupscale: interrupted", "mupscale: terminated"), where
        assert stdout == "" and not out.exists() and leftovers(tmp_path) == [], where
    assert len(landed) >= 2, "the widening was too fast for the signals to land"


HOOK = """import atexit, os, signal, time
def _late():  # registered first, so it runs last of the exit handlers: the command is over
    os.kill(os.getpid(), signal.{sig})
    time.sleep(0.3)  # the signal is handled (or not) here
atexit.register(_late)
"""


@pytest.mark.parametrize("case", ["inspect-ok", "widen-error"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_after_the_outcome_changes_nothing(tmp_path: Path, sig: str, case: str) -> None:
    """A signal that lands once the command is over (its summary or its error line printed: here from an exit
    handler, during the interpreter's exit) changes nothing: the command's own exit code and lines. The
    handlers were restored at the command's end (a second line, 130/143 instead of 0 or 2), then Python's
    exit resets them to the default action (killed: -2/-15). (widen's success path ends with os._exit.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK.format(sig=sig))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    tiny = Path(__file__).resolve().parents[1] / "examples" / "nanogpt-tiny.pt"
    argv, code = (["inspect", str(tiny), "--k", "2"], 0) if case == "inspect-ok" else (
        ["widen", str(tmp_path / "nope.pt"), "--k", "2", "-o", str(tmp_path / "w.pt")], 2)
    r = subprocess.run([*MUPSCALE, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "interrupted" not in r.stderr and "terminated" not in r.stderr, r.stderr
    if code:
        assert one_line(r.stderr).startswith("mupscale: error: "), r.stderr


def _snapshot(d: Path) -> dict[str, str]:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_sigkill_during_sharded_commit_keeps_the_old_output(big: Path, tmp_path: Path) -> None:
    """The new directory is built beside the old one and swapped in at once: killed at any moment (the
    last kill lands between the temporary directory being complete and the swap), the old output stays
    byte for byte, or the new one is complete; the next run removes what the killed ones left."""
    from mupscale_cli.commands.widen import WidenOptions, run_widen
    out = tmp_path / "shards"
    shard = ["--shard-size", "24MB"]
    opts = WidenOptions(big, out, k="2", spec="mup-mlp", shard_size="24MB")
    t0 = time.monotonic()
    run_widen(opts)  # in-process: the same code, without a process start
    took = time.monotonic() - t0  # the second kill lands a third of the way into the build, on this machine
    old = _snapshot(out)
    assert len(old) >= 5  # several shards and the index
    kept = []
    for delay in (0.0, took / 3, None):
        p = subprocess.Popen(widen_argv(big, out, *shard, "--force", "--sigma", "0.5"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        building = lambda: [d for d in tmp_path.iterdir() if TMP_PT in d.name and d.is_dir()]  # noqa: E731
        if delay is None:  # the temporary directory holds the finished output: the commit is under way
            wait_for(p, lambda: any((d / "model.safetensors.index.json").exists() for d in building()), "commit")
        else:
            wait_for(p, building, "the temporary directory")
            time.sleep(delay)
        p.kill()
        p.communicate()
        now = _snapshot(out)
        kept.append(now == old)
        if now != old:  # the swap happened before the kill: the new output, complete
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"].values()) | {"model.safetensors.index.json"} == set(now)
            assert all(now[n] != old.get(n) for n in set(index["weight_map"].values()))
            old = now
    assert kept[0] and sum(kept) >= 2, kept
    from dataclasses import replace
    res = run_widen(replace(opts, force=True))
    assert any("removed stale temporary" in n for n in res["notes"])
    assert leftovers(tmp_path) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) | {"model.safetensors.index.json"} == set(_snapshot(out))


def _together(argv: list[str]) -> list[tuple[subprocess.Popen, str]]:
    ps = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    return [(p, p.communicate(timeout=300)[1]) for p in ps]


def test_one_writer_per_output(big: Path, tmp_path: Path) -> None:
    """Two writers on one output: with --force, the second to claim it fails at once naming the first
    (they never interleave) and the first still completes; without --force, of two started together
    exactly one writes, the other says why not."""
    from mupscale_cli.formats.target import lock_path
    out = tmp_path / "wide.safetensors"
    first = subprocess.Popen(widen_argv(big, out, "--force"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = lock_path(out)
    try:  # the first holds the claim (its pid is in the lock file); stopped there, the overlap is certain
        wait_for(first, lambda: lock.exists() and lock.read_text().strip() == str(first.pid), "the claim")
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(widen_argv(big, out, "--force"), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert f"-o {out}: being written by pid {first.pid}" in one_line(second.stderr)
    assert out.is_file() and leftovers(tmp_path) == []
    out2 = tmp_path / "race.safetensors"
    tiny = Path(__file__).resolve().parents[1] / "examples" / "nanogpt-tiny.pt"
    rs = _together([*MUPSCALE, "widen", str(tiny), "--k", "2", "-o", str(out2)])
    assert sorted(p.returncode for p, _ in rs) == [0, 2], [(p.returncode, e) for p, e in rs]
    lost = next(e for p, e in rs if p.returncode == 2)
    assert "being written by pid" in lost or "exists" in lost, lost
    assert out2.is_file() and leftovers(tmp_path) == []


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 140 MiB tmpfs of its own (root only); yields its mount point, unmounted afterwards."""
    import os
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=140M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_disk_full_mid_write_is_one_line_exit_2(big: Path, small_fs: Path, suffix: str) -> None:
    """The free-space check passes, then the disk fills up (another writer) while widen writes: exit 2
    naming the output, its temporary removed."""
    out = small_fs / f"wide{suffix}"
    p = subprocess.Popen(widen_argv(big, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(p, lambda: temps(small_fs), "the temporary")
    try:  # fill the rest of the disk (unbuffered: nothing left to flush at close; the disk may be full already)
        with open(small_fs / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * (1 << 20))
    except OSError:
        pass
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2, stderr
    line = one_line(stderr)
    assert str(out) in line and "no space left" in line and "ENOSPC" in line, line
    assert not out.exists() and leftovers(small_fs) == []


def test_read_only_output_is_one_line_exit_2(big: Path, small_fs: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    out = small_fs / "wide.safetensors"
    r = subprocess.run(widen_argv(big, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert f"-o {out}: read-only file system" in line and "(EROFS)" in line, line


def test_file_size_limit_is_one_line_exit_2(big: Path, tmp_path: Path) -> None:
    """`ulimit -f`: SIGXFSZ is ignored so the write fails with EFBIG, reported in one line."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
    out = tmp_path / "wide.safetensors"
    r = subprocess.run(widen_argv(big, out), capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert str(out) in line and "EFBIG" in line, line
    assert not out.exists() and leftovers(tmp_path) == []


def test_file_size_limit_in_a_worker_of_a_sharded_output_is_one_line_exit_2(big: Path, tmp_path: Path) -> None:
    """Shards are written by the worker threads too: EFBIG there is the same one line, exit 2, and the output
    directory (and its temporary) are not left behind."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
    out = tmp_path / "wide"
    r = subprocess.run(widen_argv(big, out, "--shard-size", "64MB", "--threads", "2"), capture_output=True,
                       text=True, timeout=120, preexec_fn=limit, check=False)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("mupscale: error: ") and "EFBIG" in line, line
    assert not out.exists() and leftovers(tmp_path) == []


def test_input_changed_during_the_run_is_not_committed(big: Path, tmp_path: Path) -> None:
    """A .safetensors input rewritten in place while widen reads it: nothing at -o, exit 2."""
    from safetensors.torch import save_file
    src = tmp_path / "in.safetensors"
    save_file(torch.load(big, weights_only=True), src)
    out = tmp_path / "wide.safetensors"
    p = subprocess.Popen(widen_argv(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(p, lambda: temps(tmp_path), "the temporary")
    with open(src, "r+b") as f:  # same size, other bytes in the middle
        f.seek(src.stat().st_size // 2)
        f.write(b"\x01" * 4096)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2, stderr
    assert f"{src}: changed" in one_line(stderr)
    assert not out.exists() and leftovers(tmp_path) == []


def test_pt_input_truncated_during_the_run(big: Path, tmp_path: Path) -> None:
    """A .pt is read through mmap: truncating it raises SIGBUS in whichever thread reads next; that is one
    line and exit 2, with no temporary left (or, if no read faulted, the input check before the commit)."""
    src = tmp_path / "in.pt"
    shutil.copy(big, src)
    out = tmp_path / "wide.safetensors"
    p = subprocess.Popen(widen_argv(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(p, lambda: temps(tmp_path), "the temporary")
    os.truncate(src, 4096)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2, stderr
    line = one_line(stderr)
    assert line.startswith(f"mupscale: error: {src}") and ("shrank" in line or "changed" in line), line
    assert not out.exists() and leftovers(tmp_path) == []
