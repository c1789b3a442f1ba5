"""The one error type users see, and the helper that keeps every message on one line."""
import unicodedata


class MupscaleError(Exception):
    """A user-facing error: one line, shown without a traceback; exit_code 2 (usage/input) unless set."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str) -> str:
    """`text` with every control or line-breaking character escaped as Python does in a repr (\\n, \\r,
    \\x1b, \\u2028, ...): a path or tensor name holding them can neither break a message into two lines
    nor send terminal escape sequences. Printable characters (σ̄, γ̄↑, ...) stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (c == " ") or unicodedata.category(c) in ("Mn", "Mc", "Me")
                   else repr(c)[1:-1] for c in text)
