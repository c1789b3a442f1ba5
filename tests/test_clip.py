"""Exact gradient clipping for widened models (mupscale_cli.optim.clip_grad_norm_equivalent): per-tensor
gradient norms scale by role (norm² = copies · g² · ‖grad_base‖²); torch's clip_grad_norm_ on the wide model
breaks the lockstep when clipping is active, the base-equivalent norm keeps it over 200 float64 steps."""
from __future__ import annotations

import math

import pytest
import torch

from mupscale_cli.api import grad_scales, load
from mupscale_cli.commands.widen import WidenOptions, run_widen
from mupscale_cli.optim import clip_grad_norm_equivalent
from test_verify_stacks import make_stack_ck, stack

C = 0.05  # below every gradient norm of this run: clipping is active at every step


def models(tmp):
    """BASE (the μP stand-in after 3 steps) and its widening by mupscale widen, each with the training
    script's own optimizer loaded from its checkpoint, as a resumed train.py has them."""
    vg = stack()
    src = make_stack_ck(tmp, True)
    wide_path = tmp / "wide.pt"
    run_widen(WidenOptions(checkpoint=src, output=wide_path, k="2", spec="nanogpt-mup", force=True))
    ck = torch.load(src, weights_only=True)
    w = load(wide_path)
    out = []
    for args, sd, osd in ((ck["model_args"], ck["model"], ck["optimizer"]),
                          (w.extra["model_args"], w.model, w.optimizer)):
        m = vg.GPT(vg.GPTConfig(**args)).double()
        m.load_state_dict(sd)
        opt = vg.configure(m, ck["config"])
        opt.load_state_dict(osd)
        out.append((m, opt))
    return out, w


def lockstep(tmp, mode: str, steps: int = 200, c: float = C, norm_type: float = 2.0) -> tuple[float, int]:
    """Train base and wide on identical batches, clipping at C (torch's on BASE; `mode` on WIDE); return the
    largest relative loss/logit gap over the run and the number of steps clipping was active."""
    ((base, bopt), (wide, wopt)), w = models(tmp)
    scales = grad_scales(w)
    g = torch.Generator().manual_seed(7)
    xe = torch.randint(32, (8, 8), generator=g)
    worst, active = 0.0, 0
    for _ in range(steps):
        x = torch.randint(32, (8, 8), generator=g)
        losses = []
        for i, (m, opt) in enumerate(((base, bopt), (wide, wopt))):
            opt.zero_grad()
            loss = m(x, torch.roll(x, 1, 1))[1]
            loss.backward()
            if i == 0 or mode == "plain":
                norm = torch.nn.utils.clip_grad_norm_(m.parameters(), c, norm_type=norm_type)
            else:
                norm = clip_grad_norm_equivalent(m, c, scales, norm_type=norm_type)
            active += i == 0 and norm.item() > c
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            lb, lw = base(xe, xe)[0], wide(xe, xe)[0]
        worst = max(worst, abs(losses[1] - losses[0]) / abs(losses[0]),
                    ((lw - lb).abs().max() / lb.abs().max()).item())
    return worst, active


def test_widened_gradient_norms_scale_by_role(tmp):
    """Each widened gradient's norm is g · sqrt(copies) × the base's (Table 1), so the base-equivalent total
    norm is the base's; clip_grad_norm_equivalent returns it and applies the base's coefficient."""
    (base, _), (wide, _) = models(tmp)[0]
    w = load(tmp / "wide.pt")
    scales = grad_scales(w)
    x = torch.randint(32, (8, 8), generator=torch.Generator().manual_seed(3))
    for m in (base, wide):
        m(x, torch.roll(x, 1, 1))[1].backward()
    bp = dict(base.named_parameters())
    kinds = set()
    for n, p in wide.named_parameters():
        gs, copies = scales[n]
        kinds.add((gs, copies))
        want = gs * math.sqrt(copies) * bp[n].grad.norm().item()
        assert p.grad.norm().item() == pytest.approx(want, rel=1e-12), n
    assert {(0.5, 4), (0.5, 2)} <= kinds  # matrices (both axes widened) and vectors
    plain = torch.nn.utils.get_total_norm([p.grad for p in wide.parameters()]).item()
    base_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), C).item()
    wide_norm = clip_grad_norm_equivalent(wide, C, scales).item()
    assert wide_norm == pytest.approx(base_norm, rel=1e-12) and base_norm > C
    assert abs(plain - base_norm) > 0.05 * base_norm  # torch's norm of the wide model is another
    for n, p in wide.named_parameters():  # clipped by the base's coefficient: still g · dup(base gradient)
        gs, copies = scales[n]
        assert p.grad.norm().item() == pytest.approx(gs * math.sqrt(copies) * bp[n].grad.norm().item(), rel=1e-12)


