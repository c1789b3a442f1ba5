"""The torch.distributed process group of a run under torchrun (or with WORLD_SIZE, RANK, MASTER_ADDR and
MASTER_PORT set by hand): its environment checked first, its rendezvous bounded and interruptible, and its
teardown on every exit.

- The environment: WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT must be whole
  numbers in range and consistent (RANK < WORLD_SIZE, LOCAL_RANK <= RANK, ...): else one line, exit 2.
- The rendezvous (`init_process_group`) blocks inside C++, where Python's signal handlers cannot run: it
  runs in a thread while the main thread waits, so SIGINT / SIGTERM end the process at once (130 / 143,
  one line; nothing is written before the rendezvous), and a rank that waits longer than
  MUPSCALE_RENDEZVOUS_TIMEOUT seconds (default 300) for the others ends with one line naming the
  variables, exit 2.
- The teardown (`stop`, called by the command line on every exit): after a successful run every rank
  meets at a barrier, then `destroy_process_group`, after what the run held (FSDP2 models, DTensors) is
  released: gloo's work and those destructors run while the interpreter is alive (left to its exit, they
  abort a rank now and then: "terminate called without an active exception")."""
from __future__ import annotations

import os
import re
import signal
import sys
import threading

from mupscale_cli.errors import MupscaleError

TIMEOUT_ENV = "MUPSCALE_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
HINT = "torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; set them all, or none"
_ours = False  # whether this module started the process group (only then does `stop` end it)


def _int(name: str, low: int, high: int | None = None) -> int | None:
    """The variable as a whole number in [low, high], None when unset or empty."""
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    if not re.fullmatch(r"[0-9]{1,9}", v.strip()):
        raise MupscaleError(f"{name}={v[:40]!r} is not a non-negative integer ({HINT})")
    n = int(v)
    if n < low or (high is not None and n > high):
        raise MupscaleError(f"{name}={n} is out of range ({low}..{'' if high is None else high}) ({HINT})")
    return n


def check_env() -> tuple[int, int, int | None]:
    """(rank, world size, local rank or None) from the environment, checked; (0, 1, None) without one."""
    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", 0)
    local_world = _int("LOCAL_WORLD_SIZE", 1)
    if world is None or world == 1:
        if rank:
            raise MupscaleError(f"RANK={rank} but WORLD_SIZE is {'1' if world else 'not set'}: a single "
                                f"process is rank 0 ({HINT})")
        return 0, 1, local
    if rank is None:
        raise MupscaleError(f"WORLD_SIZE={world} but RANK is not set ({HINT})")
    if rank >= world:
        raise MupscaleError(f"RANK={rank} is not below WORLD_SIZE={world} ({HINT})")
    if local is not None and local > rank:
        raise MupscaleError(f"LOCAL_RANK={local} is above RANK={rank} ({HINT})")
    if local_world is not None and (local_world > world or (local is not None and local >= local_world)):
        raise MupscaleError(f"LOCAL_RANK={local}, LOCAL_WORLD_SIZE={local_world}, WORLD_SIZE={world} are "
                            f"inconsistent ({HINT})")
    if not os.environ.get("MASTER_ADDR", "").strip():
        raise MupscaleError(f"WORLD_SIZE={world} but MASTER_ADDR is not set ({HINT})")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun --master_port 0:
    if _int("MASTER_PORT", 0 if agent else 1, 65535) is None:  # its agent's store holds the real port
        raise MupscaleError(f"WORLD_SIZE={world} but MASTER_PORT is not set ({HINT})")
    return rank, world, local


def timeout_s() -> float:
    v = os.environ.get(TIMEOUT_ENV, "").strip()
    if not v:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(v)
    except ValueError:
        t = float("nan")
    if not t > 0:  # NaN too
        raise MupscaleError(f"{TIMEOUT_ENV}={v!r}: give the rendezvous timeout in seconds (> 0)")
    return t


def _where() -> str:
    e = os.environ
    return (f"RANK={e.get('RANK')} of WORLD_SIZE={e.get('WORLD_SIZE')} at MASTER_ADDR={e.get('MASTER_ADDR')} "
            f"MASTER_PORT={e.get('MASTER_PORT')}")


def _quit(code: int, line: str) -> None:
    """One line on stderr and the exit, now: a thread is inside the rendezvous (C++), which no exception
    can leave, and nothing has been written yet."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the exit matters, not the flush
        pass
    os.write(2, line.encode("utf-8", "replace") + b"\n")
    os._exit(code)


def start(backend: str, cuda_device: int | None = None) -> tuple[int, int]:
    """(rank, world size); with WORLD_SIZE > 1 the process group is started (if it is not yet)."""
    rank, world, _ = check_env()
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as td
    if td.is_initialized():
        return td.get_rank(), td.get_world_size()
    limit = timeout_s()
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)
    box: dict = {}

    def rendezvous() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            td.init_process_group(backend=backend)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            box["error"] = e

    main = threading.current_thread() is threading.main_thread()
    saved = {}
    if main:
        def now(signum, frame):
            _quit(130 if signum == signal.SIGINT else 143,
                  "mupscale: interrupted" if signum == signal.SIGINT else "mupscale: terminated")
        for s in (signal.SIGINT, signal.SIGTERM):
            saved[s] = signal.getsignal(s)
            signal.signal(s, now)
    try:
        t = threading.Thread(target=rendezvous, name="mupscale-rendezvous", daemon=True)
        t.start()
        t.join(limit)  # interrupted by a signal: the handler above ends the process
        if t.is_alive():
            _quit(2, f"mupscale: error: the rendezvous timed out after {limit:g} s ({_where()}): start every "
                     f"rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT and a distinct RANK (or set "
                     f"{TIMEOUT_ENV} in seconds)")
    finally:
        for s, h in saved.items():
            if h is not None:
                signal.signal(s, h)
    e = box.get("error")
    if e is not None:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MupscaleError(f"the process group did not start ({_where()}): {type(e).__name__}: {text}")
    global _ours
    _ours = True
    return td.get_rank(), td.get_world_size()


def stop(ok: bool) -> None:
    """End the process group this module started: after a successful run every rank meets at a barrier
    first (no rank leaves while another still needs it); after a failure it is destroyed at once (a
    peer may be gone)."""
    global _ours
    if not _ours:
        return
    _ours = False
    import gc

    import torch.distributed as td
    if not td.is_initialized():
        return
    gc.collect()  # FSDP2 models, DTensors and optimizers of the run (reference cycles) released while the group
    try:  # lives: their destructors after destroy_process_group, at the interpreter's exit, abort a rank
        if ok:
            td.barrier()
    except Exception:  # noqa: BLE001 - a peer failed: its own error says why
        pass
    finally:
        td.destroy_process_group()
