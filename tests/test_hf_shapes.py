"""Issue 18: the file's own evidence wins over flags, for every bundled Hugging Face family. Each family's spec
gives the shape config.json's sizes say each tensor has (rule key `shape:`), so a config.json whose
intermediate-size entry contradicts the weights (a wrong value that still divides or is a multiple of the
weights' size, which the older divisibility check lets through) is refused by `mupscale widen` in one line naming
the tensor, exit 2, nothing written. The widenings that follow the shapes are tests/test_hf_verify.py's.

All the families' `mupscale widen` commands run in one subprocess through the console script's entry point
(tests/test_hf_verify.py, RUN), so torch is imported once."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hf_lockstep import build
from test_hf_verify import CASES, RUN

# case -> the config.json entry altered (×2: a multiple of the weights' size), when not intermediate_size
WRONG = {"opt": "ffn_dim", "opt-post-ln-proj": "ffn_dim", "falcon": "ffn_hidden_size",
         "falcon-mha-sequential": "ffn_hidden_size", "gpt_bigcode": "n_inner", "gpt2": "n_inner",
         "qwen3_moe": "moe_intermediate_size"}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("hfshapes")
    for case, cfg in CASES.items():
        d = tmp / case / "base"
        build(case.partition("-")[0], cfg, dtype=torch.float32).save_pretrained(d)
        c = json.loads((d / "config.json").read_text())
        key = WRONG.get(case, "intermediate_size")
        c[key] = 2 * (c.get(key) or 4 * c["n_embd"])  # gpt2's n_inner null: 4 n_embd
        (d / "config.json").write_text(json.dumps(c))
    cmds = [[c, ["widen", str(tmp / c / "base"), "--k", "2", "-o", str(tmp / c / "wide"), "-q"]] for c in CASES]
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(cmds)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rcs = {name: rc for name, _, rc in (json.loads(line[2:]) for line in r.stdout.splitlines()
                                        if line.startswith("@@"))}
    errs = {part.partition("\n")[0]: part.partition("\n")[2] for part in r.stderr.split("@@")[1:]}
    return {c: (rcs.get(c), errs.get(c, ""), (tmp / c / "wide").exists(), r.stdout) for c in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_config_contradicting_the_weights_is_refused(refusals, case):
    rc, err, written, out = refusals[case]
    lines = err.strip().splitlines()
    key = WRONG.get(case, "intermediate_size")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mupscale: error: "), (case, rc, err)
    assert "tensor '" in lines[0] and f"{key} = " in lines[0] and "does not describe its weights" in lines[0], lines[0]
    assert not written, case