def test_plain_clipping_diverges_equivalent_stays_exact_for_200_steps(tmp):
    plain, active = lockstep(tmp, "plain", steps=20)
    assert active == 20 and plain > 1e-6
    exact, active = lockstep(tmp, "equivalent", steps=200)
    assert active == 200
    assert exact <= 1e-12


def test_scales_need_every_parameter(tmp):
    (_, _), (wide, _) = models(tmp)[0]
    for p in wide.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(KeyError, match="no gradient scale for parameter"):
        clip_grad_norm_equivalent(wide, 1.0, {"transformer.wte.weight": (0.5, 2)})
    # prefixes of torch.compile / DDP models are stripped
    scales = grad_scales(load(tmp / "wide.pt"))
    named = [(f"_orig_mod.{n}", p) for n, p in wide.named_parameters()]
    assert clip_grad_norm_equivalent(named, 1e9, scales).item() > 0


def test_inactive_clipping_keeps_the_trajectory(tmp):
    """max_norm far above every gradient norm: torch's clip on BASE changes nothing, and neither may the
    equivalent clip on WIDE (its coefficient capped at 1): the same trajectory to 1e-12 over 50 steps."""
    exact, active = lockstep(tmp, "equivalent", steps=50, c=1e6)
    assert active == 0 and exact <= 1e-12, (active, exact)


def test_infinity_norm_clipping_is_equivalent(tmp):
    """norm_type=inf: a widened gradient's largest entry is g × the base's (duplication repeats entries), so
    the base-equivalent max norm is the base's and the lockstep stays exact with clipping active, where
    torch's own inf-norm clip on WIDE leaves the base's trajectory."""
    exact, active = lockstep(tmp, "equivalent", steps=50, c=0.01, norm_type=math.inf)
    assert active == 50 and exact <= 1e-12, (active, exact)
    plain, active = lockstep(tmp, "plain", steps=20, c=0.01, norm_type=math.inf)
    assert active == 20 and plain > 1e-6, plain
    ((base, _), (wide, _)), w = models(tmp)
    x = torch.randint(32, (8, 8), generator=torch.Generator().manual_seed(3))
    for m in (base, wide):
        m(x, torch.roll(x, 1, 1))[1].backward()
    largest = max(p.grad.abs().max().item() for p in base.parameters())
    want = torch.nn.utils.clip_grad_norm_(base.parameters(), 0.01, norm_type="inf").item()
    got = clip_grad_norm_equivalent(wide, 0.01, grad_scales(w), norm_type="inf").item()
    assert want == largest and got == pytest.approx(want, rel=1e-12), (got, want)


@pytest.mark.parametrize("norm_type", [0, 0.0, math.nan])
def test_norm_types_without_an_equivalent_are_refused(tmp, norm_type):
    """ord 0 counts non-zero entries (duplication multiplies the count, no per-tensor factor undoes it in a
    total); NaN is no order: refused, gradients untouched."""
    ((_, _), (wide, _)), w = models(tmp)
    for p in wide.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="has no base-equivalent norm"):
        clip_grad_norm_equivalent(wide, 1e-3, grad_scales(w), norm_type=norm_type)
    assert all(bool((p.grad == 1).all()) for p in wide.parameters())
