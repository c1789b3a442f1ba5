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


def _shape_drops(spec: str, key: str, case: str) -> Mutation:
    """Every `shape:` of bundled spec hf-<spec> that states config.json's `key`, dropped: a config.json whose
    `key` contradicts the weights must still be refused (tests/test_hf_shapes.py, family `case`)."""
    f = f"configs/hf-{spec}.yaml"
    lines = [x for x in (ROOT / f).read_text().splitlines() if re.search(r"shape: \[[^\]]*\b" + key + r"\b", x)]
    patches = [(f, x, re.sub(r", shape: \[[^\]]*\]", "", x)) for x in lines]
    return Mutation(f"hf-{spec} {key} shapes dropped", f"config.json's {key} is checked against hf-{spec}'s weights",
                    *patches[0], ["tests/test_hf_shapes.py", "-k", f"refused and {case}"], more=tuple(patches[1:]))


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
             "src/mupscale_cli/commands/prepare.py", "    if refusing:  # a refusal's markers", "    if False:  # a refusal's markers",
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
             "configs/hf-granite-swa.yaml", '"model.layers.{i}.self_attn.sinks": {axes: [{axis: heads, block: group_heads}]',
             '"model.layers.{i}.self_attn.sinks": {axes: [heads]', ["tests/test_hf_families.py", "-k", "granite and adamw"]),
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
             "src/mupscale_cli/commands/prepare.py",
             "        if opts.spec:\n            given += _check_config_json_markers(spec, ckpt, opts.risk_model_type)",
             "        if False:\n            given += _check_config_json_markers(spec, ckpt, opts.risk_model_type)",
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
             "        raise env_error(f.error, shown) or MupscaleError(f\"{shown}: cannot write: {f.error.strerror}\") from None",
             "        raise", ["tests/test_trainer_hostile.py", "-k", "file_size_limit"]),
    Mutation("save_torch open errors unnamed", "a file torch.save cannot open is one line naming it",
             "src/mupscale_cli/formats/write.py",
             "        raise env_error(e, shown) or MupscaleError(f\"{shown}: cannot write: {e.strerror or e}\") from None",
             "        raise", ["tests/test_trainer_hostile.py", "-k", "save_torch_names"]),
    Mutation("verify of an untied widening", "verify refuses a --untie widening in one line (nothing exact to check)",
             "src/mupscale_cli/commands/verify.py", '    if prov.get("untie"):', "    if False:",
             ["tests/test_hf.py", "-k", "untie"]),
    Mutation("--no-optimizer copies trainer state", "--no-optimizer writes no optimizer.pt/scheduler.pt",
             "src/mupscale_cli/commands/widen.py", "files, skip={hf.OPTIMIZER, hf.SCHEDULER}", "files, skip=set()",
             ["tests/test_trainer_hostile.py", "-k", "no_optimizer"]),
    Mutation("scheduler _last_lr kept", "scheduler.pt's _last_lr follows the widened groups",
             "src/mupscale_cli/formats/hf_trainer.py", '        out["_last_lr"] = [g["lr"] for g in groups]',
             "        pass", ["tests/test_trainer_hostile.py", "-k", "scheduler_follows"]),
    Mutation("huge --k accepted", "--k above 2^20 is refused", "src/mupscale_cli/core/plan.py",
             "        if k > MAX_K:", "        if False:", ["tests/test_bounds.py", "-k", "huge_k"]),
    Mutation("torchrun env unchecked", "a half-set torchrun environment is one line, exit 2",
             "src/mupscale_cli/procgroup.py", "    if rank is None:\n", "    if False:\n",
             ["tests/test_bounds.py", "-k", "torchrun"]),
    # issue 17, the DCP reader and every unpickler (helper "pickle")
    Mutation("dcp EXT opcodes allowed", "DCP metadata: no object from copyreg's extension cache",
             "src/mupscale_cli/formats/dcp.py", "    dispatch[pickle.EXT1[0]] = _ext\n    dispatch[pickle.EXT2[0]] = _ext\n    dispatch[pickle.EXT4[0]] = _ext\n    dispatch[pickle.REDUCE[0]]",
             "    dispatch[pickle.REDUCE[0]]", ["tests/test_dcp.py", "-k", "extension_cache"]),
    Mutation("dcp BUILD on anything", "DCP metadata: BUILD only on DCP dataclass instances, their fields",
             "src/mupscale_cli/formats/dcp.py", "fields = self._build.get(type(inst), False)", "fields = self._build.get(type(inst), None)",
             ["tests/test_dcp.py", "-k", "build_changes"]),
    Mutation("probe EXT opcodes allowed", ".pt storage probe: no object from copyreg's extension cache",
             "src/mupscale_cli/formats/checkpoint.py", "    dispatch[pickle.EXT1[0]] = _ext\n", "",
             ["tests/test_dcp.py", "-k", "probe_refuses"]),
    Mutation("probe BUILD on anything", ".pt storage probe: BUILD only on its stand-in instances",
             "src/mupscale_cli/formats/checkpoint.py", "        if type(self.stack[-2]) is not _Any:",
             "        if False:", ["tests/test_dcp.py", "-k", "probe_refuses"]),
    Mutation("planner index unbounded", "DCP planner paths: list indices below the entry count",
             "src/mupscale_cli/formats/dcp.py", "(type(x) is int and 0 <= x < n)", "type(x) is int", ["tests/test_dcp.py", "-k", "planner_paths_checked and index"]),
    Mutation("planner paths unchecked", "DCP planner paths: types, key = dotted path, one tree",
             "src/mupscale_cli/formats/dcp.py", "        self.paths = check_paths(self.root, self.md)",
             "        self.paths = {k: tuple(self.md.planner_data.get(k, (k,))) for k in self.md.state_dict_metadata}",
             ["tests/test_dcp.py", "-k", "planner_paths_checked"]),
    Mutation("planner tree clash allowed", "DCP planner paths: no path both a value and a container",
             "src/mupscale_cli/formats/dcp.py", "            if old != kind:", "            if False:", ["tests/test_dcp.py", "-k", "planner_paths_checked and dict"]),
    Mutation("dcp chunk dtype unchecked", "each stored DCP chunk has the metadata's dtype and shape",
             "src/mupscale_cli/formats/dcp.py", "        if stored.dtype != self.dtype or tuple(stored.shape) != self.sizes:", "        if False:",
             ["tests/test_dcp.py", "-k", "must_match"]),
    Mutation("dcp item length unchecked", "a DCP item holds at least its chunk's bytes",
             "src/mupscale_cli/formats/dcp.py", "            if info.length < math.prod(s) * props.dtype.itemsize:", "            if False:",
             ["tests/test_dcp.py", "-k", "must_match"]),
    Mutation("dcp transforms allowed", "DCP items stored through transforms are refused",
             "src/mupscale_cli/formats/dcp.py", "        if getattr(info, \"transform_descriptors\", None):", "        if False:", ["tests/test_dcp.py", "-k", "must_match"]),
    Mutation("no claim on a DCP output", "one writer per output, DCP too",
             "src/mupscale_cli/commands/widen_dcp.py", "    with claim(out):  # one writer per output",
             "    with __import__('contextlib').nullcontext():  # one writer per output", ["tests/test_dcp.py", "-k", "one_writer_per_dcp"]),
    Mutation("flat groups compare lr only", "flattened DCP param groups split on any hyper-parameter (weight_decay)",
             "src/mupscale_cli/formats/dcp.py", "    return all(_eq(a[k], b[k]) for k in a)", "    return _eq(a.get(\"lr\"), b.get(\"lr\"))",
             ["tests/test_dcp.py", "-k", "weight_decay"]),
    # issue 17, Hugging Face / Trainer readers (hf helper)
    Mutation("optimizer.pt ids unchecked", "optimizer.pt's params are integer ids, each in one group",
             "src/mupscale_cli/formats/hf_trainer.py", "        if not all(_is_int(x) for x in ids):",
             "        if False:", ["tests/test_hf_hostile.py", "-k", "optimizer-params-not-ints or optimizer-id-twice"]),
    Mutation("scheduler.pt not matched to optimizer.pt", "scheduler.pt's base_lrs/_last_lr are optimizer.pt's groups'",
             "src/mupscale_cli/formats/hf_trainer.py", "            if not (a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))):",
             "            if False:", ["tests/test_hf_hostile.py", "-k", "scheduler-last-lr-disagrees or scheduler-base-lrs-disagree"]),
    Mutation("trainer_state.json unchecked", "trainer_state.json is a JSON object a Trainer resumes from",
             "src/mupscale_cli/formats/hf.py", "    if trainer:\n        check_trainer_state(path)\n", "",
             ["tests/test_hf_hostile.py", "-k", "trainer-state"]),
    Mutation("config.json NaN accepted", "config.json holds no NaN/Infinity", "src/mupscale_cli/formats/hf.py",
             "    if bad is not None:", "    if False:", ["tests/test_hf_hostile.py", "-k", "config-nan or config-infinity"]),
    Mutation("config.json dtype unchecked", "config.json's dtype names a torch dtype", "src/mupscale_cli/formats/hf.py",
             'if v is not None and not (isinstance(v, str) and (v == "auto" or _is_dtype(v))):', "if False:",
             ["tests/test_hf_hostile.py", "-k", "dtype"]),
    Mutation("second weights index copied", "a *.bin.index.json beside the weights is refused",
             "src/mupscale_cli/formats/hf.py", '"*.bin.index.json", ', "", ["tests/test_hf_hostile.py", "-k", "second-index"]),
    Mutation("index total_size lie silent", "a wrong total_size in an index is said", "src/mupscale_cli/formats/shards.py",
             "    if told is not None and told != held:", "    if False:", ["tests/test_hf_hostile.py", "-k", "total_size"]),
    Mutation("torchrun ranks race for an HF output", "under torchrun rank 0 alone writes a single-writer output",
             "src/mupscale_cli/commands/widen.py", "    rank = single_writer_rank()\n    if rank:",
             "    rank = single_writer_rank()\n    if False:", ["tests/test_hf_hostile.py", "-k", "torchrun"]),
    Mutation("k_power state factor from a float", "Gemma's exp_avg_sq moves by exactly 1/k",
             "src/mupscale_cli/core/plan.py", "            if float(e).is_integer():", "            if False:",
             ["tests/test_hf_trainer.py", "-k", "untied_gemma"]),
    Mutation("background threads not stopped by the CLI", "no thread is left running at exit, whatever raised",
             "src/mupscale_cli/cli.py", "    stop_threads()  # formats.write.Background", "    pass  # formats.write.Background",
             ["tests/test_hf_hostile.py", "-k", "guard_stops"]),
    # issue 17, output paths (second pass)
    Mutation("-o a FIFO replaced", "-o that is a FIFO, socket or device is never replaced",
             "src/mupscale_cli/formats/target.py", "    check_output_link(out)\n    check_output_kind(out)\n",
             "    check_output_link(out)\n", ["tests/test_paths.py", "-k", "fifo or socket or dev_null"]),
    Mutation("-o trailing slash dropped", "-o 'x.safetensors/' (a directory) is not written as a file",
             "src/mupscale_cli/formats/target.py", "    if raw.endswith((\"/\", os.sep)) and",
             "    if False and", ["tests/test_paths.py", "-k", "trailing"]),
    Mutation("DCP parents left after a failure", "-o in new directories: removed again if the write fails (DCP too)",
             "src/mupscale_cli/formats/output.py",
             "        if made:\n            shutil.rmtree(made[0], ignore_errors=True)\n        if isinstance(e, OSError)",
             "        if isinstance(e, OSError)", ["tests/test_paths.py", "-k", "dcp_output_creates or creates_missing"]),
    Mutation("stray exit 1", "exit 1 only when verify failed", "src/mupscale_cli/cli.py",
             "    if rv == 1 and not _VERIFY_FAILED:", "    if False:",
             ["tests/test_paths.py", "-k", "exit_1"]),
    Mutation("SystemExit passes through", "a sys.exit(1) inside a command is exit 3, not 1", "src/mupscale_cli/cli.py",
             "        if e.code in (None, 0, 2, 130, 143) or", "        if True or",
             ["tests/test_paths.py", "-k", "exit_1"]),
    Mutation("-o ancestor by path only", "-o an ancestor of the input reached through a bind mount is refused",
             "src/mupscale_cli/formats/target.py", " or (out_id is not None and out_id in in_chain[1:]):", ":",
             ["tests/test_paths.py", "-k", "bind_mount"]),
    Mutation("-o the input by path only", "-o a hard link of the input file is refused",
             "src/mupscale_cli/formats/target.py", "if r_out == r_in or (out_id is not None and out_id == in_id):",
             "if r_out == r_in:", ["tests/test_paths.py", "-k", "hard-link"]),
    Mutation("input digest reads blocking /proc files", "a size-0 /proc input (/proc/kmsg) is refused, not read",
             "src/mupscale_cli/cli.py", "    if size == 0:  # a directory", "    if not path.is_file():  # a directory",
             ["tests/test_paths.py", "-k", "proc-size-0"],
             more=(("src/mupscale_cli/cli.py",
                    "while left > 0 and (n := f.readinto(memoryview(buf)[:min(len(buf), left)])):",
                    "while n := f.readinto(buf):"),)),
    Mutation("lock error names the lock file", "-o where no file can be made (/proc) is one line naming -o",
             "src/mupscale_cli/formats/target.py", "f\"-o {one_line(str(dest))}: cannot create files in",
             "f\"{one_line(str(lock))}: cannot create files in", ["tests/test_paths.py", "-k", "proc"]),
    # issue 18 §1-§3 (evidence, refusals, sizes, trajectories of the families bundled before it)
    Mutation("risk flag ignored", "--spec of another model_type is refused unless --risk-model-type-mismatch",
             "src/mupscale_cli/commands/prepare.py", "    if risk:\n        return [f\"warning:",
             "    if True:\n        return [f\"warning:", ["tests/test_hf_evidence.py", "-k", "risk_flag"]),
    Mutation("refusal suggests the first spec that fits", "a refusal suggests only specs whose evidence the file shows",
             "src/mupscale_cli/commands/prepare.py", "    for spec in shown:\n        try:",
             "    for spec in specs:\n        try:", ["tests/test_hf_evidence.py", "-k", "no_bundled_spec"]),
    Mutation("missing rewrite key is a no-op", "a config rewrite whose key is missing is an error (Granite's logits_scaling)",
             "src/mupscale_cli/core/plan.py", '            if op in ("times", "divide") and k.get(arg, 1) != 1:',
             "            if False:", ["tests/test_hf_evidence.py", "-k", "missing_key"]),
    Mutation("rule shapes unchecked", "config.json sizes (head_dim x heads, intermediate_size) checked against the weights",
             "src/mupscale_cli/core/plan.py", "    check_rule_shapes(plan, model_args, size_overrides or {})\n",
             "", ["tests/test_hf_evidence.py", "-k", "config_sizes or widened_config or bigcode"]),
    Mutation("widened shapes unchecked", "the widened config.json describes the widened weights",
             "src/mupscale_cli/core/plan.py", "                                (wide_sizes, t.out_shape, ",
             "                                (plan.sizes, t.shape, ", ["tests/test_hf_evidence.py", "-k", "widened_config"]),
    Mutation("gemma k_power on weights only", "Gemma's embedding x k^-1/2: its gradient (optimizer state) x k^1/2 too",
             "src/mupscale_cli/core/plan.py", "        t.s, t.g = t.s * c, t.g / c", "        t.s, t.g = t.s * c, t.g",
             ["tests/test_hf_families.py::test_family_exact_with_adamw_state_through_20_steps[gemma]"]),
    Mutation("head_dim recomputed as hidden/heads", "config.json's own head_dim wins over the spec's default (Qwen3)",
             "src/mupscale_cli/core/plan.py", "        if name in overrides or name in env:  # the checkpoint's own",
             "        if name in overrides:  # the checkpoint's own",
             ["tests/test_hf_bundled.py", "-k", "lockstep and qwen3"]),
    Mutation("up_proj init std lost", "noise relative to the family's own init (Llama's up_proj: initializer_range)",
             "configs/hf-llama.yaml", "up_proj.weight\": {axes: [d_ff, d_model], std: initializer_range, ",
             "up_proj.weight\": {axes: [d_ff, d_model], ", ["tests/test_hf_bundled.py", "-k", "noise and llama"]),
    Mutation("GPT-2 c_proj std without sqrt(2 n_layer)", "noise relative to GPT-2's own init of its residual projections",
             "configs/hf-gpt2.yaml", "fan_in: 0, std: initializer_range / sqrt(2 * n_layer), shape: [n_inner, n_embd]",
             "fan_in: 0, std: initializer_range, shape: [n_inner, n_embd]", ["tests/test_hf_bundled.py", "-k", "noise and gpt2"]),
    Mutation("fused state in its first part's blocks", "a fused wqkv's optimizer state takes the widened fused "
             "layout of its parts (torchtitan)", "src/mupscale_cli/core/plan.py",
             "DimPlan(d0[0].axis, d0[0].k, shape[0] // groups.pop())", "DimPlan(d0[0].axis, d0[0].k, d0[0].block)",
             ["tests/test_titan.py", "-k", "fused_layout"]),
    Mutation("stacked parts taken as grouped", "parts_layout: stacked widens each part's rows as the part does",
             "src/mupscale_cli/core/plan.py", '    elif rule.parts_layout == "stacked":', "    elif False:",
             ["tests/test_titan.py", "-k", "stacked_parts"]),
    Mutation("fused parts not compared", "a fused state whose parts are widened differently is refused",
             "src/mupscale_cli/core/plan.py", "    if not same:\n        raise MupscaleError(f\"{where}: its parts",
             "    if False:\n        raise MupscaleError(f\"{where}: its parts",
             ["tests/test_titan.py", "-k", "parts_disagree"]),
    Mutation("tile ignored", "tile: true duplicates the whole dimension as one block", "src/mupscale_cli/core/plan.py",
             "b = max(n, 1) if d.tile else", "b = 1 if d.tile else",
             ["tests/test_titan.py", "-k", "fused_layout"]),
    Mutation("inexact sizes accepted", "a size expression must come out a whole number", "src/mupscale_cli/core/spec.py",
             "    if value.denominator != 1 or value < 0:", "    if False:",
             ["tests/test_titan.py", "-k", "exact_rationals"]),
    Mutation("sizes demanded eagerly", "a size is demanded only by a rule that uses it", "src/mupscale_cli/core/plan.py",
             "        except KeyError as e:\n            need = e.args[0]",
             "        except KeyError as e:\n            raise MupscaleError(str(e))",
             ["tests/test_titan.py", "-k", "demanded_only"]),
    Mutation("param_names advice with names stored", "with param_names stored, the error does not ask for them",
             "src/mupscale_cli/core/optstate.py", '        if all("param_names" in g for g in sd["param_groups"]):',
             "        if False:", ["tests/test_titan.py", "-k", "right_advice"]),
    # issue 17 (suite): distributed start-up and teardown, signals after the outcome, NaN in verify, evidence,
    # --optimizer, equivalent clipping
    Mutation("LOCAL_RANK unchecked", "LOCAL_RANK above RANK is one line, exit 2", "src/mupscale_cli/procgroup.py",
             "    if local is not None and local > rank:", "    if False:",
             ["tests/test_rendezvous.py", "-k", "bad_environment_is_named"]),
    Mutation("MASTER_PORT range unchecked", "MASTER_PORT beyond 65535 is one line, exit 2",
             "src/mupscale_cli/procgroup.py", '_int("MASTER_PORT", 0 if agent else 1, 65535)', '_int("MASTER_PORT", 0 if agent else 1)',
             ["tests/test_rendezvous.py", "-k", "bad_environment_is_named"]),
    Mutation("rendezvous in the main thread", "SIGTERM/SIGINT during the rendezvous: 143/130 at once",
             "src/mupscale_cli/procgroup.py", "        t.start()\n        t.join(limit)", "        rendezvous()",
             ["tests/test_rendezvous.py", "-k", "signal_during"]),
    Mutation("no rendezvous timeout", "a rendezvous nobody joins: exit 2 after MUPSCALE_RENDEZVOUS_TIMEOUT",
             "src/mupscale_cli/procgroup.py", "    limit = timeout_s()\n", "    limit = 1800.0\n",
             ["tests/test_rendezvous.py", "-k", "timeout_is_one_line"]),
    Mutation("process group not destroyed", "every rank destroys its process group (no abort at exit)",
             "src/mupscale_cli/procgroup.py", "        td.destroy_process_group()", "        pass",
             ["tests/test_rendezvous.py", "-k", "stop_barriers"]),
    Mutation("signals restored after the outcome", "a signal once the command is over changes nothing (exit 0)",
             "src/mupscale_cli/cli.py", "                signal.signal(s, signal.SIG_IGN)",
             "                signal.signal(s, saved[s])", ["tests/test_kill.py", "-k", "after_the_outcome"]),
    Mutation("NaN dropped by max", "verify FAILs when an output difference is NaN",
             "src/mupscale_cli/verify/lockstep.py",
             "        return math.nan if any(math.isnan(v) for v in vals) else max(vals)", "        return max(vals)",
             ["tests/test_verify.py", "-k", "nan_weight"]),
    Mutation("verify rel > tol", "verify FAILs when a difference is NaN (`rel > tol` is false for NaN)",
             "src/mupscale_cli/commands/verify.py", "        failed = not (d.rel <= tol)", "        failed = d.rel > tol",
             ["tests/test_verify.py", "-k", "blows_up"]),
    Mutation("NaN tensor never the worst", "a NaN tensor of WIDE is named as the worst",
             "src/mupscale_cli/verify/lockstep.py", "        if not math.isnan(worst_rel) and not r <= worst_rel:",
             "        if r > worst_rel:", ["tests/test_verify.py", "-k", "nan_weight"]),
    Mutation("partial evidence accepted", "a checkpoint showing only part of a spec's evidence is refused",
             "src/mupscale_cli/core/spec.py", "    return any(all(holds(k, v) for k, v in alt.items())",
             "    return any(any(holds(k, v) for k, v in alt.items())",
             ["tests/test_stacks_nanogpt.py", "-k", "partial_evidence"]),
    Mutation("optimizer flag overrides the state", "--optimizer adam on AdamW state is refused",
             "src/mupscale_cli/core/optstate.py", "        if found and given and given != found:", "        if False:",
             ["tests/test_optim.py", "-k", "contradicting"]),
    Mutation("clip coefficient uncapped", "inactive equivalent clipping leaves gradients as they are",
             "src/mupscale_cli/optim.py", "coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)",
             "coef = max_norm / (total + 1e-6)", ["tests/test_clip.py", "-k", "inactive"]),
    Mutation("clip total always a 2-norm", "inf-norm equivalent clipping matches torch's on BASE",
             "src/mupscale_cli/optim.py", "for x in norms]), norm_type)", "for x in norms]), 2.0)",
             ["tests/test_clip.py", "-k", "infinity"]),
    Mutation("clip ord 0 accepted", "norm_type 0/NaN has no base-equivalent norm: refused",
             "src/mupscale_cli/optim.py", "    if norm_type == 0 or math.isnan(norm_type):", "    if False:",
             ["tests/test_clip.py", "-k", "refused"]),
    Mutation("no suspect-spec warning", "a fixed (null) dimension with a width's size is warned about",
             "src/mupscale_cli/core/plan.py", "    plan.suspect = suspect_dims(plan, model_args)\n",
             "    plan.suspect = []\n", ["tests/test_spec_mistakes.py", "-k", "warned"]),
    Mutation("optimizer mismatch blames the script", "an id mismatch from a wrong spec names the spec first",
             "src/mupscale_cli/core/optstate.py", "        if suspect:  # a wrong role",
             "        if False:  # a wrong role", ["tests/test_spec_mistakes.py", "-k", "names_the_spec_first"]),
    Mutation("verify HF float32 steps", "verify on a Hugging Face family in float64 agrees at round-off (float32 "
             "RMSNorm / router softmax kept in float64)", "src/mupscale_cli/zoo/hf.py",
             "        if next(self.model.parameters()).dtype != torch.float64:\n", "        if True:\n",
             ["tests/test_hf_verify.py", "-k", "round_off and mixtral"]),
    Mutation("verify WIDE names unmapped", "verify reads a widened HF optimizer.pt named as the model names its "
             "parameters (GPT-NeoX's lm_head saved as embed_out)", "src/mupscale_cli/verify/setup.py",
             "            n = saved_name(prep.plan.spec, strip_prefix(raw))", "            n = strip_prefix(raw)",
             ["tests/test_hf_verify.py", "-k", "round_off and gpt_neox"]),
    Mutation("widened shape check with base sizes", "verify re-plans a WIDE whose recorded (base) sizes the spec "
             "scales", "src/mupscale_cli/core/plan.py",
             "    wide_sizes = resolve_sizes(plan.spec, wide_args, wide_over)",
             "    wide_sizes = resolve_sizes(plan.spec, wide_args, overrides)",
             ["tests/test_hf_verify.py", "-k", "round_off and llama"]),
    Mutation("inspect digests count optimizer.pt", "inspect on a widened HF directory with optimizer.pt: its "
             "digests check", "src/mupscale_cli/commands/inspect.py",
             "    optim = {} if ckpt.hf is not None else optimizer_refs(ckpt.optimizer)",
             "    optim = optimizer_refs(ckpt.optimizer)", ["tests/test_hf_verify.py", "-k", "inspect"]),
    Mutation("tied aliases left out", "a tied alias holds its tensor's bytes, written from the same ranges",
             "src/mupscale_cli/formats/write.py", "            for name in (t.name, *aliases[t.name]):\n"
             "                writer.write_chunk(name, a, data)",
             "            for name in (t.name,):\n                writer.write_chunk(name, a, data)",
             ["tests/test_streaming.py", "-k", "tied"]),
    Mutation("windows without backpressure", "at most depth whole windows wait for the disk (bounded memory)",
             "src/mupscale_cli/formats/direct.py",
             "                    self._cond.wait_for(lambda: len(self._queue) <= self._depth or",
             "                    self._cond.wait_for(lambda: True or", ["tests/test_direct.py", "-k", "depth"]),
    Mutation("windows writer error dropped", "an error of the writer thread (ENOSPC) reaches the caller",
             "src/mupscale_cli/formats/direct.py", "        if self._error is not None:\n            raise self._error",
             "        if False:\n            raise self._error", ["tests/test_direct.py", "-k", "error"]),
    Mutation("windows no EINVAL fallback", "a file system refusing O_DIRECT writes gets plain writes",
             "src/mupscale_cli/formats/direct.py",
             "                os.close(dfd)\n                body = 0", "                raise",
             ["tests/test_direct.py", "-k", "einval"]),
    *[_shape_drops(spec, key, case) for spec, key, case in (
        ("cohere", "intermediate_size", "cohere"), ("gemma2", "intermediate_size", "gemma2"),
        ("gemma3", "intermediate_size", "gemma3_text"), ("granite-swa", "intermediate_size", "granite_swa"),
        ("olmo2", "intermediate_size", "olmo2"), ("stablelm", "intermediate_size", "stablelm"),
        ("mixtral", "intermediate_size", "mixtral"), ("qwen3-moe", "moe_intermediate_size", "qwen3_moe"),
        ("phi3", "intermediate_size", "phi3"), ("minicpm3", "intermediate_size", "minicpm3"),
        ("falcon", "ffn_hidden_size", "falcon"), ("falcon-mha", "ffn_hidden_size", "falcon"),
        ("gpt-neox", "intermediate_size", "gpt_neox"), ("gpt-bigcode", "n_inner", "gpt_bigcode"),
        ("opt", "ffn_dim", "opt"), ("opt-proj", "ffn_dim", "opt"))],
    Mutation("DCP block slot reused before written", "a block is never overwritten before it is written (one "
             "memory slot)", "src/mupscale_cli/formats/dcp_save.py",
             "if self._last is not None and self._written is not self._last:", "if False:",
             ["tests/test_dcp_records.py", "-k", "asking_ahead"]),
    Mutation("DCP short files committed", "files holding fewer bytes than made are not committed",
             "src/mupscale_cli/formats/dcp_save.py", "    if held < nbytes[0]:", "    if False:",
             ["tests/test_dcp_records.py", "-k", "losing_bytes"]),
    Mutation("torch.save id rule unchecked", "a torch whose serialization id follows another rule gets "
             "torch.save's own records", "src/mupscale_cli/formats/torchsave.py",
             '_folded(a, infos[:-1], d.filename, b"\\0" * 8)) != old_id:', '_folded(a, infos[:-1], d.filename, b"\\0" * 8)) != old_id and False:',
             ["tests/test_dcp_records.py", "-k", "no_where or another_id_rule"]),
    Mutation("record CRC left zero", "DCP records are torch.save's bytes (the data's CRC-32)",
             "src/mupscale_cli/formats/torchsave.py", '        a.put(len(a.head) + self.nbytes + 4, struct.pack("<I", crc))\n', "",
             ["tests/test_dcp_records.py", "-k", "torch_saves_bytes"]),
    Mutation("piece CRCs not joined", "a block's CRC-32 joins its pieces' in order",
             "src/mupscale_cli/formats/dcp_save.py", "crc, n = crc32_combine(crc, c, m), n + m", "crc, n = c, n + m",
             ["tests/test_dcp_records.py", "-k", "each_item"]),
    Mutation("descriptor quirk ignored", "torch's serialization id, even for data that begins like a descriptor",
             "src/mupscale_cli/formats/torchsave.py", "if info.file_size >= 8 and head[:4] == DESCRIPTOR:",
             "if False:", ["tests/test_dcp_records.py", "-k", "torch_saves_bytes"]),
    Mutation("DCP byte order unchecked", "a record of the other byte order is read by DCP's reader (byteswapped)",
             "src/mupscale_cli/formats/dcp.py", "if rec is not None and order == sys.byteorder else None)",
             "if rec is not None else None)", ["tests/test_dcp_records.py", "-k", "big_endian"]),
    Mutation("DCP strided record read raw", "a non-contiguous stored tensor is read by DCP's reader",
             "src/mupscale_cli/formats/dcp.py", "and tuple(t.shape) == sizes and t.is_contiguous()",
             "and tuple(t.shape) == sizes", ["tests/test_dcp_records.py", "-k", "through_dcps_reader"]),
    Mutation("DCP compressed record read raw", "a compressed data record is read by DCP's reader",
             "src/mupscale_cli/formats/dcp.py", "if len(data) == 1 and data[0].compress_type == zipfile.ZIP_STORED else None",
             "if len(data) == 1 else None", ["tests/test_dcp_records.py", "-k", "through_dcps_reader"]),
    Mutation("DCP record size unchecked", "a data record shorter than its tensor is not read past",
             "src/mupscale_cli/formats/dcp.py", " and st.nbytes() == rec.file_size", "",
             ["tests/test_dcp_records.py", "-k", "shorter_than"]),
    Mutation("DCP column region read raw", "columns of a tensor (column-sharded chunks) are read by DCP's reader",
             "src/mupscale_cli/formats/dcp.py", "        if not region.is_contiguous():\n            return False  # columns",
             "        if False:\n            return False  # columns", ["tests/test_dcp_records.py", "-k", "column"]),
    Mutation("DCP piece copy skipped", "a piece the widening made elsewhere is copied into its block",
             "src/mupscale_cli/formats/dcp_save.py", "            if not (made.data_ptr() == piece.data_ptr() and made.is_contiguous()):",
             "            if False:", ["tests/test_dcp.py", "-k", "pt_to_dcp or noise_is_the_same"]),
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
