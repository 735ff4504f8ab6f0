"""GGUF for llama.cpp (arch `llama4`), written straight from BF16 safetensors in one streaming pass.

Tensor names, shapes, metadata and F16 data follow what llama.cpp's own converter
(`convert_hf_to_gguf.py`, class Llama4Model) writes for the same model; the quantized types follow
llama.cpp's `llama-quantize` type rules. The file is written through gguf-py's GGUFWriter (header, KV
data and tensor infos), then each tensor's data is appended one expert slice at a time, so memory is
bounded by one slice, never by a tensor or the model. Block encodings live in `gguf_quants`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__, arch, outputs
from ..arch import Llama4Spec
from ..checkpoint import Checkpoint, iter_row_blocks, read_slice
from ..errors import NonFiniteWeightError, SourceNotFoundError, UsageError
from ..model import Model, display_name, open_model, unfuse_gate_up
from ..sources import Source
from . import gguf_quants

GGUF_ALIGNMENT = 32
LLAMA_CPP_CHUNK = 8192
# --type -> (llama.cpp file type name, default type of a quantizable 2-D weight)
FILE_TYPES = {
    "F32": ("ALL_F32", "F32"),
    "F16": ("MOSTLY_F16", "F16"),
    "BF16": ("MOSTLY_BF16", "BF16"),
    "Q8_0": ("MOSTLY_Q8_0", "Q8_0"),
    "Q4_0": ("MOSTLY_Q4_0", "Q4_0"),
    "Q6_K": ("MOSTLY_Q6_K", "Q6_K"),
    "Q4_K_M": ("MOSTLY_Q4_K_M", "Q4_K"),
}

# HF names inside a decoder layer -> GGUF names (llama.cpp's tensor map for llama4)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output",
    "feed_forward.router.weight": "ffn_gate_inp",
    "feed_forward.shared_expert.gate_proj.weight": "ffn_gate_shexp",
    "feed_forward.shared_expert.up_proj.weight": "ffn_up_shexp",
    "feed_forward.shared_expert.down_proj.weight": "ffn_down_shexp",
    "feed_forward.gate_proj.weight": "ffn_gate",
    "feed_forward.up_proj.weight": "ffn_up",
    "feed_forward.down_proj.weight": "ffn_down",
}


@dataclass
class GGUFTensor:
    """One planned GGUF tensor: its name, numpy-order shape, type, and how to produce its rows.

    `produce` yields blocks whose concatenation along dim 0 is the whole tensor: one expert at a time
    for expert tensors, bounded blocks of whole rows otherwise."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    produce: Callable[[], Iterator[torch.Tensor]]
    layer: int | None = None
    source_bytes: int = 0
    importance_key: str | None = None  # which calibration statistics apply (see `importance`)

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        return math.prod(self.shape) // block * size


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, ndim: int, cols: int, ftype: str, layer: int | None, n_layers: int, attn_v_index: int) -> str:
    """The GGUF type of one tensor under file type `ftype`, following llama.cpp.

    Norms, 1-D tensors, rope_freqs and the router (ffn_gate_inp) stay F32 in every file type. For the
    K-quant mixes (llama-quantize's rules for a model whose expert count is not 8):
    output.weight -> Q6_K; attn_v -> Q6_K in the layers `use_more_bits` picks, else the default;
    every ffn_down (routed, shared and dense) -> Q6_K in those layers; everything else the default.
    Q4_0 puts output.weight in Q6_K as well, as llama-quantize does; Q8_0 keeps it Q8_0.
    """
    if ndim == 1 or name.startswith("rope_freqs") or ".ffn_gate_inp." in name or name.endswith("_norm.weight"):
        return "F32"
    default = FILE_TYPES[ftype][1]
    if default in ("F32", "F16", "BF16"):
        return default
    block = gguf_quants.block_type(default)
    if cols % block.block_size != 0:
        # Rows that are not whole blocks: llama.cpp falls back Q4_K -> Q5_0 and Q6_K -> Q8_0. l4q has
        # no Q5_0 encoder, so it writes Q8_0 there too (larger, more precise). Llama 4's rows (5120,
        # 8192, 16384 wide) are all whole blocks, so no real checkpoint reaches this.
        return block.fallback if block.fallback in gguf_quants.BLOCK_TYPES else "Q8_0"
    if name == "output.weight":
        return "Q8_0" if default == "Q8_0" else "Q6_K"
    if ftype == "Q4_K_M":
        if ".attn_v." in name and use_more_bits(attn_v_index, n_layers):
            return "Q6_K"
        if ".ffn_down" in name and use_more_bits(layer, n_layers):
            return "Q6_K"
    return default


