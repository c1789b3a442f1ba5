"""The `mupscale` command line: the only module that touches typer and rich."""
from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mupscale_cli import __version__
from mupscale_cli.errors import MupscaleError

EXIT_CODES = """Exit codes: 0 success; 1 verification failed; 2 usage or input error (one line on stderr);
3 internal error (a bug: please report it); 130 interrupted (SIGINT), 143 terminated (SIGTERM).
No partial output file is ever left at the output path."""

app = typer.Typer(
    name="mupscale",
    help="Widen trained μP models exactly: weights, optimizer state and hyper-parameters (μpscaling).\n\n"
         "Typical use: `mupscale inspect ckpt.pt --k 4` to check, then "
         "`mupscale widen ckpt.pt --k 4 --sigma 0.75 -o wide.safetensors`.\n\n" + EXIT_CODES,
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]})
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mupscale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """mupscale"""


def _term(signum, frame):  # SIGTERM unwinds like SIGINT so temporary files are removed
    raise SystemExit(143)


@contextmanager
def guard():
    """One-line errors, documented exit codes, never a traceback (MUPSCALE_DEBUG=1 shows it)."""
    signal.signal(signal.SIGTERM, _term)
    try:
        yield
    except MupscaleError as e:
        err.print(f"mupscale: error: {e}", markup=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("mupscale: interrupted", markup=False)
        raise typer.Exit(130) from None
    except (typer.Exit, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001
        if os.environ.get("MUPSCALE_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        err.print(f"mupscale: internal error: {type(e).__name__}: {msg} (rerun with MUPSCALE_DEBUG=1 and "
                  f"report it)", markup=False, soft_wrap=True)
        raise typer.Exit(3) from None


K_HELP = "Width multiplier: one integer for every width axis (--k 4) or per axis (--k d_model=2,d_ff=4)."
SPEC_HELP = ("Architecture spec: a bundled name (see `mupscale specs`), a YAML file or a mup .bsh file. "
             "Default: the bundled spec that covers every tensor.")
SIZE_HELP = "Base size used by a spec's block layout, NAME=INT (e.g. head_dim=64); repeatable."


def _opts(checkpoint, output, k, sigma, seed, spec, optimizer, opt_layout, size, force, no_optimizer,
          strict=False):
    from mupscale_cli.commands.widen import WidenOptions, parse_sizes
    return WidenOptions(checkpoint=checkpoint, output=output, k=k, sigma=sigma, seed=seed, spec=spec,
                        optimizer=optimizer, opt_layout=opt_layout, sizes=parse_sizes(size or []),
                        force=force, no_optimizer=no_optimizer, strict=strict)


def _progress(quiet: bool) -> Callable[[str, int], None]:
    if quiet or not sys.stderr.isatty():
        return lambda n, b: None
    return lambda n, b: err.print(f"  wrote {n} ({b / 2**20:.1f} MiB)", markup=False)


@app.command()
def widen(
    checkpoint: Path = typer.Argument(..., help="Input: nanoGPT .pt, state-dict .pt or .safetensors."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Output .safetensors (default layout) or .pt (input's layout)."),
    k: str = typer.Option("2", "--k", "-k", help=K_HELP),
    sigma: float = typer.Option(0.0, "--sigma", help="Noise base constant σ̄ (0: exact widening). Noise std = "
                                                       "σ̄ × std of a fresh μP init of the widened tensor."),
    seed: int = typer.Option(0, "--seed", help="Noise seed; a tensor's noise depends only on (seed, name, shape)."),
    spec: Optional[str] = typer.Option(None, "--spec", help=SPEC_HELP),
    optimizer: Optional[str] = typer.Option(None, "--optimizer",
                                            help="sgd|adam|adamw, only when the state cannot tell."),
    opt_layout: Optional[str] = typer.Option(
        None, "--opt-layout", help="How optimizer ids map to names: named|single|nanogpt|mup|mup-corrected "
                                   "(only when ambiguous)."),
    size: Optional[list[str]] = typer.Option(None, "--size", help=SIZE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="Write weights only."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of the path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    strict: bool = typer.Option(False, "--strict", help="Treat NaN/Inf in the input as an error, not a warning."),
) -> None:
    """Widen a checkpoint k times: weights, buffers, optimizer state and hyper-parameters (paper Table 1),
    plus optional μP-scaled noise. Prints the output path (or --json summary) on stdout.

    Example: mupscale widen ckpt.pt --k 4 --sigma 0.75 -o wide.safetensors
    """
    with guard():
        from mupscale_cli.commands.widen import run_widen
        opts = _opts(checkpoint, output, k, sigma, seed, spec, optimizer, opt_layout, size, force, no_optimizer,
                     strict)
        res = run_widen(opts, _progress(quiet))
        for note in res["notes"]:
            if not quiet:
                err.print(f"mupscale: note: {note}", markup=False, soft_wrap=True)
        typer.echo(json.dumps(res, indent=2) if as_json else res["output"])


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to inspect (input or widened)."),
    k: str = typer.Option("2", "--k", "-k", help=K_HELP),
    sigma: float = typer.Option(0.0, "--sigma", help="Show the noise std for this σ̄."),
    spec: Optional[str] = typer.Option(None, "--spec", help=SPEC_HELP),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd|adam|adamw, when ambiguous."),
    opt_layout: Optional[str] = typer.Option(None, "--opt-layout", help="Optimizer id layout, when ambiguous."),
    size: Optional[list[str]] = typer.Option(None, "--size", help=SIZE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Show, per tensor, the role, axes, shape before -> after, bytes and noise std, and the optimizer
    mapping; validates everything `widen` needs without writing anything."""
    with guard():
        from mupscale_cli.commands.inspect import run_inspect
        rep = run_inspect(_opts(checkpoint, None, k, sigma, 0, spec, optimizer, opt_layout, size, False, False))
        if as_json:
            typer.echo(json.dumps(rep, indent=2))
            return
        t = Table(title=f"{checkpoint.name}: spec {rep['spec']}, k {rep['k']}", title_justify="left")
        for c in ("tensor", "role", "axes", "shape", "widened", "MiB", "noise std", "tied to"):
            t.add_column(c, justify="right" if c in ("MiB", "noise std") else "left")
        for r in rep["rows"]:
            t.add_row(r["name"], r["role"], r["axes"] + (f" [{r['layout']}]" if r["layout"] else ""),
                      str(r["shape"]), str(r["widened"]), f"{r['bytes'] / 2**20:.2f}",
                      f"{r['noise_std']:.3g}" if r["noise_std"] else "-", r["tied_to"] or "")
        err.print(t)
        om = rep["optimizer_map"]
        if om:
            err.print(f"optimizer: {om['kind']}, ids mapped by layout '{om['layout']}'", markup=False)
            for g in om["groups"]:
                err.print(f"  group {g['group']}: {g['tensors']} tensors; factors: {' | '.join(g['factors'])}",
                          markup=False)
        for note in rep["notes"]:
            err.print(f"note: {note}", markup=False, soft_wrap=True)
        if rep["provenance"]:
            err.print(f"provenance: {json.dumps(rep['provenance'], sort_keys=True)[:400]}", markup=False)
        mb = rep["model_bytes"]
        typer.echo(f"ok: {rep['tensors']} tensors, {mb['base'] / 2**20:.1f} MiB -> {mb['widened'] / 2**20:.1f} MiB")


@app.command()
def specs(as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
    """List the bundled architecture specs."""
    with guard():
        from mupscale_cli.core.spec import bundled_paths, bundled_specs
        items = [{"name": s.name, "axes": s.axes, "detect": s.detect, "readout": s.readout,
                  "description": s.description, "path": str(p)} for s, p in zip(bundled_specs(), bundled_paths())]
        if as_json:
            typer.echo(json.dumps(items, indent=2))
            return
        for s in items:
            typer.echo(f"{s['name']:24} axes={','.join(s['axes'])} readout={s['readout']}"
                       f"{'' if s['detect'] else ' (not auto-detected)'}  {s['description']}")


def main() -> None:
    app()
