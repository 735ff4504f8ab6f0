"""Synthetic Llama 4 checkpoints: real names, shapes and layout, random BF16 values.

Used for memory, speed and dedup work at Scout's real tensor shapes (which cannot be downloaded
here) and for small test checkpoints. Values are random bit patterns in a weight-like range, drawn
from a generator seeded by (seed, tensor name, expert), so a "fine-tune" that changes a few experts
changes exactly those slices' bytes. Tensors are streamed into shards, never held whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import arch
from .checkpoint import ShardWriter, TensorEntry, split_in_order, write_index

SLICE_BYTES = 64 * 1024 * 1024

# Scout's text config (meta-llama/Llama-4-Scout-17B-16E-Instruct), minus what the weights ignore.
SCOUT_TEXT_CONFIG = {
    "model_type": "llama4_text",
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "vocab_size": 202048,
    "use_qk_norm": True,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rms_norm_eps": 1e-05,
    "max_position_embeddings": 10485760,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008],
    "pad_token_id": 200018,
}


def scout_config(num_layers: int, vocab_size: int = SCOUT_TEXT_CONFIG["vocab_size"]) -> dict:
    """A `Llama4ForConditionalGeneration` config.json with Scout's text dims, `num_layers` layers and
    `vocab_size` tokens (Scout's own by default)."""
    text = dict(SCOUT_TEXT_CONFIG, num_hidden_layers=num_layers, vocab_size=vocab_size, model_type="llama4_text")
    text["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(num_layers)]
    text["moe_layers"] = list(range(num_layers))
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }


def tensor_entries(spec: arch.Llama4Spec) -> list[TensorEntry]:
    """Every text tensor, in the order Hugging Face checkpoints store them (module order)."""
    entries = []
    for name in arch.expected_tensor_names(spec):
        shape = arch.classify(name, spec).expected_shape
        entries.append(TensorEntry(name, "BF16", shape))
    # expected_tensor_names lists embed, norm, lm_head first; checkpoints put norm and lm_head last.
    head = [e for e in entries if e.name.endswith(("model.norm.weight", "lm_head.weight"))]
    return [e for e in entries if e not in head] + head


def _rng(seed: int, name: str, part: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{part}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def random_bf16_bits(rng: np.random.Generator, count: int, scale_exponent: int = -6) -> np.ndarray:
    """`count` random BF16 values as uint16 bits: random sign and mantissa, magnitude in
    [2**(e-3), 2**(e+1)) around 2**scale_exponent, i.e. weight-like and always finite."""
    bits = rng.integers(0, 1 << 16, size=count, dtype=np.uint16)
    exponent = (rng.integers(0, 4, size=count, dtype=np.uint16) + np.uint16(127 + scale_exponent - 3)) << np.uint16(7)
    return (bits & np.uint16(0x807F)) | exponent


def _tensor_bytes(entry: TensorEntry, seed: int, overrides: dict):
    """Yield the entry's bytes in slices; fused expert tensors slice per expert."""
    if entry.name.endswith("norm.weight"):
        yield np.full(entry.shape, 0x3F80, dtype=np.uint16).tobytes()  # 1.0, as trained norms roughly are
        return
    parts = entry.shape[0] if len(entry.shape) == 3 else 1
    per_part = int(np.prod(entry.shape)) // parts
    step = max(1, SLICE_BYTES // 2)
    for part in range(parts):
        rng = _rng(overrides.get((entry.name, part), seed), entry.name, part)
        for start in range(0, per_part, step):
            yield random_bf16_bits(rng, min(step, per_part - start)).tobytes()


def write_synthetic_checkpoint(
    out_dir: Path,
    config: dict,
    *,
    seed: int = 0,
    max_shard_size: int = 5 * 1000**3,
    expert_seeds: dict[tuple[int, int], int] | None = None,
) -> Path:
    """Write a random BF16 checkpoint for `config` into `out_dir` (created).

    `expert_seeds` maps (layer, expert) to another seed: that expert's slices of gate_up_proj and
    down_proj change, nothing else does (a synthetic fine-tune).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = arch.spec_from_config(config)
    entries = tensor_entries(spec)
    overrides = {}
    for (layer, expert), s in (expert_seeds or {}).items():
        base = f"{spec.layer_prefix}{layer}.feed_forward.experts"
        overrides[(f"{base}.gate_up_proj", expert)] = s
        overrides[(f"{base}.down_proj", expert)] = s
    shards = split_in_order(entries, lambda e: e.nbytes, max_shard_size)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(out_dir / name, shard)
        for e in shard:
            for chunk in _tensor_bytes(e, seed, overrides):
                writer.write(e.name, chunk)
            weight_map[e.name] = name
        writer.close()
    write_index(out_dir, weight_map, sum(e.nbytes for e in entries))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
