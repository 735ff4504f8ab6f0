"""The embedded tiny models: `tiny` (Scout's structure, trained) and `tiny-maverick` (generated)."""

from __future__ import annotations

import json
import math
import platform
import re
import struct

import pytest
import torch
import torch.nn.functional as F

from llama4_quant import tiny_models as tm

TINY = tm.tiny_model_dir()
WINDOW = 256  # longer than the 128-token attention chunk


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text-only load drops the vision keys, and says so at length
    yield
    hf_logging.set_verbosity(level)


def _config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _layer_of(name: str) -> int:
    m = re.match(r"language_model\.model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _check_shards(model_dir) -> None:
    """>= 3 shards, index consistent with the shard headers, BF16 only, module order within shards."""
    index = tm.read_index(model_dir)
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3
    total = 0
    seen = []
    for shard in shards:
        header = _header(model_dir / shard)
        header.pop("__metadata__", None)
        assert set(header) == {k for k, v in weight_map.items() if v == shard}
        by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        for name in by_offset:
            info = header[name]
            assert info["dtype"] == "BF16", name
            start, end = info["data_offsets"]
            assert end - start == 2 * math.prod(info["shape"])
            total += end - start
        seen += by_offset
    assert index["metadata"]["total_size"] == total
    # Shards in order, and inside them: vision, projector, then the language model layer by layer.
    layers = [_layer_of(n) for n in seen if n.startswith("language_model.model.layers.")]
    assert layers == sorted(layers)
    assert seen.index("multi_modal_projector.linear_1.weight") < seen.index("language_model.model.embed_tokens.weight")
    assert seen[-1] == "language_model.lm_head.weight"
    for name in seen:
        assert name.startswith(("language_model.model.", "vision_model.")) or name in (
            "language_model.lm_head.weight",
            "multi_modal_projector.linear_1.weight",
        ), name


def _heldout_ids(tok) -> torch.Tensor:
    text = tm.tiny_heldout_path().read_text(encoding="utf-8")
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def _nll(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


# --------------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------------


def test_tiny_config_is_scout_shaped():
    cfg = _config(TINY)
    assert cfg["model_type"] == "llama4"
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"]
    assert cfg["torch_dtype"] == "bfloat16" and not cfg["tie_word_embeddings"]
    t = cfg["text_config"]
    assert t["num_local_experts"] == 16 and t["num_experts_per_tok"] == 1
    assert t["interleave_moe_layer_step"] == 1 and t["moe_layers"] == list(range(t["num_hidden_layers"]))
    assert t["use_qk_norm"] is True
    assert t["no_rope_layers"] == [int((i + 1) % 4 != 0) for i in range(t["num_hidden_layers"])]
    assert t["attention_chunk_size"] < WINDOW
    assert t["attn_temperature_tuning"] is True and t["floor_scale"] == 8192
    assert t["rope_theta"] == 500000.0
    assert t["rope_scaling"] == {
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    for key in ("hidden_size", "intermediate_size", "intermediate_size_mlp"):
        assert t[key] % 256 == 0, key
    assert t["num_attention_heads"] * t["head_dim"] % 256 == 0
    assert "vision_config" in cfg and cfg["vision_config"]["model_type"] == "llama4_vision_model"


def test_tiny_config_loads_in_transformers():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(TINY)
    t = cfg.text_config
    assert t.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    assert t.rope_parameters["rope_type"] == "llama3" and t.rope_parameters["factor"] == 16.0
    assert t.moe_layers == [0, 1, 2, 3]


def test_tiny_shards_index_and_tensor_layout():
    _check_shards(TINY)
    t = _config(TINY)["text_config"]
    e, h, i = t["num_local_experts"], t["hidden_size"], t["intermediate_size"]
    headers = {}
    for shard in set(tm.read_index(TINY)["weight_map"].values()):
        headers.update(_header(TINY / shard))
    for layer in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{layer}.feed_forward."
        assert headers[p + "experts.gate_up_proj"]["shape"] == [e, h, 2 * i]
        assert headers[p + "experts.down_proj"]["shape"] == [e, i, h]
        assert headers[p + "router.weight"]["shape"] == [e, h]
        assert headers[p + "shared_expert.down_proj.weight"]["shape"] == [h, i]
    assert headers["language_model.model.embed_tokens.weight"]["shape"] == [t["vocab_size"], h]
    assert headers["language_model.lm_head.weight"]["shape"] == [t["vocab_size"], h]
    vision_bytes = sum(
        2 * math.prod(v["shape"]) for k, v in headers.items() if k.startswith(("vision_model.", "multi_modal_projector."))
    )
    assert vision_bytes < 1_000_000
    total = sum(p.stat().st_size for p in TINY.iterdir())
    assert total < 32e6


def test_tiny_loads_whole_as_conditional_generation():
    """Every tensor has its place in Llama4ForConditionalGeneration, and the vision tower runs."""
    from transformers import Llama4ForConditionalGeneration

    model, info = Llama4ForConditionalGeneration.from_pretrained(TINY, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    v = _config(TINY)["vision_config"]
    pixels = torch.randn(1, v["num_channels"], v["image_size"], v["image_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
        projected = model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    patches = (v["image_size"] // v["patch_size"]) ** 2
    assert projected.shape == (int(patches * v["pixel_shuffle_ratio"] ** 2), _config(TINY)["text_config"]["hidden_size"])
    assert torch.isfinite(projected).all()


def test_tiny_processor_files():
    pre = json.loads((TINY / "preprocessor_config.json").read_text())
    proc = json.loads((TINY / "processor_config.json").read_text())
    v = _config(TINY)["vision_config"]
    assert pre["size"] == {"height": v["image_size"], "width": v["image_size"]}
    assert proc["patch_size"] == v["patch_size"] and proc["processor_class"] == "Llama4Processor"


def test_tiny_tokenizer_matches_config():
    from transformers import AutoTokenizer

    cfg = _config(TINY)
    t = cfg["text_config"]
    tok = AutoTokenizer.from_pretrained(TINY)
    assert len(tok) == t["vocab_size"]
    assert tok.bos_token_id == t["bos_token_id"]
    assert tok.convert_tokens_to_ids("<|eot|>") in t["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|end_of_text|>") in t["eos_token_id"]
    assert tok.pad_token_id == t["pad_token_id"] == tok.convert_tokens_to_ids("<|finetune_right_pad|>")
    assert cfg["image_token_index"] == tok.convert_tokens_to_ids("<|patch|>")
    for special in ("<|header_start|>", "<|header_end|>", "<|image|>", "<|image_start|>", "<|image_end|>"):
        assert tok.convert_tokens_to_ids(special) >= 2048 - 32
    text = "Return the number of items in a container.\n\n    >>> len([1, 2])\n    2"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    pre = json.loads((TINY / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"].startswith(r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*")


def test_tiny_heldout_perplexity_far_below_unigram():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    ids = _heldout_ids(tok)
    assert len(ids) > 100_000
    # Unigram fitted on the held-out tokens themselves (add-one): at most a hair above the best any
    # unigram model can do on this text, so below the training-split unigram baseline.
    counts = torch.bincount(ids, minlength=len(tok)).double() + 1.0
    unigram_ppl = math.exp(-(counts / counts.sum()).log()[ids].mean().item())
    n = len(ids) // WINDOW
    windows = ids[: n * WINDOW].view(n, WINDOW)[:: max(1, n // 6)][:6]
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
    assert type(model).__name__ == "Llama4ForCausalLM"
    ppl = math.exp(_nll(model.eval(), windows))
    assert ppl < 0.5 * unigram_ppl, (ppl, unigram_ppl)


# --------------------------------------------------------------------------------------------------
# corpus split
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return tm.stdlib_corpus()


def test_split_is_a_function_of_the_source():
    assert tm.split_of("json/decoder.py") == tm.split_of("json/decoder.py")
    sources = [f"pkg/module_{i}.py" for i in range(4000)]
    share = sum(tm.split_of(s) == "heldout" for s in sources) / len(sources)
    assert 0.03 < share < 0.07


def test_heldout_and_training_texts_are_disjoint(corpus):
    train, heldout = tm.split_corpus(corpus)
    train_sources, heldout_sources = {d.source for d in train}, {d.source for d in heldout}
    assert train_sources.isdisjoint(heldout_sources)
    assert all(tm.split_of(s) == "heldout" for s in heldout_sources)
    assert all(tm.split_of(s) == "train" for s in train_sources)
    assert {d.text for d in train}.isdisjoint(d.text for d in heldout)
    shipped = tm.tiny_heldout_path().read_text(encoding="utf-8")
    made_with = re.search(r"Python (\d+\.\d+\.\d+) standard library", (TINY / "TRAINING.md").read_text())
    if made_with and made_with.group(1) == platform.python_version():
        assert shipped == tm.join_docs(heldout)
    # Whatever the Python version: no training text of this stdlib is a held-out text shipped.
    shipped_docs = set(shipped.split(tm.DOC_SEPARATOR))
    long_train = {d.text for d in train if len(d.text) > 200 and tm.DOC_SEPARATOR not in d.text}
    assert long_train.isdisjoint(shipped_docs)


# --------------------------------------------------------------------------------------------------
# tiny-maverick
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    return tm.tiny_maverick_dir(tmp_path_factory.mktemp("cache-a"))


def test_maverick_generation_is_deterministic_and_cached(maverick, tmp_path):
    again = tm.tiny_maverick_dir(tmp_path)
    names = sorted(p.name for p in maverick.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (maverick / name).read_bytes() == (again / name).read_bytes(), name
    stamp = (again / "config.json").stat().st_mtime_ns
    assert tm.tiny_maverick_dir(tmp_path) == again  # cached: not regenerated
    assert (again / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_maverick_structure(maverick):
    cfg = _config(maverick)
    t = cfg["text_config"]
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"]
    assert t["num_local_experts"] == 128 and t["num_experts_per_tok"] == 1
    assert t["interleave_moe_layer_step"] == 2 and t["moe_layers"] == [1, 3]
    assert t["use_qk_norm"] is False
    assert t["no_rope_layers"] == [1, 1, 1, 0] and t["attention_chunk_size"] == 128
    assert t["intermediate_size_mlp"] == 512
    for key in ("hidden_size", "intermediate_size", "intermediate_size_mlp"):
        assert t[key] % 256 == 0
    _check_shards(maverick)
    wm = tm.read_index(maverick)["weight_map"]
    for layer in (0, 2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"language_model.model.layers.{layer}.feed_forward.{proj}.weight" in wm
        assert not any(k.startswith(f"language_model.model.layers.{layer}.feed_forward.experts") for k in wm)
    for layer in (1, 3):
        assert f"language_model.model.layers.{layer}.feed_forward.experts.gate_up_proj" in wm
        assert f"language_model.model.layers.{layer}.feed_forward.router.weight" in wm
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (maverick / name).read_bytes() == (TINY / name).read_bytes()


def test_maverick_routing_is_decisive_and_uses_every_expert(maverick, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama4 import modeling_llama4

    model = AutoModelForCausalLM.from_pretrained(maverick, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(maverick)
    ids = _heldout_ids(tok)
    n = min(len(ids) // WINDOW, 96)
    windows = ids[: n * WINDOW].view(n, WINDOW)
    # The sparse forward (each token through its own expert only) is the same function as transformers'
    # dense one, and 128 times cheaper:
    with torch.no_grad():
        dense = model(input_ids=windows[:1]).logits
        monkeypatch.setattr(modeling_llama4.Llama4TextMoe, "forward", tm.sparse_moe_forward)
        sparse = model(input_ids=windows[:1]).logits
        assert (dense - sparse).abs().max() < 1e-3
        router_logits = []
        for w in windows.split(16):
            router_logits.append(model(input_ids=w, output_router_logits=True).router_logits)
    for layer in range(2):
        lg = torch.cat([r[layer] for r in router_logits])
        top2 = lg.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        assert gap.median() > 0.5
        assert (gap < 0.01).float().mean() < 0.01
        counts = torch.bincount(lg.argmax(-1), minlength=128)
        assert (counts > 0).all(), counts


def test_maverick_is_not_chaotic(maverick):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(maverick, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(maverick)
    ids = _heldout_ids(tok)
    windows = ids[: 4 * 128].view(4, 128)
    with torch.no_grad():
        base = model(input_ids=windows).logits.log_softmax(-1)
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_tokens" not in name and "norm" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 1e-3)
        pert = model(input_ids=windows).logits.log_softmax(-1)
    kl = (base.exp() * (base - pert)).sum(-1)
    assert kl.mean() < 1e-3, kl.mean()
    # ... and it predicts text: far better than a uniform guess over the vocabulary.
    nll = -base[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    assert math.exp(nll) < 0.25 * len(tok)
