"""A user's own optimizer groups (issue 19): 2 groups (hidden matrices / the rest) whose widening needs 3 (the
scalar-like readout bias keeps eps, the vector-like tensors get eps/k). widen prints, once, paste-ready lines
that build the optimizer from the state, and only the notes that apply; the pasted lines resume exactly."""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from conftest import MUPSCALE, make_base, train
from mupscale_cli.verify.lockstep import run_lockstep
from mupscale_cli.zoo import mlp

ARGS = dict(mlp.DEFAULT_ARGS)


def two_group_checkpoint(path: Path):
    torch.manual_seed(0)
    model = mlp.build(ARGS).double()
    named = list(model.named_parameters())
    mats = [n for n, p in named if n.startswith("hidden.") and p.dim() == 2]
    rest = [n for n, _ in named if n not in mats]
    params = dict(named)
    opt = torch.optim.AdamW([{"params": [params[n] for n in mats], "param_names": mats, "lr": 1e-3},
                             {"params": [params[n] for n in rest], "param_names": rest, "lr": 2e-3}],
                            eps=1e-6, weight_decay=0.1)
    train(mlp, ARGS, model, opt, 3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": ARGS,
                "config": {"parametrization": "mup"}}, path)
    return model, opt


def snippet_of(stderr: str) -> str:
    lines = stderr.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("# resume:"))
    end = next(i for i, x in enumerate(lines) if x.startswith("mupscale: widened"))
    return "\n".join(lines[start:end])


def test_split_groups_print_a_resume_snippet_that_resumes_exactly(tmp_path: Path) -> None:
    two_group_checkpoint(tmp_path / "base.pt")
    for suffix in ("safetensors", "pt"):
        out = tmp_path / f"wide.{suffix}"
        r = subprocess.run([*MUPSCALE, "widen", str(tmp_path / "base.pt"), "--k", "2", "-o", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("# resume:") == 1 and "MuAdam" not in r.stderr, r.stderr
        note = [x for x in r.stderr.splitlines() if "param groups become 3" in x]
        assert len(note) == 1 and "readout.bias" in note[0] and "optimizer_groups" in note[0], r.stderr
        snippet = snippet_of(r.stderr)
        assert "# group 2 (lr 0.002, eps 1e-06, weight_decay 0.1): readout.bias" in snippet, snippet
        wide_args = {**ARGS, "width": 2 * ARGS["width"]}
        model = mlp.build(wide_args, ARGS).double()
        scope = {"model": model}
        exec(snippet, scope)  # the printed lines, pasted as they are
        opt = scope["optimizer"]
        assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 3
        ck = torch.load(tmp_path / "base.pt", weights_only=True)  # the base as its script resumes it
        b = mlp.build(ARGS).double()
        b.load_state_dict(ck["model"])
        named = dict(b.named_parameters())
        b_opt = torch.optim.AdamW([{"params": [named[n] for n in g["param_names"]]}
                                   for g in ck["optimizer"]["param_groups"]])
        b_opt.load_state_dict(ck["optimizer"])
        diffs = run_lockstep(mlp, ARGS, b, b_opt, model, opt, 10, seed=3)
        assert max(d.rel for d in diffs) <= 1e-12, (suffix, [d.rel for d in diffs])


def test_mup_note_only_for_mup_groups_and_no_snippet_without_a_split(tmp_path: Path) -> None:
    """The note about mup 1.0.0's MuAdam appears for a MuAdamW checkpoint (whose groups it explains), and a
    checkpoint whose groups need no split gets neither note nor snippet."""
    src, _, _ = make_base(tmp_path, mlp, ARGS, "adamw", "mup", steps=2)
    r = subprocess.run([*MUPSCALE, "widen", str(src), "--k", "2", "-o", str(tmp_path / "m.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "MuAdam" in r.stderr and r.stderr.count("# resume:") == 1, r.stderr
    src, _, _ = make_base(tmp_path, mlp, ARGS, "sgd", "mup", steps=2, name="sgd.pt")
    r = subprocess.run([*MUPSCALE, "widen", str(src), "--k", "2", "-o", str(tmp_path / "s.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "# resume" not in r.stderr and "groups become" not in r.stderr, r.stderr
