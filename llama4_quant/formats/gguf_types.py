"""GGUF file types (--type Q4_K_M ...) as a table of rules: which block type each tensor gets,
following llama-quantize's choices for a Llama 4 (a MoE model whose expert count is not 8).

Block types themselves (geometry, encoders, fallbacks) live in `gguf_quants.BLOCK_TYPES`. Nothing
here imports numpy or torch, so the CLI reads its choices from this table at start-up. Adding a file
type is one row in FILE_TYPES plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_TYPES = ("F32", "F16", "BF16")


# Which attn_v / ffn_down / attn_output tensors a file type gives another block type
# (llama-quant.cpp's llama_tensor_get_type_impl for a MoE model whose expert count is not 8): a
# rule is a tuple of (selector, block type) clauses, the first whose selector picks the tensor wins.
# attn_v is selected by its index in file order, ffn_down (routed, shared, dense) by its layer;
# GQA_4 picks every such tensor of a model with 4 or more query heads per KV head, and
# FIRST_EIGHTH_PLAIN the first eighth of the layers when no importance matrix is given.
ALL, MORE_BITS, FIRST_2, FIRST_4, FIRST_EIGHTH, FIRST_SIXTEENTH, GQA_4, FIRST_EIGHTH_PLAIN = (
    "all", "more_bits", "first_2", "first_4", "first_eighth", "first_sixteenth", "gqa_4", "first_eighth_plain")
Rule = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FileType:
    name: str  # as given to --type
    llama_name: str  # gguf-py's LlamaFileType member, stored as general.file_type
    default: str  # block type of a quantizable weight
    output: str | None = None  # block type of output.weight, where it differs from `default`
    attn_v: Rule = ()
    ffn_down: Rule = ()
    attn_output: Rule = ()


_M_MIX = ((MORE_BITS, "Q6_K"),)
FILE_TYPES: dict[str, FileType] = {t.name: t for t in (
    FileType("F32", "ALL_F32", "F32"),
    FileType("F16", "MOSTLY_F16", "F16"),
    FileType("BF16", "MOSTLY_BF16", "BF16"),
    FileType("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
    FileType("Q4_0", "MOSTLY_Q4_0", "Q4_0", output="Q6_K"),
    FileType("Q6_K", "MOSTLY_Q6_K", "Q6_K"),
    FileType("Q5_K_M", "MOSTLY_Q5_K_M", "Q5_K", output="Q6_K", attn_v=_M_MIX, ffn_down=_M_MIX),
    FileType("Q5_K_S", "MOSTLY_Q5_K_S", "Q5_K", output="Q6_K"),
    FileType("Q4_K_M", "MOSTLY_Q4_K_M", "Q4_K", output="Q6_K", attn_v=_M_MIX, ffn_down=_M_MIX),
    FileType("Q4_K_S", "MOSTLY_Q4_K_S", "Q4_K", output="Q6_K", attn_v=((FIRST_4, "Q5_K"),),
             ffn_down=((FIRST_EIGHTH, "Q5_K"),)),
    FileType("Q3_K_L", "MOSTLY_Q3_K_L", "Q3_K", output="Q6_K", attn_v=((ALL, "Q5_K"),), ffn_down=((ALL, "Q5_K"),),
             attn_output=((ALL, "Q5_K"),)),
    FileType("Q3_K_M", "MOSTLY_Q3_K_M", "Q3_K", output="Q6_K", attn_v=((FIRST_2, "Q5_K"), (ALL, "Q4_K")),
             ffn_down=((FIRST_SIXTEENTH, "Q5_K"), (ALL, "Q4_K")), attn_output=((ALL, "Q4_K"),)),
    FileType("Q3_K_S", "MOSTLY_Q3_K_S", "Q3_K", output="Q6_K"),
    FileType("Q2_K", "MOSTLY_Q2_K", "Q2_K", output="Q6_K", attn_v=((GQA_4, "Q4_K"), (ALL, "Q3_K")),
             ffn_down=((ALL, "Q3_K"),), attn_output=((ALL, "Q3_K"),)),
    FileType("IQ4_XS", "MOSTLY_IQ4_XS", "IQ4_XS", output="Q6_K", attn_v=((GQA_4, "Q5_K"),),
             ffn_down=((FIRST_EIGHTH_PLAIN, "Q5_K"),)),
    FileType("IQ4_NL", "MOSTLY_IQ4_NL", "IQ4_NL", output="Q6_K", attn_v=((GQA_4, "Q5_K"),),
             ffn_down=((FIRST_EIGHTH_PLAIN, "Q5_K"),)),
)}


def _selects(selector: str, index: int, n_layers: int, n_gqa: int, has_imatrix: bool) -> bool:
    if selector == ALL:
        return True
    if selector == GQA_4:
        return n_gqa >= 4
    if selector == FIRST_EIGHTH_PLAIN:
        return not has_imatrix and index < n_layers // 8
    if selector == MORE_BITS:
        return use_more_bits(index, n_layers)
    return index < {FIRST_2: 2, FIRST_4: 4, FIRST_EIGHTH: n_layers // 8, FIRST_SIXTEENTH: n_layers // 16}[selector]


def _apply(rule: Rule, index: int, n_layers: int, n_gqa: int, has_imatrix: bool) -> str | None:
    return next((qtype for selector, qtype in rule if _selects(selector, index, n_layers, n_gqa, has_imatrix)), None)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, ndim: int, cols: int, ftype: str, layer: int | None, n_layers: int, attn_v_index: int,
                n_gqa: int = 1, has_imatrix: bool = False) -> str:
    """The GGUF block type of one tensor (by its GGUF name) under file type `ftype`.

    Norms, 1-D tensors, rope_freqs and the router (ffn_gate_inp) stay F32 in every file type.
    output.weight takes the row's `output` type; attn_v (counted in file order), every ffn_down
    (routed, shared and dense) and attn_output take the row's rule for them where it picks them;
    `n_gqa` is the model's query heads per KV head, `has_imatrix` whether importance data is given.
    """
    from .gguf_quants import BLOCK_TYPES, block_type

    if ndim == 1 or name.startswith("rope_freqs") or ".ffn_gate_inp." in name or name.endswith("_norm.weight"):
        return "F32"
    rules = FILE_TYPES[ftype]
    if rules.default in FLOAT_TYPES:
        return rules.default
    block = block_type(rules.default)
    if cols % block.block_size != 0:
        # Rows that are not whole blocks: llama.cpp falls back Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K
        # -> Q5_1, Q6_K -> Q8_0 and IQ4_XS -> IQ4_NL. l4q has no Q5_0 / Q5_1 encoder, so it writes Q8_0 there (larger, more
        # precise). Llama 4's rows (5120, 8192, 16384 wide) are all whole blocks: no real checkpoint
        # reaches this.
        return block.fallback if block.fallback in BLOCK_TYPES else "Q8_0"
    if name == "output.weight":
        return rules.output or rules.default
    chosen = None
    if ".attn_v." in name:
        chosen = _apply(rules.attn_v, attn_v_index, n_layers, n_gqa, has_imatrix)
    elif ".ffn_down" in name:
        chosen = _apply(rules.ffn_down, layer, n_layers, n_gqa, has_imatrix)
    elif ".attn_output." in name:
        chosen = _apply(rules.attn_output, 0, n_layers, n_gqa, has_imatrix)
    return chosen or rules.default
