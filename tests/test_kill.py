"""Killing `mupscale widen` mid-write (through the installed command) never leaves a file at the output
path: SIGINT exits 130 and SIGTERM 143 without a traceback and remove their temporary file; a SIGKILL
may leave a temporary, which the next run removes (and says so).

The checkpoint is a μP MLP state dict of width 2048 (32 MiB), widened by k=4 into a 512 MiB file.
"""
from __future__ import annotations

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
    """Start a widening, wait until its temporary file exists and holds data, then send `sig`."""
    argv = [*MUPSCALE, "widen", str(ckpt), "--k", str(K), "--spec", "mup-mlp", "-o", str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not temps(out.parent):
            assert p.poll() is None, f"exited {p.returncode} before writing: {p.stderr.read()}"
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.005)
        time.sleep(0.3)  # some tensors written
        assert p.poll() is None and not out.exists(), "the widening finished before the signal; make it larger"
        p.send_signal(sig)
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
