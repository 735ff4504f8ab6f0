"""GGUF for llama.cpp (arch `llama4`), written straight from BF16 safetensors in one streaming pass.

Tensor names, shapes, metadata and F16 data follow what llama.cpp's own converter
(`convert_hf_to_gguf.py`, class Llama4Model) writes for the same model; the quantized types follow
llama.cpp's `llama-quantize` type rules. The file is written through gguf-py's GGUFWriter (header, KV
data and tensor infos), then each tensor's data is appended one expert slice at a time, so memory is
bounded by one slice, never by a tensor or the model. Block encodings live in `gguf_quants`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__, arch, distributed, outputs, walk
from ..arch import Llama4Spec
from ..checkpoint import rows_per_block
from ..devices import resolve_device
from ..errors import NonFiniteWeightError, SourceNotFoundError, UsageError
from ..model import Model, display_name, open_model
from ..schemes import check_finite
from ..sources import Source
from . import gguf_budget, gguf_quants
from .gguf_types import FILE_TYPES, Overrides, tensor_type

GGUF_ALIGNMENT = 32
LLAMA_CPP_CHUNK = 8192
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
    """One planned GGUF tensor: its name, numpy-order shape and type, and where its data comes from.

    Expert tensors ([experts, rows, cols]) are fed one expert at a time by the walk's weights
    `...experts.{e}.{gate,up,down}_proj.weight`; other tensors by the walk's weight `source` in blocks
    of whole rows; rope_freqs is computed (`data`)."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    layer: int | None = None
    source: str | None = None  # the walk's weight name (for expert tensors: expert 0's projection)
    source_bytes: int = 0
    importance_key: str | None = None  # which calibration statistics apply (see `importance`)
    data: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        return math.prod(self.shape) // block * size

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one expert's matrix for a 3-D tensor)."""
        return self.nbytes // self.shape[0]


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


def plan(model: Model, ftype: str, has_imatrix: bool = False, overrides: Overrides | None = None) -> list[GGUFTensor]:
    """Every GGUF tensor of the text model, in the walk's order (rope_freqs first); `has_imatrix`:
    importance data is given (some file types then keep fewer tensors at more bits); `overrides`:
    llama-quantize's per-tensor choices."""
    if ftype not in FILE_TYPES:
        raise UsageError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    spec = model.spec
    out: list[GGUFTensor] = []
    freqs = rope_freqs(spec)
    if freqs is not None:
        out.append(GGUFTensor("rope_freqs.weight", tuple(freqs.shape), "F32", data=freqs))
    attn_v_seen = 0
    n_gqa = spec.num_heads // spec.num_kv_heads
    p = spec.text_prefix
    for w in walk.weights(model):
        if w.role in (arch.VISION, arch.PROJECTOR):
            continue  # the vision tower and projector belong in an mmproj file
        if w.expert is not None:
            if w.expert == 0:  # ffn_{gate,up,down}_exps: the experts of one projection stacked
                kind = w.module.rsplit(".", 1)[1].removesuffix("_proj")
                name = f"blk.{w.layer}.ffn_{kind}_exps.weight"
                shape = (spec.num_experts, *w.shape)
                qtype = tensor_type(name, 3, shape[-1], ftype, w.layer, spec.num_layers, 0, n_gqa, has_imatrix, overrides)
                out.append(GGUFTensor(name, shape, qtype, w.layer, w.name, w.source_bytes * spec.num_experts, w.stats_key))
            continue
        if w.name == f"{p}model.embed_tokens.weight":
            name = "token_embd.weight"
        elif w.name == f"{p}model.norm.weight":
            name = "output_norm.weight"
        elif w.name == f"{p}lm_head.weight":
            name = "output.weight"
        elif w.layer is not None and (rest := w.name.split(f"layers.{w.layer}.", 1)[1]) in _LAYER_NAMES:
            name = f"blk.{w.layer}.{_LAYER_NAMES[rest]}.weight"
        else:
            warnings.warn(f"{w.name} has no GGUF counterpart and is left out", stacklevel=2)
            continue
        qtype = tensor_type(name, len(w.shape), w.shape[-1], ftype, w.layer, spec.num_layers, attn_v_seen,
                            n_gqa, has_imatrix, overrides)
        attn_v_seen += ".attn_v." in name
        out.append(GGUFTensor(name, w.shape, qtype, w.layer, w.name, w.source_bytes, w.stats_key))
    return out


# ---------------------------------------------------------------------------------------------
# Metadata


