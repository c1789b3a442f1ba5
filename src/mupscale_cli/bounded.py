"""Parsers for untrusted text with bounded time and memory: YAML (specs, .bsh, --hparams), JSON (safetensors
headers and metadata, Hugging Face indexes) and integers given as text.

- YAML: no aliases (`*name`: an alias bomb of a few hundred bytes expands to gigabytes), nesting at most
  MAX_DEPTH levels, at most YAML_MAX_BYTES of text, integers of at most MAX_INT_DIGITS digits.
- JSON: nesting at most MAX_DEPTH levels (Python's decoder recurses: 100000 levels end in RecursionError),
  integers of at most MAX_INT_DIGITS digits.
- Integers in options and size expressions: at most MAX_INT_DIGITS digits (Python refuses to convert longer
  strings with a ValueError of its own).
Each refusal is a MupscaleError naming where, on one line.
"""
from __future__ import annotations

import json
import re
from typing import Any

import yaml

from mupscale_cli.errors import MupscaleError

MAX_DEPTH = 64
YAML_MAX_BYTES = 4 << 20  # PyYAML (pure Python) reads about 0.2 MB/s: at most ~20 s; real specs are kilobytes
MAX_INT_DIGITS = 4300  # Python's own limit for int(str) (sys.get_int_max_str_digits() by default)


def shown(text: str, limit: int = 40) -> str:
    """repr of `text`, cut after `limit` characters (a value echoed in a message stays short)."""
    return repr(text if len(text) <= limit else f"{text[:limit]}...")


def int_text(text: str, what: str) -> int:
    """int(text) for a string of ASCII digits (callers check the form); a clear error past MAX_INT_DIGITS."""
    if len(text) > MAX_INT_DIGITS:
        raise MupscaleError(f"{what}: an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases, nested at most MAX_DEPTH levels, integers of at most MAX_INT_DIGITS
    digits. (Anchors alone are harmless; an alias is refused where it is used.)"""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed: write the "
                                              f"value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        digits = sum(c.isdigit() for c in str(value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {digits} digits (at most "
                                                    f"{MAX_INT_DIGITS})", node.start_mark)
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


_OPENERS = re.compile(r"(?:[\[{]\s*){%d}" % (MAX_DEPTH + 1))  # that many flow openers in a row


def load_yaml(text: str, where: str, loader: type[BoundedLoader] = BoundedLoader) -> Any:
    """Parse YAML `text` (from `where`, for messages) within the bounds above."""
    if len(text) > YAML_MAX_BYTES:
        raise MupscaleError(f"{where}: {len(text)} characters of YAML, more than the {YAML_MAX_BYTES} allowed")
    if _OPENERS.search(text):  # the common deep form, refused before PyYAML scans it all (seconds)
        raise MupscaleError(f"{where}: not valid YAML: nested more than {MAX_DEPTH} levels deep")
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        why = getattr(e, "problem", None) or " ".join(str(e).split())
        raise MupscaleError(f"{where}: not valid YAML{at}: {why}") from None
    except RecursionError:  # not expected within MAX_DEPTH; a last guard
        raise MupscaleError(f"{where}: YAML nested too deeply") from None


class _LongInt(ValueError):
    pass


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInt(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def depth(obj: Any) -> int:
    """Nesting depth of lists/tuples/dicts (a scalar: 0), without recursion."""
    best, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, (list, tuple)):
            best = max(best, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in x)
    return best


def loads_json(text: str | bytes, where: str, object_pairs_hook=None) -> Any:
    """json.loads within the bounds above; a ValueError (with the reason) for anything else malformed."""
    try:
        value = json.loads(text, parse_int=_json_int, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise MupscaleError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep") from None
    except _LongInt as e:
        raise MupscaleError(f"{where}: {e}") from None
    if depth(value) > MAX_DEPTH:
        raise MupscaleError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep")
    return value


INT_BITS = int(MAX_INT_DIGITS * 3.3219280948873626)  # an int with more bits has more than MAX_INT_DIGITS digits


def check_tree(obj: Any, where: str) -> None:
    """Refuse containers nested more than MAX_DEPTH levels and integers of more than MAX_INT_DIGITS digits
    (Python cannot even print them) anywhere in `obj`, e.g. the non-tensor entries of a .pt checkpoint."""
    stack = [(obj, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > INT_BITS:
            raise MupscaleError(f"{where}: holds an integer of more than {MAX_INT_DIGITS} digits")
        if isinstance(x, dict):
            x = [*x.keys(), *x.values()]
        elif not isinstance(x, (list, tuple, set, frozenset)):
            continue
        if d >= MAX_DEPTH:
            raise MupscaleError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        stack.extend((v, d + 1) for v in x)
