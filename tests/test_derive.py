"""One read, many derivatives: a multi-target run gives each target the bytes of its single run, reads
the source once, and resumes after a kill -9 to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import output_digests

from cli.main import main
from llama4_quant import checkpoint, outputs
from llama4_quant.derive import derive
from llama4_quant.model import open_model
from llama4_quant.sources import resolve
from llama4_quant.tiny_models import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
SCHEMES, GGUF_TYPES = ("int4", "fp8"), ("Q4_K_M", "Q8_0")


digest_output = output_digests().digest_output


def l4q(*args: str):
    return CliRunner().invoke(main, [*args, "--quiet"])


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> dict[str, str]:
    """Digests of each target written by its own run (small shards, so resume has something to skip)."""
    work = tmp_path_factory.mktemp("single")
    digests = {}
    for scheme in SCHEMES:
        out = work / scheme
        assert l4q("quantize", "--model", "tiny", "--to", scheme, "--max-shard-size", "1MB", "--out", str(out)).exit_code == 0
        digests[scheme] = digest_output(out)
    for ftype in GGUF_TYPES:
        out = work / f"{ftype}.gguf"
        assert l4q("export", "gguf", "tiny", "--type", ftype, "--out", str(out)).exit_code == 0
        digests[ftype] = digest_output(out)
    return digests


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


def target_lists(out_dir: Path):
    """(name, output) of each target, named as the CLI names them."""
    return [(s, out_dir / f"tiny-{s}") for s in SCHEMES], [(t, out_dir / f"tiny-{t}.gguf") for t in GGUF_TYPES]


def test_one_read_gives_every_target_its_single_run_bytes(single_runs, tmp_path):
    model = open_model(resolve("tiny"))
    model.fingerprint()  # resume fingerprints are a few samples per tensor: counted apart from the walk
    before = checkpoint.bytes_read()
    schemes, ggufs = target_lists(tmp_path)
    done, read, _ = derive(model, schemes, ggufs, max_shard_size=1_000_000, show_progress=False)
    assert checkpoint.bytes_read() - before == read == model.ckpt.total_bytes  # every byte, once
    assert [d.out for d in done] == [out for _, out in schemes + ggufs]
    for name, out in schemes + ggufs:
        assert digest_output(out) == single_runs[name], name


def test_the_cli_writes_several_targets_by_default_names(single_runs, tmp_path):
    args = ["quantize", "--model", "tiny", "--max-shard-size", "1MB", "--out-dir", str(tmp_path)]
    for s in SCHEMES:
        args += ["--to", s]
    for t in GGUF_TYPES:
        args += ["--gguf", t]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "read" in result.output and "once for 4 outputs" in result.output
    assert digest_output(tmp_path / "tiny-int4") == single_runs["int4"]
    assert digest_output(tmp_path / "tiny-Q4_K_M.gguf") == single_runs["Q4_K_M"]


KILLER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from llama4_quant import derive, walk
    from llama4_quant.formats.gguf_budget import Budget
    from llama4_quant.formats.gguf_types import FILE_TYPES
    from llama4_quant.model import open_model
    from llama4_quant.sources import resolve

    source, out, kill_after, targets = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # --target-bpw, --imatrix, --mmproj
    real_walk, seen = walk.walk, [0]

    def dying_walk(model, targets, progress=lambda n: None):
        def count(n):
            seen[0] += 1
            if seen[0] == kill_after:
                os._exit(9)  # as kill -9: no cleanup, no flush of Python buffers
            progress(n)
        return real_walk(model, targets, count)

    walk.walk = dying_walk
    model = open_model(resolve(source))
    name = Path(model.source.label).name
    schemes = [(t, out / f"{name}-{t}") for t in targets if t not in FILE_TYPES]
    ggufs = [(t, out / f"{name}-{t}.gguf") for t in targets if t in FILE_TYPES]
    options = {}
    if "bpw" in extra:
        options["gguf_budget"] = Budget(bpw=extra["bpw"])
    if "calib" in extra:
        options["calib"] = Path(extra["calib"])
    if "mmproj" in extra:
        options["mmproj"] = ("F16", out / extra["mmproj"])
    derive.derive(model, schemes, ggufs, max_shard_size=1_000_000, show_progress=False, **options)
""")


def killed_run(source: str, out_dir: Path, kill_after: int, targets: list[str], extra: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, source, str(out_dir), str(kill_after), ",".join(targets),
                           json.dumps(extra or {})], cwd=ROOT)
    assert proc.returncode == 9


