"""The layer-streaming engine, calibration statistics, and the mse / gptq methods end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama4_quant import sources
from llama4_quant.calibrate import engine as engine_module
from llama4_quant.calibrate.data import calibration_ids
from llama4_quant.calibrate.engine import Engine
from llama4_quant.calibrate.stats import Stats, calibrate
from llama4_quant.calibrate.weights import WeightSource
from llama4_quant.checkpoint import Checkpoint, read_slice, read_tensor
from llama4_quant.evaluate import StreamingRunner, TransformersRunner, load_causal_lm
from llama4_quant.formats import compressed_tensors as ct
from llama4_quant.pipeline import quantize
from llama4_quant.tiny_models import tiny_maverick_dir, tiny_model_dir


def l4q(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def tiny_stats(tmp_path_factory) -> Path:
    src = sources.resolve("tiny")
    ids, description = calibration_ids(src.path, None, 16, 256)
    out = tmp_path_factory.mktemp("stats") / "tiny-stats"
    calibrate(src, out, ids, description, device="cpu", show_progress=False)
    return out


def tiny_with_temperature_tuning(tmp_path: Path) -> Path:
    """tiny with floor_scale 4: its NoPE layer's query scaling then varies within a window (8192 makes it 1)."""
    path = tmp_path / "tiny-floor4"
    path.mkdir()
    for f in tiny_model_dir().iterdir():
        (path / f.name).symlink_to(f)
    (path / "config.json").unlink()
    config = json.loads((tiny_model_dir() / "config.json").read_text())
    config["text_config"]["floor_scale"] = 4
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("model_dir", [lambda _: tiny_model_dir(), lambda _: tiny_maverick_dir(), tiny_with_temperature_tuning],
                         ids=["tiny", "tiny-maverick", "tiny-temperature-tuning"])
def test_engine_matches_transformers(model_dir, tmp_path):
    """Logits and routes of the layer-streaming engine equal transformers' own forward, past one attention chunk."""
    path = model_dir(tmp_path)
    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (2, 300))  # 300 > the tiny models' attention chunk of 128
    engine = Engine(WeightSource(path), record_routes=True)
    logp = list(engine.log_probs(engine.run_layers(engine.embed(ids))))
    runner = TransformersRunner(path, "cpu")
    for w in range(2):
        ref, routes = runner(ids[w])
        torch.testing.assert_close(logp[w], ref, atol=1e-4, rtol=0)
        ours = torch.stack([engine.routes[i].view(2, 300)[w] for i in runner.moe_layers], dim=1)
        assert (ours == routes).float().mean() > 0.999  # a near-tie may flip in float32
    stream = list(StreamingRunner(path, "cpu").run(ids))
    torch.testing.assert_close(stream[1][0], logp[1])


