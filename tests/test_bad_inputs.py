"""Every command that takes a model, against every kind of broken model and unwritable output.

Each cell must end the same way: exit status 1, exactly one `l4q: error:` line on stderr, no
traceback, and nothing under the output's name (an interrupted partial may stay only where the
command can resume it). The broken models are hard-linked copies of `tiny` (and `tiny-maverick` for
the dense MLP) with one file replaced, so building them costs little.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import SCHEME_NAMES, main
from llama4_quant.checkpoint import Checkpoint
from llama4_quant.sources import resolve
from llama4_quant.tiny_models import tiny_maverick_dir, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
PREFIX = "language_model."


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy whose files are hard links: replace a file (never edit it in place) to damage it."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def edit_config(model: Path, edit) -> None:
    config = json.loads((model / "config.json").read_text())
    edit(config["text_config"])
    replace_file(model / "config.json", json.dumps(config).encode())


def first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


def rewrite_header(shard: Path, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    replace_file(shard, struct.pack("<Q", len(text)) + text + raw[8 + n :])


def poison(model: Path, tensor: str, value: bytes) -> None:
    """Write one BF16 NaN or Inf into `tensor`, in a replaced copy of its shard."""
    info = Checkpoint(model).by_name[tensor]
    raw = bytearray(info.file.read_bytes())
    at = info.offset + 2 * (info.nbytes // 4)  # a quarter in: inside some expert for fused tensors
    raw[at : at + 2] = value
    replace_file(info.file, bytes(raw))


def edit_index(model: Path, edit) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    replace_file(model / "model.safetensors.index.json", json.dumps(index).encode())


def rename_shard_in_index(model: Path, new_name: str) -> None:
    old = first_shard(model).name
    edit_index(model, lambda wm: wm.update({k: new_name for k, v in wm.items() if v == old}))


def outside_shard(model: Path) -> None:
    outside = model.parent / "elsewhere.safetensors"
    shutil.copyfile(first_shard(model), outside)
    rename_shard_in_index(model, "../elsewhere.safetensors")


def symlinked_shard(model: Path, target: str) -> None:
    shard = first_shard(model)
    shard.unlink()
    shard.symlink_to(target)


NAN, INF = b"\xc0\x7f", b"\x80\x7f"
ROLE_TENSORS = {  # role -> (model, tensor)
    "embed": ("tiny", "model.embed_tokens.weight"),
    "lm_head": ("tiny", "lm_head.weight"),
    "norm": ("tiny", "model.layers.1.input_layernorm.weight"),
    "attention": ("tiny", "model.layers.2.self_attn.k_proj.weight"),
    "router": ("tiny", "model.layers.1.feed_forward.router.weight"),
    "experts_gate_up": ("tiny", "model.layers.3.feed_forward.experts.gate_up_proj"),
    "experts_down": ("tiny", "model.layers.0.feed_forward.experts.down_proj"),
    "shared_expert": ("tiny", "model.layers.2.feed_forward.shared_expert.up_proj.weight"),
    "dense_mlp": ("tiny-maverick", "model.layers.0.feed_forward.down_proj.weight"),
}

# name -> (base model, damage); a damage of None means the model directory does not exist.
BAD_MODELS = {
    "missing path": ("tiny", None),
    "empty dir": ("tiny", lambda m: [p.unlink() for p in m.iterdir()]),
    "non-Llama-4 config": ("tiny", lambda m: replace_file(m / "config.json", b'{"model_type": "llama", "hidden_size": 8}')),
    "invalid JSON config": ("tiny", lambda m: replace_file(m / "config.json", b'{"model_type": "llama4", ')),
    "truncated shard": ("tiny", lambda m: replace_file(first_shard(m), first_shard(m).read_bytes()[:-4096])),
    "corrupt shard header": ("tiny", lambda m: replace_file(first_shard(m), first_shard(m).read_bytes()[:12] + b"\xff" * 20 + first_shard(m).read_bytes()[32:])),
    "oversized header": ("tiny", lambda m: replace_file(first_shard(m), struct.pack("<Q", 2**62) + first_shard(m).read_bytes()[8:])),
    "string offsets": ("tiny", lambda m: rewrite_header(first_shard(m), lambda h: [
        e.update(data_offsets=[str(o) for o in e["data_offsets"]]) for k, e in h.items() if k != "__metadata__"])),
    "float offsets": ("tiny", lambda m: rewrite_header(first_shard(m), lambda h: [
        e.update(data_offsets=[float(o) for o in e["data_offsets"]]) for k, e in h.items() if k != "__metadata__"])),
    "index names a missing shard": ("tiny", lambda m: rename_shard_in_index(m, "model-00009-of-00009.safetensors")),
    "index names a shard outside": ("tiny", outside_shard),
    "index names /etc/passwd": ("tiny", lambda m: rename_shard_in_index(m, "/etc/passwd")),
    "shape mismatch": ("tiny", lambda m: edit_config(m, lambda t: t.update(intermediate_size=t["intermediate_size"] * 2))),
    "expert count mismatch": ("tiny", lambda m: edit_config(m, lambda t: t.update(num_local_experts=t["num_local_experts"] + 1))),
    "dangling shard symlink": ("tiny", lambda m: symlinked_shard(m, "nowhere.safetensors")),
    "looping shard symlink": ("tiny", lambda m: symlinked_shard(m, first_shard(m).name)),
    **{f"{'NaN' if i % 2 == 0 else 'Inf'} in {role}": (model, lambda m, t=tensor, v=(NAN if i % 2 == 0 else INF): poison(m, PREFIX + t, v))
       for i, (role, (model, tensor)) in enumerate(ROLE_TENSORS.items())},
}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    bases = {"tiny": tiny_model_dir(), "tiny-maverick": tiny_maverick_dir()}
    models = {}
    for i, (name, (base, damage)) in enumerate(BAD_MODELS.items()):
        model = root / f"case{i:02d}" / "model"
        model.parent.mkdir()
        if damage is not None:
            linked_copy(bases[base], model)
            damage(model)
        models[name] = model
    return models


def command(name: str, model: Path, tmp: Path, partner: str = "tiny") -> tuple[list[str], Path | None]:
    """(arguments, the output that must not appear) for one command run on `model`; eval compares it
    with `partner`, a sound model of the same architecture."""
    out = tmp / "out"
    return {
        "quantize": (["quantize", "--model", str(model), "--to", "int8", "--out", str(out)], out),
        "export gguf": (["export", "gguf", str(model), "--type", "Q8_0", "--out", str(out)], out),
        "calibrate": (["calibrate", str(model), "--out", str(out), "--samples", "2", "--seq-len", "32",
                       "--device", "cpu"], out),
        "eval base": (["eval", "--base", str(model), "--candidate", str(resolve(partner).path), "--ctx", "64",
                       "--max-tokens", "128", "--report", str(out)], out / "report.json"),
        "eval candidate": (["eval", "--base", partner, "--candidate", str(model), "--ctx", "64", "--max-tokens", "128",
                            "--report", str(out)], out / "report.json"),
        "inspect": (["inspect", str(model), "--check-values"], None),
        "dedup": (["dedup", str(model), "--store", str(tmp / "store")], None),
        "push": (["push", str(model), "--repo", "someone/model", "--dry-run", "--store", str(tmp / "store")], None),
    }[name]


COMMANDS = ("quantize", "export gguf", "calibrate", "eval base", "eval candidate", "inspect", "dedup", "push")


def assert_one_line_failure(exit_code: int, stderr: str, out: Path | None) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("l4q: error:"), stderr
    if out is not None:
        assert not out.exists(), f"{out} exists after a failure"


@pytest.mark.parametrize("case", list(BAD_MODELS))
@pytest.mark.parametrize("cmd", COMMANDS)
def test_bad_model(cmd, case, bad_models, tmp_path):
    args, out = command(cmd, bad_models[case], tmp_path, partner=BAD_MODELS[case][0])
    result = CliRunner().invoke(main, [*args, "--quiet"] if cmd != "inspect" else args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_one_line_failure(result.exit_code, result.stderr, out)
    if out is not None and cmd in ("quantize", "export gguf", "calibrate"):
        assert not out.with_name(out.name + ".l4q-partial").exists(), "bad input left a partial behind"


POISONED = {  # the tensor poisoned by `poison` -> the weight its NaN/Inf lands in (tiny: 16 experts)
    "experts_gate_up": "model.layers.3.feed_forward.experts.8.gate_proj.weight",
    "experts_down": "model.layers.0.feed_forward.experts.8.down_proj.weight",
    "shared_expert": "model.layers.2.feed_forward.shared_expert.up_proj.weight",
}


FINDERS = {  # output type -> whether its encoder finds NaN/Inf itself (then the walk's reader does not look)
    "int4": True, "int8": True, "fp8": True, "fp8-block": True, "mxfp4a16": False, "Q8_0": True, "Q4_K_M": True,
}


@pytest.mark.parametrize("job", list(FINDERS))
@pytest.mark.parametrize("role", list(POISONED))
def test_non_finite_weight_is_named_by_who_finds_it(job, role, bad_models, tmp_path, monkeypatch):
    """int4, int8, the fp8 schemes and the GGUF block types find NaN/Inf in their own passes over a
    weight, so the walk's reader does not look first: the error then names the weight (an expert's
    projection), not the fused tensor's slice. Every other weight (here mxfp4a16's; the copies in
    `test_bad_model`) is still checked by the reader, and every error counts the values."""
    from llama4_quant import pipeline, schemes
    from llama4_quant.formats import gguf

    checked = []
    original = schemes.check_finite
    for module in (schemes, pipeline, gguf):  # the walk's reader, and the targets naming what they refused
        monkeypatch.setattr(module, "check_finite", lambda w, name: (checked.append(name), original(w, name)))
    case = f"{'NaN' if list(ROLE_TENSORS).index(role) % 2 == 0 else 'Inf'} in {role}"
    out = tmp_path / "out"
    model = str(bad_models[case])
    args = ["quantize", "--model", model, "--to", job] if job in SCHEME_NAMES else ["export", "gguf", model, "--type", job]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--quiet"])
    assert_one_line_failure(result.exit_code, result.stderr, out)
    assert not out.with_name(out.name + ".l4q-partial").exists(), "bad input left a partial behind"
    stored = PREFIX + ROLE_TENSORS[role][1]
    mlp = [name for name in checked if ".feed_forward." in name and "proj" in name]  # the quantized weights
    if FINDERS[job]:  # the reader passed over no quantized weight; the target counted the one it refused
        where = PREFIX + POISONED[role]
        assert mlp == [where], mlp
    else:
        assert len(mlp) > 1
        where = f"{stored}[8]" if "experts." in stored else stored
    assert result.stderr.strip() == f"l4q: error: {where}: 1 non-finite values (NaN/Inf) in the source weight"


def test_no_file_outside_the_model_is_opened(bad_models, tmp_path):
    """The error for an index naming /etc/passwd echoes nothing read from it."""
    args, _ = command("inspect", bad_models["index names /etc/passwd"], tmp_path)
    result = CliRunner().invoke(main, args)
    assert "outside the model directory" in result.stderr and "root:x" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Unwritable outputs: a tiny tmpfs (disk full) and a read-only mount, in a private mount namespace


WRITERS = {
    "quantize": lambda out: ["quantize", "--model", "tiny", "--to", "int8", "--out", f"{out}/x"],
    "export gguf": lambda out: ["export", "gguf", "tiny", "--type", "Q8_0", "--out", f"{out}/x.gguf"],
    "calibrate": lambda out: ["calibrate", "tiny", "--out", f"{out}/x", "--samples", "2", "--seq-len", "32", "--device", "cpu"],
    "eval": lambda out: ["eval", "--base", "tiny", "--candidate", str(tiny_model_dir()), "--ctx", "64", "--max-tokens",
                         "128", "--report", f"{out}/x"],
    "dedup": lambda out: ["dedup", str(tiny_model_dir()), "--store", f"{out}/x"],
    "push": lambda out: ["push", str(tiny_model_dir()), "--repo", "someone/model", "--dry-run", "--store", f"{out}/x"],
}
MOUNTS = {
    "disk full": "mount -t tmpfs -o size=16k tmpfs {dir}",
    "read-only": "mount -t tmpfs -o size=1m tmpfs {dir} && mount -o remount,ro {dir}",
}


def in_namespace(mount: str, directory: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run l4q with `directory` mounted as `mount` says; returns the result and what the mount held after."""
    script = (f"{mount.format(dir=directory)} || exit 99; {sys.executable} -m cli.main \"$@\"; rc=$?; "
              f"echo @@; cd {directory} && find . -mindepth 1; exit $rc")
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    return result, [p.removeprefix("./") for p in result.stdout.rpartition("@@")[2].split()]


