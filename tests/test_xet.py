"""`l4q dedup` against hf_xet's real on-disk Xet store, and `l4q push`'s plan, card, dry run and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from llama4_quant import sources
from llama4_quant.pipeline import quantize
from llama4_quant.xet import card
from llama4_quant.xet.dedup import measure, upload_files
from llama4_quant.xet.push import plan_push

REPO = Path(__file__).parents[1]
SECRET = "hf_l4qTestSecretTokenThatMustNeverBePrinted0123"


def l4q(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base_env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, check=False,
                          cwd=cwd or REPO, env={**base_env, **(env or {})})


def random_file(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory) -> Path:
    return quantize(sources.resolve("tiny"), tmp_path_factory.mktemp("q") / "tiny-int4", "int4", device="cpu",
                    show_progress=False).out


def test_dedup_counts_what_the_store_already_holds(tmp_path):
    """Real Xet chunking: a file with one changed stretch stores about that stretch, measuring leaves the store alone."""
    store = tmp_path / "store"
    base = random_file(tmp_path / "base" / "w.bin", 8_000_000, 0)
    data = bytearray(base.read_bytes())
    data[3_000_000:3_500_000] = np.random.default_rng(1).integers(0, 256, 500_000, dtype=np.uint8).tobytes()
    changed = tmp_path / "out" / "w.bin"
    changed.parent.mkdir()
    changed.write_bytes(bytes(data))
    fresh = random_file(tmp_path / "out" / "new.bin", 2_000_000, 2)

    report = measure(tmp_path / "out", [tmp_path / "base"], store)
    by_name = {f.name: f for f in report.files}
    assert by_name["new.bin"].new_bytes == fresh.stat().st_size  # nothing to share
    w = by_name["w.bin"]
    assert 500_000 <= w.new_bytes <= 500_000 + 4 * 128 * 1024  # the change plus a few boundary chunks
    assert w.size == 8_000_000 and w.deduped_bytes == w.size - w.new_bytes
    assert report.dedup == pytest.approx(1 - report.new_bytes / 10_000_000)

    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    again = measure(tmp_path / "out", [tmp_path / "base"], store)  # the base is not chunked again, nor OUT stored
    assert [f.new_bytes for f in again.files] == [f.new_bytes for f in report.files]
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_dedup_cli_json_and_table(tmp_path, tiny_int4):
    store = tmp_path / "store"
    r = l4q("dedup", str(tiny_int4), "--against", str(sources.resolve("tiny").path), "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    files = {f["name"]: f for f in report["files"]}
    assert "config.json" in files and "l4q_recipe.json" in files
    assert files["tokenizer.json"]["dedup"] > 0.99  # carried over byte for byte
    assert 0 < report["total"]["dedup"] < 1
    total = sum(f["size"] for f in report["files"])
    assert report["total"]["size"] == total == sum(p.stat().st_size for p in upload_files(tiny_int4))
    r = l4q("dedup", str(tiny_int4), "--against", str(sources.resolve("tiny").path), "--store", str(store))
    assert r.returncode == 0 and "| total |" in r.stdout
    r = l4q("dedup", str(tmp_path / "missing"), "--store", str(store))
    assert r.returncode == 1 and r.stderr.startswith("l4q: error:") and r.stderr.count("\n") == 1
    r = l4q("dedup", str(tiny_int4), "--store", str(tmp_path / "fresh" / "store"), "--json")  # a store not there yet
    assert r.returncode == 0 and json.loads(r.stdout)["total"]["new_bytes"] > 0, r.stderr


def test_model_card(tiny_int4, tmp_path):
    out = tmp_path / "tiny-int4"
    shutil.copytree(tiny_int4, out)
    r = l4q("eval", "--base", "tiny", "--candidate", str(out), "--max-tokens", "512", "--report", str(out / "l4q-report"), "--quiet")
    assert r.returncode == 0, r.stderr
    d = card.describe(out, base_model="meta-llama/Llama-4-Scout-17B-16E-Instruct")
    text = card.render(d, {"against": ["base"], "total": {"size": 10e9, "deduped_bytes": 4e9, "dedup": 0.4, "new_bytes": 6e9}})
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert front["base_model_relation"] == "quantized"
    assert {"llama4", "l4q", "compressed-tensors", "int4"} <= set(front["tags"])
    assert front["pipeline_tag"] == "image-text-to-text"
    assert card.CARD_MARKER in text and "| method | rtn |" in text
    assert "| scheme | int4: int4 weights, symmetric, group 128, 16-bit activations |" in text
    assert "## Evaluation" in text and "Mean KLD" in text  # the eval table of the report in OUT
    assert "40.0%" in text


def test_push_plan_and_dry_run_touch_no_network(tiny_int4, tmp_path):
    plan = plan_push(tiny_int4, "someone/tiny-int4", revision="v1", commit_message="hello")
    names = [n for n, _, _ in plan.files]
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names) and "README.md" not in names
    assert plan.total_bytes == sum(s for _, _, s in plan.files) + len(plan.card.encode())
    # No token, and an endpoint nothing listens on: a dry run must still work.
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "L4Q_CACHE": str(tmp_path / "cache")}
    r = l4q("push", str(tiny_int4), "--repo", "someone/tiny-int4", "--dry-run", "--store", str(tmp_path / "store"), env=env)
    assert r.returncode == 0, r.stderr
    assert "push to https://huggingface.co/someone/tiny-int4" in r.stdout and "README.md (model card" in r.stdout
    assert "dedup estimate" in r.stdout and "dry run: nothing was sent" in r.stdout


def test_push_errors_are_one_line_and_never_show_the_token(tiny_int4, tmp_path):
    hf_home = tmp_path / "hf"
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = l4q("push", str(tiny_int4), "--repo", "someone/x", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no Hugging Face token" in r.stderr

    r = l4q("push", str(tiny_int4), "--repo", "someone/x", env={**env, "HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "offline" in r.stderr

    r = l4q("push", str(tiny_int4), "--repo", "someone/x", env={**env, "HF_TOKEN": SECRET})  # nothing listens there
    # stderr also holds the dedup estimate's progress bar; the error is its one last line
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("l4q: error: push to someone/x failed")
    assert sum(line.startswith("l4q: error") for line in r.stderr.splitlines()) == 1
    r2 = l4q("push", str(tiny_int4), "--repo", "not a repo", env={**env, "HF_TOKEN": SECRET})
    assert r2.returncode == 1 and "user/name" in r2.stderr
    logs = "".join(p.read_text(errors="replace") for p in hf_home.rglob("*") if p.is_file() and p.suffix != ".lock")
    for text in (r.stdout, r.stderr, r2.stdout, r2.stderr, logs):
        assert SECRET not in text and SECRET[3:20] not in text


def test_push_refuses_what_is_not_a_derivative(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    for target in ("notes", "x.gguf"):
        r = l4q("push", str(tmp_path / target), "--repo", "someone/x", "--dry-run", "--store", str(tmp_path / "store"))
        assert r.returncode == 1 and r.stderr.startswith("l4q: error:") and r.stderr.count("\n") == 1, r.stderr


def test_push_keeps_a_readme_it_did_not_write(tiny_int4, tmp_path):
    out = tmp_path / "own"
    shutil.copytree(tiny_int4, out)
    (out / "README.md").write_text("# my own card\n")
    r = l4q("push", str(out), "--repo", "someone/x", "--dry-run", "--store", str(tmp_path / "store"))
    assert r.returncode == 1 and "not an l4q model card" in r.stderr
