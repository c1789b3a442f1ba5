"""microsoft/mup's examples (stand-ins in tests/stacks/mup_examples.py), widened from their own .bsh: the
Transformer's `pos_encoder.pe` buffer (not in the .bsh) is widened by its shape, the optimizer ids stay
mapped; the widened state loads into the optimizer the example builds (MuAdam / MuSGD over
wide.parameters()), or widen names the builder that loads it; the wide model then follows the base
model's training step by step in float64."""
from __future__ import annotations

import pytest
import torch

from mupscale_cli.api import load, make_optimizer, optimizer_groups
from tests.conftest import mupscale
from tests.stacks import mup_examples as ex

K, STEPS, BASE_W, W = 2, 12, 8, 16

# (mup 1.0.0's MuSharedReadout sizes its bias by the embedding's width, not the vocabulary: tied runs
# without bias, as a tied example with bias cannot run)
CASES = [("transformer", "muadam", True, False), ("transformer", "muadam", False, False),
         ("transformer", "musgd", True, False), ("transformer", "musgd", False, True),
         ("transformer", "muadam", False, True), ("mlp", "musgd", False, False), ("mlp", "muadam", True, False)]


def _train(kind, m, opt, steps, g):
    losses = []
    for _ in range(steps):
        x, y = ex.batch(kind, g)
        opt.zero_grad()
        loss = ex.loss(kind, m, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind,opt_name,bias,tied", CASES)
def test_mup_example_widens_loads_and_keeps_lockstep(tmp, kind, opt_name, bias, tied):
    kw = {"bias": bias} if kind == "mlp" else {"bias": bias, "tied": tied}
    bsh = ex.make_bsh(kind, BASE_W, tmp / "base.bsh", **kw)
    assert "pos_encoder.pe" not in bsh.read_text()  # make_base_shapes records parameters only
    torch.manual_seed(0)
    base = ex.model(kind, W, bsh, **kw)
    opt = ex.optimizer(opt_name, base)
    _train(kind, base, opt, 3, torch.Generator().manual_seed(1))
    torch.save({"model": base.state_dict(), "optimizer": opt.state_dict()}, tmp / "base.pt")

    r = mupscale("widen", str(tmp / "base.pt"), "--spec", str(bsh), "--k", str(K), "-o", str(tmp / "wide.pt"))
    assert r.returncode == 0, r.stderr
    w = load(tmp / "wide.pt")
    wide = ex.model(kind, W * K, bsh, **kw)
    wide.load_state_dict(w.model, strict=True)
    if kind == "transformer":  # the buffer was duplicated along its width axis, not left at the base width
        assert torch.equal(wide.pos_encoder.pe, base.pos_encoder.pe.repeat_interleave(K, dim=2))
    wopt = ex.optimizer(opt_name, wide)  # what the example's script builds
    try:
        wopt.load_state_dict(w.optimizer)
        loaded_as_built = True
    except ValueError as e:
        assert "parameter groups" in str(e)
        loaded_as_built = False
        assert "MuAdam" in r.stderr and "optimizer_groups" in r.stderr and "# resume:" in r.stderr, r.stderr
        wopt = make_optimizer("adam" if opt_name == "muadam" else "sgd", optimizer_groups(wide, w.optimizer))
        wopt.load_state_dict(w.optimizer)
    # MuAdam puts the scalar-like readout bias beside the vector-like tensors, whose eps Table 1 scales:
    # that group must split; without such a bias (and always with MuSGD, empty groups kept) it loads as built
    splits = opt_name == "muadam" and bias
    assert loaded_as_built == (not splits), r.stderr
    assert len(w.optimizer["param_groups"]) == len(opt.state_dict()["param_groups"]) + (1 if splits else 0)

    a = _train(kind, base, opt, STEPS, torch.Generator().manual_seed(2))
    b = _train(kind, wide, wopt, STEPS, torch.Generator().manual_seed(2))
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert rel <= 1e-12, (rel, a[-1], b[-1])
    x, _ = ex.batch(kind, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ya, yb = base(x), wide(x)
    assert ((ya - yb).abs().max() / ya.abs().max()).item() <= 1e-12


def test_bsh_buffer_with_two_matching_axes_is_refused(tmp):
    """A buffer dimension whose size is the width of two axes cannot be placed: the error says how."""
    bsh = tmp / "b.bsh"
    bsh.write_text("a.weight: [8, null]\nb.weight: [null, 4]\n")
    torch.save({"a.weight": torch.zeros(16, 3), "b.weight": torch.zeros(3, 16), "buf": torch.zeros(16)},
               tmp / "m.pt")
    r = mupscale("inspect", str(tmp / "m.pt"), "--spec", str(bsh))
    assert r.returncode == 2 and "buf" in r.stderr and "list it in the .bsh" in r.stderr, r.stderr