@pytest.mark.parametrize("kill_after", [3, 120])
def test_resume_after_kill_9_gives_the_same_bytes(single_runs, tmp_path, kill_after):
    killed_run("tiny", tmp_path, kill_after, [*SCHEMES, *GGUF_TYPES])
    schemes, ggufs = target_lists(tmp_path)
    for _, out in schemes + ggufs:
        assert not out.exists() and outputs.partial_path(out).is_dir()  # nothing that looks complete
    if kill_after == 120:  # far enough for finished shards and tensors that resume must not redo
        progress = json.loads((outputs.partial_path(tmp_path / "tiny-int4") / outputs.PROGRESS_NAME).read_text())
        assert progress["done"]
    every = ["quantize", "--model", "tiny", "--to", "int4", "--to", "fp8", "--gguf", "Q4_K_M", "--gguf", "Q8_0",
             "--max-shard-size", "1MB", "--out-dir", str(tmp_path), "--resume"]
    # Other options for the compressed-tensors targets: refused before any partial is touched.
    partials = {out: tree_digest(outputs.partial_path(out)) for _, out in schemes + ggufs}
    result = l4q(*every, "--quantize-attention")
    assert result.exit_code == 1 and "started from another source or with other options" in result.stderr
    assert partials == {out: tree_digest(outputs.partial_path(out)) for _, out in schemes + ggufs}
    result = l4q(*every)
    assert result.exit_code == 0, result.stderr
    for name, out in schemes + ggufs:
        assert digest_output(out) == single_runs[name], name


def test_a_bad_target_stops_the_run_before_anything_is_written(tmp_path):
    (tmp_path / "tiny-Q8_0.gguf").write_bytes(b"someone else's file")
    result = l4q("quantize", "--model", "tiny", "--to", "int4", "--gguf", "Q8_0", "--out-dir", str(tmp_path))
    assert result.exit_code == 1 and result.stderr.startswith("l4q: error:") and "already exists" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-Q8_0.gguf"]
    result = l4q("quantize", "--model", "tiny", "--to", "int4", "--gguf", "Q8_0", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "--out-dir" in result.stderr


def test_tensors_read_in_many_row_blocks_give_the_same_bytes(monkeypatch, tmp_path):
    """Scout's embeddings arrive in blocks of rows (64 MiB each); with blocks of 8 rows here, the
    copies and the GGUF rows of tiny must still come out as recorded."""
    monkeypatch.setattr(checkpoint, "ROW_BLOCK_BYTES", 4096)
    recorded = json.loads((ROOT / "tests" / "data" / "output_digests.json").read_text())
    model = open_model(resolve("tiny"))
    derive(model, [("int4", tmp_path / "tiny-int4-rtn")], [("Q4_K_M", tmp_path / "tiny-Q4_K_M.gguf")], show_progress=False)
    for name in ("tiny-int4-rtn", "tiny-Q4_K_M.gguf"):
        assert digest_output(tmp_path / name) == recorded[name], name


def test_a_gguf_resumes_only_under_the_same_header(tmp_path):
    """The header fixes every tensor's offset: a source whose metadata changed (here its chat
    template) must not have its finished tensors reused at shifted places."""
    src = Path(shutil.copytree(tiny_model_dir(), tmp_path / "src", copy_function=os.link))
    killed_run(str(src), tmp_path, 60, ["Q8_0"])
    out = tmp_path / "src-Q8_0.gguf"
    assert json.loads((outputs.partial_path(out) / outputs.PROGRESS_NAME).read_text())["done"]
    config = src / "tokenizer_config.json"
    edited = {**json.loads(config.read_text()), "chat_template": "{{ messages }}"}
    config.unlink()  # a hard link to the embedded model: replace it, do not write through it
    config.write_text(json.dumps(edited))
    result = l4q("export", "gguf", str(src), "--type", "Q8_0", "--out", str(out), "--resume")
    assert result.exit_code == 1 and "started from another source or with other options" in result.stderr
    result = l4q("export", "gguf", str(src), "--type", "Q8_0", "--out", str(out), "--resume", "--overwrite")
    assert result.exit_code == 0 and out.is_file() and not outputs.partial_path(out).exists()


def test_target_bpw_and_mmproj_resume_after_kill_9_to_the_same_bytes(tmp_path):
    """The size-targeted choice is the same on the rerun (so the partial's fingerprint holds), and the
    mmproj resumes as the text GGUF does."""
    stats = ROOT / "tests" / "data" / "stats" / "tiny"
    options = ["--imatrix", str(stats), "--target-bpw", "4", "--mmproj", "--quiet"]
    whole = tmp_path / "whole"
    result = l4q("export", "gguf", "tiny", "--out", str(whole / "tiny-Q4_K_M.gguf"), *options)
    assert result.exit_code == 0, result.stderr
    killed = tmp_path / "killed"
    killed.mkdir()
    killed_run("tiny", killed, 40, ["Q4_K_M"], {"bpw": 4, "calib": str(stats), "mmproj": "mmproj-tiny-F16.gguf"})
    assert not (killed / "tiny-Q4_K_M.gguf").exists()
    assert json.loads((outputs.partial_path(killed / "tiny-Q4_K_M.gguf") / outputs.PROGRESS_NAME).read_text())["done"]
    result = l4q("export", "gguf", "tiny", "--out", str(killed / "tiny-Q4_K_M.gguf"), "--resume", *options)
    assert result.exit_code == 0, result.stderr
    for name in ("tiny-Q4_K_M.gguf", "mmproj-tiny-F16.gguf"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
