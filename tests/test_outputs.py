"""The output life cycle: what --overwrite may replace, the lock on a partial, resume fingerprints,
and that published files name no local path."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import output_digests

from cli.main import main
from llama4_quant import outputs, pipeline
from llama4_quant.checkpoint import Checkpoint
from llama4_quant.errors import OutputWriteError, ResumeMismatchError
from llama4_quant.sources import Source
from llama4_quant.tiny_models import tiny_model_dir


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def l4q(*args: str, cwd: Path | None = None, env: dict | None = None):
    old = Path.cwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner(env=env).invoke(main, [*args, "--quiet"])
    finally:
        os.chdir(old)


def assert_refused(result, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("l4q: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def workspace(small_model, tmp_path) -> dict[str, Path]:
    """A user's directory holding their own files and a copy of the source model."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    src = Path(shutil.copytree(small_model, home / "models" / "src"))
    return {"home": home, "src": src}


@pytest.mark.parametrize("target", ["cwd", "source", "parent of source", "home", "user dir", "source shard"])
def test_overwrite_refuses_dangerous_targets(workspace, target, tmp_path):
    home, src = workspace["home"], workspace["src"]
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    out = {"cwd": ".", "source": str(src), "parent of source": str(src.parent), "home": str(home),
           "user dir": str(user_dir), "source shard": str(sorted(src.glob("*.safetensors"))[0])}[target]
    before = tree_digest(tmp_path)
    result = l4q("quantize", "--model", str(src), "--to", "int8", "--out", out, "--overwrite", cwd=home,
                 env={"HOME": str(home)})
    assert_refused(result, "refusing to overwrite")
    if target == "source shard":  # the GGUF export onto a shard of its own source
        result = l4q("export", "gguf", str(src), "--type", "Q8_0", "--out", out, "--overwrite", cwd=home)
        assert_refused(result, "refusing to overwrite", "source")
    assert tree_digest(tmp_path) == before  # nothing touched, nothing left behind


def test_overwrite_replaces_only_l4q_outputs(small_model, tmp_path):
    out = tmp_path / "out"
    assert l4q("quantize", "--model", str(small_model), "--to", "int8", "--out", str(out)).exit_code == 0
    first = tree_digest(out)
    result = l4q("quantize", "--model", str(small_model), "--to", "fp8", "--out", str(out))
    assert_refused(result, "already exists")
    assert l4q("quantize", "--model", str(small_model), "--to", "fp8", "--out", str(out), "--overwrite").exit_code == 0
    assert tree_digest(out) != first and json.loads((out / "l4q_recipe.json").read_text())["scheme"] == "fp8"
    # A GGUF file written by l4q may be replaced; a directory in its place may not.
    gguf = tmp_path / "m.gguf"
    assert l4q("export", "gguf", "tiny", "--type", "Q8_0", "--out", str(gguf)).exit_code == 0
    assert l4q("export", "gguf", "tiny", "--type", "Q8_0", "--out", str(gguf), "--overwrite").exit_code == 0
    result = l4q("export", "gguf", "tiny", "--type", "Q8_0", "--out", str(out), "--overwrite")
    assert_refused(result, "is a directory")
    assert not outputs.partial_path(out).exists()
    # A foreign file with the .gguf suffix is not l4q's.
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF not ours")
    assert_refused(l4q("export", "gguf", "tiny", "--out", str(foreign), "--overwrite"), "did not write it")
    assert foreign.read_bytes() == b"GGUF not ours"


def test_a_live_run_locks_its_partial(small_model, tmp_path):
    out = tmp_path / "out"
    partial = outputs.partial_path(out)
    partial.mkdir()
    (partial / outputs.PROGRESS_NAME).write_text("{}")
    with open(partial / outputs.LOCK_NAME, "a+") as lock:  # what a running l4q holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for flag in ("--resume", "--overwrite"):
            result = l4q("quantize", "--model", str(small_model), "--to", "int8", "--out", str(out), flag)
            assert_refused(result, "another l4q process is writing")
        assert (partial / outputs.PROGRESS_NAME).read_text() == "{}"
    # Once the other process is gone, --overwrite starts over.
    assert l4q("quantize", "--model", str(small_model), "--to", "int8", "--out", str(out), "--overwrite").exit_code == 0
    assert not partial.exists() and (out / "config.json").is_file()


