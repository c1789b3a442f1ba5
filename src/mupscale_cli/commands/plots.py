"""Sweep plots (optional extra: matplotlib): loss against σ̄ and against γ̄↑, one curve per proxy."""
from __future__ import annotations

from pathlib import Path

from mupscale_cli.errors import MupscaleError


def plot_sweep(results: list[dict], path: Path, labels: list[str] | None = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MupscaleError("--plot needs matplotlib: pip install 'mupscale-cli[plot]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, res in enumerate(results):
        label = labels[i] if labels else res["proxy"]["checkpoint"]
        rows = [r for r in res["grid"] if r["score"] is not None]
        xs = sorted({r["sigma"] for r in rows})
        ax1.plot(xs, [next(r["score"] for r in rows if r["sigma"] == x and r["lr"] == res["lr"]) for x in xs],
                 "o-", label=f"{label} (γ̄↑={res['lr']:.3g})")
        ys = sorted({r["lr"] for r in rows})
        ax2.plot(ys, [next(r["score"] for r in rows if r["lr"] == y and r["sigma"] == res["sigma"]) for y in ys],
                 "o-", label=f"{label} (σ̄={res['sigma']:.3g})")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    ax1.set_yscale("log")
    for ax, x in ((ax1, "σ̄ (noise base constant)"), (ax2, "γ̄↑ (learning-rate base constant)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel(x)
        ax.set_ylabel("mean training loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
