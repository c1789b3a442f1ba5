"""The distributed start-up (mupscale_cli.procgroup): a broken torchrun environment is one line and exit 2
before anything is read; SIGTERM / SIGINT during the rendezvous end the process at once (143 / 130); a
rendezvous the other ranks never join times out with one line naming the variables (exit 2)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MUPSCALE
from mupscale_cli.errors import MupscaleError
from mupscale_cli.procgroup import TIMEOUT_ENV, check_env, timeout_s
from test_dcp import _small_dcp

DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "TORCHELASTIC_USE_AGENT_STORE", TIMEOUT_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether some process listens on TCP `port` (/proc/net/tcp*, state 0A): rank 0's store is up, so
    the rendezvous is under way. Read, not connected to: a probe connection would disturb the store."""
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                return True
    return False


def env(**kv: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    e.update(kv)
    return e


@pytest.fixture(scope="module")
def dcp_in(tmp_path_factory) -> Path:
    return _small_dcp(tmp_path_factory.mktemp("rdzv") / "base")


def widen_argv(src: Path, out: Path) -> list[str]:
    return [*MUPSCALE, "widen", str(src), "-o", str(out), "--k", "2", "--spec", "mup-mlp"]


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and "terminate called" not in stderr, stderr
    return lines[0]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="watches the store's port through /proc")
@pytest.mark.parametrize("sig,code,line", [(signal.SIGTERM, 143, "mupscale: terminated"),
                                           (signal.SIGINT, 130, "mupscale: interrupted")], ids=["TERM", "INT"])
def test_signal_during_the_rendezvous_ends_it_at_once(dcp_in, tmp_path, sig, code, line):
    """Rank 0 of 2, rank 1 never started: rank 0 waits in the rendezvous (its store listening); the signal
    ends it within seconds (torch's own wait is 30 min, inside C++ where no Python handler runs)."""
    port = free_port()
    out = tmp_path / "out"
    p = subprocess.Popen(widen_argv(dcp_in, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            assert p.poll() is None, f"exited {p.returncode} before the rendezvous: {p.stderr.read()}"
            assert time.monotonic() < deadline, "rank 0 never started its store"
            time.sleep(0.01)
        time.sleep(0.2)  # inside init_process_group's wait for rank 1
        t0 = time.monotonic()
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == code, (p.returncode, stderr)
    assert took < 10, took
    assert one_line(stderr) == line and stdout == ""
    assert not out.exists() and not [q for q in tmp_path.iterdir() if ".mupscale-" in q.name]


def test_rendezvous_timeout_is_one_line_exit_2(dcp_in, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run(widen_argv(dcp_in, out), capture_output=True, text=True, timeout=120,
                       env=env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                               **{TIMEOUT_ENV: "3"}))
    assert r.returncode == 2, r.stderr
    msg = one_line(r.stderr)
    assert msg.startswith("mupscale: error: the rendezvous timed out after 3 s"), msg
    for v in ("RANK=0", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", TIMEOUT_ENV):
        assert v in msg, msg
    assert time.monotonic() - t0 < 60 and not out.exists()


BAD_ENV = [  # (environment, what the line must name)
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' is not a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "1.0"}, "RANK='1.0' is not a non-negative integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is out of range"),
    ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK=1 but WORLD_SIZE is 1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "LOCAL_RANK=1 is above RANK=0"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "LOCAL_RANK=2, LOCAL_WORLD_SIZE=2, WORLD_SIZE=4 are inconsistent"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
     "MASTER_PORT='http' is not a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is out of range"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"},  # 0 only from torchrun's agent
     "MASTER_PORT=0 is out of range"),
]


@pytest.mark.parametrize("bad,what", BAD_ENV, ids=[w.split(" ")[0] + str(i) for i, (_, w) in enumerate(BAD_ENV)])
def test_bad_environment_is_named(monkeypatch, bad, what):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in bad.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(MupscaleError) as e:
        check_env()
    assert what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_environments(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    assert check_env() == (0, 1, None) and timeout_s() == 300
    for kv, want in [({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, (0, 1, 0)),
                     ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}, (3, 4, 1))]:
        for k, v in kv.items():
            monkeypatch.setenv(k, v)
        assert check_env() == want
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(MupscaleError, match=TIMEOUT_ENV):
            timeout_s()


@pytest.mark.parametrize("bad,what", [({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set"),
                                      ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                        "MASTER_PORT": "garbage"}, "MASTER_PORT='garbage'")], ids=["rank", "port"])
@pytest.mark.parametrize("command", ["widen", "verify"])
def test_bad_environment_end_to_end(dcp_in, tmp_path, bad, what, command):
    """Through the command: exit 2 (not 3), one line naming the variable, nothing written."""
    out = tmp_path / "out"
    argv = widen_argv(dcp_in, out) if command == "widen" else [*MUPSCALE, "verify", str(dcp_in), "--steps", "1"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env(**bad))
    assert r.returncode == 2, r.stderr
    msg = one_line(r.stderr)
    assert msg.startswith("mupscale: error: ") and what in msg, msg
    assert not out.exists() and r.stdout == ""


RANK_PROGRAM = """
import os, sys, threading
import torch.distributed as td
from mupscale_cli import procgroup
rank, world = procgroup.start("gloo")
assert (rank, world) == (int(os.environ["RANK"]), 2) and td.is_initialized()
procgroup.stop(True)
assert not td.is_initialized(), "the process group outlived stop()"
procgroup.stop(True)  # a second stop is a no-op
print("stopped", rank, [t.name for t in threading.enumerate() if t.name == "mupscale-rendezvous"])
"""


def test_stop_barriers_and_destroys_the_group():
    """Two ranks start a gloo group through procgroup, stop it (barrier, destroy_process_group): nothing of
    the group is left for the interpreter's exit, and both exit 0 with no abort."""
    port = free_port()
    ps = [subprocess.Popen([sys.executable, "-c", RANK_PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=str(port)))
          for r in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    for r, (p, (out, err)) in enumerate(zip(ps, outs)):
        assert p.returncode == 0 and "terminate called" not in err, (r, p.returncode, err[-2000:])
        assert out.strip() == f"stopped {r} []", out
