"""Shared fixtures: small synthetic Llama 4 checkpoints with real names and layout."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from llama4_quant import synthetic


def load_script(name: str):
    """A module of scripts/ (they are programs, not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_cpp_reference():
    """scripts/llama_cpp_reference.py: llama.cpp's own converter and llama-quantize, as independent references."""
    return load_script("llama_cpp_reference")


def output_digests():
    """scripts/output_digests.py: the matrix of recorded outputs and how each is digested."""
    return load_script("output_digests")


def small_config(num_layers: int = 4, num_experts: int = 4, maverick: bool = False) -> dict:
    """Scout's layout at small, K-quant-friendly sizes (every dim a multiple of 256)."""
    config = synthetic.scout_config(num_layers)
    text = config["text_config"]
    text.update(
        hidden_size=256, intermediate_size=256, intermediate_size_mlp=512, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=512, num_local_experts=num_experts,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_chunk_size=64,
    )
    if maverick:
        text.update(interleave_moe_layer_step=2, use_qk_norm=False, moe_layers=list(range(1, num_layers, 2)))
    return config


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A 4-layer, 4-expert random checkpoint in 5+ shards. Read-only: copy it before corrupting."""
    return synthetic.write_synthetic_checkpoint(
        tmp_path_factory.mktemp("small") / "model", small_config(), max_shard_size=3_000_000
    )


@pytest.fixture(scope="session")
def small_maverick(tmp_path_factory) -> Path:
    """Maverick's layout (dense layers between MoE layers, no qk-norm), small and random."""
    return synthetic.write_synthetic_checkpoint(
        tmp_path_factory.mktemp("small-mav") / "model", small_config(maverick=True), max_shard_size=3_000_000
    )


@pytest.fixture
def model_copy(small_model, tmp_path) -> Path:
    """A private copy of `small_model` that a test may damage."""
    return Path(shutil.copytree(small_model, tmp_path / "src"))