def add_general(writer, model_dir: Path, source: Source, file_type: str, gguf_type: str) -> None:
    """general.* keys as llama.cpp's converter writes them (name, size label, sampling defaults, ...;
    `file_type`: a gguf.LlamaFileType name, `gguf_type`: "model" or "mmproj"), plus l4q's own."""
    import gguf

    total, shared, expert, count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(gguf_type)
    meta.set_gguf_meta_model(writer)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    # Beyond the converter's keys: what this file derives from, and that l4q made it.
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, display_name(source))  # never a local path
    if source.repo_id:
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{source.repo_id}")
    writer.add_string("general.quantized_by", f"l4q {__version__}")


def add_metadata(writer, model_dir: Path, config: dict, spec: Llama4Spec, ftype: str, source: Source) -> None:
    """general.*, llama4.* and tokenizer.* keys as llama.cpp's converter writes them, plus l4q's own."""
    import gguf

    add_general(writer, model_dir, source, FILE_TYPES[ftype].llama_name, gguf.GGUFType.MODEL)
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


def encode(data: torch.Tensor, qtype: str, importance: np.ndarray | None, device: torch.device | str = "cpu") -> np.ndarray:
    """Rows of one tensor slice in `qtype`, as the bytes GGUF stores; block types are encoded on
    `device` (the same bytes on the CPU and a GPU)."""
    if qtype == "BF16":
        return data.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(data.shape[0], -1)
    if qtype in ("F32", "F16"):
        # bf16 -> f32 is exact; f32 -> f16 rounds to nearest even, as llama.cpp's converter does.
        arr = data.to(torch.float32).numpy()
        return (arr if qtype == "F32" else arr.astype(np.float16)).reshape(-1).view(np.uint8)
    # bf16 rows as they come (an expert's transposed view too): the encoders load tiles of rows on
    # the kernel threads and widen them to float32 themselves
    return gguf_quants.quantize(data.reshape(-1, data.shape[-1]), qtype, importance, device).reshape(-1)