def test_namespaces_work_here(tmp_path):
    """The unwritable-output tests need unprivileged mount namespaces; fail loudly, not skip, without them."""
    probe, _ = in_namespace(MOUNTS["read-only"], tmp_path, ["--version"])
    assert probe.returncode == 0, f"unshare/mount unavailable: {probe.stderr}"


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("cmd", WRITERS)
def test_unwritable_output(cmd, mount, tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    result, left = in_namespace(MOUNTS[mount], target, [*WRITERS[cmd](target), "--quiet"])
    assert_one_line_failure(result.returncode, result.stderr, None)
    assert any(w in result.stderr for w in ("cannot write", "No space left", "Read-only")), result.stderr
    complete = {"quantize": "x", "export gguf": "x.gguf", "calibrate": "x", "eval": "x/report.json"}.get(cmd)
    assert complete not in left, left  # nothing under the output's own name
    assert not [p for p in left if p.endswith((".tmp", ".header"))], left  # no half-written scratch files


def test_disk_full_keeps_a_resumable_partial(tmp_path):
    """Out of space mid-run: one line, the partial stays (named as partial) and says to --resume."""
    target = tmp_path / "mnt"
    target.mkdir()
    script = (f"mount -t tmpfs -o size=6m tmpfs {target} && {sys.executable} -m cli.main quantize --model tiny --to int8 "
              f"--out {target}/x --max-shard-size 4MB --quiet; echo rc=$?; ls -a {target} {target}/x.l4q-partial")
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert "rc=1" in result.stdout and "--resume" in result.stderr, result.stderr
    listing = result.stdout.split()
    assert "x" not in listing and "x.l4q-partial" in listing and ".l4q-progress.json" in listing


# ---------------------------------------------------------------------------------------------
# Options


BAD_OPTIONS = {
    "max shard size 5iB": ["quantize", "--model", "tiny", "--to", "int4", "--max-shard-size", "5iB"],
    "max shard size 0": ["quantize", "--model", "tiny", "--to", "int4", "--max-shard-size", "0"],
    "out under /proc": ["quantize", "--model", "tiny", "--to", "int4", "--out", "/proc/l4q-test/x"],
    "ignore (": ["quantize", "--model", "tiny", "--to", "int4", "--ignore", "("],
    "device garbage": ["quantize", "--model", "tiny", "--to", "int4", "--device", "garbage"],
    "device meta": ["quantize", "--model", "tiny", "--to", "int4", "--device", "meta"],
    "model ~nonexist": ["quantize", "--model", "~nonexist-user-l4q/x", "--to", "int4"],
    "eval ctx 1": ["eval", "--base", "tiny", "--candidate", "x", "--ctx", "1"],
    "eval ctx -5": ["eval", "--base", "tiny", "--candidate", "x", "--ctx", "-5"],
    "eval ctx 0": ["eval", "--base", "tiny", "--candidate", "x", "--ctx", "0"],
    "eval max tokens 0": ["eval", "--base", "tiny", "--candidate", "x", "--max-tokens", "0"],
    "eval max tokens -5": ["eval", "--base", "tiny", "--candidate", "x", "--max-tokens", "-5"],
    "eval device meta": ["eval", "--base", "tiny", "--candidate", "tiny", "--device", "meta", "--report", "{tmp}/r"],
    "calibrate device garbage": ["calibrate", "tiny", "--out", "{tmp}/s", "--device", "garbage"],
    "gguf device garbage": ["export", "gguf", "tiny", "--out", "{tmp}/x.gguf", "--device", "garbage"],
    "split experts": ["quantize", "--model", "tiny", "--to", "int4", "--ignore", ".*experts\\.0\\..*"],
    "split q/k/v": ["quantize", "--model", "tiny", "--to", "int4", "--quantize-attention", "--ignore", ".*q_proj"],
    "split shared gate/up": ["quantize", "--model", "tiny", "--to", "int4", "--ignore", ".*shared_expert\\.gate_proj"],
    "split dense gate/up": ["quantize", "--model", "tiny-maverick", "--to", "int4", "--ignore", ".*layers\\.0\\.feed_forward\\.up_proj"],
    "eval report is a file": ["eval", "--base", "tiny", "--candidate", "tiny", "--report", "{tmp}/file"],
    "non-UTF-8 data": ["calibrate", "tiny", "--out", "{tmp}/s", "--data", "{tmp}/latin1.txt"],
    "corrupt --calib": ["quantize", "--model", "tiny", "--to", "int4", "--method", "mse", "--calib", "{tmp}/badstats"],
    "corrupt --imatrix": ["export", "gguf", "tiny", "--imatrix", "{tmp}/badstats"],
    "corrupt gguf candidate": ["eval", "--base", "tiny", "--candidate", "{tmp}/bad.gguf", "--report", "{tmp}/r"],
    "empty gguf candidate": ["eval", "--base", "tiny", "--candidate", "{tmp}/empty.gguf", "--report", "{tmp}/r"],
    "truncated gguf candidate": ["eval", "--base", "tiny", "--candidate", "{tmp}/truncated.gguf", "--report", "{tmp}/r"],
    "bad --tensor-type regex": ["export", "gguf", "tiny", "--tensor-type", "ffn_(=Q4_K"],
    "bad --tensor-type type": ["export", "gguf", "tiny", "--tensor-type", "ffn_down=Q7_K"],
    "--tensor-type without =": ["export", "gguf", "tiny", "--tensor-type", "ffn_down"],
    "bad --output-tensor-type": ["export", "gguf", "tiny", "--output-tensor-type", "Q9"],
    "push repo a/..": ["push", "{tmp}", "--repo", "a/..", "--dry-run"],
    "push repo ../x": ["push", "{tmp}", "--repo", "../x", "--dry-run"],
    "push repo with space": ["push", "{tmp}", "--repo", "a b/c", "--dry-run"],
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(case, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 100)
    (tmp_path / "badstats").mkdir()
    for name in ("stats.json", "imatrix.safetensors", "tokens.safetensors"):
        (tmp_path / "badstats" / name).write_bytes(b"\x00garbage")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + os.urandom(64))
    (tmp_path / "empty.gguf").write_bytes(b"")
    if "truncated" in case:
        from llama4_quant.formats.gguf import export_gguf

        full = export_gguf(tiny_source(), tmp_path / "full.gguf", "Q8_0", show_progress=False).out
        (tmp_path / "truncated.gguf").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    args = [a.replace("{tmp}", str(tmp_path)) for a in BAD_OPTIONS[case]]
    if args[0] in ("quantize", "export", "calibrate") and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("l4q: error:"), result.stderr
    assert not (tmp_path / "out").exists()


def tiny_source():
    return resolve("tiny")


def test_size_units():
    from cli.main import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    assert parse_size("1.5 MB") == 1_500_000 and parse_size("512k") == 512_000 and parse_size("3TiB") == 3 * 2**40
    assert math.isclose(parse_size("0.5KiB"), 512)
