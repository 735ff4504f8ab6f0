"""l4q's outputs load through transformers + compressed-tensors and stay close to the BF16 model."""

from __future__ import annotations

import pytest

from llama4_quant import arch, evaluate, pipeline, sources, tiny_models

CTX, WINDOWS = 256, 3
# Mean KLD ceilings on held-out text: int8 and fp8 must be near-lossless; int4 is a real loss
# (the README's table, from benchmarks/quality_tiny.py, has the measured figures).
MAX_MEAN_KLD = {"int4": 0.05, "int8": 0.01, "fp8": 0.01}
MIN_TOP1 = {"int4": 0.85, "int8": 0.95, "fp8": 0.95}


@pytest.fixture(scope="module", params=["tiny", "tiny-maverick"])
def base(request):
    src = sources.resolve(request.param)
    windows = evaluate.token_windows(src.path, tiny_models.tiny_heldout_path().read_text(), CTX)[:WINDOWS]
    return src, windows, evaluate.window_logits(evaluate.load_causal_lm(src.path), windows)


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_quantized_model_loads_and_agrees(base, scheme, tmp_path):
    src, windows, base_logprobs = base
    out = tmp_path / scheme
    pipeline.quantize(src, out, scheme, show_progress=False)
    model = evaluate.load_causal_lm(out)
    # The fused experts became one quantized module per expert, decompressed on load.
    first_moe = arch.spec_from_config(arch.load_config(src.path)).moe_layers[0]
    layer = model.model.layers[first_moe]
    assert type(layer.feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    a = evaluate.compare(base_logprobs, evaluate.window_logits(model, windows), windows)
    assert a.mean_kld < MAX_MEAN_KLD[scheme], a
    assert a.top1 > MIN_TOP1[scheme], a
    assert a.ppl_candidate < a.ppl_base * (1.1 if scheme == "int4" else 1.02), a


def test_non_weight_files_are_copied(tmp_path):
    src = sources.resolve("tiny")
    pipeline.quantize(src, tmp_path / "out", "fp8", show_progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src.path / name).read_bytes()