def fingerprint(tensors: list[GGUFTensor], ftype: str, source_fingerprint: str, importance_digest: str,
                header_digest: str) -> str:
    """Identifies the source's content, the options and the file's layout, for --resume."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, ftype, importance_digest, source_fingerprint, header_digest]).encode())
    for t in tensors:
        h.update(f"{t.name}:{t.qtype}:{t.shape}\n".encode())
    return h.hexdigest()


class GGUFTarget:
    """A GGUF file at `out`, written from the walk (see `walk.Target`).

    The header, metadata and tensor infos are written first; every tensor's place in the file then
    follows from the planned sizes, so each piece of data is written where it belongs as the walk
    brings it (an expert tensor one expert at a time, others in blocks of rows). A tensor whose bytes
    are all written and synced is recorded in the partial's progress, so --resume rewrites only the rest.
    In a job of several ranks, each rank encodes and writes the tensors `owners` gives it into rank 0's
    file (which rank 0 created with the header); tensors read together stay with one rank.
    """

    def __init__(self, model: Model, out: Path, ftype: str, *, importance: Callable[[str], np.ndarray | None] | None = None,
                 importance_digest: str = "", resume: bool = False, overwrite: bool = False,
                 device: torch.device | str = "cpu", overrides: Overrides | None = None,
                 budget: gguf_budget.Budget | None = None, stats=None):
        self.model, self.out, self.ftype, self.importance = model, out, ftype, importance
        self.budget, self.stats = budget, stats  # stats: calibrate.stats.Stats, for the budget
        self._override_patterns = [p for p, _ in overrides.tensor_types] if overrides else []
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.importance_digest, self.resume, self.overwrite = importance_digest, resume, overwrite
        self.tensors = self.plan_tensors(overrides)
        self._by_weight: dict[str, GGUFTensor] = {}
        self._last_weight: dict[str, GGUFTensor] = {}  # the walk's last weight feeding each tensor
        for t in self.tensors:
            if t.source is None:
                continue
            if len(t.shape) == 3:
                names = [t.source.replace(".experts.0.", f".experts.{e}.") for e in range(t.shape[0])]
            else:
                names = [t.source]
            self._by_weight.update(dict.fromkeys(names, t))
            self._last_weight[names[-1]] = t
        self.partial: outputs.Partial | None = None
        self._file = None
        self._writer: outputs.FileWriter | None = None
        self._importance_of: dict[str, np.ndarray | None] = {}

    # What differs between GGUF files of one model (the text model here, the mmproj in gguf_mmproj):
    # the architecture, the tensors, the metadata, and what the source must hold.
    arch_name = "llama4"

    def plan_tensors(self, overrides: Overrides | None) -> list[GGUFTensor]:
        return plan(self.model, self.ftype, has_imatrix=self.importance is not None, overrides=overrides)

    def add_metadata(self, writer) -> None:
        add_metadata(writer, self.model.dir, self.model.config, self.model.spec, self.ftype, self.model.source)

    def check_source(self) -> None:
        if FILE_TYPES[self.ftype].needs_imatrix and self.importance is None:
            raise UsageError(f"{self.ftype} needs an importance matrix, as llama-quantize does: give --imatrix STATS "
                             "(from l4q calibrate)")
        if not (self.model.dir / "tokenizer.json").is_file():
            raise SourceNotFoundError(f"{self.model.dir}: no tokenizer.json; a GGUF file carries the model's tokenizer, "
                                      "so the source needs its tokenizer files")

    @property
    def source_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tensors)

    @property
    def expected_bytes(self) -> int:
        return len(self._header_bytes) + sum(t.nbytes + GGUF_ALIGNMENT for t in self.tensors)

    def check(self) -> None:
        self.out = outputs.check_output(self.out, self.model.paths, resume=self.resume, overwrite=self.overwrite,
                                        is_file=True)
        self.check_source()
        if self.budget is not None:
            pinned = {t.name for t in self.tensors if any(re.search(p, t.name) for p in self._override_patterns)}
            gguf_budget.apply(self.model, self.tensors, self.budget, len(self._header()), self.stats, pinned)
        # The header (metadata, tokenizer, tensor infos) fixes every tensor's offset: resuming trusts the
        # finished tensors only under the same header.
        self._header_bytes = self._header()
        self.fingerprint = fingerprint(self.tensors, self.ftype, self.model.fingerprint(), self.importance_digest,
                                       hashlib.sha256(self._header_bytes).hexdigest())
        self._mine = {t.name for t, r in zip(self.tensors, self.owners()) if r == distributed.rank()}
        outputs.check_output(self.out, self.model.paths, resume=self.resume, overwrite=self.overwrite, is_file=True,
                             fingerprint=self.fingerprint)

    def owners(self) -> list[int]:
        """The rank that writes each tensor: tensors that come from one stored tensor (an expert's gate
        and up) together, balanced by the bytes read; tensors made here (t.data) by rank 0."""
        read_of = {w.name: r.info.name for r in walk.reads(self.model) for w in r.weights}
        groups: dict[str, int] = {}
        for t in self.tensors:
            if t.source is not None:
                groups[read_of[t.source]] = groups.get(read_of[t.source], 0) + t.source_bytes
        owner = dict(zip(groups, distributed.assign(list(groups.values()))))
        return [owner[read_of[t.source]] if t.source is not None else 0 for t in self.tensors]

    def start(self) -> None:
        self.partial = outputs.start(self.out, self.model.paths, self.fingerprint, resume=self.resume,
                                     overwrite=self.overwrite, is_file=True)
        path = self.partial.path(self.out.name)
        self._done = set(self.partial.done) if path.is_file() else set()
        with outputs.writing(self.partial.dir, resume_hint=True):
            header = self._header_bytes
            data_start = len(header) + (-len(header) % GGUF_ALIGNMENT)
            main = distributed.is_main()
            self._file = open(path, "r+b" if not main or (self.partial.resumed and path.is_file()) else "wb")
            if main:
                self._file.write(header)
                self._file.flush()
            self._writer = outputs.FileWriter(self._file.fileno(), self.partial.dir, path=path)
            offset = data_start
            self._offset = {}
            for t in self.tensors:
                self._offset[t.name] = offset
                offset += t.nbytes + (-t.nbytes % GGUF_ALIGNMENT)
            if main:
                self._file.truncate(offset)  # the padding between and after tensors is zeros
            for t in self.tensors:
                if t.data is not None and t.name not in self._done and t.name in self._mine:
                    self._write(t, 0, t.data)
                    self._tensor_done(t)

    def _header(self) -> bytes:
        """Header, metadata and tensor infos, as gguf-py's GGUFWriter writes them."""
        import gguf

        class InMemoryWriter(gguf.GGUFWriter):
            # Into memory, not a scratch file: a run killed here leaves nothing behind in the temp dir.
            def open_output_file(self, path=None) -> None:
                self.fout, self.state = [io.BytesIO()], gguf.WriterState.EMPTY

        writer = InMemoryWriter(None, self.arch_name)
        for t in self.tensors:
            # Declared as bytes: GGUFWriter turns the byte shape back into the element shape for any type.
            byte_shape = (*t.shape[:-1], t.nbytes // math.prod(t.shape[:-1]))
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[t.qtype])
        self.add_metadata(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        return writer.fout[0].getvalue()

    def prepare(self, show_progress: bool) -> None:
        pass

    def wants(self, w: walk.Weight) -> str | None:
        t = self._by_weight.get(w.name)
        return walk.ROWS if t is not None and t.name not in self._done and t.name in self._mine else None

    def finds_non_finite(self, w: walk.Weight) -> bool:
        """A weight encoded to a block type: the encoders refuse NaN/Inf, and `take` then names it."""
        return self._by_weight[w.name].qtype in gguf_quants.BLOCK_TYPES

    def take(self, w: walk.Weight, start_row: int, data: torch.Tensor) -> None:
        t = self._by_weight[w.name]
        try:
            if w.expert is not None:
                self._write(t, w.expert, data[None])
                return
            step = rows_per_block(w.info)  # the walk's row blocks, however the data came
            for first in range(0, data.shape[0], step):
                self._write(t, start_row + first, data[first:first + step])
        except NonFiniteWeightError:  # the encoder's error names a row of the slice: name the weight, count them
            check_finite(data, w.name)
            raise

    def _write(self, t: GGUFTensor, first_row: int, rows: torch.Tensor) -> None:
        imp = self._importance(t)
        if imp is not None and imp.ndim == 2:
            imp = imp[first_row]  # an expert tensor's statistics: [experts, in]
        raw = encode(rows, t.qtype, imp, self.device)
        if raw.nbytes != rows.shape[0] * t.row_bytes:
            raise RuntimeError(f"{t.name}: encoded {raw.nbytes} bytes for {rows.shape[0]} rows, planned {t.row_bytes} each")
        self._writer.write(np.ascontiguousarray(raw), self._offset[t.name] + first_row * t.row_bytes)

    def _importance(self, t: GGUFTensor) -> np.ndarray | None:
        if not (self.importance and t.importance_key):
            return None
        if t.name not in self._importance_of:  # once per tensor (dropped when it is done), not once per expert
            self._importance_of[t.name] = self.importance(t.importance_key)
        return self._importance_of[t.name]

    def weight_done(self, w: walk.Weight) -> None:
        t = self._last_weight.get(w.name)
        if t is not None and t.name not in self._done and t.name in self._mine:
            self._tensor_done(t)

    def _tensor_done(self, t: GGUFTensor) -> None:
        def record(fd=self._file.fileno(), partial=self.partial, name=t.name):  # once its bytes are on disk
            os.fsync(fd)
            partial.mark_done(name)

        self._writer.then(record)
        self._done.add(t.name)
        self._importance_of.pop(t.name, None)

    def finish(self) -> None:
        self._writer.close()
        with outputs.writing(self.partial.dir, resume_hint=True):
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self) -> None:
        with outputs.writing(self.out):
            self.partial.commit(self.out.name)

    def fail(self, exc: BaseException) -> None:
        if self.partial is None:
            return
        if self._file is not None:
            try:
                if self._writer is not None:
                    self._writer.close()
            except BaseException:
                pass  # the failure being handled, or one it caused
            try:
                self._file.close()
            except OSError:
                pass  # on a full disk the final flush fails too; the partial is kept for --resume
        self.partial.fail(exc)


