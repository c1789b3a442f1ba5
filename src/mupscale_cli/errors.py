"""The one error type users see, how background work is told to stop, and the helper that keeps every
message on one line."""
import threading
import unicodedata


class MupscaleError(Exception):
    """A user-facing error: one line, shown without a traceback; exit_code 2 (usage/input) unless set."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# Packages imported only by some commands (not declared dependencies, or in an extra), and how to get them.
OPTIONAL = {"mup": "pip install --no-deps mup==1.0.0 (its declared dependencies would pull a CUDA torch)",
            "matplotlib": "pip install 'mupscale-cli[plot]'",
            "transformers": "pip install 'mupscale-cli[hf]'", "accelerate": "pip install 'mupscale-cli[hf]'"}


def missing_package(e: BaseException) -> MupscaleError | None:
    """A one-line error for an optional package that is not installed, naming how to install it."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    if not isinstance(e, ImportError) or top not in OPTIONAL:
        return None
    return MupscaleError(f"this needs the {top} package, which is not installed: {OPTIONAL[top]}")


class Cancelled(BaseException):
    """Raised inside a background thread whose owner asked it to stop (see `formats.write.Background`)."""


_THREADS: list = []  # (stop event, thread) of background threads started and not yet stopped
_THREADS_LOCK = threading.Lock()


def register_thread(stop: threading.Event, thread: threading.Thread) -> None:
    """A background thread the command's exit path must stop and join (`stop_threads`), whatever raised."""
    with _THREADS_LOCK:
        _THREADS.append((stop, thread))


def unregister_thread(thread: threading.Thread) -> None:
    with _THREADS_LOCK:
        _THREADS[:] = [(s, t) for s, t in _THREADS if t is not thread]


def stop_threads() -> None:
    """Ask every registered background thread to stop and join it (cli.guard, on every way out): a thread
    left inside torch while the interpreter exits aborts the process ("terminate called ...")."""
    while True:
        with _THREADS_LOCK:
            if not _THREADS:
                return
            stop, thread = _THREADS.pop()
        stop.set()
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join()


def check_cancelled() -> None:
    """In loops that may run on a background thread: stop if this thread was asked to (a thread left
    running inside torch while the interpreter exits aborts the process: "terminate called ...")."""
    stop = getattr(threading.current_thread(), "mupscale_stop", None)
    if stop is not None and stop.is_set():
        raise Cancelled()


def one_line(text: str) -> str:
    """`text` with every control or line-breaking character escaped as Python does in a repr (\\n, \\r,
    \\x1b, \\u2028, ...): a path or tensor name holding them can neither break a message into two lines
    nor send terminal escape sequences. Printable characters (σ̄, γ̄↑, ...) stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (c == " ") or unicodedata.category(c) in ("Mn", "Mc", "Me")
                   else repr(c)[1:-1] for c in text)
