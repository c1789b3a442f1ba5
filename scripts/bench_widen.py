"""Widening speed and memory: `mupscale widen` against the disk (dd) and a naive in-memory widening.

Makes a synthetic nanoGPT-named GPT-2 checkpoint (n_embd 768, vocab 50304, tied lm_head stored as its own
tensor; n_layer chosen to reach --size-mb) as .safetensors, then for k in --ks and σ̄ in {0, --sigma}
measures, each in its own child process:
  (a) dd        writing the same number of bytes as the widened file, with fsync (conv=fsync);
  (b) naive     load everything (safetensors.torch.load_file), widen every tensor in memory (mupscale's
                own math), safetensors.torch.save_file, fsync;
  (c) mupscale  `mupscale widen IN --k K --sigma S -o OUT -q` (streaming, --threads worker threads).
Each child runs under a small Python wrapper that reports the child's own peak RSS and CPU time (getrusage
of its only child). Times are wall-clock and include interpreter start-up and imports. Cases run in
rounds (--repeat) and the fastest run of each is kept. Output files are deleted after each run; `sync`
runs before each measurement so earlier writes do not overlap it. Prints a Markdown table.

    python scripts/bench_widen.py                    # about 600 MB input, k = 2 and 4, σ̄ = 0 and 0.75
    python scripts/bench_widen.py --size-mb 200 --ks 2 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WRAP = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
dt = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": r.returncode, "seconds": dt, "stderr": r.stderr[-2000:], "cpu": u.ru_utime + u.ru_stime,
                  "maxrss": u.ru_maxrss * 1024, "stdout": r.stdout[-20000:]}))
"""

NAIVE = r"""
import os, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from mupscale_cli.commands.widen import WidenOptions, prepare
from mupscale_cli.core.widen import widen_noised
src, out, k, sigma, seed = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
plan = prepare(WidenOptions(Path(src), k=k, spec="nanogpt-mup"), lazy=True).plan  # shapes only
tensors = load_file(src)                                                           # everything in memory
wide = {n: widen_noised(tensors[n], plan.tensors[n], sigma, seed) for n in tensors}
save_file(wide, out, metadata={"format": "pt"})
fd = os.open(out, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
"""


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def make_input(path: Path, size_mb: float) -> dict:
    import torch
    from safetensors.torch import save_file
    d, vocab, block = 768, 50304, 1024
    per_layer = 12 * d * d + 13 * d
    fixed = 2 * vocab * d + block * d + 2 * d
    n_layer = max(1, round((size_mb * 1e6 / 4 - fixed) / per_layer))
    args = {"n_layer": n_layer, "n_head": 12, "n_embd": d, "block_size": block, "bias": True,
            "vocab_size": vocab, "dropout": 0.0}
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.empty(*shape).uniform_(-0.05, 0.05, generator=g)
    sd = {"transformer.wte.weight": rnd(vocab, d), "transformer.wpe.weight": rnd(block, d)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": torch.ones(d), h + "ln_1.bias": torch.zeros(d),
                   h + "attn.c_attn.weight": rnd(3 * d, d), h + "attn.c_attn.bias": rnd(3 * d),
                   h + "attn.c_proj.weight": rnd(d, d), h + "attn.c_proj.bias": rnd(d),
                   h + "ln_2.weight": torch.ones(d), h + "ln_2.bias": torch.zeros(d),
                   h + "mlp.c_fc.weight": rnd(4 * d, d), h + "mlp.c_fc.bias": rnd(4 * d),
                   h + "mlp.c_proj.weight": rnd(d, 4 * d), h + "mlp.c_proj.bias": rnd(d)})
    sd.update({"transformer.ln_f.weight": torch.ones(d), "transformer.ln_f.bias": torch.zeros(d)})
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied in nanoGPT; safetensors stores it twice
    save_file(sd, path, metadata={"format": "pt", "mupscale.extra": json.dumps({"model_args": args})})
    return args


