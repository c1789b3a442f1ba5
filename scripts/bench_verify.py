"""Benchmark and calibrate `mupscale verify`.

    python scripts/bench_verify.py                 # both parts
    python scripts/bench_verify.py --part bench    # time per step: verify vs training base and wide alone
    python scripts/bench_verify.py --part drift    # drift of exact widenings with verify's defaults
    python scripts/bench_verify.py --part drift --dtypes float64 --seeds 0,1,2   # the docs/verify.md table

bench: a zoo GPT of moderate size (default n_layer 4, n_embd 128, block 64, vocab 256, batch 16, k 2,
float32); in one process it times (a) training the base alone, (b) training the wide model alone, (c)
`run_verify` (both trained in lockstep + every comparison), N steps each, and prints ms/step and the
ratio c / (a + b) (target <= 1.3).

drift: for every zoo model x {SGD, Adam, AdamW}, the exact in-memory widening (k = 2) trained in lockstep
with verify's defaults (200 steps, batch 8) in float64, float32 and bfloat16, for each --seeds (seeds of
the synthetic batches): the largest relative loss/output difference. These figures set verify's default
tolerances (commands/verify.py DEFAULT_TOL; docs/verify.md).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mupscale_cli.api import make_optimizer
from mupscale_cli.commands.verify import VerifyOptions, default_tol, run_verify
from mupscale_cli.commands.widen import WidenOptions, prepare
from mupscale_cli.zoo import gpt, llama, mlp, resnet

# as tests/test_verify.py: every rescaled hyper-parameter non-zero (dampening, amsgrad, coupled weight decay)
HP = {"sgd": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-3),
      "adam": dict(lr=1e-3, eps=1e-6, amsgrad=True, weight_decay=1e-2),
      "adamw": dict(lr=1e-3, eps=1e-6, weight_decay=0.1)}
ZOO = {
    "mlp": (mlp, dict(mlp.DEFAULT_ARGS)),
    "gpt": (gpt, dict(gpt.DEFAULT_ARGS)),
    "resnet": (resnet, {"width": 2, "num_classes": 10, "in_channels": 3, "image_size": 8}),
    "llama": (llama, dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=12,
                          rope_theta=10000.0, rms_norm_eps=1e-6)),
}


def make_checkpoint(path: Path, zoo, args: dict, opt: str, steps: int = 3, batch_size: int = 8) -> Path:
    """Train a zoo model a few steps in float64 and save it nanoGPT-style with its optimizer."""
    torch.manual_seed(0)
    model = zoo.build(args).double()
    kind = opt
    hp = dict(HP[opt])
    o = make_optimizer(kind, [{"params": [p for _, p in model.named_parameters()],
                               "param_names": [n for n, _ in model.named_parameters()], **hp}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = zoo.batch(args, batch_size, g, torch.float64)
        o.zero_grad()
        zoo.loss(model, x, y).backward()
        o.step()
    torch.save({"model": model.state_dict(), "optimizer": o.state_dict(), "model_args": args, "iter_num": steps,
                "config": {"parametrization": "mup"}},
               path)
    return path


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_alone(zoo, args: dict, base_args: dict | None, sd_model: dict, steps: int, batch_size: int,
                dtype: torch.dtype, lr: float, device: str = "cpu") -> float:
    """ms per step of training one model alone (same batches, AdamW)."""
    torch.manual_seed(0)
    model = zoo.build(args, base_args).to(device=device, dtype=dtype)
    if sd_model is not None:
        model.load_state_dict(sd_model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    xs = [tuple(t.to(device) for t in zoo.batch(args if base_args is None else base_args, batch_size, g, dtype))
          for _ in range(steps + 1)]
    t0 = None
    for i, (x, y) in enumerate(xs):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()  # the first step warms up allocations
        opt.zero_grad(set_to_none=True)
        zoo.loss(model, x, y).backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


def bench(args, dtype: str, steps: int, batch_size: int, device: str = "cpu") -> None:
    d = tempfile.mkdtemp()
    ck = make_checkpoint(Path(d) / "gpt.pt", gpt, args, "adamw", steps=2, batch_size=batch_size)
    dt = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    wide_args = {**args, "n_embd": 2 * args["n_embd"]}
    stamps = []
    run_verify(VerifyOptions(base=ck, steps=2, dtype=dtype, batch_size=batch_size, device=device))  # warm-up
    a = train_alone(gpt, args, None, None, steps, batch_size, dt, 1e-3, device)
    b = train_alone(gpt, wide_args, args, None, steps, batch_size, dt, 1e-3, device)
    rep = run_verify(VerifyOptions(base=ck, steps=steps, dtype=dtype, batch_size=batch_size, device=device,
                                   tol=1e30), on_step=lambda r, f: stamps.append(time.perf_counter()))
    c = (stamps[-1] - stamps[1]) / (steps - 1) * 1e3  # step 1 .. N, past the step-0 measurement
    n_base = sum(p.numel() for p in gpt.build(args).parameters())
    print(f"bench: zoo GPT {args['n_layer']} layers, n_embd {args['n_embd']} -> {2 * args['n_embd']} (k 2), "
          f"block {args['block_size']}, vocab {args['vocab_size']}, batch {batch_size}, {dtype} on {device}, "
          f"{torch.get_num_threads()} CPU threads, {steps} steps, {n_base / 1e6:.2f}M base parameters")
    print(f"  (a) base alone      {a:8.1f} ms/step")
    print(f"  (b) wide alone      {b:8.1f} ms/step")
    print(f"  (c) verify          {c:8.1f} ms/step  (whole run incl. loading and widening: "
          f"{rep['time_s']:.1f} s)")
    print(f"  ratio c / (a + b) = {c / (a + b):.2f}  (target <= 1.3)")


def drift(steps: int, dtypes: list[str], models: list[str], batch_size: int, seeds: list[int],
          device: str = "cpu") -> None:
    """Worst relative loss/output gap over --seeds per model x optimizer x dtype, and in float64 the margin:
    the smallest ratio, over steps and seeds, of verify's default tolerance at that step to the gap."""
    d = Path(tempfile.mkdtemp())
    rows = []
    for name in models:
        zoo, args = ZOO[name]
        for opt in ("sgd", "adam", "adamw"):
            ck = make_checkpoint(d / f"{name}-{opt}.pt", zoo, args, opt, batch_size=batch_size)
            tol_at = default_tol("float64", prepare(WidenOptions(checkpoint=ck, k="2")).plan)
            row, margin = [name, opt], float("inf")
            for dt in dtypes:
                t0, worst = time.perf_counter(), (0.0, 0.0)
                for seed in seeds:
                    rep = run_verify(VerifyOptions(base=ck, steps=steps, dtype=dt, device=device, tol=1e30,
                                                   batch_size=batch_size, seed=seed))
                    m = rep["max"]
                    worst = max(worst, (max(m["loss_rel"], m["out_rel"], m["train_out_rel"]), m["tensor_rel"]))
                    if dt == "float64":
                        gaps = [(r["step"], max(r["loss_rel"] or 0, r["out_rel"], r["train_out_rel"] or 0))
                                for r in rep["rows"]]
                        margin = min([margin] + [tol_at(t) / g for t, g in gaps if g > 0])
                row.append((*worst, time.perf_counter() - t0))
            print(f"  {name:7} {opt:6} " + "  ".join(f"{dt}: {r[0]:.2e} (tensor {r[1]:.1e}, {r[2]:.1f}s)"
                                                      for dt, r in zip(dtypes, row[2:])), flush=True)
            rows.append((row, tol_at(steps), margin))
    print(f"\nMax relative loss/output difference of exact widenings (k 2), {steps} steps in lockstep, batch "
          f"{batch_size}, batch seeds {','.join(map(str, seeds))}, {device}, {torch.get_num_threads()} CPU threads:\n")
    f64 = "float64" in dtypes
    print("| model | optimizer | " + " | ".join(dtypes) + (" | default --tol at the last step | smallest margin |"
                                                           if f64 else " |"))
    print("|---|---|" + "---|" * len(dtypes) + ("---|---|" if f64 else ""))
    for row, tol, margin in rows:
        extra = f" {tol:.0e} | {margin:.2g}x |" if f64 else ""
        print(f"| {row[0]} | {row[1]} | " + " | ".join(f"{x[0]:.1e}" for x in row[2:]) + " |" + extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["bench", "drift", "all"], default="all")
    ap.add_argument("--steps", type=int, default=30, help="bench steps")
    ap.add_argument("--drift-steps", type=int, default=VerifyOptions.steps)
    ap.add_argument("--drift-batch", type=int, default=VerifyOptions.batch_size)
    ap.add_argument("--seeds", default="0", help="seeds of verify's synthetic batches (drift: the worst)")
    ap.add_argument("--dtype", default="float32", help="bench dtype")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--models", default="mlp,gpt,resnet,llama")
    ap.add_argument("--dtypes", default="float64,float32,bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu|cuda")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.part in ("bench", "all"):
        args = {**gpt.DEFAULT_ARGS, "n_layer": a.n_layer, "n_head": 4, "n_embd": a.n_embd,
                "block_size": a.block_size, "vocab_size": 256}
        bench(args, a.dtype, a.steps, a.batch_size, a.device)
    if a.part in ("drift", "all"):
        drift(a.drift_steps, a.dtypes.split(","), a.models.split(","), a.drift_batch,
              [int(x) for x in a.seeds.split(",")], a.device)


if __name__ == "__main__":
    main()
