"""Corrected μP optimizers: groups, Table 2 factors from infshapes, param_names, state dict round trip."""
import copy

import mup
import pytest
import torch
from torch import nn

from mupscale_cli.optim import MuAdam, MuAdamW, MuSGD


class Net(nn.Module):
    def __init__(self, h1: int, h2: int):
        super().__init__()
        self.fc1 = nn.Linear(5, h1)  # vector-like weight and bias (wm = h1 mult)
        self.fc2 = nn.Linear(h1, h2)  # matrix-like, fan-in mult != fan-out mult
        self.gain = nn.Parameter(torch.ones(()))  # scalar-like
        self.out = mup.MuReadout(h2, 3)  # vector-like weight (wm = h2 mult), scalar-like bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gain * torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def net(h1: int = 8, h2: int = 12) -> Net:
    return mup.set_base_shapes(Net(h1, h2), Net(4, 4), delta=Net(5, 5))


def expected(p: torch.Tensor, opt: str, lr: float, eps: float, wd: float) -> tuple[float, float, float]:
    """(lr, eps, wd) from paper Table 2 relative to the base width, computed from the infshape."""
    dims = [d.width_mult() for d in p.infshape if d.isinf()]
    if len(dims) == 2:
        n_out, n_in = dims
        return {"adam": (lr / n_in, eps / n_out, wd * n_in / n_out), "adamw": (lr / n_in, eps / n_out, wd * n_in),
                "sgd": (lr * n_out / n_in, eps, wd * n_in / n_out)}[opt]
    if len(dims) == 1:
        n = dims[0]
        return {"adam": (lr, eps / n, wd / n), "adamw": (lr, eps / n, wd), "sgd": (lr * n, eps, wd / n)}[opt]
    return lr, eps, wd


OPTS = {"adam": lambda m, **kw: MuAdam(m, lr=0.1, eps=1e-3, weight_decay=0.01, **kw),
        "adamw": lambda m, **kw: MuAdamW(m, lr=0.1, eps=1e-3, weight_decay=0.01, **kw),
        "sgd": lambda m, **kw: MuSGD(m, lr=0.1, weight_decay=0.01, momentum=0.9, **kw)}


@pytest.mark.parametrize("opt", list(OPTS))
def test_groups_and_table2_factors(opt):
    m = net()
    o = OPTS[opt](m.named_parameters())
    params = dict(m.named_parameters())
    names = [n for g in o.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(params) and len(names) == len(set(names))
    assert [g["param_names"] for g in o.param_groups] == [  # matrix, vector (wm 2, wm 3), scalar
        ["fc2.weight"], ["fc1.weight", "fc1.bias"], ["fc2.bias", "out.weight"], ["gain", "out.bias"]]
    for g in o.param_groups:
        assert all(p is params[n] for p, n in zip(g["params"], g["param_names"]))
        for n in g["param_names"]:
            lr, eps, wd = expected(params[n], opt, 0.1, 1e-3, 0.01)
            assert g["lr"] == pytest.approx(lr, rel=1e-12) and g["weight_decay"] == pytest.approx(wd, rel=1e-12)
            assert opt == "sgd" or g["eps"] == pytest.approx(eps, rel=1e-12)
    sd_groups = o.state_dict()["param_groups"]
    assert [g["param_names"] for g in sd_groups] == [g["param_names"] for g in o.param_groups]
    assert isinstance(o, {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt])
    if opt != "sgd":
        assert all(g["decoupled_weight_decay"] == (opt == "adamw") for g in sd_groups)


def test_adam_decoupled_flag_equals_adamw():
    m = net()
    a, b = MuAdam(m, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True), MuAdamW(m, lr=0.1, weight_decay=0.1)
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]


def test_sgd_matches_mup_1_0_0():
    m = net()
    ours = MuSGD(m, lr=0.1, weight_decay=0.01)
    theirs = mup.MuSGD(m.parameters(), lr=0.1, weight_decay=0.01)
    def hp(o: torch.optim.Optimizer) -> list[float]:
        by_id = {id(p): (g["lr"], g["weight_decay"]) for g in o.param_groups for p in g["params"]}
        return [x for p in m.parameters() for x in by_id[id(p)]]
    assert hp(ours) == pytest.approx(hp(theirs), rel=1e-12)


