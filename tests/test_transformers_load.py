"""l4q's outputs load through transformers + compressed-tensors and stay close to the BF16 model."""

from __future__ import annotations

import pytest

from llama4_quant import arch, evaluate, pipeline, sources

CTX, WINDOWS = 256, 3
# Mean KLD ceilings on held-out text: int8 and fp8 must be near-lossless; int4 is a real loss
# (the README's table, from benchmarks/quality_tiny.py, has the measured figures).
MAX_MEAN_KLD = {"int4": 0.05, "int8": 0.01, "fp8": 0.01, "fp8-block": 0.01, "nvfp4a16": 0.05, "mxfp4a16": 0.05,
                "nvfp4": 0.1, "mxfp4": 0.1}  # the W4A4 schemes scored with their inputs quantized as served
MIN_TOP1 = {"int4": 0.85, "int8": 0.95, "fp8": 0.95, "fp8-block": 0.95, "nvfp4a16": 0.85, "mxfp4a16": 0.85,
            "nvfp4": 0.75, "mxfp4": 0.75}


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_quantized_models_load_and_agree(model, tmp_path):
    from llama4_quant.calibrate.data import calibration_ids
    from llama4_quant.calibrate.stats import calibrate

    src = sources.resolve(model)
    stats = tmp_path / "stats"  # nvfp4's static input scales
    calibrate(src, stats, *calibration_ids(src.path, None, 8, 64), device="cpu", show_progress=False)
    outs = {scheme: tmp_path / scheme for scheme in MAX_MEAN_KLD}
    for scheme, out in outs.items():
        pipeline.quantize(src, out, scheme, calib=stats if scheme == "nvfp4" else None, show_progress=False)
    # The fused experts become one quantized module per expert, decompressed on load.
    first_moe = arch.spec_from_config(arch.load_config(src.path)).moe_layers[0]
    loaded = evaluate.load_causal_lm(outs["int4"])
    assert type(loaded.model.layers[first_moe].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    del loaded
    report = evaluate.evaluate(src, list(outs.values()), ctx=CTX, max_tokens=CTX * WINDOWS, progress=False)
    for scheme, c in zip(outs, report["candidates"]):
        assert c["scheme"] == scheme
        assert c["kld"]["mean"] < MAX_MEAN_KLD[scheme], c["kld"]
        assert c["top1_agreement"] > MIN_TOP1[scheme], c
        assert c["perplexity_ratio"] < (1.02 if scheme in ("int8", "fp8", "fp8-block") else 1.1), c


def test_non_weight_files_are_copied(tmp_path):
    src = sources.resolve("tiny")
    pipeline.quantize(src, tmp_path / "out", "fp8", show_progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src.path / name).read_bytes()
