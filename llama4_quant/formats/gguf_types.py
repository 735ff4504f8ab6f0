"""GGUF file types (--type Q4_K_M ...) as a table of rules: which block type each tensor gets,
following llama-quantize's choices for a Llama 4 (a MoE model whose expert count is not 8).

Block types themselves (geometry, encoders, fallbacks) live in `gguf_quants.BLOCK_TYPES`. Nothing
here imports numpy or torch, so the CLI reads its choices from this table at start-up. Adding a file
type is one row in FILE_TYPES plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_TYPES = ("F32", "F16", "BF16")


# Which attn_v / ffn_down tensors a file type gives another block type (llama-quant.cpp's
# llama_tensor_get_type_impl): "more_bits" the layers `use_more_bits` picks (the _M mixes),
# "first_4" the first four attn_v, "first_eighth" the ffn_down of the first eighth of the layers.
MORE_BITS, FIRST_4, FIRST_EIGHTH = "more_bits", "first_4", "first_eighth"


@dataclass(frozen=True)
class FileType:
    name: str  # as given to --type
    llama_name: str  # gguf-py's LlamaFileType member, stored as general.file_type
    default: str  # block type of a quantizable weight
    output: str | None = None  # block type of output.weight, where it differs from `default`
    attn_v: tuple[str, str] | None = None  # (which, block type) for attn_v
    ffn_down: tuple[str, str] | None = None  # (which, block type) for every ffn_down (routed, shared, dense)


FILE_TYPES: dict[str, FileType] = {t.name: t for t in (
    FileType("F32", "ALL_F32", "F32"),
    FileType("F16", "MOSTLY_F16", "F16"),
    FileType("BF16", "MOSTLY_BF16", "BF16"),
    FileType("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
    FileType("Q4_0", "MOSTLY_Q4_0", "Q4_0", output="Q6_K"),
    FileType("Q6_K", "MOSTLY_Q6_K", "Q6_K"),
    FileType("Q5_K_M", "MOSTLY_Q5_K_M", "Q5_K", output="Q6_K", attn_v=(MORE_BITS, "Q6_K"), ffn_down=(MORE_BITS, "Q6_K")),
    FileType("Q5_K_S", "MOSTLY_Q5_K_S", "Q5_K", output="Q6_K"),
    FileType("Q4_K_M", "MOSTLY_Q4_K_M", "Q4_K", output="Q6_K", attn_v=(MORE_BITS, "Q6_K"), ffn_down=(MORE_BITS, "Q6_K")),
    FileType("Q4_K_S", "MOSTLY_Q4_K_S", "Q4_K", output="Q6_K", attn_v=(FIRST_4, "Q5_K"), ffn_down=(FIRST_EIGHTH, "Q5_K")),
)}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, ndim: int, cols: int, ftype: str, layer: int | None, n_layers: int, attn_v_index: int) -> str:
    """The GGUF block type of one tensor (by its GGUF name) under file type `ftype`.

    Norms, 1-D tensors, rope_freqs and the router (ffn_gate_inp) stay F32 in every file type.
    output.weight takes the row's `output` type; attn_v (counted in file order) and every ffn_down
    (routed, shared and dense) take the row's `attn_v` / `ffn_down` rule where it picks them.
    """
    from .gguf_quants import BLOCK_TYPES, block_type

    if ndim == 1 or name.startswith("rope_freqs") or ".ffn_gate_inp." in name or name.endswith("_norm.weight"):
        return "F32"
    rules = FILE_TYPES[ftype]
    if rules.default in FLOAT_TYPES:
        return rules.default
    block = block_type(rules.default)
    if cols % block.block_size != 0:
        # Rows that are not whole blocks: llama.cpp falls back Q4_K -> Q5_0, Q5_K -> Q5_1 and Q6_K ->
        # Q8_0. l4q has no Q5_0 / Q5_1 encoder, so it writes Q8_0 there too (larger, more precise). Llama 4's rows (5120,
        # 8192, 16384 wide) are all whole blocks, so no real checkpoint reaches this.
        return block.fallback if block.fallback in BLOCK_TYPES else "Q8_0"
    if name == "output.weight":
        return rules.output or rules.default
    if ".attn_v." in name and rules.attn_v:
        which, qtype = rules.attn_v
        if use_more_bits(attn_v_index, n_layers) if which == MORE_BITS else attn_v_index < 4:
            return qtype
    if ".ffn_down" in name and rules.ffn_down:
        which, qtype = rules.ffn_down
        if use_more_bits(layer, n_layers) if which == MORE_BITS else layer < n_layers // 8:
            return qtype
    return rules.default
