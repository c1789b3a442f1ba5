"""Prints how fast mupscale's bounded parsers refuse hostile inputs (docs/safety.md, 'What is validated').

    python scripts/bounds_report.py
"""
from __future__ import annotations

import re
import time

from mupscale_cli.bounded import load_yaml, loads_json
from mupscale_cli.core.spec import compile_pattern
from mupscale_cli.errors import MupscaleError

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


def timed(what: str, fn) -> None:
    t = time.perf_counter()
    try:
        fn()
        out = "accepted"
    except MupscaleError as e:
        out = str(e)[:70]
    print(f"{what:44} {1e3 * (time.perf_counter() - t):9.2f} ms  {out}")


def regex(p: str) -> re.Pattern:  # the pattern compiler before issue 10 (backtracking)
    parts = re.split(r"(\{\w+\}|\*)", p)
    return re.compile("".join(r"(\d+)" if s.startswith("{") else r"[^.]*" if s == "*" else re.escape(s)
                              for s in parts))


if __name__ == "__main__":
    timed(f"YAML alias bomb ({len(BOMB)} bytes, 9^10 nodes)", lambda: load_yaml(BOMB, "bomb"))
    timed("YAML nested 100000 deep (200 KB)", lambda: load_yaml("x: " + "[" * 100000 + "]" * 100000, "deep"))
    timed("JSON nested 100000 deep", lambda: loads_json("[" * 100000 + "]" * 100000, "deep"))
    timed("JSON integer of 4301 digits", lambda: loads_json("7" * 4301, "int"))
    name = "a" * 33 + "b"
    for stars in (8, 10, 12, 14):
        p = "*a" * stars
        timed(f"glob {stars} stars vs 34 chars (automaton)", lambda: compile_pattern(p).fullmatch(name))
    for stars in (6, 7, 8):
        p = "*a" * stars
        timed(f"glob {stars} stars vs 34 chars (old regex)", lambda: regex(p).fullmatch(name))
