"""torchtitan's Llama3 through DCP: split q/k/v and the default FusedQKVLinear (one `wqkv` parameter saved as
wq/wk/wv, its optimizer state keyed by `wqkv`, rows per key/value group).

A 2-rank FSDP2 job (tests/titan_job.py, gloo on CPU, float64) trains the stand-in, saves it as torchtitan's
CheckpointManager does and records 20 more steps. `mupscale widen --spec torchtitan-llama3 --k 2` (in one
process, and under torchrun with 2 ranks) needs no --model-arg; the widened checkpoint resumes at 2 and at 1
rank, fused and split, and must follow the base trajectory to 1e-12 relative (measured: ~7e-16)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import mupscale
from mupscale_cli.core.plan import make_plan
from mupscale_cli.core.spec import eval_size, load_spec, parse_spec
from mupscale_cli.core.widen import widen
from mupscale_cli.errors import MupscaleError
from mupscale_cli.formats.dcp import DcpReader
from test_dcp import same_tensors, torchrun

sys.path.insert(0, str(Path(__file__).parent))
import titan_job  # noqa: E402  (the stand-in's modules, for the layout checks below)

JOB = Path(__file__).with_name("titan_job.py")
TOL = 1e-12
SPEC = "torchtitan-llama3"
FUSED = "layers.{}.attention.qkv_linear.wqkv.weight"
OTHERS = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def follows(base: Path, wide: Path) -> tuple[float, float]:
    """The widened job's losses and probe logits against the base's, step by step: (loss gap, logit gap)."""
    a, b = torch.load(base), torch.load(wide)
    assert len(a["loss"]) == len(b["loss"]) == 20
    assert a["loss"][0] != a["loss"][-1]  # it trains
    rel = max(abs(x - y) / abs(x) for x, y in zip(a["loss"], b["loss"]))
    out = float((a["out"] - b["out"]).abs().max() / a["out"].abs().max())
    print(f"{wide.name}: loss gap {rel:.1e}, logit gap {out:.1e} over 20 steps")
    assert rel <= TOL and out <= TOL, (rel, out)
    # groups lm_head, vector-like, matrix-like: lr × 1/k, × 1, × 1/k (readout of a summing model, Table 1)
    assert b["lr"] == pytest.approx([a["lr"][0] / 2, a["lr"][1], a["lr"][2] / 2], rel=1e-15)
    return rel, out


@pytest.fixture(scope="module")
def titan(tmp_path_factory):
    """Base checkpoints of both variants, made on first use."""
    d = tmp_path_factory.mktemp("titan")
    made: dict[str, Path] = {}

    def base(qkv: str) -> Path:
        if qkv not in made:
            torchrun(2, str(JOB), "base", str(d / f"{qkv}-base"), str(d / f"{qkv}-base.pt"), "--qkv", qkv)
            made[qkv] = d
        return d
    return base


def resume(d: Path, ckpt: str, qkv: str) -> None:
    for ranks in (2, 1):
        torchrun(ranks, str(JOB), "wide", str(d / ckpt), str(d / f"{ckpt}-{ranks}.pt"), "--qkv", qkv)
        follows(d / f"{qkv}-base.pt", d / f"{ckpt}-{ranks}.pt")


def test_fused_qkv_resumes_exactly_at_2_and_1_ranks(titan):
    """FusedQKVLinear: the model saved as wq/wk/wv, the optimizer state under wqkv; widened without any
    --model-arg, the fused state in the widened fused layout."""
    d = titan("fused")
    r = mupscale("widen", str(d / "fused-base"), "-o", str(d / "fused-w"), "--k", "2", "--spec", SPEC, check=True)
    assert "resume with dim, n_heads, n_kv_heads" in r.stderr
    rd = DcpReader(d / "fused-w")
    q = "layers.0.attention.qkv_linear."
    assert {f"{q}wq.weight", f"{q}wk.weight", f"{q}wv.weight"} <= set(rd.paths)
    assert f"{q}wqkv.weight" not in rd.paths and f"optimizer.state.{q}wq.weight.exp_avg" not in rd.paths
    rows = (titan_job.N_HEADS + 2 * titan_job.N_KV) * titan_job.HEAD_DIM
    assert rd.info(f"optimizer.state.{q}wqkv.weight.exp_avg").shape == (2 * rows, 2 * titan_job.DIM)
    resume(d, "fused-w", "fused")


def test_split_qkv_widened_under_torchrun_resumes_exactly(titan):
    """QKVLinear: 2-rank widen (the same tensors as one process) resumes at 2 and 1 ranks."""
    d = titan("split")
    mupscale("widen", str(d / "split-base"), "-o", str(d / "split-w1"), "--k", "2", "--spec", SPEC, check=True)
    torchrun(2, "-m", "mupscale_cli", "widen", str(d / "split-base"), "-o", str(d / "split-w"), "--k", "2",
             "--spec", SPEC)
    same_tensors(d / "split-w1", d / "split-w")
    resume(d, "split-w", "split")


def test_fused_state_without_a_rule_is_one_line_with_the_right_advice(titan, tmp_path):
    """A spec with no rule for wqkv: the optimizer does store param_names, so the error must not ask for them;
    it names the rule to add."""
    d = titan("fused")
    spec = yaml.safe_load(load_spec(SPEC).text)
    spec["tensors"] = {p: r for p, r in spec["tensors"].items() if "wqkv" not in p}
    (tmp_path / "nofused.yaml").write_text(yaml.safe_dump(spec))
    r = mupscale("widen", str(d / "fused-base"), "-o", str(tmp_path / "w"), "--k", "2", "--spec",
                 str(tmp_path / "nofused.yaml"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "so it stores param_names" not in r.stderr
    assert "wqkv.weight" in r.stderr and "'state_only: true' and 'parts'" in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()


# --- the fused layout, without processes ---------------------------------------------------------------

PER_GROUP = """
name: titan-per-group
readout: sum
sizes:
  group_dim: head_dim * n_heads / n_kv_heads
  qkv_block: head_dim * n_heads / n_kv_heads + 2 * head_dim   # one key/value group of wqkv
