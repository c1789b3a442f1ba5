"""The one error type users see."""


class MupscaleError(Exception):
    """A user-facing error: one line, shown without a traceback; exit_code 2 (usage/input) unless set."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
