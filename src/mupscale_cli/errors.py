"""The one error type users see, and how background work is told to stop."""
import threading


class MupscaleError(Exception):
    """A user-facing error: one line, shown without a traceback; exit_code 2 (usage/input) unless set."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Cancelled(BaseException):
    """Raised inside a background thread whose owner asked it to stop (see `formats.write.Background`)."""


def check_cancelled() -> None:
    """In loops that may run on a background thread: stop if this thread was asked to (a thread left
    running inside torch while the interpreter exits aborts the process: "terminate called ...")."""
    stop = getattr(threading.current_thread(), "mupscale_stop", None)
    if stop is not None and stop.is_set():
        raise Cancelled()