tensors:
  "layers.{i}.attention.qkv_linear.wq.weight": [{axis: heads, block: group_dim}, d_model]
  "layers.{i}.attention.qkv_linear.wk.weight": [{axis: heads, block: head_dim}, d_model]
  "layers.{i}.attention.qkv_linear.wv.weight": [{axis: heads, block: head_dim}, d_model]
  "layers.{i}.attention.qkv_linear.wqkv.weight":
    state_only: true
    parts_layout: grouped
    parts: ["layers.{i}.attention.qkv_linear.wq.weight", "layers.{i}.attention.qkv_linear.wk.weight",
            "layers.{i}.attention.qkv_linear.wv.weight"]
  "layers.{i}.attention.fused_by_size.weight": {axes: [{axis: heads, block: qkv_block}, d_model], state_only: true}
"""
ARGS = {"head_dim": titan_job.HEAD_DIM, "n_heads": titan_job.N_HEADS, "n_kv_heads": titan_job.N_KV}


def qkv_spec(**edits):
    """The bundled spec's q/k/v rules only (the layout checks below have no other tensors), rules edited."""
    d = yaml.safe_load(load_spec(SPEC).text)
    d["tensors"] = {p: r for p, r in d["tensors"].items() if "qkv_linear" in p and p.endswith("weight")}
    for w, axes in edits.items():
        d["tensors"][f"layers.{{i}}.attention.qkv_linear.{w}.weight"] = axes
    return parse_spec(yaml.safe_dump(d), "bundled-qkv")


def _parts_and_fused(k: int = 1):
    torch.manual_seed(1)
    m = titan_job.FusedQKVLinear(titan_job.DIM * k, titan_job.N_HEADS * k, titan_job.N_KV * k).double()
    return m, {f"layers.0.attention.qkv_linear.{n}": t for n, t in m.state_dict().items()}