def test_incoming_groups_are_split_separately():
    m = net()
    decay = [(n, p) for n, p in m.named_parameters() if p.dim() >= 2]
    no_decay = [(n, p) for n, p in m.named_parameters() if p.dim() < 2]
    o = MuAdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.5}], lr=0.1)
    assert [g["param_names"] for g in o.param_groups] == [
        ["fc2.weight"], ["fc1.weight"], ["out.weight"], ["fc1.bias"], ["fc2.bias"], ["gain", "out.bias"]]
    assert [g["weight_decay"] for g in o.param_groups] == pytest.approx([0.1 * 2, 0.1, 0.1, 0, 0, 0])
    assert [g["lr"] for g in o.param_groups] == pytest.approx([0.1 / 2, 0.1, 0.1, 0.5, 0.5, 0.5])


def test_base_width_keeps_base_hyperparameters():
    o = MuAdam(net(4, 4), lr=0.1, eps=1e-3, weight_decay=0.01)
    assert all((g["lr"], g["eps"], g["weight_decay"]) == (0.1, 1e-3, 0.01) for g in o.param_groups)


@pytest.mark.parametrize("opt", list(OPTS))
def test_state_dict_round_trip(opt):
    torch.manual_seed(0)
    m = net()
    o = OPTS[opt](m)
    for _ in range(2):
        o.zero_grad()
        m(torch.randn(4, 5)).square().mean().backward()
        o.step()
    sd = o.state_dict()
    m2 = net()
    m2.load_state_dict(m.state_dict())
    o2 = OPTS[opt](m2)
    o2.load_state_dict(copy.deepcopy(sd))  # torch keeps references to the state tensors
    sd2 = o2.state_dict()
    assert sd2["param_groups"] == sd["param_groups"]
    for i, st in sd["state"].items():
        assert all(torch.equal(v, sd2["state"][i][k]) for k, v in st.items())
    for oo, mm in ((o, m), (o2, m2)):
        oo.zero_grad()
        mm(torch.ones(2, 5)).sum().backward()
        oo.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_errors():
    with pytest.raises(ValueError, match="Did you forget to call `mup.set_base_shapes`"):
        MuAdam(nn.Linear(3, 3), lr=0.1)
    with pytest.raises(TypeError, match="named_parameters"):
        MuSGD(net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        MuAdamW([], lr=0.1)


@pytest.mark.parametrize("state,given,what", [("adamw", "adam", "contradicts the checkpoint"),
                                              ("adam", "adamw", "contradicts the checkpoint"),
                                              ("adamw", "sgd", "does not fit the checkpoint's optimizer state"),
                                              ("sgd", "adamw", "does not fit the checkpoint's optimizer state")])
def test_optimizer_flag_contradicting_the_state_is_refused(tmp_path, state, given, what):
    """`widen --optimizer adam` on AdamW state (its groups say decoupled_weight_decay=True) would scale weight
    decay by Adam's g/s instead of AdamW's 1/s: one line, exit 2, nothing written. The matching flag widens."""
    from conftest import mupscale
    from test_verify import make_ck
    src = make_ck(tmp_path, "mlp", state)
    flags = {g.get("decoupled_weight_decay") for g in torch.load(src)["optimizer"]["param_groups"]}
    assert flags == ({True} if state == "adamw" else {False} if state == "adam" else {None}), flags
    out = tmp_path / "wide.pt"
    r = mupscale("widen", str(src), "--k", "2", "-o", str(out), "--optimizer", given)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and f"--optimizer {given}" in lines[0], r.stderr
    assert not out.exists()
    r = mupscale("widen", str(src), "--k", "2", "-o", str(out), "--optimizer", state)
    assert r.returncode == 0 and out.exists(), r.stderr