def rope_freqs(spec: Llama4Spec) -> torch.Tensor | None:
    """llama3 rope scaling as the per-frequency factors llama.cpp reads from `rope_freqs.weight`."""
    rs = spec.rope_scaling or {}
    if str(rs.get("rope_type", rs.get("type", ""))).lower() != "llama3":
        return None
    dim = spec.head_dim
    freqs = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_len = rs.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs:  # the same float32 arithmetic as llama.cpp's converter, for identical bytes
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def plan(ckpt: Checkpoint, spec: Llama4Spec, ftype: str) -> list[GGUFTensor]:
    """Every GGUF tensor of the text model, in the source's storage order (rope_freqs first)."""
    if ftype not in FILE_TYPES:
        raise UsageError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    n = spec.num_layers
    out: list[GGUFTensor] = []
    freqs = rope_freqs(spec)
    if freqs is not None:
        out.append(GGUFTensor("rope_freqs.weight", tuple(freqs.shape), "F32", lambda f=freqs: iter([f])))
    attn_v_seen = 0
    experts_done: set[int] = set()
    p = spec.text_prefix
    for info in ckpt.tensors:
        role = arch.classify(info.name, spec)
        if role.role in (arch.VISION, arch.PROJECTOR):
            continue  # the vision tower and projector belong in an mmproj file
        if role.role in arch.EXPERT_ROLES:
            if role.layer in experts_done:
                continue
            experts_done.add(role.layer)
            out += _expert_tensors(ckpt, spec, ftype, role.layer)
            continue
        if info.name == f"{p}model.embed_tokens.weight":
            name = "token_embd.weight"
        elif info.name == f"{p}model.norm.weight":
            name = "output_norm.weight"
        elif info.name == f"{p}lm_head.weight":
            name = "output.weight"
        elif role.layer is not None and (rest := info.name.split(f"layers.{role.layer}.", 1)[1]) in _LAYER_NAMES:
            name = f"blk.{role.layer}.{_LAYER_NAMES[rest]}.weight"
        else:
            warnings.warn(f"{info.name} has no GGUF counterpart and is left out", stacklevel=2)
            continue
        qtype = tensor_type(name, len(info.shape), info.shape[-1], ftype, role.layer, n, attn_v_seen)
        attn_v_seen += ".attn_v." in name
        out.append(GGUFTensor(name, info.shape, qtype, lambda info=info: iter_row_blocks(info), role.layer,
                              info.nbytes, importance_key=info.name.removesuffix(".weight")))
    return out


def _expert_tensors(ckpt: Checkpoint, spec: Llama4Spec, ftype: str, layer: int) -> list[GGUFTensor]:
    """ffn_{gate,up,down}_exps: the fused HF tensors transposed and split, produced one expert at a time."""
    base = f"{spec.layer_prefix}{layer}.feed_forward.experts"
    gate_up, down = ckpt.by_name[f"{base}.gate_up_proj"], ckpt.by_name[f"{base}.down_proj"]
    e, h, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size

    def gate_or_up(half: int):
        def produce():
            for i in range(e):
                yield unfuse_gate_up(read_slice(gate_up, i))[half][None]

        return produce

    def produce_down():
        for i in range(e):
            yield read_slice(down, i).T[None]

    tensors = []
    for kind, shape, produce, src in (
        ("gate", (e, inter, h), gate_or_up(0), gate_up.nbytes // 2),
        ("up", (e, inter, h), gate_or_up(1), gate_up.nbytes // 2),
        ("down", (e, h, inter), produce_down, down.nbytes),
    ):
        name = f"blk.{layer}.ffn_{kind}_exps.weight"
        qtype = tensor_type(name, 3, shape[-1], ftype, layer, spec.num_layers, 0)
        tensors.append(GGUFTensor(name, shape, qtype, produce, layer, src, importance_key=f"{base}.{kind}"))
    return tensors


# ---------------------------------------------------------------------------------------------
# Metadata


def add_metadata(writer, model_dir: Path, config: dict, spec: Llama4Spec, ftype: str, source: Source) -> None:
    """general.*, llama4.* and tokenizer.* keys as llama.cpp's converter writes them, plus l4q's own."""
    import gguf

    total, shared, expert, count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[ftype][0]])
    # Beyond the converter's keys: what this file derives from, and that l4q made it.
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, display_name(source))  # never a local path
    if source.repo_id:
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{source.repo_id}")
    writer.add_string("general.quantized_by", f"l4q {__version__}")

    text = config.get("text_config", config)
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size_mlp)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_expert_count(spec.num_experts)
    writer.add_expert_used_count(spec.experts_per_token)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_interleave_moe_layer_step(int(text.get("interleave_moe_layer_step", 1)))
    writer.add_expert_feed_forward_length(spec.intermediate_size)
    if "layer_types" in text and all(t == "full_attention" for t in text["layer_types"]):
        writer.add_sliding_window(0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, spec.vocab_size)


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """gpt2-style BPE vocabulary with Llama 4's pre-tokenizer, as llama.cpp's converter writes it."""
    import gguf
    from transformers import AutoTokenizer

    from ..text import quiet_transformers

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama4")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # it chats about template tokens it does not need
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True)
        special.add_to_gguf(writer, quiet=True)
    finally:
        gguf_log.setLevel(level)
    # Older gguf-py releases leave out the flags a tokenizer's template does not set; newer ones (and
    # llama.cpp's converter) write them from what the tokenizer actually adds around a text.
    ids = tokenizer("a")["input_ids"]
    implied = {"bos": ids[:1] == [tokenizer.bos_token_id], "eos": ids[-1:] == [tokenizer.eos_token_id], "sep": False}
    for kind, value in implied.items():
        if kind not in special.add_special_token:
            getattr(writer, f"add_add_{kind}_token")(value)


