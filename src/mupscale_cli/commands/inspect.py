"""`mupscale inspect`: what widen would do, validated, without writing anything."""
from __future__ import annotations

import json

from mupscale_cli.commands.widen import WidenOptions, prepare, summary
from mupscale_cli.formats import digest, load_checkpoint
from mupscale_cli.bounded import loads_json
from mupscale_cli.formats.checkpoint import (META_DIGESTS, META_PROV, PROV_DIGESTS, Checkpoint, iter_chunks,
                                             provenance_of)
from mupscale_cli.core.optstate import factors
from mupscale_cli.formats.write import optimizer_refs
from mupscale_cli.formats.safetensors import _tensor_bytes
from mupscale_cli.errors import MupscaleError


def check_digests(ckpt: Checkpoint) -> dict | None:
    """Recompute the checksum (formats/digest.py) of every tensor a widened file recorded (None if it records none);
    a mismatch, a missing or an unrecorded tensor is an error naming the tensor."""
    if META_DIGESTS in ckpt.metadata:
        try:
            recorded = loads_json(ckpt.metadata[META_DIGESTS], f"{ckpt.path}: metadata {META_DIGESTS!r}")
        except ValueError:
            recorded = None
    else:
        prov = ckpt.extra.get("mupscale")
        if not isinstance(prov, dict) or PROV_DIGESTS not in prov:
            return None
        recorded = prov[PROV_DIGESTS]
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise MupscaleError(f"{ckpt.path}: the recorded tensor digests are not a JSON object of name -> digest; "
                            f"the file was modified: widen again from the source")
    # a Hugging Face directory's optimizer state is optimizer.pt beside the safetensors, which record only theirs
    optim = {} if ckpt.hf is not None else optimizer_refs(ckpt.optimizer)
    actual = {**{n: (ckpt.tensors, n) for n in ckpt.tensors}, **optim}
    bad = [n for n, h in recorded.items() if n not in actual or _digest(*actual[n]) != h]
    bad += [n for n in actual if n not in recorded]
    if bad:
        n = bad[0]
        what = ("is missing" if n not in actual else "was not recorded at widening" if n not in recorded
                else "does not match the checksum recorded at widening")
        more = f" ({len(bad) - 1} more tensors differ)" if len(bad) > 1 else ""
        raise MupscaleError(f"{ckpt.path}: tensor {n!r} {what}{more}: the file is corrupted or was modified; "
                            f"widen again from the source")
    return {"checked": len(recorded), "bad": bad}


def _digest(m, name: str) -> str:
    """Checksum of the stored bytes of m[name], read piece by piece (the same as tensor_digest(m[name]))."""
    h = digest.new()
    for x in iter_chunks(m, name, 1 << 22):
        h.update(_tensor_bytes(x))
    return h.hexdigest()


def run_inspect(opts: WidenOptions) -> dict:
    prep = prepare(opts, lazy=True)
    plan = prep.plan
    rows = []
    for n, p in plan.tensors.items():
        rows.append({
            "name": n, "role": p.role, "axes": p.axes_text, "shape": list(p.shape),
            "widened": list(p.out_shape), "bytes": p.out_bytes, "s": str(p.s), "g": str(p.g),
            "noise_std": opts.sigma * p.noise_unit, "tied_to": p.alias_of,
            "layout": ",".join(f"{d.axis}/" + ("+".join(f"{a}:{b}" for a, b in d.segments) if d.segments
                                                  else str(d.block))
                               for d in p.dims if d.axis and (d.block > 1 or d.segments)) or None,
        })
    optim = None
    if prep.omap is not None:
        groups = []
        for i, (g, names) in enumerate(zip(prep.ckpt.optimizer["param_groups"], prep.omap.names)):
            fs = sorted({", ".join(f"{h}×{f}" for h, f in factors(prep.omap.kind, plan.state_plan(n).s,
                                                                   plan.state_plan(n).g).items() if h in g)
                         for n in names})  # state_plan: a parameter the file splits (fused experts) too
            hps = {h: g[h] for h in ("lr", "eps", "weight_decay", "momentum") if isinstance(g.get(h), (int, float))}
            groups.append({"group": i, "tensors": len(names), "factors": fs, "hparams": hps})
        optim = {"kind": prep.omap.kind, "layout": prep.omap.layout, "groups": groups}
    prov = {k: v for k, v in provenance_of(prep.ckpt).items() if k != PROV_DIGESTS}
    digests = check_digests(prep.ckpt)
    if digests is not None:
        prep.notes.append(f"integrity: the checksums of all {digests['checked']} tensors match the digests "
                          f"recorded at widening")
    return {**summary(prep, None, opts, None), "rows": rows, "optimizer_map": optim,
            "provenance": prov or None, "digests": digests}


def is_widened(path) -> bool:
    """Whether PATH is a mupscale output (it records its widening): `inspect PATH` without --k then describes
    the file itself (k = 1) instead of planning a second widening by the default k."""
    return bool(provenance_of(load_checkpoint(path, lazy=True)))


def provenance_line(prov: dict) -> str:
    """The provenance of a widened file in one short line (the full record: `inspect --json`)."""
    def get(key, default="?"):
        v = prov.get(key)
        return default if v is None else v
    k = prov.get("k")
    if isinstance(k, dict) and k:
        ks = f"×{next(iter(k.values()))}" if len(set(map(str, k.values()))) == 1 else "×(" + ", ".join(
            f"{a} {n}" for a, n in sorted(k.items())) + ")"
    else:
        ks = f"×{get('k')}"
    sha = str(get("source_sha256", ""))[:12]
    parts = [f"{get('tool', 'mupscale')} widened {get('source')}" + (f" (sha256 {sha}…)" if sha else "") + f" {ks}",
             f"spec {get('spec')}"]
    sigma = prov.get("sigma")
    if isinstance(prov.get("sigma_per_tensor"), dict) or (isinstance(sigma, (int, float)) and sigma):
        s = "σ̄ per tensor" if isinstance(prov.get("sigma_per_tensor"), dict) else f"σ̄ {sigma:g}"
        parts.append(f"{s}, seed {get('seed')} ({get('noise')}, {get('noise_device', 'cpu')})")
    else:
        parts.append("σ̄ 0 (exact)")
    if prov.get("optimizer"):
        parts.append(f"{prov['optimizer']} state")
    if isinstance(prov.get("lr_scale"), (int, float)) and prov["lr_scale"] != 1:
        parts.append(f"lr × {prov['lr_scale']:g} (--hparams)")
    if prov.get("dtype"):
        parts.append(f"cast to {prov['dtype']}")
    return "; ".join(parts) + "; the full record: --json"