@dataclass
class ExportResult:
    out: Path
    tensors: list[GGUFTensor]
    source_bytes: int
    output_bytes: int
    warnings: list[str]


def export_gguf(
    source: Source | Model,
    out: Path,
    ftype: str,
    *,
    importance: Callable[[str], np.ndarray | None] | None = None,
    importance_digest: str = "",
    resume: bool = False,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    overrides: Overrides | None = None,
    show_progress: bool = True,
) -> ExportResult:
    """Write `source`'s text model as a GGUF file of type `ftype`; `out` appears only when complete.

    `importance(key)` may return per-input-channel importance weights for a tensor (calibration's
    E[x^2]), by the HF module name, or [experts, in] for expert tensors; the K-quant search uses them.
    `importance_digest` identifies them for --resume. `overrides`: llama-quantize's per-tensor types.
    """
    model = source if isinstance(source, Model) else open_model(source)
    target = GGUFTarget(model, out, ftype, importance=importance, importance_digest=importance_digest, resume=resume,
                        overwrite=overwrite, device=device, overrides=overrides)
    walk.run(model, [target], show_progress, desc=f"gguf {ftype}")
    return ExportResult(target.out, target.tensors, target.source_bytes, target.out.stat().st_size,
                        llama_cpp_warnings(model.spec))
