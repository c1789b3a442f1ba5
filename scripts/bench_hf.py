"""Widen a random Hugging Face Llama (≈1.2 GB float32) k=2: `mupscale widen DIR -o OUT` (streamed) against dd
writing the same bytes (conv=fsync) in the same run, and against the in-memory way (from_pretrained, widen every
tensor in memory, save_pretrained): time, ratio to dd and peak RSS side by side, each in its own process
(`/usr/bin/time -v`), in --repeat rounds (fastest kept; dd right after mupscale in each round). Prints one table
(docs/performance.md, docs/formats.md 'Hugging Face').

    python scripts/bench_hf.py [--tiny] [--keep DIR] [--repeat N] [--skip-memory] [--shard-size 2GB]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=12,
           num_key_value_heads=4, max_position_embeddings=2048)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def make(path: Path, cfg: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).save_pretrained(path)


def in_memory(src: Path, out: Path) -> None:
    """The in-memory way: load, widen each tensor with mupscale's own rules, build and save the wide model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mupscale_cli.core.plan import make_plan
    from mupscale_cli.core.spec import load_spec
    from mupscale_cli.core.widen import widen
    base = AutoModelForCausalLM.from_pretrained(src)
    sd = base.state_dict()
    cfg = base.config.to_dict()
    plan = make_plan(load_spec("hf-llama"), {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}, {"*": 2}, cfg)
    wide_sd = {n: widen(t, plan.tensors[n]) for n, t in sd.items()}
    del base, sd
    wcfg = AutoConfig.from_pretrained(src, **{a: cfg[a] * 2 for a in ("hidden_size", "intermediate_size",
                                                                       "num_attention_heads", "num_key_value_heads")})
    with torch.device("meta"):
        wide = AutoModelForCausalLM.from_config(wcfg)
    wide.load_state_dict(wide_sd, assign=True)
    wide.save_pretrained(out)


def timed(argv: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{argv}: exit {r.returncode}\n{r.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1])
    return {"wall_s": wall, "peak_rss_mib": round(rss / 1024)}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--in-memory":
        in_memory(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a smoke test of this script)")
    ap.add_argument("--keep", type=Path, help="work here instead of a temporary directory, and keep it")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; the fastest run of each way is kept")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the in-memory way")
    ap.add_argument("--shard-size", default=None, help="also widen into shards of this size (--shard-size)")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench_hf-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        base = work / "base"
        if not (base / "config.json").exists():
            make(base, TINY if a.tiny else BIG)
        mup = [sys.executable, "-m", "mupscale_cli", "widen", str(base), "--k", "2", "-q", "--force"]
        ways = [("mupscale widen (streamed, one file)", [*mup, "-o", str(work / "wide-mupscale")],
                 work / "wide-mupscale")]
        if a.shard_size:
            ways.append((f"mupscale widen (--shard-size {a.shard_size})",
                         [*mup, "--shard-size", a.shard_size, "-o", str(work / "wide-shards")], work / "wide-shards"))
        if not a.skip_memory:
            ways.append(("in memory (from_pretrained, widen, save_pretrained)",
                         [sys.executable, __file__, "--in-memory", str(base), str(work / "wide-memory")],
                         work / "wide-memory"))
        rows: dict = {}
        for _ in range(a.repeat):
            for name, argv, out in ways:
                if out.exists():
                    shutil.rmtree(out)
                subprocess.run(["sync"], check=True)
                r = {**timed(argv), "output_bytes": size(out)}
                shutil.rmtree(out)
                if name not in rows or r["wall_s"] < rows[name]["wall_s"]:
                    rows[name] = r
                if name == ways[0][0]:  # dd writing the same bytes, right after
                    count = -(-r["output_bytes"] // (4 << 20))
                    for dd, flags in (("dd", []), ("dd oflag=direct", ["oflag=direct"])):  # the page cache; the disk
                        subprocess.run(["sync"], check=True)
                        d = {**timed(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=4M", f"count={count}",
                                      *flags, "conv=fsync", "status=none"]), "output_bytes": count * (4 << 20)}
                        (work / "dd.bin").unlink()
                        if dd not in rows or d["wall_s"] < rows[dd]["wall_s"]:
                            rows[dd] = d
        dd_rate = rows["dd"]["output_bytes"] / rows["dd"]["wall_s"]
        disk_rate = rows["dd oflag=direct"]["output_bytes"] / rows["dd oflag=direct"]["wall_s"]
        print(f"base: {size(base) / 2**20:.0f} MiB ({json.dumps(TINY if a.tiny else BIG)}), k = 2, "
              f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, dd {dd_rate / 1e9:.2f} GB/s, dd oflag=direct "
              f"{disk_rate / 1e9:.2f} GB/s, best of {a.repeat}")
        print("| way | wall s | output MiB | ratio to dd | ratio to dd oflag=direct | peak RSS MiB |\n"
              "|---|---|---|---|---|---|")
        for name, r in [("dd", rows.pop("dd")), ("dd oflag=direct", rows.pop("dd oflag=direct")), *rows.items()]:
            rate = r["output_bytes"] / r["wall_s"]
            print(f"| {name} | {r['wall_s']:.2f} | {r['output_bytes'] / 2**20:.0f} | {rate / dd_rate:.2f} | "
                  f"{rate / disk_rate:.2f} | {r['peak_rss_mib']} |")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