def test_resume_notices_a_source_changed_in_place(model_copy, tmp_path):
    """A tensor re-saved with new values and the old mtime restored: --resume must refuse. A mere
    touch (new mtime, same bytes) must not matter: the fingerprint is of the content."""
    out = tmp_path / "out"
    src = Source(model_copy, model_copy.name)
    pipeline.quantize(src, out, "int8", max_shard_size=2_000_000, show_progress=False)
    fingerprint = _fingerprint_of(model_copy)
    for shard in model_copy.glob("*.safetensors"):
        os.utime(shard)
    assert _fingerprint_of(model_copy) == fingerprint
    # Make the finished output an interrupted one again, as a kill before the move would leave it.
    partial = outputs.partial_path(out)
    os.replace(out, partial)
    (partial / outputs.PROGRESS_NAME).write_text(json.dumps({"fingerprint": fingerprint, "done": []}))
    info = Checkpoint(model_copy).by_name["language_model.model.layers.1.self_attn.q_proj.weight"]
    stat = info.file.stat()
    with open(info.file, "r+b") as f:  # new values throughout the tensor, as a re-saved fine-tune has
        f.seek(info.offset)
        f.write(bytes(info.nbytes))
    os.utime(info.file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert info.file.stat().st_mtime_ns == stat.st_mtime_ns and info.file.stat().st_size == stat.st_size
    with pytest.raises(ResumeMismatchError):
        pipeline.quantize(src, out, "int8", max_shard_size=2_000_000, resume=True, show_progress=False)


def _fingerprint_of(model_dir: Path) -> str:
    from llama4_quant.formats import compressed_tensors as ct
    from llama4_quant.model import open_model

    model = open_model(Source(model_dir, model_dir.name))
    plan = pipeline.build_plan(model, ct.get_scheme("int8"), pipeline.ignore_patterns(), 2_000_000)
    plan.method = "rtn"
    return plan.fingerprint(model.fingerprint())


def test_published_files_name_no_local_path(tmp_path):
    src = Path(shutil.copytree(tiny_model_dir(), tmp_path / "private-place" / "my-tiny", copy_function=os.link))
    out, gguf, stats = tmp_path / "q", tmp_path / "m.gguf", tmp_path / "stats"
    assert l4q("quantize", "--model", str(src), "--to", "int4", "--out", str(out)).exit_code == 0
    assert l4q("export", "gguf", str(src), "--type", "Q8_0", "--out", str(gguf)).exit_code == 0
    assert l4q("calibrate", str(src), "--out", str(stats), "--samples", "2", "--seq-len", "32", "--device", "cpu").exit_code == 0
    for published in (out / "l4q_recipe.json", stats / "stats.json", stats / "report.md"):
        text = published.read_text()
        assert "private-place" not in text and "my-tiny" in text, published
    assert json.loads((out / "l4q_recipe.json").read_text())["source"] == "my-tiny"
    assert b"private-place" not in gguf.read_bytes()


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_attention_stays_bf16_by_default(small_model, tmp_path, scheme):
    default, opted = tmp_path / "default", tmp_path / "opted"
    assert l4q("quantize", "--model", str(small_model), "--to", scheme, "--out", str(default)).exit_code == 0
    result = CliRunner().invoke(main, ["quantize", "--model", str(small_model), "--to", scheme, "--out", str(opted),
                                       "--quantize-attention", "--quiet"])
    assert result.exit_code == 0 and "l4q: warning:" in result.stderr and "vLLM" in result.stderr
    names = set(json.loads((default / "model.safetensors.index.json").read_text())["weight_map"])
    q = "language_model.model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" in names and f"{q}.weight_scale" not in names
    config = json.loads((default / "config.json").read_text())
    assert "re:" + pipeline.ATTENTION_IGNORE in config["quantization_config"]["ignore"]
    opted_names = set(json.loads((opted / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"{q}.weight_scale" in opted_names
    recipe = json.loads((opted / "l4q_recipe.json").read_text())
    assert recipe["quantized_attention"] is True and "0.17.0" in recipe["minimum_vllm"]


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_every_output_has_its_recorded_bytes(model, tmp_path):
    """Every cell of scripts/output_digests.py's matrix (statistics, every scheme with rtn, mse,
    calibrated mse and gptq, quantized attention, every GGUF type, the imatrix-searched K-quants)
    gives the bytes recorded in tests/data/output_digests.json. Statistics and GPTQ come from this
    CPU's matmuls: they are compared where the CPU is of the recorded kind, and run everywhere."""
    digests = output_digests()
    recorded = json.loads((Path(__file__).parent / "data" / "output_digests.json").read_text())
    same_cpu = recorded["cpu"] == digests.cpu_signature()
    wrong = []
    for name, args in digests.runs(tmp_path):
        if not name.startswith(f"{model}-") or name.startswith("tiny-maverick-") != (model == "tiny-maverick"):
            continue
        result = l4q(*args)
        assert result.exit_code == 0, f"{name}: {result.stderr}"
        if (same_cpu or not digests.cpu_dependent(name)) and digests.digest_output(tmp_path / name) != recorded[name]:
            wrong.append(name)
    assert not wrong, f"outputs whose bytes changed: {wrong}"


def test_push_refuses_a_symlink_leaving_the_derivative(tmp_path):
    out = tmp_path / "tiny-int8"
    assert l4q("quantize", "--model", "tiny", "--to", "int8", "--out", str(out)).exit_code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (out / "notes.txt").symlink_to(secret)
    for args in (["push", str(out), "--repo", "someone/tiny-int8", "--dry-run"], ["dedup", str(out)]):
        result = l4q(*args, "--store", str(tmp_path / "store"))
        assert_refused(result, "outside")
    (out / "notes.txt").unlink()
    (out / "inside.txt").symlink_to(out / "config.json")  # a link within the directory is fine
    result = l4q("push", str(out), "--repo", "someone/tiny-int8", "--dry-run", "--store", str(tmp_path / "store"))
    assert result.exit_code == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Writing past the page cache


@pytest.mark.parametrize("direct", ["used", "refused at open", "refused at write"])
def test_file_writer_puts_every_byte_in_place(tmp_path, monkeypatch, direct):
    """Runs of every length and alignment, crossing the stage's size, out of order, with holes, with
    copies from a file and a callable between them: the file holds exactly the bytes handed over,
    and a callable sees every byte handed over before it, whether O_DIRECT can be used or not."""
    import random

    real_open, real_pwrite, direct_fds = os.open, os.pwrite, set()

    def open_(path, flags, *args):
        if flags & os.O_DIRECT and direct == "refused at open":
            raise OSError(22, "Invalid argument")
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def pwrite(fd, data, at):
        if fd in direct_fds and direct == "refused at write":
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    stage, rng = outputs.DIRECT_STAGE, random.Random(0)
    size = 3 * stage + 12345
    expected = bytearray(size)
    source = tmp_path / "source.bin"
    source.write_bytes(rng.randbytes(stage + 5000))
    path = tmp_path / "out.bin"
    f = open(path, "wb")
    f.write(rng.randbytes(1000))  # a header, written through the file object
    f.flush()
    expected[:1000] = path.read_bytes()
    writer = outputs.FileWriter(f.fileno(), path, path=path)
    seen = []

    def put(at: int, n: int) -> None:
        data = rng.randbytes(n)
        expected[at:at + n] = data
        writer.write(data, at)

    at = 1000
    for n in (1, 4095, 4097, 3 << 20, stage + 7, 2):  # one run, crossing the stage's end
        put(at, n)
        at += n
    hole = at  # filled later by a copy, as lm_head's is
    at += stage + 100
    put(at + 3 * 4096 + 17, 5000)  # out of order: the run after it comes second
    put(at, 3 * 4096 + 17)
    writer.copy(source, 333, stage + 100, hole)
    expected[hole:hole + stage + 100] = source.read_bytes()[333:333 + stage + 100]
    writer.then(lambda upto=at + 3 * 4096 + 17 + 5000: seen.append(path.read_bytes()[:upto]))
    put(size - 10, 10)  # a run inside one block, past a hole that stays zeros
    writer.close()
    f.close()
    assert path.read_bytes() == bytes(expected)
    assert seen == [bytes(expected[:len(seen[0])])]
    if direct == "used":
        assert writer.direct.direct_bytes > 2 * stage  # the whole blocks of the runs and the copy
    else:
        assert writer.direct is None or writer.direct.direct_bytes == 0


def test_file_writer_failing_past_the_page_cache_raises_one_line(tmp_path, monkeypatch):
    """A full disk while writing directly: OutputWriteError from `close`, nothing raised on the
    writer's thread besides."""
    import errno
    import threading

    real_open, real_pwrite, direct_fds, thread_errors = os.open, os.pwrite, set(), []

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def pwrite(fd, data, at):
        if fd in direct_fds:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    path = tmp_path / "out.bin"
    with open(path, "wb") as f:
        writer = outputs.FileWriter(f.fileno(), path, path=path)
        assert writer.direct is not None
        writer.write(bytes(3 * outputs.DIRECT_STAGE), 0)
        with pytest.raises(OutputWriteError, match="No space left on device"):
            writer.close()
    assert not writer.thread.is_alive() and thread_errors == []
