"""The last line of `make demo`: what was widened and what verify found, from the JSON that `widen --json`
and `verify --json` wrote. Exits 1 unless verify passed."""
from __future__ import annotations

import json
import sys


def main(widen_json: str, verify_json: str) -> int:
    w = json.load(open(widen_json))
    v = json.load(open(verify_json))
    k = w["k"]
    ks = " ".join(f"{a}×{n}" for a, n in k.items()) if len(set(k.values())) > 1 else f"×{next(iter(k.values()))}"
    mib = w["model_bytes"]
    opt = w.get("optimizer") or {}
    worst = max(x for x in (v["max"]["loss_rel"], v["max"]["out_rel"]) if x is not None)
    result = "PASS" if v["result"] == "pass" else "FAIL"
    print(f"demo: {result}: widened {ks} ({mib['base'] / 2**20:.2f} -> {mib['widened'] / 2**20:.2f} MiB of weights"
          f"{', ' + opt['kind'] + ' state and hyper-parameters' if opt else ''}) into {w['output']}; trained "
          f"{v['steps_run']} steps beside the base: loss and outputs equal to {worst:.1e} relative "
          f"(tolerance {v['tolerance']['loss_output']:g})")
    return 0 if result == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
