"""What an input directory holds is read only from inside it, and only as the model (issue 17 §3).

A symbolic link leading out of the input (`tokenizer.model -> ../secret/id_rsa`) was published into the output;
a stale `model.safetensors` beside an index and its shards was copied over the widened weights. Both are refused
in one line, exit 2, nothing written; the Hugging Face cache layout (snapshot files linking to the repository's
own blobs/) still widens."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import MUPSCALE


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MUPSCALE, "widen", *map(str, args), "--k", "2"], capture_output=True, text=True,
                          timeout=300)


def refused(r: subprocess.CompletedProcess, match: str, out: Path) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupscale: error: ") and match in lines[0], r.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    from hf_tiny import make
    d = tmp_path_factory.mktemp("hf") / "llama"
    make("llama", d)
    return d


def test_link_out_of_an_hf_directory_refused(hf, tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "id_rsa").write_text("PRIVATE KEY")
    d = tmp_path / "model"
    shutil.copytree(hf, d)
    (d / "tokenizer.model").symlink_to("../secret/id_rsa")
    refused(run(d, "-o", tmp_path / "wide"), "leading out of", tmp_path / "wide")
    # a link inside the directory is fine (and copied as its bytes)
    (d / "tokenizer.model").unlink()
    (d / "notes.txt").write_text("mine")
    (d / "readme.txt").symlink_to("notes.txt")
    r = run(d, "-o", tmp_path / "wide")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "wide" / "readme.txt").read_text() == "mine"


def test_absolute_link_and_linked_weights_refused(hf, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(hf / "model.safetensors", outside)  # valid weights: only the guard can refuse them
    d = tmp_path / "model"
    shutil.copytree(hf, d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(outside)
    refused(run(d, "-o", tmp_path / "wide"), "leading out of", tmp_path / "wide")


def test_hf_cache_snapshot_links_to_its_own_blobs(hf, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(hf.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    r = run(snap, "-o", tmp_path / "wide")
    assert r.returncode == 0, r.stderr
    wide = load_file(tmp_path / "wide" / "model.safetensors")
    base = load_file(hf / "model.safetensors")
    assert wide["model.embed_tokens.weight"].shape[1] == 2 * base["model.embed_tokens.weight"].shape[1]
    # another repository's blobs are not this snapshot's
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "k").write_text("PRIVATE")
    (snap / "tokenizer.model").symlink_to(Path("../../../models--evil--x/blobs/k"))
    refused(run(snap, "-o", tmp_path / "wide2"), "leading out of", tmp_path / "wide2")


def test_shard_and_dcp_files_linked_out_refused(hf, tmp_path):
    # a sharded directory whose (valid) shard is a link to a file outside it
    outside = tmp_path / "outside.safetensors"
    shutil.copy(hf / "model.safetensors", outside)
    d = tmp_path / "sharded"
    d.mkdir()
    names = list(load_file(outside))
    (d / "model-00001-of-00001.safetensors").symlink_to(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    refused(run(d, "-o", tmp_path / "w.safetensors", "--spec", "hf-llama"), "leading out of",
            tmp_path / "w.safetensors")
    # a DCP directory whose data file is a link out of it
    from test_dcp import _small_dcp
    dcp = _small_dcp(tmp_path / "dcp")
    data = sorted(dcp.glob("*.distcp"))[0]
    moved = tmp_path / "moved.distcp"
    data.rename(moved)
    data.symlink_to(moved)
    refused(run(dcp, "-o", tmp_path / "wdcp", "--spec", "mup-mlp"), "leading out of", tmp_path / "wdcp")


@pytest.mark.parametrize("stale", ["model.safetensors", "pytorch_model.bin", "model-00009-of-00009.safetensors"])
def test_stale_weights_beside_the_model_refused(hf, tmp_path, stale):
    """Shards + index (the model) and another weights file beside them: which is the model? Copied as an
    'other file', a stale model.safetensors replaced the widened weights in the output."""
    from hf_tiny import make
    d = tmp_path / "model"
    make("llama", d, shard="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    shutil.copy(hf / "model.safetensors", d / stale)
    refused(run(d, "-o", tmp_path / "wide"), stale, tmp_path / "wide")


@pytest.mark.parametrize("key,value", [("hidden_size", 63), ("hidden_size", -64), ("intermediate_size", 100),
                                       ])
def test_config_sizes_checked_against_the_weights(hf, tmp_path, key, value):
    """config.json sizes that do not describe the weights (32 wide, MLP 48) were widened ×k into the output's
    config beside weights they do not describe (from_pretrained failed), exit 0."""
    d = tmp_path / "model"
    shutil.copytree(hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    refused(run(d, "-o", tmp_path / "wide", "--spec", "hf-llama"), "does not describe its weights", tmp_path / "wide")
