"""Optimizer state ids in every form real checkpoints use map to the right tensors; an entry that maps to
no parameter is an error, never a silent drop (Adam would restart from zero moments)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_wide, make_base, mupscale
from mupscale_cli.api import load
from mupscale_cli.verify.lockstep import run_lockstep
from mupscale_cli.zoo import gpt

ARGS = dict(gpt.DEFAULT_ARGS)


def rekey(src, out, state_key, params=lambda p: p):
    """The checkpoint at `src` with its optimizer ids rewritten (state keys and group params)."""
    ck = torch.load(src, weights_only=True)
    osd = ck["optimizer"]
    osd["state"] = {state_key(k): v for k, v in osd["state"].items()}
    for g in osd["param_groups"]:
        g["params"] = [params(p) for p in g["params"]]
    torch.save(ck, out)
    return out


def json_round_trip(k):
    return json.loads(json.dumps({k: 0})).popitem()[0]  # what a JSON round trip makes of a key: '3'


FORMS = {
    "int": (lambda k: k, lambda p: p),
    "str (JSON round trip)": (json_round_trip, lambda p: p),
    "str state and str params": (str, str),
    "int state, str params": (lambda k: k, str),
}


@pytest.mark.parametrize("form", FORMS)
def test_every_id_form_widens_every_state_entry(tmp, form):
    src, _, base_opt = make_base(tmp, gpt, ARGS, "adam", "mup", steps=3)
    keyed = rekey(src, tmp / "keyed.pt", *FORMS[form])
    r = mupscale("widen", str(keyed), "--k", "2", "-o", str(tmp / "w.safetensors"), check=True)
    assert r.returncode == 0
    w = load(tmp / "w.safetensors")
    n_in = sum(len(st) for st in base_opt.state_dict()["state"].values())
    assert n_in == 4 * len(base_opt.state_dict()["state"])  # step, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad)
    assert sum(len(st) for st in w.optimizer["state"].values()) == n_in  # nothing dropped


def test_string_keyed_state_follows_the_base_trajectory_float64(tmp):
    """Through the real CLI: a state keyed '0', '1', ... widens exactly (200 lockstep steps ≤ 1e-12)."""
    src, base, base_opt = make_base(tmp, gpt, ARGS, "adamw", "named", steps=5)
    keyed = rekey(src, tmp / "keyed.pt", json_round_trip)
    assert all(isinstance(k, str) for k in torch.load(keyed, weights_only=True)["optimizer"]["state"])
    mupscale("widen", str(keyed), "--k", "2", "-o", str(tmp / "wide.safetensors"), check=True)
    wide, wide_opt, _ = load_wide(gpt, tmp / "wide.safetensors", ARGS, "adamw")
    assert all(int(st["step"]) == 5 for st in wide_opt.state_dict()["state"].values())
    diffs = run_lockstep(gpt, ARGS, base, base_opt, wide, wide_opt, 200, seed=3)
    assert max(d.rel for d in diffs) <= 1e-12


def test_name_keyed_state_maps_by_name(tmp):
    """torch.distributed-style state keyed by parameter name, groups listing names."""
    src, _, base_opt = make_base(tmp, gpt, ARGS, "adamw", "named", steps=2)
    ck = torch.load(src, weights_only=True)
    osd = ck["optimizer"]
    ids = {pid: n for g in osd["param_groups"] for pid, n in zip(g["params"], g.pop("param_names"))}
    osd["state"] = {ids[k]: v for k, v in osd["state"].items()}
    for g in osd["param_groups"]:
        g["params"] = [ids[p] for p in g["params"]]
    torch.save(ck, tmp / "named.pt")
    mupscale("widen", str(tmp / "named.pt"), "--k", "2", "-o", str(tmp / "w.safetensors"), check=True)
    w = load(tmp / "w.safetensors")
    assert sum(len(st) for st in w.optimizer["state"].values()) == sum(
        len(st) for st in base_opt.state_dict()["state"].values())


@pytest.mark.parametrize("how", ["dangling int", "dangling str", "twice"])
def test_unmapped_state_entry_is_an_error(tmp, how):
    src, _, _ = make_base(tmp, gpt, ARGS, "adam", "mup", steps=2)
    ck = torch.load(src, weights_only=True)
    st = ck["optimizer"]["state"]
    if how == "dangling int":
        st[999] = st[0]
    elif how == "dangling str":
        ck["optimizer"]["state"] = {f"p{k}": v for k, v in st.items()}
    else:
        st["0"] = st[0]
    torch.save(ck, tmp / "bad.pt")
    r = mupscale("widen", str(tmp / "bad.pt"), "--k", "2", "-o", str(tmp / "w.pt"))
    assert r.returncode == 2 and r.stdout == "" and not (tmp / "w.pt").exists()
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert ("belongs to no parameter" if how != "twice" else "two entries for id 0") in line


def test_safetensors_state_of_an_unlisted_tensor_is_an_error(tmp):
    """Our own format keys state by name: state of a name no group lists must not vanish either."""
    from mupscale_cli.formats.safetensors import LazySafetensors  # noqa: F401 - the format under test
    from safetensors.torch import load_file, save_file
    src, _, _ = make_base(tmp, gpt, ARGS, "adam", "named", steps=2)
    mupscale("widen", str(src), "--k", "2", "-o", str(tmp / "w.safetensors"), check=True)
    meta = __import__("safetensors").safe_open(str(tmp / "w.safetensors"), "pt").metadata()
    t = load_file(tmp / "w.safetensors")
    t["__optim__/no.such.tensor/exp_avg"] = torch.zeros(2, dtype=torch.float64)
    meta = {k: v for k, v in meta.items() if k != "mupscale.xxh3_128"}
    save_file(t, tmp / "edited.safetensors", metadata=meta)
    r = mupscale("widen", str(tmp / "edited.safetensors"), "--k", "2", "-o", str(tmp / "w2.safetensors"))
    assert r.returncode == 2 and "'no.such.tensor' belongs to no parameter" in r.stderr


def test_widened_step_is_a_new_tensor(tmp):
    """`step` is copied as a new tensor (the paper's reference code shares it: base and wide optimizers then
    count steps together and diverge at the first step), also in memory (sweep, the Python API)."""
    from mupscale_cli.commands.widen import WidenOptions, prepare
    from mupscale_cli.core.optstate import widen_optimizer
    src, _, _ = make_base(tmp, gpt, ARGS, "adam", "named", steps=2)
    prep = prepare(WidenOptions(checkpoint=src, k="2"))
    wide = widen_optimizer(prep.ckpt.optimizer, prep.plan, prep.omap)
    given = {st["step"].untyped_storage().data_ptr() for st in prep.ckpt.optimizer["state"].values()}
    steps = [st["step"] for st in wide["state"].values()]
    assert len(steps) == len(given) and all(float(s) == 2 for s in steps)
    assert not any(s.untyped_storage().data_ptr() in given for s in steps)
