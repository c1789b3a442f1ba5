"""The CLI's everyday manners (issue 19), each through the real `mupscale` command in a subprocess:
inspect describes a widened file, --json - writes to stdout, progress without a terminal, help text."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import MUPSCALE, mupscale

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "nanogpt-tiny.pt")


def test_inspect_of_a_widened_file_describes_the_file(tmp_path: Path) -> None:
    """`mupscale widen ... | xargs mupscale inspect`: without --k a mupscale output is described as it is
    (shapes as stored, its groups' hyper-parameters, a short provenance line), not widened again by 2."""
    out = tmp_path / "w.safetensors"
    path = mupscale("widen", TINY, "--k", "4", "--sigma", "0.5", "-o", str(out), check=True).stdout.strip()
    r = mupscale("inspect", path, "--json", check=True)
    rep = json.loads(r.stdout)
    assert rep["describes"] == "file" and set(rep["k"].values()) == {1}
    assert all(row["shape"] == row["widened"] for row in rep["rows"])
    rows = {row["name"]: row for row in rep["rows"]}
    assert rows["transformer.wte.weight"]["shape"] == [64, 128]  # n_embd 32 × 4, as stored
    r = mupscale("inspect", path, check=True)
    assert r.stdout.startswith("ok: 29 tensors") and "a mupscale output" in r.stdout
    prov = [x for x in r.stderr.splitlines() if x.startswith("provenance:")]
    assert len(prov) == 1 and "×4" in prov[0] and "σ̄ 0.5, seed 0" in prov[0] and prov[0].endswith("--json")
    header = next(x for x in r.stderr.splitlines() if "tensor" in x and "role" in x)
    assert "shape" in header and "widened" not in header  # no "widened" column: nothing is being widened
    # --k still plans a further widening of the file
    rep = json.loads(mupscale("inspect", path, "--k", "2", "--json", check=True).stdout)
    assert rep["describes"] == "widening" and rows["transformer.wte.weight"]["shape"] == [64, 128]
    assert {r["name"]: r for r in rep["rows"]}["transformer.wte.weight"]["widened"] == [64, 256]
    # an input that is not a mupscale output: the default k is 2, as before
    rep = json.loads(mupscale("inspect", TINY, "--json", check=True).stdout)
    assert rep["describes"] == "widening" and set(rep["k"].values()) == {2}


def test_verify_json_dash_writes_the_report_to_stdout(tmp_path: Path) -> None:
    """`--json -` is stdout (as `widen --json` prints its summary there), never a file named '-'."""
    r = mupscale("verify", TINY, "--steps", "2", "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["result"] == "pass" and rep["steps_run"] == 2
    assert r.stderr.startswith("PASS: 2 steps") and not (Path.cwd() / "-").exists()
    out = tmp_path / "report.json"
    r = mupscale("verify", TINY, "--steps", "1", "--json", str(out), "--quiet")
    assert r.returncode == 0 and r.stdout.startswith("PASS") and json.loads(out.read_text())["result"] == "pass"


def test_sweep_has_the_model_option_its_errors_name(tmp_path: Path) -> None:
    """A spec without a `model:` section: sweep says to pass --model, and sweep takes --model."""
    spec_text = (ROOT / "configs" / "nanogpt-mup.yaml").read_text()
    assert spec_text.rstrip().endswith("model:\n  factory: mupscale_cli.zoo.gpt")
    spec = tmp_path / "no-model.yaml"
    spec.write_text(spec_text.rstrip()[: -len("model:\n  factory: mupscale_cli.zoo.gpt")].replace(
        "name: nanogpt-mup", "name: no-model"))
    args = ["sweep", TINY, "--spec", str(spec), "--k", "2", "--sigma", "0", "--lr", "0.001", "--steps", "4",
            "--base-lr", "0.001"]
    r = mupscale(*args)
    assert r.returncode == 2 and "pass --model" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = mupscale(*args, "--model", "mupscale_cli.zoo.gpt")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sigma"] == 0


def test_widen_progress_without_a_terminal_is_plain_lines_and_a_summary(tmp_path: Path) -> None:
    """stderr a pipe (CI logs): plain progress lines (here one per 10%: MUPSCALE_PROGRESS_SECONDS=0), then a
    closing summary; stdout carries the path alone. By default a short widening prints only the summary;
    --quiet prints nothing."""
    out = tmp_path / "w.safetensors"
    argv = [*MUPSCALE, "widen", TINY, "--k", "4", "-o", str(out), "--threads", "0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MUPSCALE_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0 and r.stdout == f"{out}\n", r.stderr
    lines = r.stderr.splitlines()
    steps = [int(re.match(r"mupscale: widening: (\d+)% \(", x).group(1)) for x in lines[:-1]]
    assert len(steps) >= 5 and steps == sorted(steps) and steps[-1] < 100, lines
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:])), steps
    assert re.fullmatch(r"mupscale: widened 29 tensors by k 4: 4\.7 MiB written in [\d.]+ s \(.*/s\)", lines[-1])
    r = subprocess.run([*argv, "--force"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "MUPSCALE_PROGRESS_SECONDS"})
    assert r.returncode == 0 and len(r.stderr.splitlines()) == 1 and "widened 29 tensors" in r.stderr, r.stderr
    r = subprocess.run([*argv, "--force", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == f"{out}\n"


def test_help_is_wrapped_once_flags_have_no_metavar_and_specs_lines_are_short() -> None:
    """Help text: the source's line breaks do not survive into rich's wrapping (a wide terminal shows a
    paragraph on one line), flags show no `<bool>`, repeatable options say what they take; `specs` lines fit
    100 columns."""
    env = {**os.environ, "COLUMNS": "250"}
    r = subprocess.run([*MUPSCALE, "widen", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0
    assert any("under torchrun (torchrun --nproc-per-node N -m mupscale_cli widen ...) the ranks" in x
               for x in r.stdout.splitlines()), r.stdout
    opts = {x.split()[1]: x for x in r.stdout.splitlines() if x.startswith("│ --")}
    for flag in ("--force", "--json", "--untie", "--strict", "--quiet", "--no-optimizer"):
        assert "<bool>" not in opts[flag], opts[flag]
    assert "NAME=INT" in opts["--size"] and "KEY=VALUE" in opts["--model-arg"] and "list[str]" not in r.stdout
    r = subprocess.run([*MUPSCALE, "specs"], capture_output=True, text=True, timeout=120, env=env)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) > 20 and max(map(len, lines)) <= 100
    assert any(x.startswith("nanogpt-mup ") for x in lines)