def llama_cpp_warnings(spec: Llama4Spec) -> list[str]:
    """Settings of this model that llama.cpp's Llama 4 loader does not honour."""
    found = []
    if spec.attention_chunk_size not in (None, LLAMA_CPP_CHUNK):
        found.append(
            f"attention_chunk_size is {spec.attention_chunk_size}, but llama.cpp always uses {LLAMA_CPP_CHUNK} for "
            f"Llama 4: outputs match only on contexts up to {spec.attention_chunk_size} tokens"
        )
    if spec.use_qk_norm != (spec.num_experts != 128):
        found.append(
            f"use_qk_norm is {spec.use_qk_norm}, but llama.cpp turns qk-norm {'off' if spec.num_experts == 128 else 'on'} "
            f"for a Llama 4 with {spec.num_experts} experts: this model will run wrongly there"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Writing


def encode(data: torch.Tensor, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    """Rows of one tensor slice in `qtype`, as the bytes GGUF stores."""
    if qtype == "BF16":
        return data.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(data.shape[0], -1)
    if qtype in ("F32", "F16"):
        # bf16 -> f32 is exact; f32 -> f16 rounds to nearest even, as llama.cpp's converter does.
        arr = data.to(torch.float32).numpy()
        return (arr if qtype == "F32" else arr.astype(np.float16)).reshape(-1).view(np.uint8)
    rows = data.reshape(-1, data.shape[-1]).to(torch.float32).numpy()
    return gguf_quants.quantize(rows, qtype, importance).reshape(-1)


@dataclass
class ExportResult:
    out: Path
    tensors: list[GGUFTensor]
    source_bytes: int
    output_bytes: int
    warnings: list[str]


def _write_gguf(path: Path, tensors: list[GGUFTensor], model: Model, ftype: str, importance, show_progress: bool) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "llama4")
    for t in tensors:
        # Declared as bytes: GGUFWriter turns the byte shape back into the element shape for any type.
        byte_shape = (*t.shape[:-1], t.nbytes // math.prod(t.shape[:-1]))
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    add_metadata(writer, model.dir, model.config, model.spec, ftype, model.source)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        with tqdm(total=sum(t.source_bytes for t in tensors), unit="B", unit_scale=True, unit_divisor=1024,
                  disable=not show_progress, desc=f"gguf {ftype}", dynamic_ncols=True) as bar:
            for t in tensors:
                fout.write(b"\0" * (-fout.tell() % GGUF_ALIGNMENT))
                written = 0
                imp = importance(t.importance_key) if importance and t.importance_key else None
                for e, part in enumerate(t.produce()):  # e: the expert, for expert tensors
                    if not torch.isfinite(part).all():
                        raise NonFiniteWeightError(f"{t.name}: NaN/Inf in the source weight")
                    imp_part = imp[e] if imp is not None and imp.ndim == 2 else imp
                    raw = encode(part, t.qtype, imp_part)
                    fout.write(raw.tobytes())
                    written += raw.nbytes
                    bar.update(part.numel() * 2 if t.source_bytes else 0)
                if written != t.nbytes:
                    raise RuntimeError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
            fout.write(b"\0" * (-fout.tell() % GGUF_ALIGNMENT))
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        writer.close()


def export_gguf(
    source: Source | Model,
    out: Path,
    ftype: str,
    *,
    importance: Callable[[str], np.ndarray | None] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ExportResult:
    """Write `source`'s text model as a GGUF file of type `ftype`; `out` appears only when complete.

    `importance(key)` may return per-input-channel importance weights for a tensor (calibration's
    E[x^2]), by the HF module name, or [experts, in] for expert tensors; the K-quant search uses them.
    """
    model = source if isinstance(source, Model) else open_model(source)
    spec = model.spec
    if not (model.dir / "tokenizer.json").is_file():
        raise SourceNotFoundError(f"{model.dir}: no tokenizer.json; a GGUF file carries the model's tokenizer, "
                                  "so the source needs its tokenizer files")
    tensors = plan(model.ckpt, spec, ftype)
    partial = outputs.start(out, model.paths, "", resume=False, overwrite=overwrite, is_file=True, resumable=False)
    out = partial.out
    tmp = partial.path(out.name)
    try:
        with outputs.writing(partial.dir):
            _write_gguf(tmp, tensors, model, ftype, importance, show_progress)
    except BaseException as exc:
        partial.fail(exc)
        raise
    with outputs.writing(out):
        partial.commit(out.name)
    return ExportResult(out, tensors, sum(t.source_bytes for t in tensors), out.stat().st_size, llama_cpp_warnings(spec))