def child(argv: list[str], env: dict | None = None) -> dict:
    subprocess.run(["sync"], check=True)
    r = subprocess.run([sys.executable, "-c", WRAP, *argv], capture_output=True, text=True, check=True, env=env)
    res = json.loads(r.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed ({res['rc']}): {res['stderr']}")
    return res


def run_case(argv: list[str], out: Path | None, env: dict | None = None) -> dict:
    """One run in its own child (its peak RSS and CPU time), deleting the output afterwards."""
    r = child(argv, env)
    r["bytes"] = out.stat().st_size if out is not None and out.exists() else None
    if out is not None:
        out.unlink(missing_ok=True)
    return r


def keep_best(rows: dict, key: tuple, r: dict) -> None:
    """The fastest run of a case (and the largest peak RSS over its runs)."""
    if key not in rows:
        rows[key] = r
        return
    old = rows[key]
    rss = max(old["maxrss"], r["maxrss"])
    rows[key] = min(old, r, key=lambda x: x["seconds"])
    rows[key]["maxrss"] = rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=600, help="input size in MB (default 600)")
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--sigma", type=float, default=0.75, help="the σ̄ > 0 case (default 0.75)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is reported (default 2)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new one in /tmp)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--warmup-gb", type=float, default=4.0,
                    help="write and delete this much first (a VM backs fresh memory slowly the first time)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also time another checkout's src/ (e.g. the commit before a change) in the same rounds")
    ap.add_argument("--dd-direct", action="store_true",
                    help="also time dd oflag=direct (the disk without the page cache) in the same rounds")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mupscale-bench-", dir=a.dir))
    exe = shutil.which("mupscale") or sys.executable
    mup = [exe] if exe.endswith("mupscale") else [exe, "-m", "mupscale_cli"]
    rows = []
    try:
        src = work / "in.safetensors"
        args = make_input(src, a.size_mb)
        in_bytes = src.stat().st_size
        log(f"input: {src} {in_bytes / 1e6:.0f} MB, n_layer {args['n_layer']}, n_embd {args['n_embd']}, "
            f"{os.cpu_count()} CPUs")
        out = work / "out.safetensors"
        if a.warmup_gb > 0:
            log(f"warm-up: {a.warmup_gb:g} GB through the page cache")
            child(["dd", "if=/dev/zero", f"of={work / 'warm.bin'}", "bs=4M", f"count={int(a.warmup_gb * 250)}",
                   "conv=fsync", "status=none"])
            (work / "warm.bin").unlink()
        ks = [int(x) for x in a.ks.split(",")]
        sigmas = (0.0, a.sigma)
        best: dict[tuple, dict] = {}
        for rnd in range(a.repeat):  # rounds, so that slow drifts of the machine hit every case alike
            for k in ks:
                for sigma in sigmas:
                    log(f"round {rnd + 1}, k={k} σ̄={sigma}: mupscale ...")
                    argv = [*mup, "widen", str(src), "--k", str(k), "--sigma", str(sigma), "--spec", "nanogpt-mup",
                            "--threads", str(a.threads), "-q", "--force", "--json", "-o", str(out)]
                    r = run_case(argv, out)
                    r["inside"] = json.loads(r["stdout"])["time_s"]  # without interpreter start-up and imports
                    keep_best(best, ("mupscale", k, sigma), r)
                    if a.baseline_src is not None:
                        log(f"round {rnd + 1}, k={k} σ̄={sigma}: baseline ...")
                        env = {**os.environ, "PYTHONPATH": str(a.baseline_src)}
                        r = run_case(argv, out, env)
                        r["inside"] = json.loads(r["stdout"])["time_s"]
                        keep_best(best, ("baseline", k, sigma), r)
                    if sigma == 0.0:
                        nbytes = best[("mupscale", k, sigma)]["bytes"]
                        count = math.ceil(nbytes / (4 << 20))
                        log(f"round {rnd + 1}, k={k}: dd {count * 4 << 20} bytes ...")
                        r = run_case(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=4M", f"count={count}",
                                      "conv=fsync", "status=none"], work / "dd.bin")
                        r["bytes"] = count * (4 << 20)
                        keep_best(best, ("dd", k, None), r)
                        if a.dd_direct:
                            r = run_case(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=4M", f"count={count}",
                                          "oflag=direct", "conv=fsync", "status=none"], work / "dd.bin")
                            r["bytes"] = count * (4 << 20)
                            keep_best(best, ("dd-direct", k, None), r)
                    if not a.skip_naive:
                        log(f"round {rnd + 1}, k={k} σ̄={sigma}: naive ...")
                        keep_best(best, ("naive", k, sigma), run_case(
                            [sys.executable, "-c", NAIVE, str(src), str(out), str(k), str(sigma), "0"], out))
        names = {"dd": "dd (fsync)", "dd-direct": "dd oflag=direct (fsync)", "baseline": f"baseline ({a.baseline_src})",
                 "naive": "naive (load, widen, save_file)",
                 "mupscale": f"mupscale widen (--threads {a.threads})"}
        for k in ks:
            dd = best[("dd", k, None)]
            dd_rate = dd["bytes"] / dd["seconds"]
            for key in [("dd", k, None), ("dd-direct", k, None)] + [(c, k, s_) for s_ in sigmas
                                                                     for c in ("naive", "baseline", "mupscale")]:
                if key in best:
                    r = best[key]
                    rows.append({"case": names[key[0]], "k": k, "sigma": key[2], "bytes": r["bytes"],
                                 "seconds": r["seconds"], "cpu": r["cpu"], "maxrss": r["maxrss"],
                                 "ratio": r["bytes"] / r["seconds"] / dd_rate, "inside": r.get("inside")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import time
    dd_rates = ", ".join(f"{r['case'].split(' (')[0]} k={r['k']}: {r['bytes'] / r['seconds'] / 1e9:.2f}"
                         for r in rows if r["sigma"] is None)
    print(f"{time.strftime('%Y-%m-%d')}: input {in_bytes / 1e6:.0f} MB (n_layer {args['n_layer']}, n_embd 768, "
          f"vocab 50304, float32), {os.cpu_count()} CPUs; σ̄ > 0 is {a.sigma}; best of {a.repeat}; dd GB/s in this "
          f"run: {dd_rates}\n")
    print("| case | k | σ̄ | output GB | seconds | GB/s | ratio to dd | without start-up: s, ratio | CPU s | "
          "peak RSS MB | RSS / input |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sigma = "–" if r["sigma"] is None else f"{r['sigma']:g}"
        dd_s = next(x["seconds"] * x["bytes"] / r["bytes"] for x in rows if x["k"] == r["k"] and x["sigma"] is None)
        inside = f"{r['inside']:.1f}, {dd_s / r['inside']:.2f}" if r.get("inside") else "–"
        print(f"| {r['case']} | {r['k']} | {sigma} | {r['bytes'] / 1e9:.2f} | {r['seconds']:.1f} | "
              f"{r['bytes'] / r['seconds'] / 1e9:.3f} | {r['ratio']:.2f} | {inside} | {r['cpu']:.1f} | "
              f"{r['maxrss'] / 2**20:.0f} | {r['maxrss'] / in_bytes:.2f} |")
    mu = {(r["k"], r["sigma"]): r for r in rows if r["case"].startswith("mupscale")}
    ks = sorted({k for k, _ in mu})
    if len(ks) >= 2:
        for s in sorted({s for _, s in mu}):
            lo, hi = mu[(ks[0], s)], mu[(ks[-1], s)]
            log(f"σ̄={s}: peak RSS k={ks[-1]} minus k={ks[0]}: {(hi['maxrss'] - lo['maxrss']) / 2**20:+.0f} MB")
    if a.json:
        a.json.write_text(json.dumps({"input_bytes": in_bytes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
