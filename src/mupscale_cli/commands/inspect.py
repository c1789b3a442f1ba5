"""`mupscale inspect`: what widen would do, validated, without writing anything."""
from __future__ import annotations

import json

from mupscale_cli.commands.widen import WidenOptions, prepare, summary
from mupscale_cli.core.checkpoint import META_PROV
from mupscale_cli.core.optstate import factors


def run_inspect(opts: WidenOptions) -> dict:
    prep = prepare(opts)
    plan = prep.plan
    rows = []
    for n, p in plan.tensors.items():
        rows.append({
            "name": n, "role": p.role, "axes": p.axes_text, "shape": list(p.shape),
            "widened": list(p.out_shape), "bytes": p.out_bytes, "s": str(p.s), "g": str(p.g),
            "noise_std": opts.sigma * p.noise_unit, "tied_to": p.alias_of,
            "layout": ",".join(f"{d.axis}/{d.block}" for d in p.dims if d.axis and d.block > 1) or None,
        })
    optim = None
    if prep.omap is not None:
        groups = []
        for i, (g, names) in enumerate(zip(prep.ckpt.optimizer["param_groups"], prep.omap.names)):
            fs = sorted({", ".join(f"{h}×{f}" for h, f in factors(prep.omap.kind, plan.tensors[n].s,
                                                                   plan.tensors[n].g).items() if h in g)
                         for n in names})
            groups.append({"group": i, "tensors": len(names), "factors": fs})
        optim = {"kind": prep.omap.kind, "layout": prep.omap.layout, "groups": groups}
    prov = prep.ckpt.metadata.get(META_PROV) or (prep.ckpt.extra.get("mupscale") and json.dumps(
        prep.ckpt.extra["mupscale"]))
    return {**summary(prep, None, opts, None), "rows": rows, "optimizer_map": optim,
            "provenance": json.loads(prov) if prov else None}
