"""GGUF file types (--type Q4_K_M ...) as a table of rules: which block type each tensor gets,
following llama-quantize's choices for a Llama 4 (a MoE model whose expert count is not 8).

Block types themselves (geometry, encoders, fallbacks) live in `gguf_quants.BLOCK_TYPES`. Nothing
here imports numpy or torch, so the CLI reads its choices from this table at start-up. Adding a file
type is one row in FILE_TYPES plus its tests.
"""

from __future__ import annotations

import re
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
    tensor_types: tuple[tuple[str, str], ...] = ()  # built-in (regex, block type) choices, as --tensor-type
    needs_imatrix: bool = False  # llama-quantize refuses the type without an importance matrix


# The MoE-aware mixes: the routed experts (most of the bytes: 16 x 3 or 128 x 3 projections per MoE
# layer, of which a token uses one) at low bits, everything every token uses (attention, the shared
# expert, dense layers, embeddings, output) as in Q4_K_M, in the manner of the "dynamic" GGUFs
# published for Llama 4.
_EXPERTS_Q2 = (("ffn_(gate|up)_exps", "Q2_K"), ("ffn_down_exps", "Q3_K"))
_EXPERTS_Q3 = (("ffn_(gate|up)_exps", "Q3_K"), ("ffn_down_exps", "Q4_K"))


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
    FileType("Q2_K_S", "MOSTLY_Q2_K_S", "Q2_K", output="Q6_K", attn_v=((GQA_4, "Q4_K"),),
             ffn_down=((FIRST_EIGHTH, "Q4_K"),), needs_imatrix=True),
    FileType("IQ4_XS", "MOSTLY_IQ4_XS", "IQ4_XS", output="Q6_K", attn_v=((GQA_4, "Q5_K"),),
             ffn_down=((FIRST_EIGHTH_PLAIN, "Q5_K"),)),
    FileType("IQ4_NL", "MOSTLY_IQ4_NL", "IQ4_NL", output="Q6_K", attn_v=((GQA_4, "Q5_K"),),
             ffn_down=((FIRST_EIGHTH_PLAIN, "Q5_K"),)),
    FileType("Q3_K_MOE", "MOSTLY_Q3_K_M", "Q4_K", output="Q6_K", attn_v=_M_MIX, ffn_down=_M_MIX,
             tensor_types=_EXPERTS_Q3),
    FileType("Q2_K_MOE", "MOSTLY_Q2_K", "Q4_K", output="Q6_K", attn_v=_M_MIX, ffn_down=_M_MIX,
             tensor_types=_EXPERTS_Q2),
)}

# The mmproj (vision tower and projector) file's types, as llama.cpp's converter offers them for it:
# type -> gguf-py's LlamaFileType member.
MMPROJ_TYPES = {"F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "F32": "ALL_F32"}


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


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor choices: `--tensor-type REGEX=TYPE` (the first pattern found in a
    tensor's name wins over the file type's rules), `--output-tensor-type`, `--token-embedding-type`."""

    tensor_types: tuple[tuple[str, str], ...] = ()
    output: str | None = None
    token_embedding: str | None = None


def parse_overrides(tensor_types: tuple[str, ...] = (), output: str | None = None,
                    token_embedding: str | None = None) -> Overrides:
    """Overrides from the command line's strings, read as llama-quantize reads them (the pattern up to
    the first '=', lower-cased; type names in any case); a bad pattern or type name is a UsageError."""
    from ..errors import UsageError

    output, token_embedding = (q.upper() if q else None for q in (output, token_embedding))
    pairs = []
    for spec in tensor_types:
        pattern, sep, qtype = spec.partition("=")
        pattern, qtype = pattern.lower(), qtype.upper()
        if not sep or not pattern or not qtype:
            raise UsageError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'ffn_.*_exps=Q2_K'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--tensor-type {spec!r}: bad regular expression ({exc})") from None
        pairs.append((pattern, qtype))
    named = [q for _, q in pairs] + [q for q in (output, token_embedding) if q]
    known = list(FLOAT_TYPES) + list(_block_types()) if named else []  # the block types import torch
    for qtype in named:
        if qtype not in known:
            raise UsageError(f"unknown tensor type {qtype!r}; choose one of {', '.join(known)}")
    return Overrides(tuple(pairs), output, token_embedding)


def _block_types():
    from .gguf_quants import BLOCK_TYPES

    return BLOCK_TYPES


def _fallback(qtype: str, cols: int) -> str:
    """llama.cpp's tensor_type_fallback for rows that are not whole blocks of `qtype`: Q2_K / Q3_K ->
    Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, then F16 if that does not fit
    either. l4q has no Q5_0 / Q5_1 encoder and writes Q8_0 there (larger, more precise). Llama 4's
    rows (5120, 8192, 16384 wide) are all whole blocks: no real checkpoint reaches this."""
    blocks = _block_types()
    if qtype in FLOAT_TYPES or cols % blocks[qtype].block_size == 0:
        return qtype
    fallback = blocks[qtype].fallback
    fallback = fallback if fallback in blocks else "Q8_0"
    return fallback if cols % blocks[fallback].block_size == 0 else "F16"


def tensor_type(name: str, ndim: int, cols: int, ftype: str, layer: int | None, n_layers: int, attn_v_index: int,
                n_gqa: int = 1, has_imatrix: bool = False, overrides: Overrides | None = None) -> str:
    """The GGUF block type of one tensor (by its GGUF name) under file type `ftype`.

    Norms, 1-D tensors, rope_freqs and the router (ffn_gate_inp) stay F32 in every file type.
    output.weight takes the row's `output` type; attn_v (counted in file order), every ffn_down
    (routed, shared and dense) and attn_output take the row's rule for them where it picks them;
    `n_gqa` is the model's query heads per KV head, `has_imatrix` whether importance data is given.
    `overrides` come first, as in llama-quantize (and --tensor-type only in a quantized file type).
    """
    if ndim == 1 or name.startswith("rope_freqs") or ".ffn_gate_inp." in name or name.endswith("_norm.weight"):
        return "F32"
    overrides = overrides or Overrides()
    if name == "token_embd.weight" and overrides.token_embedding:
        return overrides.token_embedding
    if name == "output.weight" and overrides.output:
        return overrides.output
    rules = FILE_TYPES[ftype]
    if rules.default in FLOAT_TYPES:
        return rules.default
    patterns = overrides.tensor_types + rules.tensor_types  # the user's first
    chosen = next((qtype for pattern, qtype in patterns if re.search(pattern, name)), None)
    if chosen is None and name == "output.weight":
        chosen = rules.output if cols % _block_types()[rules.default].block_size == 0 else "Q8_0"
    elif chosen is None and ".attn_v." in name:
        chosen = _apply(rules.attn_v, attn_v_index, n_layers, n_gqa, has_imatrix)
    elif chosen is None and ".ffn_down" in name:
        chosen = _apply(rules.ffn_down, layer, n_layers, n_gqa, has_imatrix)
    elif chosen is None and ".attn_output." in name:
        chosen = _apply(rules.attn_output, 0, n_layers, n_gqa, has_imatrix)
    return _fallback(chosen or rules.default, cols)