def test_engine_reads_compressed_tensors_like_transformers(tmp_path):
    """A quantized derivative runs through the engine as transformers decompresses it."""
    src = sources.resolve("tiny")
    quantize(src, tmp_path / "int8", "int8", device="cpu", show_progress=False)
    ids = torch.randint(0, 2000, (1, 64), generator=torch.Generator().manual_seed(1))
    engine = Engine(WeightSource(tmp_path / "int8"))
    (ours,) = engine.log_probs(engine.run_layers(engine.embed(ids)))
    with torch.no_grad():
        ref = torch.log_softmax(load_causal_lm(tmp_path / "int8")(ids).logits[0].float(), -1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_calibration_data_never_uses_heldout_text():
    from llama4_quant.calibrate.data import builtin_text
    from llama4_quant.tiny_models import tiny_heldout_path

    text, _ = builtin_text()
    heldout = tiny_heldout_path().read_text()
    paragraphs = [p for p in heldout.split("\n\n") if len(p) > 200][:50]
    assert paragraphs and not any(p in text for p in paragraphs)


def test_calibrate_statistics(tiny_stats):
    stats = Stats(tiny_stats)
    meta = stats.meta
    assert meta["data"]["tokens"] == 16 * 256 and stats.ids.shape == (16, 256)
    tensors = load_file(str(tiny_stats / "imatrix.safetensors"))
    spec_layers = [layer["layer"] for layer in meta["moe_layers"]]
    assert spec_layers == [0, 1, 2, 3]
    for layer in meta["moe_layers"]:
        assert sum(e["tokens"] for e in layer["experts"]) == layer["tokens"] == 16 * 256
        counts = tensors[f"language_model.model.layers.{layer['layer']}.feed_forward.experts.gate.counts"]
        for e in layer["experts"]:  # routed experts are counted as routed, the rest over all tokens
            assert counts[e["expert"]] == (e["tokens"] if e["path"] == "routed" else layer["tokens"])
            assert (e["path"] == "all tokens") == (e["tokens"] < layer["threshold"])
    for key, t in tensors.items():
        assert torch.isfinite(t).all(), key
        if key.endswith(".counts"):
            assert (t > 0).all(), key
    imp = stats.importance("language_model.model.layers.0.self_attn.q_proj")
    assert imp.shape == (256,) and (imp > 0).all()
    assert stats.importance("language_model.model.layers.2.feed_forward.experts.down").shape == (16, 256)
    assert (tiny_stats / "imatrix.gguf").is_file() and "| layer |" in (tiny_stats / "report.md").read_text()


def test_unrouted_experts_get_all_token_statistics_and_sensible_gptq_weights(tmp_path):
    """8 calibration tokens over 16 experts: at least half the experts of every layer see no token.
    They still get statistics (from all tokens), GPTQ weights close to the original, and are named."""
    src = sources.resolve("tiny")
    ids, description = calibration_ids(src.path, None, 1, 8)
    stats_dir = tmp_path / "stats"
    result = calibrate(src, stats_dir, ids, description, device="cpu", show_progress=False)
    unrouted = [(layer["layer"], e["expert"]) for layer in result.stats["moe_layers"] for e in layer["experts"] if e["tokens"] == 0]
    assert len(unrouted) >= 4 * 8
    assert all(f"layer {layer} expert {e}" in result.stats["all_token_experts"] for layer, e in unrouted)
    report = (stats_dir / "report.md").read_text()
    assert "0:" in report and "*" in report

    out = quantize(src, tmp_path / "gptq", "int4", method="gptq", calib=stats_dir, device="cpu", show_progress=False).out
    recipe = json.loads((out / "l4q_recipe.json").read_text())
    named = recipe["gptq"]["all_token_experts"]
    assert all(any(s.startswith(f"layer {layer} expert {e} ") for s in named) for layer, e in unrouted)
    base, cand = Checkpoint(src.path), Checkpoint(out)
    scheme = ct.get_scheme("int4")
    for layer, e in unrouted:
        prefix = f"language_model.model.layers.{layer}.feed_forward.experts"
        gate_up = read_slice(base.by_name[f"{prefix}.gate_up_proj"], e).float()
        original = gate_up[:, :256].T
        parts = {s: read_tensor(cand.by_name[f"{prefix}.{e}.gate_proj.{s}"]) for s in ("weight_packed", "weight_scale", "weight_shape")}
        w = scheme.decode(parts)
        assert torch.isfinite(w).all()
        rtn = scheme.decode({k.rsplit(".", 1)[1]: v for k, v in scheme.encode_weight("m", original)})
        err, rtn_err = (w - original).norm() / original.norm(), (rtn - original).norm() / original.norm()
        assert err < 2 * rtn_err, (layer, e, err, rtn_err)


def test_gptq_lowers_layer_output_error(tiny_stats, tmp_path):
    """On the calibration inputs, GPTQ's attention projections reproduce the BF16 outputs better than RTN's."""
    src = sources.resolve("tiny")
    outs = {m: quantize(src, tmp_path / m, "int4", method=m, calib=tiny_stats if m != "rtn" else None,
                        quantize_attention=True, device="cpu", show_progress=False).out for m in ("rtn", "mse", "gptq")}
    base = WeightSource(src.path)
    engine = Engine(base)
    ids = Stats(tiny_stats).ids[:4]
    x = engine._norm(engine.embed(ids), "language_model.model.layers.0.input_layernorm.weight").reshape(-1, 256)
    module = "language_model.model.layers.0.self_attn.q_proj"
    ref = x @ base.linear(module).T
    err = {m: (x @ WeightSource(p).linear(module).T - ref).norm().item() for m, p in outs.items()}
    assert err["gptq"] < 0.8 * err["rtn"] and err["mse"] < err["rtn"], err
    recipe = json.loads((outs["gptq"] / "l4q_recipe.json").read_text())
    assert recipe["method"] == "gptq" and recipe["gptq"]["fell_back_to_rtn"] == []


def test_calibrate_resumes_after_interruption(tmp_path, monkeypatch, tiny_stats):
    src = sources.resolve("tiny")
    ids = Stats(tiny_stats).ids
    real_layer = Engine.layer

    def interrupted(self, layer, h):
        if layer == 2:
            raise KeyboardInterrupt
        return real_layer(self, layer, h)

    monkeypatch.setattr(engine_module.Engine, "layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(src, tmp_path / "stats", ids, "same data", device="cpu", show_progress=False)
    monkeypatch.setattr(engine_module.Engine, "layer", real_layer)
    assert not (tmp_path / "stats").exists() and (tmp_path / "stats.l4q-partial").is_dir()
    result = calibrate(src, tmp_path / "stats", ids, "same data", device="cpu", resume=True, show_progress=False)
    assert result.layers_resumed == 2
    fresh = load_file(str(tiny_stats / "imatrix.safetensors"))
    resumed = load_file(str(tmp_path / "stats" / "imatrix.safetensors"))
    assert fresh.keys() == resumed.keys()
    for k in fresh:
        assert torch.equal(fresh[k], resumed[k]), k


def test_cli_errors_are_one_line(tmp_path, tiny_stats):
    r = l4q("quantize", "--model", "tiny", "--to", "int4", "--method", "gptq", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--calib" in r.stderr
    r = l4q("quantize", "--model", "tiny", "--to", "int4", "--method", "gptq", "--calib", str(tmp_path), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 1 and "not an l4q calibration statistics directory" in r.stderr
    r = l4q("export", "gguf", "tiny-maverick", "--imatrix", str(tiny_stats), "--out", str(tmp_path / "m.gguf"), cwd=tmp_path)
    assert r.returncode == 1 and "architecture differs" in r.stderr and r.stderr.count("\n") == 1
    r = l4q("calibrate", "tiny", "--samples", "100000", "--seq-len", "512", "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert r.returncode == 1 and "too short" in r.stderr and not (tmp_path / "s").exists()


def test_gguf_export_with_imatrix(tmp_path, tiny_stats):
    """`--imatrix` reaches the K-quant search: same tensors as without except the importance-weighted ones."""
    import gguf

    r1 = l4q("export", "gguf", "tiny", "--type", "Q4_K_M", "--quiet", "--out", str(tmp_path / "plain.gguf"), cwd=tmp_path)
    r2 = l4q("export", "gguf", "tiny", "--type", "Q4_K_M", "--quiet", "--imatrix", str(tiny_stats), "--out", str(tmp_path / "imat.gguf"), cwd=tmp_path)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr
    plain = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "plain.gguf")).tensors}
    imat = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "imat.gguf")).tensors}
    changed = [n for n in plain if bytes(plain[n].data) != bytes(imat[n].data)]
    assert "blk.0.ffn_gate_exps.weight" in changed and "blk.0.attn_q.weight" in changed
    assert all(plain[n].tensor_type.name.endswith("_K") for n in changed)


def test_gpu_check_script_runs_its_paths_on_cpu():
    """The script a lent GPU machine runs: here both 'devices' are the CPU, so the results must agree exactly."""
    script = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--devices", "cpu", "cpu", "--skip-scout", "--models", "tiny",
                        "--samples", "4", "--seq-len", "64"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"GPTQ weights identical": "100.00%"' in r.stdout
    assert '"max routed-count difference": 0' in r.stdout
    for target in ("int4", "fp8", "Q8_0", "Q4_K_M"):
        assert f'"{target} same bytes": true' in r.stdout
