"""`l4q eval` on the tiny model: identity, a damaged expert, and the same token ids for every candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from llama4_quant import evaluate, pipeline, sources
from llama4_quant.checkpoint import Checkpoint, read_tensor, write_safetensors

REPO = Path(__file__).resolve().parents[1]
CTX, TOKENS = 256, 4 * 256


@pytest.fixture(scope="module")
def tiny():
    return sources.resolve("tiny")


def test_base_against_itself_is_exact(tiny):
    report = evaluate.evaluate(tiny, [tiny.path], ctx=CTX, max_tokens=TOKENS, progress=False)
    c = report["candidates"][0]
    assert c["kld"]["mean"] == 0 and c["kld"]["max"] == 0
    assert c["top1_agreement"] == 1.0
    assert c["routing_agreement"]["mean"] == 1.0 and len(c["routing_agreement"]["per_layer"]) == 4
    assert c["perplexity"] == pytest.approx(c["base_perplexity"], rel=1e-6)
    assert c["token_ids_sha256"] == report["data"]["token_ids_sha256"]


def damage_expert(out_dir, module: str, factor: float) -> None:
    """Multiply one expert projection's scales in place: a broken expert, as a bad quantizer makes."""
    ckpt = Checkpoint(out_dir)
    info = ckpt.by_name[f"{module}.weight_scale"]
    shard = info.file
    tensors = {t.name: read_tensor(t) for t in ckpt.tensors if t.file == shard}
    tensors[info.name] = (tensors[info.name].float() * factor).to(torch.bfloat16)
    write_safetensors(shard, tensors)


def test_damaged_expert_shows_in_heatmap_and_kld(tiny, tmp_path):
    good, bad = tmp_path / "tiny-int8", tmp_path / "tiny-int8-damaged"
    pipeline.quantize(tiny, good, "int8", show_progress=False)
    pipeline.quantize(tiny, bad, "int8", show_progress=False)
    expert = "language_model.model.layers.1.feed_forward.experts.5"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        damage_expert(bad, f"{expert}.{proj}", -3.0)
    report = evaluate.evaluate(tiny, [good, bad], ctx=CTX, max_tokens=TOKENS, progress=False)
    g, b = report["candidates"]
    heat = torch.tensor(b["weight_error"]["experts"])
    assert b["weight_error"]["expert_layers"] == [0, 1, 2, 3]
    assert heat.argmax().item() == 1 * 16 + 5  # row: layer 1, column: expert 5
    assert heat[1, 5] > 1.0 and heat.flatten().sort().values[-2] < 0.05
    assert torch.tensor(g["weight_error"]["experts"]).max() < 0.05
    assert b["kld"]["mean"] > 3 * g["kld"]["mean"]


def test_eval_command_writes_all_outputs(tiny, tmp_path):
    out = tmp_path / "tiny-fp8"
    pipeline.quantize(tiny, out, "fp8", show_progress=False)
    report_dir = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "eval", "--base", "tiny", "--candidate", str(out), "--ctx", str(CTX), "--max-tokens", str(TOKENS),
        "--report", str(report_dir), "--quiet",
    ])
    assert result.exit_code == 0, result.stderr
    for name in ("report.json", "report.md", "report.html", "kld_distribution.png", "expert_heatmap.png"):
        assert (report_dir / name).is_file(), name
    report = json.loads((report_dir / "report.json").read_text())
    assert report["candidates"][0]["scheme"] == "fp8"
    assert "tiny-fp8" in result.output


def test_eval_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--base", "tiny", "--candidate", str(tmp_path / "missing"), "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "no such candidate" in result.stderr


def test_gguf_and_safetensors_candidates_get_identical_token_ids(tiny, tmp_path):
    """A GGUF made by llama.cpp's own converter runs in llama.cpp on the very ids transformers gets."""
    import importlib.util

    from llama4_quant.evaluate import ids_digest, token_windows

    spec = importlib.util.spec_from_file_location("llama_cpp_reference", REPO / "scripts" / "llama_cpp_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    gguf = reference.convert(tiny.path, tmp_path / "tiny-f16.gguf", "f16")
    st = tmp_path / "tiny-int8"
    pipeline.quantize(tiny, st, "int8", show_progress=False)

    report = evaluate.evaluate(tiny, [st, gguf], ctx=CTX, max_tokens=TOKENS, progress=False)
    s, g = report["candidates"]
    windows = token_windows(tiny.path, evaluate.load_text(None)[0], CTX, TOKENS)
    # tiny's attention chunk is 128 and llama.cpp fixes it at 8192: the GGUF gets each window's first
    # 129 ids (positions 0-127 scored), the safetensors candidate the whole windows.
    assert s["token_ids_sha256"] == report["data"]["token_ids_sha256"] == ids_digest(windows)
    assert g["windows"]["length"] == 129 and g["windows"]["scored_positions_per_window"] == 128
    assert g["token_ids_sha256"] == ids_digest(windows[:, :129])
    assert g["kind"] == "gguf" and g["scheme"] == "F16" and g["windows"]["note"]
    # F16 in llama.cpp vs BF16 in transformers: the same model, so near-zero divergence.
    assert g["kld"]["mean"] < 1e-3 and g["top1_agreement"] > 0.99
