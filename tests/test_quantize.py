"""End-to-end tests of the streaming quantizer on small synthetic checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cli.main import main
from llama4_quant import arch, pipeline, sources
from llama4_quant.checkpoint import Checkpoint, read_tensor
from llama4_quant.formats import compressed_tensors as ct
from llama4_quant.sources import Source

REPO = Path(__file__).resolve().parents[1]


def run_quantize(src: Path, out: Path, scheme: str, **kw) -> pipeline.QuantizeResult:
    kw.setdefault("max_shard_size", 2_000_000)
    return pipeline.quantize(Source(src, src.name), out, scheme, show_progress=False, **kw)


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def source_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every source Linear as [out, in] float64, experts unfused, keyed by module name."""
    ckpt = Checkpoint(src)
    spec = arch.spec_from_config(arch.load_config(src))
    weights = {}
    for info in ckpt.tensors:
        t = read_tensor(info).double()
        role = arch.classify(info.name, spec).role
        if role == arch.EXPERTS_GATE_UP:
            base, inter = info.name.removesuffix(".gate_up_proj"), t.shape[2] // 2
            for i in range(t.shape[0]):
                weights[f"{base}.{i}.gate_proj"] = t[i, :, :inter].T
                weights[f"{base}.{i}.up_proj"] = t[i, :, inter:].T
        elif role == arch.EXPERTS_DOWN:
            base = info.name.removesuffix(".down_proj")
            for i in range(t.shape[0]):
                weights[f"{base}.{i}.down_proj"] = t[i].T
        else:
            weights[info.name.removesuffix(".weight")] = t
    return weights


