"""Mutation check: does the test suite go red when a promise of the README breaks?

    python scripts/mutation_check.py              # every mutation, its tests, then the table
    python scripts/mutation_check.py --full       # each mutation against the whole suite (pytest -x; slow)
    python scripts/mutation_check.py --only eps   # mutations whose name contains "eps"

Copies the working tree (git's tracked and untracked, not ignored, files) into a temporary directory,
runs the selected tests once unmutated (they must pass, or the table would mean nothing), then for each
known-bad patch: applies it to the copy (the patched text must occur exactly once), runs the tests that
guard that promise with `pytest -x` in the copy (PYTHONPATH=copy/src, so `mupscale` runs the mutant too),
records the first failing test, and restores the file. Prints a Markdown table (docs/mutation-check.md):
mutation -> caught (by which test) / survived. Exit 1 if any mutation survived.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    promise: str  # what the README promises that the patch breaks
    file: str
    old: str
    new: str
    tests: list[str]  # pytest arguments selecting the guarding tests
    more: tuple = ()  # further (file, old, new) patches of the same mutation


MUTATIONS = [
    Mutation("no eps rescaling", "Adam/AdamW eps × g", "src/mupscale_cli/core/optstate.py",
             '"eps": g, ', "", ["tests/test_widen_exact.py", "-k", "lockstep_float64"]),
    Mutation("no initial_lr rescale", "`initial_lr` like lr (LR schedulers)", "src/mupscale_cli/core/optstate.py",
             'return {"lr": s, "initial_lr": s, ', 'return {"lr": s, ', ["tests/test_scheduler.py"]),
    Mutation("no backpressure in streaming", "at most threads + 1 ranges in flight (bounded memory)",
             "src/mupscale_cli/formats/write.py", "while len(pending) > threads:", "while len(pending) > len(tasks):",
             ["tests/test_streaming.py", "-k", "in_flight"]),
    Mutation("no --force check", "an existing output needs --force", "src/mupscale_cli/formats/output.py",
             "    if out.exists() and not opts.force:\n        raise MupscaleError(f\"-o {out}: exists; pass --force to o",
             "    if False:\n        raise MupscaleError(f\"-o {out}: exists; pass --force to o",
             ["tests/test_cli.py", "-k", "errors_are_one_line"],
             more=(("src/mupscale_cli/commands/widen.py",
                    "if not opts.force and os.path.lexists(target.path)", "if False and os.path.lexists(target.path)"),
                   ("src/mupscale_cli/formats/target.py",  # the commit's own no-clobber rename
                    "    if not replace or not os.path.lexists(dest):", "    if not os.path.lexists(dest):"))),
    Mutation("a dropped state entry", "every optimizer state entry is widened",
             "src/mupscale_cli/core/optstate.py", 'if pid in sd["state"]:', 'if pid in sd["state"] and nid != 1:',
             ["tests/test_state_ids.py", "-k", "every_id_form"]),
    Mutation("string ids not mapped", "optimizer ids '0', '1' (JSON) map like 0, 1",
             "src/mupscale_cli/core/optstate.py", "    if isinstance(x, str) and x.isascii() and x.isdigit():",
             "    if False:", ["tests/test_state_ids.py"]),
    Mutation("shared step tensor", "`step` copied as a new tensor", "src/mupscale_cli/core/optstate.py",
             'return v.clone() if isinstance(v, torch.Tensor) else v', 'return v',
             ["tests/test_state_ids.py", "-k", "step_is_a_new_tensor"]),
    Mutation("NaN/Inf not counted", "NaN/Inf: a warning; an error with --strict", "src/mupscale_cli/core/checks.py",
             "if not (x.dtype.is_floating_point or x.dtype.is_complex) or bool(torch.isfinite(x.sum())):",
             "if True:", ["tests/test_hostile.py", "-k", "test_nan_is_a_warning"]),
    Mutation("fused segments as one block", "a fused dimension's segments are duplicated each on its own",
             "src/mupscale_cli/core/plan.py", "for size, b in self.segments or ((n, self.block),):",
             "for size, b in ((n, self.block),):", ["tests/test_segments.py"]),
    Mutation("phi3 query heads one by one", "GQA: query heads duplicated with their group (lockstep, not just forward)",
             "configs/hf-phi3.yaml", "[q_dim, group_dim]", "[q_dim, head_dim]",
             ["tests/test_hf_families.py", "-k", "phi3 and adamw"]),
    Mutation("saved_as ignored for optimizer names", "a parameter saved under another name (GPT-NeoX embed_out) "
             "keeps its optimizer state", "src/mupscale_cli/core/optstate.py",
             "n = saved_name(plan.spec, n)  #", "n = n  #", ["tests/test_hf_families.py", "-k", "gpt_neox and adamw"]),
    Mutation("neox heads split q|k|v", "GPT-NeoX query_key_value: whole per-head [q|k|v] blocks",
             "configs/hf-gpt-neox.yaml", "block: qkv_block}, d_model]", "block: head_dim}, d_model]",
             ["tests/test_hf_families.py", "-k", "gpt_neox and adamw"]),
    Mutation("huge factors as integers", "k_power factors (Gemma) widen optimizer state (exp_avg_sq) without an "
             "internal error", "src/mupscale_cli/core/widen.py",
             "return f.numerator > EXACT_INT or f.denominator > EXACT_INT", "return False",
             ["tests/test_segments.py", "-k", "irrational"]),
    Mutation("router duplicated, not divided", "MoE router is a readout: ÷ k",
             "configs/hf-mixtral.yaml", '"model.layers.{i}.block_sparse_moe.gate.weight": {axes: [null, d_model], ',
             '"model.layers.{i}.block_sparse_moe.gate.weight": {axes: [null, d_model], fan_in: 0, ',
             ["tests/test_hf_families.py", "-k", "router_is_a_readout"]),
    Mutation("refusal does not win", "a refusing spec whose markers hold is chosen over its exact sibling",
             "src/mupscale_cli/commands/widen.py", "if refusing and len(shown) > 1:", "if False:",
             ["tests/test_hf_families.py", "-k", "refused and minicpm3"]),
    Mutation("minicpm3 latent projection as mup readout", "MiniCPM3 q_a/kv_a: summing projections (÷ k)",
             "configs/hf-minicpm3.yaml", "kv_a_proj_with_mqa.weight\": {axes: [null, d_model], k_power: -1,",
             "kv_a_proj_with_mqa.weight\": {axes: [null, d_model],",
             ["tests/test_hf_families.py", "-k", "minicpm3 and adamw"]),
    Mutation("cohere logit_scale kept", "Cohere: logit_scale ÷ k keeps the tied readout exact",
             "configs/hf-cohere.yaml", "  logit_scale: {divide: d_model}\n", "",
             ["tests/test_hf_families.py", "-k", "cohere and adamw"]),
    Mutation("falcon dense per head", "Falcon new decoder: dense reads heads in whole groups",
             "configs/hf-falcon.yaml", "{axes: [d_model, {axis: d_model, block: group_dim}]",
             "{axes: [d_model, {axis: d_model, block: head_dim}]",
             ["tests/test_hf_families.py", "-k", "falcon and adamw"]),
    Mutation("granite sinks per head", "Granite SWA: a sink moves with its query head (whole query groups)",
             "configs/hf-granite-swa.yaml", '"model.layers.{i}.self_attn.sinks": [{axis: heads, block: group_heads}]',
             '"model.layers.{i}.self_attn.sinks": [heads]', ["tests/test_hf_families.py", "-k", "granite and adamw"]),
    Mutation("moe state_only ignored", "Mixtral's fused experts: optimizer state widened as the fused parameter",
             "src/mupscale_cli/core/plan.py", "rules = [r for r in self.spec.rules if r.state_only and r.regex.fullmatch(name)]",
             "rules = []", ["tests/test_hf_families.py", "-k", "mixtral and adamw"]),
    Mutation("saved_as placeholders ignored", "a parameter saved under another name per layer (Mixtral's router)",
             "src/mupscale_cli/core/spec.py", "            return out\n    return name", "            return b\n    return name",
             ["tests/test_hf_families.py", "-k", "mixtral and adamw"]),
    Mutation("stateless file tensors demand state", "a Trainer checkpoint of Mixtral: per-expert file tensors have "
             "no state of their own", "src/mupscale_cli/commands/widen.py",
             "if any(n not in mapped and not prep.plan.tensors[n].stateless for n in prep.plan.params):",
             "if any(n not in mapped for n in prep.plan.params):",
             ["tests/test_hf_families.py", "-k", "trainer_checkpoint"]),
    Mutation("forced spec against config.json", "--spec NAME never widens a layout config.json contradicts",
             "src/mupscale_cli/commands/widen.py", "        if opts.spec:\n            _check_config_json_markers(spec, ckpt)",
             "        if False:\n            _check_config_json_markers(spec, ckpt)",
             ["tests/test_hf_families.py", "-k", "forced_spec"]),
    # issue 17: the guards added in the fifth session
    Mutation("DCP allow-list walks dotted names", "DCP .metadata unpickled with exact (module, name) pairs only",
             "src/mupscale_cli/formats/dcp.py", "        obj = _allowed_object(module, name)\n",
             "        obj = _allowed_object(module, name) or (super().find_class(module, name)\n"
             "                                                if module.startswith('torch.distributed') else None)\n",
             ["tests/test_unpicklers.py", "-k", "dcp_metadata_unpickler or through_the_command"]),
    Mutation("-o over the input", "-o never equals, contains or lies inside the input",
             "src/mupscale_cli/formats/output.py", "    check_not_over_input(out, opts.checkpoint)\n", "",
             ["tests/test_paths.py"]),
    Mutation("-o a symbolic link", "-o that is a symbolic link is refused", "src/mupscale_cli/formats/target.py",
             "    if out.is_symlink():\n        target = os.readlink(out)", "    if False:\n        target = os.readlink(out)",
             ["tests/test_paths.py", "-k", "link"]),
    Mutation("links out of the input followed", "a file of an input directory linking out of it is never read",
             "src/mupscale_cli/formats/target.py", "    if not p.is_symlink():\n        return\n",
             "    if True:\n        return\n", ["tests/test_input_files.py", "-k", "link or blobs"]),
    Mutation("stale weights copied", "other weights beside a Hugging Face model are refused",
             "src/mupscale_cli/formats/hf.py", "    if stale:\n", "    if False:\n",
             ["tests/test_input_files.py", "-k", "stale"]),
    Mutation("DCP tiling skipped", "DCP chunks tile every tensor exactly, whatever their count",
             "src/mupscale_cli/formats/dcp.py", "        why = _tiling_error(shape, boxes, covered)",
             "        why = None if len(boxes) > 256 else _tiling_error(shape, boxes, covered)",
             ["tests/test_dcp.py", "-k", "tiling"]),
    Mutation("config sizes unchecked", "config.json sizes describe the weights", "src/mupscale_cli/core/plan.py",
             "    check_args_against_shapes(plan, model_args)\n", "", ["tests/test_input_files.py", "-k", "config_sizes"]),
    Mutation("layer count unchecked", "config.json's layer count is the weights'", "src/mupscale_cli/formats/hf.py",
             "    check_layers(path, config, list(ckpt.tensors))\n", "",
             ["tests/test_trainer_hostile.py", "-k", "layers"]),
    Mutation("torch.save errors as RuntimeError", "a failed optimizer.pt write is exit 2 naming it",
             "src/mupscale_cli/formats/write.py",
             "        raise env_error(e, shown) or MupscaleError(f\"{shown}: cannot write: {e.strerror or e}\") from None",
             "        raise", ["tests/test_trainer_hostile.py", "-k", "file_size_limit"]),
    Mutation("--no-optimizer copies trainer state", "--no-optimizer writes no optimizer.pt/scheduler.pt",
             "src/mupscale_cli/commands/widen.py", "files, skip={hf.OPTIMIZER, hf.SCHEDULER}", "files, skip=set()",
             ["tests/test_trainer_hostile.py", "-k", "no_optimizer"]),
    Mutation("scheduler _last_lr kept", "scheduler.pt's _last_lr follows the widened groups",
             "src/mupscale_cli/formats/hf_trainer.py", '        out["_last_lr"] = [g["lr"] for g in groups]',
             "        pass", ["tests/test_trainer_hostile.py", "-k", "scheduler_follows"]),
    Mutation("huge --k accepted", "--k above 2^20 is refused", "src/mupscale_cli/core/plan.py",
             "        if k > MAX_K:", "        if False:", ["tests/test_bounds.py", "-k", "huge_k"]),
    Mutation("torchrun env unchecked", "a half-set torchrun environment is one line, exit 2",
             "src/mupscale_cli/verify/dist.py", "    rank = number(\"RANK\")", "    rank = 0",
             ["tests/test_bounds.py", "-k", "torchrun"]),
    Mutation("no suspect-spec warning", "a fixed (null) dimension with a width's size is warned about",
             "src/mupscale_cli/core/plan.py", "    plan.suspect = suspect_dims(plan, model_args)\n",
             "    plan.suspect = []\n", ["tests/test_spec_mistakes.py", "-k", "warned"]),
    Mutation("optimizer mismatch blames the script", "an id mismatch from a wrong spec names the spec first",
             "src/mupscale_cli/core/optstate.py", "        if suspect:  # a wrong role",
             "        if False:  # a wrong role", ["tests/test_spec_mistakes.py", "-k", "names_the_spec_first"]),
]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def pytest(copy: Path, args: list[str], timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.perf_counter() - t0


def first_failure(out: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)
    return m.group(1) if m else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the whole suite (pytest -x) for every mutation")
    ap.add_argument("--only", default="", help="mutations whose name contains this")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    a = ap.parse_args()
    chosen = [m for m in MUTATIONS if a.only in m.name]
    with tempfile.TemporaryDirectory(prefix="mupscale-mutants-") as d:
        copy = Path(d)
        copy_tree(copy)
        selections = [["tests"]] if a.full else [m.tests for m in chosen]
        for sel in {tuple(s) for s in selections}:  # the unmutated tree must pass what guards it
            rc, out, secs = pytest(copy, list(sel), a.timeout)
            if rc != 0:
                print(f"the unmutated tree fails {' '.join(sel)} ({first_failure(out)}); fix that first",
                      file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            patches = [(m.file, m.old, m.new), *m.more]
            texts = {f: (copy / f).read_text() for f, _, _ in patches}
            bad = [(f, old) for f, old, _ in patches if texts[f].count(old) != 1]
            if bad:
                rows.append((m, "patch does not apply", f"{bad[0][1]!r} in {bad[0][0]}", 0.0))
                continue
            for f, old, new in patches:
                (copy / f).write_text((copy / f).read_text().replace(old, new))
            try:
                rc, out, secs = pytest(copy, ["tests"] if a.full else m.tests, a.timeout)
            finally:
                for f, text in texts.items():
                    (copy / f).write_text(text)
            verdict = "caught" if rc == 1 else "survived" if rc == 0 else f"pytest exit {rc}"
            rows.append((m, verdict, first_failure(out) if rc == 1 else "", secs))
            print(f"{m.name}: {verdict} {rows[-1][2]} ({secs:.0f} s)", file=sys.stderr, flush=True)
    print("| mutation | promise it breaks | patched file | result | first failing test | seconds |")
    print("|---|---|---|---|---|---|")
    for m, verdict, test, secs in rows:
        print(f"| {m.name} | {m.promise} | `{m.file.removeprefix('src/mupscale_cli/')}` | {verdict} | "
              f"{f'`{test}`' if test else ''} | {secs:.0f} |")
    return 0 if all(v == "caught" for _, v, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
