"""mupscale: exact μP widening of trained checkpoints (weights, optimizer state, hyper-parameters)."""

__version__ = "0.1.0"


def is_program() -> bool:
    """Whether this process is the `mupscale` program (its script, or `python -m mupscale_cli`)."""
    import sys
    from pathlib import Path
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if prog.name == "mupscale" or (prog.name == "__main__.py" and prog.parent.name == "mupscale_cli"):
        return True
    argv = getattr(sys, "orig_argv", [])
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "mupscale_cli"


def _early_signals() -> None:
    """As the program, before the imports (typer, rich, torch: a second or more): SIGINT and SIGTERM end
    it at once with one line and exit 130/143, nothing being written yet. `cli.guard` takes over later."""
    import os
    import signal

    def stop(signum, frame):
        os.write(2, b"mupscale: interrupted\n" if signum == signal.SIGINT else b"mupscale: terminated\n")
        os._exit(130 if signum == signal.SIGINT else 143)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


if is_program():
    _early_signals()