def rounding_bound(scheme: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The per-element error each scheme guarantees (see llama4_quant/schemes.py)."""
    s = scale.double()
    if scheme == "int4":
        s = s.repeat_interleave(w.shape[1] // s.shape[1], dim=1)
        return s / 2 * (1 + 1e-6)
    s = s.expand_as(w)
    if scheme == "int8":
        return s / 2 * (1 + 1e-6)
    return torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("model", ["small_model", "small_maverick"])
def test_every_tensor_within_rounding_bound(model, scheme, request, tmp_path):
    src = request.getfixturevalue(model)
    result = run_quantize(src, tmp_path / "out", scheme)
    out = load_all(tmp_path / "out")
    source_raw = {t.name: read_tensor(t) for t in Checkpoint(src).tensors}
    weights = source_weights(src)
    sch = ct.get_scheme(scheme)
    quantized = {n.rsplit(".", 1)[0] for n in out if n.endswith(".weight_scale")}
    assert len(quantized) == len(result.plan.quantized_modules())
    spec = arch.spec_from_config(arch.load_config(src))
    experts = spec.num_experts * len(spec.moe_layers) * 3
    assert sum(".experts." in m for m in quantized) == experts
    for module in quantized:
        parts = {n.rsplit(".", 1)[1]: t for n, t in out.items() if n.rsplit(".", 1)[0] == module}
        deq = sch.decode(parts).double()
        ref = weights[module]
        assert deq.shape == ref.shape, module
        assert torch.isfinite(deq).all()
        err = (deq - ref).abs()
        assert (err <= rounding_bound(scheme, ref, parts["weight_scale"])).all(), module
    # Everything else is copied byte for byte, in the source's dtype.
    for name, t in out.items():
        if name.rsplit(".", 1)[0] not in quantized:
            assert torch.equal(t.view(torch.uint8), source_raw[name].view(torch.uint8)), name
    for keep in ("router", "lm_head", "embed_tokens", "norm"):
        assert any(keep in n for n in out if n.rsplit(".", 1)[0] not in quantized)


def test_output_metadata(small_model, tmp_path):
    run_quantize(small_model, tmp_path / "out", "int4")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert "re:.*lm_head" in q["ignore"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_all(out).values()
    )
    assert not list(out.glob(".l4q*")) and not (out.parent / "out.l4q-partial").exists()


def test_expert_tensors_are_contiguous_and_in_source_order(small_model, tmp_path):
    run_quantize(small_model, tmp_path / "out", "int4")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    ckpt_order = []
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        raw = shard.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__")
        ckpt_order += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    assert set(ckpt_order) == set(index["weight_map"])
    expert_0 = [n for n in ckpt_order if ".layers.0.feed_forward.experts.0." in n]
    first = ckpt_order.index(expert_0[0])
    assert ckpt_order[first : first + len(expert_0)] == expert_0
    assert [n.split(".")[-2] for n in expert_0[::3]] == ["gate_proj", "up_proj", "down_proj"]


def test_shards_respect_max_size(small_model, tmp_path):
    result = run_quantize(small_model, tmp_path / "out", "int8", max_shard_size=1_000_000)
    largest_unit = max(u.output_bytes for u in result.plan.units)
    for shard in (tmp_path / "out").glob("*.safetensors"):
        assert shard.stat().st_size <= max(1_000_000, largest_unit) + 64 * 1024


def test_byte_identical_reruns(small_model, tmp_path):
    run_quantize(small_model, tmp_path / "a", "int4")
    run_quantize(small_model, tmp_path / "b", "int4")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_ignore_keeps_modules_bf16(small_model, tmp_path):
    run_quantize(small_model, tmp_path / "out", "int4", ignore=(".*shared_expert.*",))
    out = load_all(tmp_path / "out")
    assert not [n for n in out if "shared_expert" in n and n.endswith("weight_packed")]
    assert out["language_model.model.layers.0.feed_forward.shared_expert.up_proj.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "re:.*shared_expert.*" in config["quantization_config"]["ignore"]


@pytest.mark.parametrize("pattern", [".*experts\\.1\\.up_proj", ".*experts\\.[01]\\..*", ".*layers\\.2\\.self_attn\\.v_proj"])
def test_ignoring_part_of_a_fused_group_is_refused(small_model, tmp_path, pattern):
    from llama4_quant.errors import UsageError

    with pytest.raises(UsageError, match="one scheme"):
        run_quantize(small_model, tmp_path / "out", "int4", ignore=(pattern,), quantize_attention=True)


def test_inspect_predicts_output_size(small_model, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(small_model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["architecture"]["experts"] == 4
    assert report["shards"] >= 3
    for scheme in ("int4", "fp8"):
        run_quantize(small_model, tmp_path / scheme, scheme)
        actual = sum(p.stat().st_size for p in (tmp_path / scheme).glob("*.safetensors"))
        predicted = report["predicted_output"][scheme]["bytes"]
        assert predicted <= actual < predicted + 64 * 1024  # headers are the only difference


# ---------------------------------------------------------------------------------------------
# Interruption and resume

KILL_AFTER_SHARDS = """
import os, signal, sys
from llama4_quant import checkpoint
waits = 0
real_wait = checkpoint.ShardWriter.wait
def wait(self):  # the shard is in place, not yet recorded as done
    global waits
    real_wait(self)
    waits += 1
    if waits == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.ShardWriter.wait = wait
from cli.main import main
sys.argv = ["l4q"] + sys.argv[1:]
main()
"""


def test_killed_run_resumes_to_identical_bytes(small_model, tmp_path):
    args = ["quantize", "--model", str(small_model), "--to", "int4", "--max-shard-size", "1MB", "--quiet"]
    subprocess.run([sys.executable, "-m", "cli.main", *args, "--out", str(tmp_path / "ref")], check=True, cwd=REPO)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_SHARDS, *args, "--out", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ, "KILL_AFTER": "2"},
    )
    assert killed.returncode == -9
    partial = tmp_path / "out.l4q-partial"
    assert not (tmp_path / "out").exists() and partial.is_dir()
    # Killed after the second shard was renamed into place but before it was recorded: the worst
    # moment, since the file looks finished. Resume must redo it rather than trust it.
    assert len(json.loads((partial / ".l4q-progress.json").read_text())["done"]) == 1
    assert (partial / "model-00002-of-00005.safetensors").is_file()

    again = subprocess.run([sys.executable, "-m", "cli.main", *args, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr

    resumed = subprocess.run(
        [sys.executable, "-m", "cli.main", *args, "--out", str(tmp_path / "out"), "--resume"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists()
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert ref_files == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in ref_files:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_resume_refuses_other_options(small_model, tmp_path):
    partial = tmp_path / "out.l4q-partial"
    partial.mkdir()
    (partial / ".l4q-progress.json").write_text(json.dumps({"fingerprint": "something else", "done": []}))
    from llama4_quant.errors import ResumeMismatchError

    with pytest.raises(ResumeMismatchError):
        run_quantize(small_model, tmp_path / "out", "int4", resume=True)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, nothing that looks complete


def cli_fails(args: list[str], out: Path, match: str) -> None:
    result = CliRunner().invoke(main, ["quantize", *args, "--to", "int4", "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l4q: error:"), result.stderr
    assert match in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".l4q-partial").exists()


def test_missing_hub_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli_fails(["--model", "someone/not-downloaded"], tmp_path / "out", "hf download someone/not-downloaded")


def test_hub_repo_resolves_from_local_cache(small_model, tmp_path, monkeypatch):
    """A repo id resolves to its snapshot in the Hugging Face cache, offline."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf"
    repo = cache / "models--someone--small-llama4"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(small_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    src = sources.resolve("someone/small-llama4")
    assert src.repo_id == "someone/small-llama4"
    assert src.path == repo / "snapshots" / commit
