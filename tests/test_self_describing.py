"""Outputs carry their spec's text; -o creates missing directories (and removes them on failure); --untie
writes a separate readout for a tied standard-parametrization model."""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from mupscale_cli.api import load
from mupscale_cli.zoo import mlp
from tests.conftest import make_base, mupscale

ARGS = {"width": 16, "depth": 3, "d_in": 8, "d_out": 4}


def test_output_of_a_non_bundled_spec_needs_no_spec(tmp):
    base, _, _ = make_base(tmp, mlp, ARGS, opt="adamw", layout="named", steps=3)
    spec = tmp / "my-mlp.yaml"
    from mupscale_cli.core.spec import load_spec
    spec.write_text(load_spec("mup-mlp").text.replace("name: mup-mlp", "name: my-mlp")
                    .replace("config.parametrization: mup", "config.my_marker: 1"))
    wide = tmp / "wide.safetensors"
    mupscale("widen", str(base), "--spec", str(spec), "--k", "2", "-o", str(wide), check=True)
    spec.unlink()  # the output must not need the file any more
    r = mupscale("inspect", str(wide), "--k", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["spec"] == "my-mlp"
    r = mupscale("verify", str(base), str(wide), "--steps", "4")
    assert r.returncode == 0, r.stderr + r.stdout
    r = mupscale("widen", str(wide), "--k", "2", "-o", str(tmp / "wide4.pt"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["spec"] == "my-mlp"
    w4 = load(tmp / "wide4.pt")
    assert w4.extra["model_args"]["width"] == 4 * ARGS["width"]
    assert w4.provenance["spec_text"].startswith("name: my-mlp")


def test_o_into_missing_directories_creates_them_and_removes_them_on_failure(tmp):
    base, model, _ = make_base(tmp, mlp, ARGS, steps=1)
    r = mupscale("widen", str(base), "-o", str(tmp / "runs" / "wide" / "ckpt.pt"))
    assert r.returncode == 0 and (tmp / "runs" / "wide" / "ckpt.pt").is_file(), r.stderr
    ck = torch.load(base)
    ck["model"]["hidden.0.weight"][0, 0] = float("nan")
    torch.save(ck, tmp / "nan.pt")
    r = mupscale("widen", str(tmp / "nan.pt"), "--strict", "-o", str(tmp / "new" / "sub" / "w.safetensors"))
    assert r.returncode == 2 and "NaN" in r.stderr, r.stderr
    assert not (tmp / "new").exists()


class TinySP(nn.Module):
    """Standard parametrization, summing readout, optionally tied to the input embedding."""

    def __init__(self, d: int, vocab: int = 12, tied: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


SP_SPEC = """name: tiny-sp
readout: sum
tied: {head.weight: emb.weight}
untie: {readout: head.weight, from: emb.weight, fan_in: 1, set: {model_args.tied: false}}
model_args: {d: width}
tensors:
  emb.weight: {axes: [null, width], fan_in: 0}
  mid.weight: [width, width]
"""


def test_tied_summing_readout_is_refused_and_untie_writes_a_separate_readout(tmp):
    torch.manual_seed(0)
    base = TinySP(8).double()
    torch.save({"model": base.state_dict(), "model_args": {"d": 8, "tied": True}}, tmp / "sp.pt")
    (tmp / "sp.yaml").write_text(SP_SPEC)
    r = mupscale("widen", str(tmp / "sp.pt"), "--spec", str(tmp / "sp.yaml"), "-o", str(tmp / "w.pt"))
    assert r.returncode == 2 and "docs/stacks.md" in r.stderr and "--untie" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp / "w.pt").exists()
    r = mupscale("widen", str(tmp / "sp.pt"), "--spec", str(tmp / "sp.yaml"), "--untie", "-o", str(tmp / "w.pt"))
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp / "w.pt")
    assert ck["model_args"] == {"d": 16, "tied": False}
    wide = TinySP(16, tied=False).double()
    wide.load_state_dict(ck["model"], strict=True)
    assert not torch.equal(wide.head.weight, wide.emb.weight)
    x = torch.randint(0, 12, (4, 5))
    with torch.no_grad():
        a, b = base(x), wide(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-12
    # the plain duplication a tied readout gets instead doubles the logits: what the refusal prevents
    tied = TinySP(16, tied=True).double()
    tied.load_state_dict({k: v for k, v in ck["model"].items() if k != "head.weight"}, strict=False)
    with torch.no_grad():
        assert ((tied(x) - 2 * a).abs().max() / a.abs().max()).item() <= 1e-12


def test_declared_group_key_follows_a_split_and_unknown_keys_get_a_note(tmp):
    """A spec's group key that scales like lr (nanoGPT-mup's lr_scale) is rescaled in every part of a
    group Table 1 splits (nanoGPT's decay group holds embeddings, lr × 1, and matrices, lr × 1/k); a key no
    one declared is copied with a note."""
    from mupscale_cli.commands.widen import WidenOptions, prepare
    from mupscale_cli.core.spec import load_spec
    from mupscale_cli.zoo import gpt
    src, _, _ = make_base(tmp, gpt, dict(gpt.DEFAULT_ARGS), "adamw", "nanogpt", steps=2)
    ck = torch.load(src)
    for g in ck["optimizer"]["param_groups"]:
        g["lr_scale"], g["my_key"] = 0.5, 7
    torch.save(ck, src)
    spec = tmp / "s.yaml"
    spec.write_text(load_spec("nanogpt-mup").text + "optimizer:\n  group_keys:\n    lr_scale: lr\n")
    prep = prepare(WidenOptions(checkpoint=src, spec=str(spec), k="2"))
    assert any("'my_key'" in n and "copied unchanged" in n for n in prep.notes), prep.notes
    assert not any("'lr_scale'" in n for n in prep.notes)
    r = mupscale("widen", str(src), "--spec", str(spec), "-o", str(tmp / "w.pt"))
    assert r.returncode == 0, r.stderr
    groups = torch.load(tmp / "w.pt")["optimizer"]["param_groups"]
    lr0 = ck["optimizer"]["param_groups"][0]["lr"]
    assert len(groups) == 3 and sorted(g["lr"] / lr0 for g in groups) == [0.5, 1, 1]
    for g in groups:
        assert g["lr_scale"] == 0.5 * g["lr"] / lr0 and g["my_key"] == 7
