"""`mupscale spec init CKPT`: a skeleton spec from a checkpoint's tensor names, shapes and model_args.

The skeleton is a starting point the user checks: every guess is commented. What it guesses:
- width axes: model_args entries with a width's name (n_embd, width, d_model, hidden_size, ...) whose value
  is a tensor dimension; each is its own axis, named like the entry (`n_embd: n_embd`). Without any, the
  most common dimension of the matrices, axis `width` (marked "check").
- per dimension: a width's size -> that axis; a size another model_args integer has (vocab_size,
  block_size) -> fixed; a small multiple of a width (fused [q|k|v] 3×, an MLP's 4×) -> that axis,
  duplicated in place (blocks stay aligned; μP 1/d attention: head_dim grows); anything else fixed.
- embeddings (names with emb/wte/wpe/tok/pos): fan_in 0; BatchNorm statistics, counters and tensors that
  are not float, or (when the optimizer names its parameters) not among them: buffers.
- tied tensors: an embedding and a readout with equal values (nanoGPT's lm_head = wte).
Layers are folded into `{i}` patterns when every layer has the same shapes and axes.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from mupscale_cli.core.plan import make_plan, same_values
from mupscale_cli.core.spec import parse_spec
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats import load_checkpoint
from mupscale_cli.formats.checkpoint import Checkpoint

WIDTH_NAMES = ("n_embd", "width", "d_model", "hidden_size", "hidden_dim", "dim", "embed_dim", "emb_dim",
               "model_dim", "d_ff", "ffn_dim", "intermediate_size", "n_inner", "channels", "base_channels")
EMBED = re.compile(r"(^|[._])(emb\w*|wte|wpe|tok\w*|pos\w*|embed_tokens)([._]|$)")
READOUT = re.compile(r"(^|[._])(lm_head|head|readout|output|decoder|classifier|out_proj)([._]|$)")
ATTN = re.compile(r"attn|attention|qkv|query|key|value|q_proj|k_proj|v_proj")
MAX_FUSED = 16  # a dimension m × width (m ≤ this) is that width axis, duplicated in place


def _ints(args: dict | None) -> dict[str, int]:
    return {k: v for k, v in (args or {}).items() if isinstance(v, int) and not isinstance(v, bool) and v > 1}


def width_axes(ckpt: Checkpoint, shapes: dict) -> tuple[dict[str, int], bool]:
    """Width axes and their base sizes; True when guessed from the shapes (no model_args to name them)."""
    dims = Counter(n for s, _ in shapes.values() for n in s)
    ints = _ints(ckpt.model_args)
    found = {k: v for k, v in ints.items() if k in WIDTH_NAMES and dims[v]}
    if found:
        return found, False
    mats = Counter(n for s, _ in shapes.values() if len(s) >= 2 for n in s)
    if not mats:
        raise MupscaleError(f"{ckpt.path.name}: no tensor has two dimensions: nothing to widen, no spec to sketch")
    return {"width": mats.most_common(1)[0][0]}, True


def _dim(n: int, widths: dict[str, int], fixed: dict[str, int]) -> tuple[str | None, str]:
    """(axis or None, comment) of one dimension of size n."""
    eq = [a for a, v in widths.items() if v == n]
    fx = [a for a, v in fixed.items() if v == n]
    if eq:
        note = f"check: {n} is also {', '.join(fx)}" if fx else ""
        if len(eq) > 1:
            note = f"check: {n} is the size of {', '.join(eq)}" + (f" and {', '.join(fx)}" if fx else "")
        return eq[0], note
    if fx:
        return None, ""
    for a, v in widths.items():
        if n % v == 0 and 2 <= n // v <= MAX_FUSED:
            return a, f"{n} = {n // v} × {a}"
    return None, ""


def _pattern(name: str) -> str:
    letters = iter("ijklmn")
    return re.sub(r"(?<=\.)\d+(?=\.|$)", lambda m: "{" + next(letters, "p") + "}", name)


def skeleton(path: Path) -> tuple[str, dict]:
    """The spec text for the checkpoint at `path`, and what it found (for the command's summary)."""
    ckpt = load_checkpoint(path, lazy=True)
    shapes = ckpt.shapes()
    widths, guessed = width_axes(ckpt, shapes)
    fixed = {k: v for k, v in _ints(ckpt.model_args).items() if k not in widths}
    names = list(shapes)
    opt = ckpt.optimizer if isinstance(ckpt.optimizer, dict) else None
    groups = opt.get("param_groups") if opt else None
    named = None
    if isinstance(groups, list) and groups and all(isinstance(g, dict) and "param_names" in g for g in groups):
        named = {ckpt.strip(str(n)) for g in groups for n in g["param_names"]}
    # tied: a readout equal to an embedding (the alias is the later name, as named_parameters() drops it)
    tied: dict[str, str] = {}
    for b in names:
        if not READOUT.search(b):
            continue
        for a in names:
            if a != b and EMBED.search(a) and shapes[a] == shapes[b] and a not in tied and names.index(a) < names.index(b):
                if same_values(ckpt.tensors, a, b):
                    tied[b] = a
                    break
    rules: dict[str, tuple[list, dict, str]] = {}  # name -> (axes, extra keys, comment)
    heads = False
    for n in names:
        if n in tied:
            continue
        shape, dtype = shapes[n]
        leaf = n.rpartition(".")[2]
        axes, notes = [], []
        for size in shape:
            a, note = _dim(size, widths, fixed)
            axes.append(a)
            if note:
                notes.append(note)
        extra: dict = {}
        buffer = (leaf in ("running_mean", "running_var", "num_batches_tracked") or not dtype.is_floating_point
                  or (named is not None and n not in named))
        if buffer:
            extra["buffer"] = True
            notes.append("not trained (a buffer)")
        elif len(shape) == 2 and EMBED.search(n) and axes[0] is None and axes[1] is not None:
            extra["fan_in"] = 0
            notes.append("an embedding: fixed fan-in (rows)")
        elif len(shape) >= 2 and axes[0] is None and axes[1] is not None and sum(a is not None for a in axes) == 1:
            notes.append("readout-like: its noise std is σ̄ itself; zero-initialised? add noise: false")
        if any("×" in x for x in notes) and ATTN.search(n):
            notes.append("attention: see the note above")
            heads = True
        rules[n] = (axes, extra, "; ".join(dict.fromkeys(notes)))
    # fold layers into {i} patterns when all members agree
    by_pat: dict[str, list[str]] = {}
    for n in rules:
        by_pat.setdefault(_pattern(n), []).append(n)
    lines_t = []
    for pat, members in by_pat.items():
        same = all(rules[m][:2] == rules[members[0]][:2] and shapes[m] == shapes[members[0]] for m in members)
        for key in ([pat] if same and len(members) > 1 else members):
            axes, extra, note = rules[members[0] if key == pat else key]
            ax = "[" + ", ".join(a or "null" for a in axes) + "]"
            value = ax if not extra else "{" + ", ".join([f"axes: {ax}"] + [
                f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items()]) + "}"
            lines_t.append(f"  {_quote(key)}: {value}" + (f"   # {note}" if note else ""))
    args = ckpt.model_args or {}
    mults = [k for k, v in args.items() if "width_mult" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name.split(".")[0]) or "my-model"
    out = [f"# Skeleton spec written by `mupscale spec init {path.name}` from its tensor names, shapes and",
           "# model_args. Check every guess (comments say which); docs/spec-format.md explains each key.",
           f"name: {stem}",
           f"description: {stem} (skeleton from mupscale spec init; edit me)",
           "detect: false                 # chosen with --spec only",
           "readout: mup                  # mup: the readout divides by width (mup's MuReadout); "
           "sum: a plain summing nn.Linear readout (standard parametrization)"]
    out.append("model_args:                   # ARG: AXIS multiplies ARG by that axis's k; "
               "model_args not named here are kept as they are")
    if guessed:
        out.append(f"  # check: no model_args entry names the width; axis 'width' is the most common dimension "
                   f"({widths['width']}); add `YOUR_ARG: width` so the widened model_args say the new width")
    for a in widths:
        if not guessed:
            out.append(f"  {a}: {a}")
    for m in mults:
        out.append(f"  {m}: {{times: {next(iter(widths))}}}   # check: a width multiplier grows with width")
    if tied:
        out.append("tied:                         # alias: canonical (found by equal values)")
        out += [f"  {_quote(a)}: {_quote(c)}" for a, c in tied.items()]
    out.append("tensors:                      # one entry per dimension: null (fixed) or the width axis it grows with")
    if heads:
        out += ["  # Attention (check): a fused dimension m × width is duplicated coordinate by coordinate, so each",
                "  # block ([q|k|v]) stays aligned, n_head stays and head_dim grows: exact with μP's 1/d attention.",
                "  # With 1/sqrt(d) attention duplicate whole heads instead (as the bundled nanogpt-mup-heads does):",
                "  # {axis: AXIS, block: head_dim} on every dimension laid out in heads (q/k/v rows, the output",
                "  # projection's columns), `sizes: {head_dim: AXIS / n_head}` and `n_head: AXIS` under model_args."]
    out += lines_t
    if named is None and opt is not None:
        out += ["# optimizer:                 # only if widen cannot match the optimizer's ids to names: your",
                "#   layouts:                 # script's groups in order, a tensor joins the first that fits",
                "#     my-script:",
                "#       - {min_dim: 2}        # e.g. matrices",
                "#       - {}                  # every tensor left"]
    out += ["# model:                       # for `mupscale verify`: your model code (or verify --model FILE.py:Class)",
            "#   factory: path/to/model.py:GPT"]
    text = "\n".join(out) + "\n"
    # the skeleton must at least be a valid spec that covers the checkpoint
    spec = parse_spec(text, f"spec init {path.name}")
    make_plan(spec, shapes, {a: 2 for a in spec.axes}, ckpt.model_args, {}, ckpt.tensors,
              config=ckpt.extra.get("config") if isinstance(ckpt.extra.get("config"), dict) else None)
    return text, {"axes": widths, "guessed": guessed, "rules": len(lines_t), "tied": tied}


def _quote(s: str) -> str:
    return f'"{s}"' if re.search(r"[{}:#\[\]&*!|>'\"%@`, ]", s) or not s else s


def write_spec(text: str, output: Path, checkpoint: Path, force: bool) -> None:
    """The skeleton into `output`: a new file (or --force), never the checkpoint, written whole then renamed."""
    import os
    import tempfile
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise MupscaleError(f"-o {output}: that is the checkpoint")
    if output.is_dir():
        raise MupscaleError(f"-o {output}: is a directory; name the spec file (e.g. {output / 'my-model.yaml'})")
    if output.exists() and not force:
        raise MupscaleError(f"-o {output}: exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        raise MupscaleError(f"-o {output}: no directory {output.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".mupscale-tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