@pytest.mark.parametrize("spec_text", ["bundled", "per-group"])
def test_fused_state_is_the_fused_layout_of_its_widened_parts(spec_text):
    """widen(wqkv state) = torchtitan's merge of the widened wq, wk, wv (the wide model's own fused layout), bit
    for bit: with the parts tiled whole (bundled spec) and duplicated in place per key/value group (sizes)."""
    spec = qkv_spec() if spec_text == "bundled" else parse_spec(PER_GROUP, "per-group")
    m, parts = _parts_and_fused()
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in parts.items()}
    plan = make_plan(spec, shapes, {"*": 2}, ARGS if spec_text != "bundled" else None)
    fused = m.wqkv.weight.detach()
    fp = plan.state_plan(FUSED.format(0), (tuple(fused.shape), fused.dtype))
    wide, _ = _parts_and_fused(2)
    wide.load_state_dict({n.rpartition("qkv_linear.")[2]: widen(t, plan.tensors[n], 1) for n, t in parts.items()})
    for power in (1, 2):  # exp_avg (× g), exp_avg_sq (× g²)
        merged = titan_job.FusedQKVLinear._merge_on_load  # torchtitan's merge, on the widened parts
        sd = {f"{w}.weight": widen(parts[f"layers.0.attention.qkv_linear.{w}.weight"],
                                   plan.tensors[f"layers.0.attention.qkv_linear.{w}.weight"], power)
              for w in ("wq", "wk", "wv")}
        merged(wide, sd, "")
        assert torch.equal(widen(fused, fp, power), sd["wqkv.weight"])
    if spec_text == "per-group":  # the same rows from an explicit size expression
        by_size = plan.state_plan("layers.0.attention.fused_by_size.weight", (tuple(fused.shape), fused.dtype))
        assert plan.sizes["qkv_block"] == (titan_job.N_HEADS // titan_job.N_KV + 2) * titan_job.HEAD_DIM
        assert torch.equal(widen(fused, by_size, 1), widen(fused, fp, 1))


@pytest.mark.parametrize("rules", ["tiled", "per-coordinate"])
def test_stacked_parts_widen_each_part_in_place(rules):
    """parts_layout: stacked ([wq | wk | wv] one after another, as Phi-3's qkv_proj): each part's rows widen as
    the part does, so the widened fused state is the widened parts stacked (not the whole fused tensor tiled)."""
    d = yaml.safe_load(qkv_spec().text)
    rule = d["tensors"]["layers.{i}.attention.qkv_linear.wqkv.weight"]
    rule["parts_layout"] = "stacked"
    if rules == "per-coordinate":
        for w in ("wq", "wk", "wv"):
            d["tensors"][f"layers.{{i}}.attention.qkv_linear.{w}.weight"] = ["heads", "d_model"]
    spec = parse_spec(yaml.safe_dump(d), "stacked")
    _, parts = _parts_and_fused()
    plan = make_plan(spec, {n: (tuple(t.shape), t.dtype) for n, t in parts.items()}, {"*": 2})
    stacked = torch.cat(list(parts.values()))
    fp = plan.state_plan(FUSED.format(0), (tuple(stacked.shape), stacked.dtype))
    want = torch.cat([widen(t, plan.tensors[n], 1) for n, t in parts.items()])
    assert torch.equal(widen(stacked, fp, 1), want)
    if rules == "tiled":
        assert not torch.equal(want, torch.cat([stacked, stacked]) / 2)  # not the whole tensor tiled


@pytest.mark.parametrize("edit", [
    {"wk": [{"axis": "heads", "block": 2}, "d_model"]},  # wk in blocks of 2 rows: 4 blocks, wq's 1
    {"wv": [{"axis": "heads", "tile": True}, None]},  # wv's columns fixed, the others' widened
    {"wv": [{"axis": "rows", "tile": True}, "d_model"]},  # another axis (its own k)
    {"wq": {"axes": [{"axis": "heads", "tile": True}, "d_model"], "k_power": -0.5}},  # other scales
])
def test_fused_state_refused_when_its_parts_disagree(edit):
    _, parts = _parts_and_fused()
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in parts.items()}
    spec = qkv_spec(**edit)
    plan = make_plan(spec, shapes, {"heads": 2, "d_model": 2, "rows": 3} if "rows" in spec.axes else {"*": 2})
    with pytest.raises(MupscaleError, match="its parts are widened differently"):
        plan.state_plan(FUSED.format(0), ((sum(s[0][0] for s in shapes.values()), titan_job.DIM), torch.float64))


