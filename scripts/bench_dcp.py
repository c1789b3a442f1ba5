"""Widening a DCP checkpoint: throughput and peak RSS per rank, 1 process and torchrun with 2 ranks, against dd.

Makes a synthetic μP MLP (bundled `mup-mlp` names; float32; --width, --depth) with AdamW state (exp_avg,
exp_avg_sq, step), saved with dcp.save in the plain layout {"model", "optim"}, then measures, each in its
own child process, in --repeat rounds (fastest kept):
  (a) dd        writing as many bytes as the widened checkpoint, with fsync (conv=fsync), and the same with
                oflag=direct (the disk itself, around the page cache);
  (b) 1 rank    `mupscale widen IN -o OUT --k K --spec mup-mlp --json`;
  (c) 2 ranks   the same under `torchrun --standalone --nproc-per-node 2 -m mupscale_cli`.
A wrapper reports the child's wall time and the largest peak RSS of any process below it (getrusage of its
children: for torchrun, the largest rank or the agent). "in-process s" is widen's own time on rank 0
(after imports, before exit; --json time_s). Prints a Markdown table.

    python scripts/bench_dcp.py                     # width 2048, depth 6: 200 MiB in (model + AdamW), k = 2
    python scripts/bench_dcp.py --width 1024 --repeat 1
"""
from __future__ import annotations

import argparse
import json
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
print(json.dumps({"rc": r.returncode, "seconds": dt, "stderr": r.stderr[-2000:], "maxrss": u.ru_maxrss * 1024,
                  "stdout": r.stdout[-20000:]}))
"""


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def make_input(path: Path, width: int, depth: int) -> int:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    torch.manual_seed(0)
    m = nn.ModuleDict({"input": nn.Linear(64, width), "hidden": nn.ModuleList(
        nn.Linear(width, width) for _ in range(depth - 2)), "readout": nn.Linear(width, 16)})
    o = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    o.step()
    msd, osd = get_state_dict(m, o)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=True)
    return sum(f.stat().st_size for f in path.iterdir())


def child(argv: list[str], env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", WRAP, *argv], capture_output=True, text=True, env=env)
    res = json.loads(r.stdout)
    if res["rc"]:
        raise SystemExit(f"{' '.join(argv)} failed: {res['stderr']}")
    return res


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=0.0, help="σ̄ (default 0)")
    ap.add_argument("--skip-torchrun", action="store_true", help="one rank only")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dcp-", dir=a.dir))
    env = dict(os.environ)
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        log(f"making the input (width {a.width}, depth {a.depth}) ...")
        in_bytes = make_input(work / "in", a.width, a.depth)
        widen = ["widen", str(work / "in"), "-o", str(work / "out"), "--k", str(a.k), "--spec", "mup-mlp",
                 "--sigma", str(a.sigma), "--json", "-q"]
        cases = {
            "1 rank": [sys.executable, "-m", "mupscale_cli", *widen],
            "2 ranks (torchrun)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node=2", "-m", "mupscale_cli", *widen],
        }
        if a.skip_torchrun:
            del cases["2 ranks (torchrun)"]
        best: dict[str, dict] = {}
        out_bytes = None
        for rnd in range(a.repeat):
            for name, argv in cases.items():
                shutil.rmtree(work / "out", ignore_errors=True)
                subprocess.run(["sync"])
                log(f"round {rnd + 1}: {name} ...")
                r = child(argv, env)
                out_bytes = size_of(work / "out")
                try:
                    r["inproc"] = json.loads(r["stdout"])["time_s"]
                except (ValueError, KeyError):
                    r["inproc"] = None
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
            count = -(-out_bytes // (4 << 20))
            for dd, flags in (("dd", []), ("dd oflag=direct", ["oflag=direct"])):  # the page cache; the disk
                subprocess.run(["sync"])
                log(f"round {rnd + 1}: {dd} {count * 4} MiB ...")
                r = child(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=4M", f"count={count}", *flags,
                           "conv=fsync", "status=none"])
                (work / "dd.bin").unlink()
                r["inproc"] = None
                if dd not in best or r["seconds"] < best[dd]["seconds"]:
                    best[dd] = r
        dd_rate = out_bytes / best["dd"]["seconds"]
        disk_rate = out_bytes / best["dd oflag=direct"]["seconds"]
        import time
        print(f"{time.strftime('%Y-%m-%d')}: input {in_bytes / 2**20:.0f} MiB (model + AdamW state), output "
              f"{out_bytes / 2**20:.0f} MiB, k = {a.k}, σ̄ = {a.sigma:g}, best of {a.repeat}, {os.cpu_count()} CPUs, dd "
              f"{dd_rate / 1e9:.2f} GB/s and dd oflag=direct {disk_rate / 1e9:.2f} GB/s in this run\n")
        print("| case | seconds | output MB/s | ratio to dd | ratio to dd oflag=direct | in-process s (rank 0) | "
              "peak RSS MiB (largest process) |")
        print("|---|---|---|---|---|---|---|")
        for name in ["dd", "dd oflag=direct", *cases]:
            r = best[name]
            rate = out_bytes / r["seconds"]
            ip = f"{r['inproc']:.2f}" if r["inproc"] is not None else "-"
            print(f"| {name} | {r['seconds']:.2f} | {rate / 1e6:.0f} | {rate / dd_rate:.2f} | {rate / disk_rate:.2f} | "
                  f"{ip} | {r['maxrss'] / 2**20:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
