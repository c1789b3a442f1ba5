"""The C library functions Python's `os` lacks (renameat2, sync_file_range, mallopt, signal), through ctypes.

They are looked up among the symbols already loaded into this process (dlopen(NULL)): libc is always one of
them, and `ctypes.util.find_library("c")` would run `ldconfig -p` in a subprocess (a fork of a process that
holds torch) on every call."""
from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def libc() -> ctypes.CDLL | None:
    """This process's C library (Linux), or None where there is none to ask."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