def test_fused_state_refused_without_its_parts_or_with_other_rows():
    spec = qkv_spec()
    _, parts = _parts_and_fused()
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in parts.items()}
    plan = make_plan(spec, shapes, {"*": 2})
    rows = sum(s[0][0] for s in shapes.values())
    with pytest.raises(MupscaleError, match="not its parts' rows stacked"):
        plan.state_plan(FUSED.format(0), ((rows + 4, titan_job.DIM), torch.float64))
    with pytest.raises(MupscaleError, match="its part 'layers.7.attention.qkv_linear.wq.weight' is not a param"):
        plan.state_plan(FUSED.format(7), ((rows, titan_job.DIM), torch.float64))


@pytest.mark.parametrize("body,msg", [
    ("{parts: ['a.{i}.x'], optional: true, parts_layout: grouped}", "needs 'state_only: true'"),
    ("{parts: ['a.{i}.x'], state_only: true, axes: [null]}", "needs 'state_only: true' and no 'axes'"),
    ("{parts: ['a.x'], state_only: true, parts_layout: grouped}", "placeholders"),
    ("{parts: [], state_only: true}", "list of tensor name patterns"),
    ("{parts: ['a.{i}.x'], state_only: true}", "'parts_layout' must be one of grouped, stacked"),
    ("{parts: ['a.{i}.x'], state_only: true, parts_layout: interleaved}", "'parts_layout' must be one of"),
    ("{axes: [null], parts_layout: grouped}", "'parts_layout' needs 'parts'"),
    ("{axes: [{axis: h, tile: true, block: 2}]}", "give no 'block'"),
    ("{axes: [{axis: h, tile: 1}]}", "'tile' must be true or false"),
])
def test_spec_parts_and_tile_are_checked(body, msg):
    with pytest.raises(MupscaleError, match=msg):
        parse_spec(f'name: x\ntensors:\n  "a.{{i}}.y": {body}\n', "x")


# --- size expressions ------------------------------------------------------------------------------------

def test_size_expressions_are_exact_rationals():
    env = {"head_dim": 64, "n_heads": 32, "n_kv_heads": 8}
    want = 64 * 4 + 2 * 64
    for expr in ("head_dim * n_heads / n_kv_heads + 2 * head_dim", "head_dim / n_kv_heads * n_heads + 2*head_dim",
                 "head_dim * (n_heads / n_kv_heads + 2)", "(n_heads + 2 * n_kv_heads) * head_dim / n_kv_heads"):
        assert eval_size(expr, env) == want, expr
    assert eval_size("n_heads - n_kv_heads", env) == 24
    for expr, msg in [("head_dim / 3", "64/3, not a whole number"), ("n_kv_heads - n_heads", "not a whole"),
                      ("head_dim / (n_heads - 32)", "divides by zero"), ("(head_dim", "ends too early"),
                      ("head_dim)", "unexpected"), ("head_dim % 2", "unexpected"),
                      ("1 / " + " / ".join(["head_dim"] * 11), "exceeds")]:
        with pytest.raises(ValueError, match=msg):
            eval_size(expr, env)
    with pytest.raises(KeyError):
        eval_size("hidden / 2", env)


def test_a_size_is_demanded_only_by_a_rule_that_uses_it():
    """An optional rule that matches nothing does not demand its block size; a rule that matches does."""
    text = """
name: lazy
sizes:
  head_dim: hidden_size / num_attention_heads
tensors:
  w.weight: [d_model, d_model]
  "q.weight": {axes: [{axis: d_model, block: head_dim}, d_model], optional: true}
"""
    spec = parse_spec(text, "lazy")
    plan = make_plan(spec, {"w.weight": ((4, 4), torch.float64)}, {"*": 2})
    assert plan.tensors["w.weight"].out_shape == (8, 8) and "head_dim" not in plan.sizes
    with pytest.raises(MupscaleError, match="size 'head_dim' = 'hidden_size / num_attention_heads' needs "
                                            "'hidden_size'.*pass --size head_dim=N"):
        make_plan(spec, {"w.weight": ((4, 4), torch.float64), "q.weight": ((4, 4), torch.float64)}, {"*": 2})
    plan = make_plan(spec, {"w.weight": ((4, 4), torch.float64), "q.weight": ((4, 4), torch.float64)}, {"*": 2},
                     {"hidden_size": 4, "num_attention_heads": 2})
    assert plan.tensors["q.weight"].dims[0].block == 2
