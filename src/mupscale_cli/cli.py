"""The `mupscale` command line: the only module that touches typer and rich.

Over 500 lines: one option table and one short body per command (widen, inspect, specs, verify, sweep), kept
together so every flag's help text, metavar and exit path is read in one place; the commands' work is in
commands/."""
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

from mupscale_cli import __version__, is_program
from mupscale_cli.errors import OPTIONAL, MupscaleError, missing_package, one_line  # noqa: F401 (OPTIONAL: tests)

EXIT_CODES = """Exit codes: 0 success; 1 verification failed; 2 usage, input or environment error (disk full,
read-only, ...: one line on stderr); 3 internal error (a bug: please report it); 130 interrupted (SIGINT),
143 terminated (SIGTERM). No partial output is ever left at the output path: files and shard directories
appear at once, one writer per output."""

app = typer.Typer(
    name="mupscale",
    help="Widen trained μP models exactly: weights, optimizer state and hyper-parameters (μpscaling).\n\n"
         "Typical use: `mupscale inspect ckpt.pt --k 4` to check, then "
         "`mupscale widen ckpt.pt --k 4 --sigma 0.75 -o wide.safetensors`.\n\n" + EXIT_CODES,
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]})
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def say(line: str) -> None:
    """One message line on stderr: control characters in paths and names escaped (errors.one_line), so it
    stays one line whatever a file name holds."""
    err.print(one_line(line), markup=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mupscale {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """mupscale"""


def _signalled(signum, frame):
    """SIGINT and SIGTERM unwind (temporaries are removed, threads joined); a second one waits for that."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGTERM:
        raise SystemExit(143)
    raise KeyboardInterrupt


_threads: list = []  # (stop event, thread) of threads the command started: stopped and joined on exit


def _stop_threads() -> None:
    from mupscale_cli.errors import stop_threads
    while _threads:
        stop, thread = _threads.pop()
        stop.set()
        thread.join()
    stop_threads()  # formats.write.Background threads (the scan beside a writer), whatever raised


@contextmanager
def guard():
    """One-line errors, documented exit codes, never a traceback (MUPSCALE_DEBUG=1 shows it). Every thread
    is joined before the exit (a thread inside torch while the interpreter exits aborts the process)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _signalled)
    signal.signal(signal.SIGINT, _signalled)
    if hasattr(signal, "SIGXFSZ"):  # over `ulimit -f`: let write() fail with EFBIG instead of dying
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    ok = False  # the run succeeded (exit 0, or 1: verify's FAIL): every rank of a process group gets here
    try:
        yield
        ok = True
    except MupscaleError as e:
        say(f"mupscale: error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("mupscale: interrupted", markup=False)
        raise typer.Exit(130) from None
    except SystemExit as e:
        if e.code == 143:
            err.print("mupscale: terminated", markup=False)
        raise
    except typer.Exit as e:
        ok = e.exit_code in (0, 1)
        raise
    except OSError as e:  # the environment (a path too long, not a directory, a /proc file, ...): exit 2
        if os.environ.get("MUPSCALE_DEBUG"):
            raise
        from mupscale_cli.formats.target import env_error, os_error
        me = env_error(e, "mupscale") or os_error(e)
        say(f"mupscale: error: {me}")
        raise typer.Exit(2) from None
    except ImportError as e:
        me = missing_package(e)
        if me is None:
            raise
        err.print(f"mupscale: error: {me}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001
        if os.environ.get("MUPSCALE_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        say(f"mupscale: internal error: {type(e).__name__}: {msg} (rerun with MUPSCALE_DEBUG=1 and report it)")
        raise typer.Exit(3) from None
    finally:
        if is_program():  # the outcome is decided (output committed, or its error line printed): a signal
            for s in saved:  # from here on changes nothing; ignored for the rest of the exit, never left to
                signal.signal(s, signal.SIG_IGN)  # Python's exit, which restores the default action (-2/-15)
        _stop_threads()
        from mupscale_cli.procgroup import stop
        stop(ok)  # torchrun: barrier, then destroy_process_group (gloo's threads must not outlive it)
        if not is_program():
            for s, h in saved.items():
                if h is not None:
                    signal.signal(s, h)


K_HELP = "Width multiplier: one integer for every width axis (--k 4) or per axis (--k d_model=2,d_ff=4)."
SPEC_HELP = ("Architecture spec: a bundled name (see `mupscale specs`), a YAML file or a mup .bsh file. "
             "Default: the spec a mupscale output records, else the bundled spec that covers every tensor and "
             "whose markers (model_args/config) the checkpoint shows; names and shapes alone never choose one.")
TRUST_HELP = ("Import and run the model factory a spec file names outside mupscale (its model.factory): "
              "code named by a file runs only with this opt-in. --model on the command line needs none.")
SIZE_HELP = "Base size used by a spec's block layout, NAME=INT (e.g. head_dim=64); repeatable."
RISK_HELP = ("With --spec: widen a Hugging Face directory whose config.json names another model_type (or variant) "
             "than the spec's markers. The output is then NOT known to be the same function (a warning says so): "
             "check it with `mupscale verify`. Without this flag such a --spec is refused.")
ARG_HELP = ("The checkpoint's model_args entry KEY=VALUE (an integer, float, true/false or a string), over "
            "what it stores: for checkpoints that store none (DCP, plain safetensors); repeatable.")


def _output_path(raw: str) -> Path:
    """-o as typed: a trailing '/' on a file name is refused here, before Path() drops it."""
    from mupscale_cli.formats.target import check_output_name
    try:
        check_output_name(raw)
    except MupscaleError as e:
        raise typer.BadParameter(str(e)) from None  # a usage error: one line, exit 2
    return Path(raw)


def _opts(checkpoint, output, k, sigma, seed, spec, optimizer, opt_layout, size, force, no_optimizer,
          strict=False, model_arg=None):
    from mupscale_cli.core.job import WidenOptions, parse_model_args, parse_sizes
    return WidenOptions(checkpoint=checkpoint, output=output, k=k, sigma=sigma, seed=seed, spec=spec,
                        optimizer=optimizer, opt_layout=opt_layout, sizes=parse_sizes(size or []),
                        force=force, no_optimizer=no_optimizer, strict=strict,
                        model_args=parse_model_args(model_arg or []))


class _Bar:
    """widen's progress: a Rich bar (bytes written, rate, ETA) on stderr; `start(total)` then `(name, nbytes)`."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.bar = Progress(TextColumn("widening"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True)
        self.task = None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("widen", total=total)

    def __call__(self, name: str, nbytes: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, nbytes)

    def stop(self) -> None:
        self.bar.stop()


class _Lines:
    """widen's progress when stderr is no terminal (CI logs, pipelines): a plain line when another 10% is
    written or a minute has passed, never more often than every MUPSCALE_PROGRESS_SECONDS (10) seconds, the
    first after three times that (a widening of a few seconds prints only its closing summary)."""

    def __init__(self) -> None:
        try:
            self.every = max(0.0, float(os.environ.get("MUPSCALE_PROGRESS_SECONDS", "10")))
        except ValueError:
            self.every = 10.0
        self.total = self.done = 0
        self.t0 = self.last_t = 0.0
        self.last_frac = 0.0

    def start(self, total: int) -> None:
        import time
        self.total, self.t0 = total, time.monotonic()
        self.last_t = self.t0 + 2 * self.every

    def __call__(self, name: str, nbytes: int) -> None:
        import time
        self.done += nbytes
        if not self.total or self.done >= self.total:
            return
        now = time.monotonic()
        frac, since = self.done / self.total, now - self.last_t
        if since < self.every or (frac - self.last_frac < 0.1 and since < max(60.0, self.every)):
            return
        from mupscale_cli.formats.safetensors import fmt_bytes
        rate = self.done / max(now - self.t0, 1e-9)
        say(f"mupscale: widening: {frac:.0%} ({fmt_bytes(self.done)} of {fmt_bytes(self.total)}), "
            f"{fmt_bytes(int(rate))}/s, about {(self.total - self.done) / rate:.0f} s left")
        self.last_t, self.last_frac = now, frac

    def stop(self) -> None:
        pass


def _done_line(res: dict) -> str:
    """widen's closing summary on stderr: what was written, how large, how fast."""
    from mupscale_cli.formats.safetensors import fmt_bytes
    k = res.get("k") or {}
    size = res.get("output_bytes")
    secs = res.get("time_s")
    rate = f" ({fmt_bytes(int(size / secs))}/s)" if size and secs else ""
    return (f"mupscale: widened {res.get('tensors', '?')} tensors by k {_k_text(k) if k else '?'}: "
            f"{fmt_bytes(size) if size else '?'} written in {secs if secs is not None else '?'} s{rate}")


def _prehash(path: Path):
    """Start the sha256 of a single-file input on a thread now, while torch loads (with one core busy
    importing, the other is free); returns a function giving the hex digest (None for a directory).
    The thread stops at the next 4 MiB when the command ends (guard)."""
    try:
        size = path.stat().st_size if path.is_file() else 0
    except OSError:
        size = 0
    if size == 0:  # a directory, or nothing to hash: never read (/proc/kmsg is a 'regular file' that blocks)
        return None
    import hashlib
    import threading
    box: dict = {}
    stop = threading.Event()

    def run() -> None:
        try:
            h, buf = hashlib.sha256(), bytearray(1 << 22)
            with open(path, "rb", buffering=0) as f:
                left = size  # the size seen at the start (a file that changes meanwhile is refused later)
                while left > 0 and (n := f.readinto(memoryview(buf)[:min(len(buf), left)])):
                    left -= n
                    if stop.is_set():
                        box["error"] = MupscaleError(f"{path}: reading stopped")
                        return
                    h.update(memoryview(buf)[:n])
            box["digest"] = h.hexdigest()
        except OSError as e:
            box["error"] = MupscaleError(f"{path}: cannot read: {e.strerror or e}")

    thread = threading.Thread(target=run, daemon=True, name="mupscale-prehash")
    _threads.append((stop, thread))
    thread.start()

    def result() -> str:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["digest"]
    return result


def _is_program() -> bool:
    """Whether this process is the `mupscale` program (not an in-process caller such as a test)."""
    from mupscale_cli import is_program
    return is_program()


def _exit_now_if_program() -> None:
    """As the `mupscale` program (not in-process callers such as tests), exit as soon as the output is
    committed and printed: Python's own shutdown with torch loaded takes about 0.4 s, and there is nothing
    left to do (the output is fsynced and renamed, the worker threads are gone)."""
    if _is_program():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _widen_memory_settings() -> None:
    """Before torch loads: glibc returns freed large blocks at once (limit_heap_growth: peak memory stays
    flat), and large tensors sit on transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE) so that the
    fresh buffers of range after range cost few page faults."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads: never used here, 70 ms to start
    import gc
    enabled = gc.isenabled()
    gc.disable()  # torch's import makes some 100 000 objects: collections during it are 50 ms of start-up
    try:
        from mupscale_cli.formats.write import limit_heap_growth
    finally:
        if enabled:
            gc.enable()
    gc.freeze()  # and later collections (while writing) need not walk them again
    limit_heap_growth()


def _progress(quiet: bool):
    """A progress bar when stderr is a terminal, plain lines when not; nothing with --quiet."""
    if quiet:
        return lambda n, b: None
    return _Bar() if sys.stderr.isatty() else _Lines()


@app.command()
def widen(
    checkpoint: Path = typer.Argument(..., help="Input: nanoGPT .pt, state-dict .pt, .safetensors, or a sharded "
                                                "safetensors directory / index."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", parser=lambda raw: _output_path(raw),
                                          help="Output .safetensors (default layout) or .pt (input's layout); "
                                               "a directory with --shard-size."),
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
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help=ARG_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="Write weights only."),
    risk_model_type: bool = typer.Option(False, "--risk-model-type-mismatch", help=RISK_HELP),
    untie: bool = typer.Option(False, "--untie", help="A tied readout under standard parametrization (HF "
                               "tie_word_embeddings, nanoGPT's lm_head = wte) has no exact tied widening: write it "
                               "as a separate tensor, readout = embedding / k (config: tie_word_embeddings false), "
                               "for stacks that load an untied model (docs/stacks.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of the path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    strict: bool = typer.Option(False, "--strict", help="Treat NaN/Inf in the input as an error, not a warning."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast the model's floating-point tensors to "
                                        "float32|bfloat16|float16 (after the noise). Optimizer state keeps its dtype."),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", help="Write Hugging Face shards of at most "
                                             "this size (e.g. 5GB, 500MiB): -o is then a directory (or "
                                             "DIR/NAME.safetensors for NAME-0000i-of-0000N shards), new, empty "
                                             "or an earlier sharded output, replaced as a whole at once."),
    threads: int = typer.Option(2, "--threads", help="Worker threads making tensors (0: one thread); the "
                                "output is the same bytes for any number."),
    noise_device: str = typer.Option("cpu", "--noise-device", help="cpu|cuda: where the noise is drawn. "
                                     "CUDA draws other numbers than the CPU for the same seed; it is recorded "
                                     "in the provenance."),
    hparams: Optional[Path] = typer.Option(None, "--hparams", help="σ̄ and γ̄↑ tuned on a small proxy "
                                           "(`mupscale sweep -o hparams.yaml`): the noise as --sigma would, and "
                                           "every group's lr × γ̄↑/γ̄. Replaces --sigma."),
    base_lr: Optional[float] = typer.Option(None, "--base-lr", help="With --hparams: the checkpoint's base "
                                            "learning rate γ̄ (default: its config.learning_rate, else the "
                                            "proxy's)."),
    chunk_size: str = typer.Option("8MiB", "--chunk-size", hidden=True, help="Unit of work for large tensors."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Output format: dcp (a torch.distributed.checkpoint "
                                      "directory, the input's layout; the default for a DCP input and -o DIR), "
                                      "safetensors, pt, or hf (Hugging Face shards, 5GB unless --shard-size)."),
) -> None:
    """Widen a checkpoint k times: weights, optimizer state and hyper-parameters, exactly.

    Every tensor is duplicated and rescaled by its role (paper Table 1), optionally plus μP-scaled noise
    (--sigma). Prints the output path (or --json summary) on stdout, progress and notes on stderr. Inputs: .pt,
    .safetensors, a Hugging Face sharded checkpoint (directory or *.safetensors.index.json), or a Hugging
    Face model directory (config.json + weights; a Trainer checkpoint-N/ too): its output is a directory
    that from_pretrained loads (config.json rewritten, tokenizer and other files copied).

    A torch.distributed.checkpoint (DCP) directory too; under torchrun (torchrun --nproc-per-node N -m
    mupscale_cli widen ...) the ranks share the work of a DCP output.

    Example: mupscale widen ckpt.pt --k 4 --sigma 0.75 -o wide.safetensors

    Example: mupscale widen models/llama --k 2 -o models/llama-wide
    """
    with guard():
        from dataclasses import replace

        if _is_program():
            from mupscale_cli.formats.target import install_sigbus_handler
            install_sigbus_handler()  # an mmapped input that shrinks: one line, exit 2, no temporaries
        digest = _prehash(checkpoint)
        _widen_memory_settings()
        from mupscale_cli.commands.widen import run_widen
        from mupscale_cli.formats.safetensors import parse_size
        opts = _opts(checkpoint, output, k, sigma, seed, spec, optimizer, opt_layout, size, force, no_optimizer,
                     strict, model_arg)
        opts = replace(opts, dtype=dtype, shard_size=shard_size, threads=threads, noise_device=noise_device,
                       chunk_bytes=parse_size(chunk_size), source_digest=digest, hparams=hparams,
                       base_lr=base_lr, untie=untie, format=fmt, risk_model_type=risk_model_type)
        bar = _progress(quiet or os.environ.get("RANK", "0") != "0")
        try:
            res = run_widen(opts, bar)
        finally:
            if isinstance(bar, _Bar):
                bar.stop()
        if res.get("rank", 0) == 0:  # under torchrun: rank 0 speaks for all
            for note in res["notes"]:
                if not quiet:
                    say(f"mupscale: note: {note}")
            if not quiet and res.get("resume") and not as_json:
                for line in res["resume"].splitlines():
                    err.print(one_line(line), markup=False, soft_wrap=True)
            if not quiet:
                say(_done_line(res))
            typer.echo(json.dumps(res, indent=2) if as_json else res["output"])
    _exit_now_if_program()


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to inspect (input or widened)."),
    k: Optional[str] = typer.Option(None, "--k", "-k", help=K_HELP + " Default: 2; for a mupscale output, none: "
                                    "the file is described as it is (pass --k to plan a further widening)."),
    sigma: float = typer.Option(0.0, "--sigma", help="Show the noise std for this σ̄."),
    spec: Optional[str] = typer.Option(None, "--spec", help=SPEC_HELP),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd|adam|adamw, when ambiguous."),
    opt_layout: Optional[str] = typer.Option(None, "--opt-layout", help="Optimizer id layout, when ambiguous."),
    size: Optional[list[str]] = typer.Option(None, "--size", help=SIZE_HELP),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help=ARG_HELP),
    untie: bool = typer.Option(False, "--untie", help="As widen --untie: the tied readout as its own tensor."),
    risk_model_type: bool = typer.Option(False, "--risk-model-type-mismatch", help=RISK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Show what widen would do, per tensor, and check it all without writing anything.

    Per tensor: the role, axes, shape before -> after, bytes and noise std; then the optimizer mapping. A
    mupscale output (without --k) is described as it is: its tensors, optimizer groups, provenance and
    checksums."""
    with guard():
        from mupscale_cli.commands.inspect import is_widened, provenance_line, run_inspect
        from dataclasses import replace
        describe = k is None and is_widened(checkpoint)
        rep = run_inspect(replace(_opts(checkpoint, None, "1" if describe else k or "2", sigma, 0, spec, optimizer,
                                        opt_layout, size, False, False, model_arg=model_arg), untie=untie,
                                  risk_model_type=risk_model_type))
        rep["describes"] = "file" if describe else "widening"
        if as_json:
            typer.echo(json.dumps(rep, indent=2))
            return
        cols = ("tensor", "role", "axes", "shape", "MiB", "tied to") if describe else \
            ("tensor", "role", "axes", "shape", "widened", "MiB", "noise std", "tied to")
        title = (f"{checkpoint.name}: a mupscale output, spec {rep['spec']}" if describe else
                 f"{checkpoint.name}: spec {rep['spec']}, k {_k_text(rep['k'])}")
        t = Table(title=title, title_justify="left")
        for c in cols:
            t.add_column(c, justify="right" if c in ("MiB", "noise std") else "left")
        for r in rep["rows"]:
            cells = {"tensor": r["name"], "role": r["role"],
                     "axes": r["axes"] + (f" [{r['layout']}]" if r["layout"] else ""), "shape": str(r["shape"]),
                     "widened": str(r["widened"]), "MiB": f"{r['bytes'] / 2**20:.2f}",
                     "noise std": f"{r['noise_std']:.3g}" if r["noise_std"] else "-", "tied to": r["tied_to"] or ""}
            t.add_row(*(cells[c] for c in cols))
        err.print(t)
        om = rep["optimizer_map"]
        if om:
            err.print(f"optimizer: {om['kind']}, ids mapped by layout '{om['layout']}'", markup=False)
            for g in om["groups"]:
                what = (", ".join(f"{h} {v:g}" for h, v in g["hparams"].items()) if describe else
                        f"factors: {' | '.join(g['factors'])}")
                err.print(f"  group {g['group']}: {g['tensors']} tensors; {what}", markup=False)
        for note in rep["notes"]:
            say(f"note: {note}")
        if rep["provenance"]:
            say(f"provenance: {provenance_line(rep['provenance'])}")
        mb = rep["model_bytes"]
        if describe:
            typer.echo(f"ok: {rep['tensors']} tensors, {mb['base'] / 2**20:.1f} MiB, a mupscale output "
                       f"(--k K: what a further widening would do)")
        else:
            typer.echo(f"ok: {rep['tensors']} tensors, {mb['base'] / 2**20:.1f} MiB -> {mb['widened'] / 2**20:.1f} "
                       f"MiB")


def _k_text(k: dict) -> str:
    """k per axis as the user writes it: 4, or d_model=2,d_ff=4."""
    vals = set(k.values())
    return str(next(iter(vals))) if len(vals) == 1 else ",".join(f"{a}={n}" for a, n in k.items())


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _verify_table(rows: list[dict], steps: int, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for c in ("step", "loss", "Δloss rel", "max |Δout|", "Δout rel", "furthest tensor", "rel", ""):
        t.add_column(c, justify="left" if c in ("furthest tensor", "") else "right")
    for r, failed in rows:
        t.add_row(str(r["step"]), _fmt(r["loss"]), _fmt(r["loss_rel"]), _fmt(r["out_abs"]), _fmt(r["out_rel"]),
                  r["tensor"] or "-", _fmt(r["tensor_rel"]), "[red]FAIL[/red]" if failed else "ok")
    return t


@app.command()
def verify(
    base: Path = typer.Argument(..., help="The base checkpoint (with its optimizer state)."),
    wide: Optional[Path] = typer.Argument(None, help="Its widening by `mupscale widen`; omitted: widen BASE in "
                                                      "memory (σ̄ = 0)."),
    spec: Optional[str] = typer.Option(None, "--spec", help=SPEC_HELP + " With WIDE: the spec it records."),
    k: Optional[str] = typer.Option(None, "--k", "-k", help=K_HELP + " Default: WIDE's recorded k, else 2."),
    steps: int = typer.Option(200, "--steps", help="Training steps in lockstep."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda (auto: the GPU when there is one)."),
    dtype: str = typer.Option("float64", "--dtype", help="float64|float32|bfloat16: models, states and batches."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Largest relative loss/output difference allowed "
                                                             "(default per dtype: float64 1e-10, with BatchNorm "
                                                             "x10 every 20 steps up to 1e-4; float32 1e-3; "
                                                             "bfloat16 0.5)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per training batch (and evaluation batch)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A .pt/.safetensors with 'inputs' and 'targets' "
                                                              "tensors, used in order (default: synthetic "
                                                              "batches the spec's model describes)."),
    hidden: bool = typer.Option(False, "--hidden", help="Compare every layer's activations too (widened vs "
                                                         "duplicated base) and name the first that diverges."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="PATH|-", help="Write the JSON report to "
                                             "this file; '-': to stdout, instead of the PASS/FAIL line (which then "
                                             "goes to stderr)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic batches."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd|adam|adamw: when the state cannot "
                                                                       "tell, or (with --lr) BASE has none. Or your "
                                                                       "optimizer builder, pkg.module:fn or "
                                                                       "FILE.py:fn, fn(model[, config]) -> "
                                                                       "Optimizer: both states must load into it "
                                                                       "(WIDE's not loading fails, exit 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of a fresh optimizer (BASE without "
                                                          "optimizer state); with --lr-rule lr_scale|uniform the "
                                                          "script's (constant) lr."),
    opt_layout: Optional[str] = typer.Option(None, "--opt-layout", help="Optimizer id layout, when ambiguous."),
    size: Optional[list[str]] = typer.Option(None, "--size", help=SIZE_HELP),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help=ARG_HELP + " The wide model's: "
                                                  "these, rewritten by the spec (or WIDE's recorded ones)."),
    model: Optional[str] = typer.Option(None, "--model", help="Your model code: path/to/model.py:GPT or "
                                                               "pkg.module:GPT (a class, built as "
                                                               "GPT(GPTConfig(**model_args)) or GPT(**model_args)), "
                                                               "or a factory pkg.module[:function]. Default: the "
                                                               "spec's model section (a bundled model)."),
    lr_rule: str = typer.Option("stored", "--lr-rule", help="How the training script sets lrs each step: stored "
                                                            "(the state's per-group lrs), lr_scale (schedule × "
                                                            "group['lr_scale'], nanoGPT-mup), uniform (one lr for "
                                                            "all groups, stock nanoGPT). Schedule: --lr, else "
                                                            "BASE's config (nanoGPT's)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Clip gradients by the global norm C "
                                                                        "each step, as the training script does."),
    clip_mode: str = typer.Option("plain", "--clip-mode", help="plain: torch's clip_grad_norm_ on both (breaks "
                                                               "equivalence when active); equivalent: "
                                                               "mupscale_cli.optim.clip_grad_norm_equivalent on the "
                                                               "wide model."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Eval-mode outputs on a fixed batch "
                                                                         "every N steps (default 10, 1 with "
                                                                         "--hidden); loss, training outputs and "
                                                                         "tensors are compared every step."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on stderr."),
    trust_spec_code: bool = typer.Option(False, "--trust-spec-code", help=TRUST_HELP),
) -> None:
    """Check that a widening is exact: train BASE and WIDE side by side and compare them at every step.

    BASE and WIDE (or BASE widened in memory) train on identical batches; loss, outputs and every tensor are
    compared before the first step and after each. A noised WIDE must
    equal exact widening + its recorded noise bit for bit. Exit 0 pass, 1 diverged, 2 usage/input error.

    Example: mupscale verify ckpt.pt wide.safetensors --steps 200 --json report.json
    """
    with guard():
        from mupscale_cli.commands.verify import VerifyOptions, run_verify
        from mupscale_cli.core.job import parse_model_args, parse_sizes
        opts = VerifyOptions(base=base, wide=wide, spec=spec, k=k, steps=steps, device=device, dtype=dtype,
                             tol=tol, batch_size=batch_size, data=data, hidden=hidden, seed=seed,
                             optimizer=optimizer, lr=lr, opt_layout=opt_layout, sizes=parse_sizes(size or []),
                             model_args=parse_model_args(model_arg or []),
                             model=model, eval_every=eval_every, trust_code=trust_spec_code, lr_rule=lr_rule,
                             grad_clip=grad_clip, clip_mode=clip_mode)
        to_stdout = json_path is not None and str(json_path) == "-"
        if to_stdout:
            json_path = None
        elif json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
            raise MupscaleError(f"--json {json_path}: not a writable file path")
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 prints and writes the report
            quiet, json_path, to_stdout = True, None, False
        shown: list[tuple[dict, bool]] = []
        tty = sys.stderr.isatty() and not quiet

        def on_step(row: dict, failed: bool) -> None:
            s = row["step"]
            if failed or steps <= 20 or s % 10 == 0 or s == steps:
                shown.append((row, failed))
            if tty and s and s % max(1, steps // 10) == 0:
                err.print(f"  step {s}/{steps}: Δout rel {_fmt(row['out_rel'])}", markup=False)

        rep = run_verify(opts, on_step)
        if not quiet and shown:
            ks = _k_text(rep["k"]) if isinstance(rep["k"], dict) else rep["k"]
            err.print(_verify_table(shown, steps, f"verify {base.name} -> {wide.name if wide else 'in-memory'}: "
                                                  f"spec {rep['spec']}, k {ks}, {rep['dtype']} on {rep['device']}"))
        if json_path is not None:
            try:
                json_path.write_text(json.dumps(rep, indent=2, default=str) + "\n")
            except OSError as e:
                raise MupscaleError(f"--json {json_path}: cannot write: {e.strerror}") from None
        if not quiet:
            for note in rep["notes"]:
                say(f"mupscale: note: {note}")
            if rep["noise"] if "noise" in rep else None:
                n = rep["noise"]
                bad = sum(v not in ("noised", "exact") for v in n["tensors"].values())
                cast = f", cast to {n['dtype']}" if n.get("dtype") else ""
                sig = "σ̄ per tensor" if n.get("sigma_per_tensor") is not None else f"σ̄ {n['sigma']}"
                err.print(f"re-derivation check ({sig}, seed {n['seed']}{cast}): {n['checked'] - bad}/"
                          f"{n['checked']} tensors equal bit for bit", markup=False)
            if rep["result"] == "pass":
                for i in rep["issues"]:
                    say(f"mupscale: warning: {i['message']}")
            for line in rep["diagnosis"]:
                say(f"mupscale: diagnosis: {line}")
        if to_stdout:
            typer.echo(json.dumps(rep, indent=2, default=str))
            say(_verify_line(rep))
        elif os.environ.get("RANK", "0") == "0":
            typer.echo(_verify_line(rep))
        if rep["result"] != "pass":
            _VERIFY_FAILED.append(rep["result"])
            raise typer.Exit(1)


def _verify_line(rep: dict) -> str:
    m = rep["max"]
    worst = max((v for v in (m["loss_rel"], m["out_rel"]) if v is not None), default=None)
    tol = rep["tolerance"]["loss_output"]
    where = f"{rep['dtype']} on {rep['device']}; " + _model_text(rep)
    if rep["result"] == "pass":
        noise = f"; noise/cast re-derived bit for bit ({rep['noise']['checked']} tensors)" if rep.get("noise") else ""
        return f"PASS: {rep['steps_run']} steps in lockstep, max relative loss/output difference {_fmt(worst)} " \
               f"<= {tol:g} ({where}){noise}"
    f = rep["first_failure"]
    parts = []
    if f:
        s = f"diverged at step {f['step']}: {f['what']} relative difference {_fmt(f['value'])} > {f.get('tol', tol):.2g}"
        if f.get("readout"):
            s += f", readout {f['readout']!r} gives {_fmt(f.get('output_ratio'))} × BASE's outputs"
        if f.get("layer"):
            s += f", first diverging layer {f['layer']!r}"
        if f.get("tensor"):
            s += f", tensor furthest from the widened base {f['tensor']!r} ({_fmt(f['tensor_rel'])})"
        parts.append(s)
    elif rep["lockstep"] == "pass":
        parts.append(f"lockstep on the noise-free reconstruction passed ({rep['steps_run']} steps)")
    noise = rep.get("noise")
    if noise and not noise["ok"]:
        bad = [n for n, v in noise["tensors"].items() if v not in ("noised", "exact")]
        first = bad[0] if bad else next((i["tensor"] for i in rep["issues"] if i["kind"] == "noise"), None)
        parts.insert(0, f"noise check failed for {len(bad)} tensor(s) (first {first!r})")
    builder = [i for i in rep["issues"] if i["kind"] == "builder"]
    if builder:
        parts.insert(0, builder[0]["message"])
    structure = [i for i in rep["issues"] if i["kind"] == "structure"]
    if structure:
        parts.insert(0, structure[0]["message"])
    return f"FAIL: {'; '.join(parts)} ({where})"


def _model_text(rep: dict) -> str:
    if rep.get("model_code") == "transformers":
        import transformers
        args = rep.get("model_args", {}).get("base", {})
        cls = "/".join(args.get("architectures") or []) or f"AutoModelForCausalLM({args.get('model_type')})"
        return (f"model: transformers {transformers.__version__} {cls} built from config.json" + (
            ", its float32 steps (norms, softmax) kept in float64" if rep.get("dtype") == "float64" else ""))
    if rep.get("model_code") == "bundled":
        return f"model: bundled {rep['model']}, not your training code (--model FILE.py:Class)"
    return f"model: {rep['model']}"


@app.command()
def specs(as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
    """List the bundled architecture specs."""
    with guard():
        from mupscale_cli.core.spec import bundled_paths, bundled_specs
        items = [{"name": s.name, "axes": s.axes, "detect": s.detect and bool(s.evidence), "readout": s.readout,
                  "evidence": s.evidence, "description": s.description, "path": str(p)}
                 for s, p in zip(bundled_specs(), bundled_paths())]
        if as_json:
            typer.echo(json.dumps(items, indent=2))
            return
        import shutil
        import textwrap
        width = min(100, shutil.get_terminal_size((100, 24)).columns)
        for s in items:  # a heading line per spec, then its description wrapped below it
            ev = " or ".join(" and ".join(f"{k}={v!r}" for k, v in alt.items()) for alt in s["evidence"])
            typer.echo(f"{s['name']:22} axes {','.join(s['axes'])}; readout {s['readout']}")
            for line in textwrap.wrap(f"detected by {ev}" if s["detect"] else "not auto-detected: --spec NAME",
                                      width, initial_indent="    ", subsequent_indent="      "):
                typer.echo(line)
            for line in textwrap.wrap(s["description"] or "", width, initial_indent="    ",
                                      subsequent_indent="    "):
                typer.echo(line)


@app.command()
def sweep(
    checkpoint: Path = typer.Argument(..., help="The trained proxy (small) checkpoint, with optimizer state."),
    k: str = typer.Option("2", "--k", "-k", help=K_HELP),
    sigma: str = typer.Option("0.25,0.5,1,2,4", "--sigma", help="Grid of σ̄ (or t for relative schemes)."),
    lr: Optional[str] = typer.Option(None, "--lr", help="Grid of γ̄↑ (default γ̄ × 0.25,0.5,1,2)."),
    steps: int = typer.Option(200, "--steps", help="Training steps per setting."),
    spec: Optional[str] = typer.Option(None, "--spec", help=SPEC_HELP),
    base_lr: Optional[float] = typer.Option(None, "--base-lr", help="The proxy's γ̄ (default: config.learning_rate)."),
    early: Optional[float] = typer.Option(None, "--early", help="Score on the first FRACTION of steps; reports "
                                                                 "the rank correlation with full-run scores."),
    halving: bool = typer.Option(False, "--halving", help="Successive halving: keep the better half at budgets "
                                 "T/2^r, ..., T/2, T (the first at least --early × T, else T/8)."),
    seeds: int = typer.Option(1, "--seeds", help="Noise/data seeds per setting (confidence across seeds)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Batch size of the synthetic task or --data."),
    noise_scheme: str = typer.Option("mup", "--noise-scheme", help="mup|relative|masked|interpolate (App. F.5)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A .pt/.safetensors with `inputs` and `targets`."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the best setting to hparams.yaml."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of loss against σ̄ and γ̄↑ (needs matplotlib)."),
    model: Optional[str] = typer.Option(None, "--model", help="The proxy's model code, as verify --model: "
                                        "path/to/model.py:GPT or pkg.module[:function]. Default: the spec's "
                                        "model section (a bundled model)."),
    trust_spec_code: bool = typer.Option(False, "--trust-spec-code", help=TRUST_HELP),
) -> None:
    """Tune σ̄ and γ̄↑ on a small proxy upscaling, to reuse when widening the big model (paper §3.2).

    The proxy n0 -> k·n0 is widened for every setting, trained, and scored by the mean training loss. Prints the best pair
    (JSON) on stdout; the grid table on stderr. Then: mupscale widen BIG.pt --k K --hparams hparams.yaml"""
    with guard():
        from mupscale_cli.commands.sweep import SweepOptions, check_output_file, parse_floats, run_sweep
        if plot is not None:
            check_output_file(plot, "--plot")
        o = SweepOptions(checkpoint=checkpoint, k=k, sigmas=parse_floats(sigma, "--sigma"),
                         lrs=parse_floats(lr, "--lr") if lr else None, steps=steps, spec=spec, base_lr=base_lr,
                         early=early, halving=halving, seeds=seeds, batch_size=batch_size, scheme=noise_scheme,
                         data=data, output=output, model=model, trust_code=trust_spec_code)
        res = run_sweep(o, say)
        t = Table(title=f"sweep {checkpoint.name}: k {res['k']}, {res['steps']} steps, scheme {res['noise_scheme']}",
                  title_justify="left")
        for c in ("σ̄", "γ̄↑", "steps", "score", "± se", "early", "final loss"):
            t.add_column(c, justify="right")
        for r in res["grid"]:
            best = r["sigma"] == res["sigma"] and r["lr"] == res["lr"]
            t.add_row(*(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in
                        (r["sigma"], r["lr"], r["steps"], r["score"], r["score_se"], r["early"], r["final_loss"])),
                      style="bold green" if best else None)
        err.print(t)
        err.print(f"best: sigma={res['sigma']:g} lr={res['lr']:g} ({res['confidence']})", markup=False,
                  soft_wrap=True)
        if plot:
            from mupscale_cli.commands.plots import plot_sweep
            plot_sweep([res], plot)
        typer.echo(json.dumps({k2: res[k2] for k2 in ("sigma", "lr", "base_lr", "noise_scheme", "k", "confidence",
                                                        "rank_correlation_early_full", "total_train_steps",
                                                        "full_grid_steps")}))


_VERIFY_FAILED: list = []  # verify's failed check appends here: the one way `mupscale` may exit 1


def _internal(what: str) -> None:
    """A bug outside a command's guard: one line, exit 3 (never a traceback, never 1)."""
    say(f"mupscale: internal error: {what} (rerun with MUPSCALE_DEBUG=1 and report it)")
    sys.exit(3)


spec_app = typer.Typer(help="Write architecture specs for your own models.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")


@spec_app.command("init")
def spec_init(
    checkpoint: Path = typer.Argument(..., help="The checkpoint whose tensor names, shapes and model_args the "
                                                "skeleton is made from."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the spec to this file (default: "
                                                                         "stdout)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing -o file."),
) -> None:
    """Write a skeleton spec for a checkpoint: its width axes, each tensor's axes, tied tensors.

    Every guess is commented: check them against your model code (docs/spec-format.md), then widen with
    --spec FILE and check the result with mupscale verify.

    Example: mupscale spec init ckpt.pt -o my-model.yaml
    """
    with guard():
        from mupscale_cli.commands.spec_init import skeleton, write_spec
        text, info = skeleton(checkpoint)
        axes = ", ".join(f"{a} ({v})" for a, v in info["axes"].items())
        if output is None:
            typer.echo(text, nl=False)
            return
        write_spec(text, output, checkpoint, force)
        say(f"mupscale: wrote {output}: width axes {axes}{' (guessed: check)' if info['guessed'] else ''}, "
            f"{info['rules']} tensor rules{', tied ' + ', '.join(info['tied']) if info['tied'] else ''}; check the "
            f"commented guesses, then: mupscale widen {checkpoint} --spec {output} --k 2 -o wide.safetensors")
        typer.echo(str(output))


def _unwrap(text: str) -> str:
    """A docstring's paragraphs each on one line: rich wraps help text to the terminal and keeps the source's
    line breaks, which leaves ragged lines."""
    import inspect as _inspect
    return "\n\n".join(" ".join(p.split("\n")) for p in _inspect.cleandoc(text).split("\n\n"))


METAVARS = {"k": "K|AXIS=K,...", "size": "NAME=INT", "model_arg": "KEY=VALUE"}


def _tidy_help() -> None:
    """Help as shown: docstrings unwrapped, no `<bool>` after a flag, repeatable options' metavars saying
    what they take (`<list[str]>` says nothing)."""
    import inspect as _inspect
    from typer.models import OptionInfo
    app.info.help = _unwrap(app.info.help)
    for cb in [i.callback for i in [*app.registered_commands, *spec_app.registered_commands]] + [_root]:
        if cb.__doc__:
            cb.__doc__ = _unwrap(cb.__doc__)
        for name, par in _inspect.signature(cb).parameters.items():
            opt = par.default
            if isinstance(opt, OptionInfo) and opt.metavar is None:
                if par.annotation in (bool, "bool"):
                    opt.metavar = ""
                elif name in METAVARS:
                    opt.metavar = METAVARS[name]


_tidy_help()


def main() -> None:
    """Entry point: click's usage errors (bad option values) become one line too, exit 2; anything else that
    escapes is exit 3 in one line; exit 1 only when verify reported a failed check."""
    try:
        rv = app(standalone_mode=False)
    except KeyboardInterrupt:  # before a command's guard took over
        err.print("mupscale: interrupted", markup=False)
        sys.exit(130)
    except SystemExit as e:  # the guard's 143, or something calling sys.exit itself
        if e.code in (None, 0, 2, 130, 143) or os.environ.get("MUPSCALE_DEBUG"):
            raise
        _internal(f"SystemExit: {one_line(str(e.code))[:200]}")
    except BaseException as e:  # typer vendors click: match its exceptions by what they offer
        if type(e).__name__ == "Abort":
            err.print("mupscale: interrupted", markup=False)
            sys.exit(130)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            # outside a command's guard (typer itself): a bug, exit 3 in one line; never a traceback, never 1
            if os.environ.get("MUPSCALE_DEBUG"):
                raise
            msg = str(e).splitlines()[0] if str(e) else ""
            _internal(f"{type(e).__name__}: {msg}")
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            err.print(ctx.get_help(), markup=False)
        else:
            where = f"mupscale {ctx.info_name} --help" if ctx is not None and ctx.parent else "mupscale --help"
            say(f"mupscale: error: {e.format_message()} (see {where})")
        sys.exit(2)
    if rv == 1 and not _VERIFY_FAILED:
        _internal("exit status 1 outside a failed verify")
    sys.exit(rv if isinstance(rv, int) else 0)
