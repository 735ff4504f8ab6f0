"""The vision tower and projector of a Llama 4 checkpoint as the mmproj GGUF that llama.cpp's mtmd
(`llama-mtmd-cli`, `llama-server --mmproj`) loads beside the text GGUF.

Architecture `clip`, projector type `llama4`: keys, tensor names, types and data as llama.cpp's own
converter (`convert_hf_to_gguf.py --mmproj`, class Llama4VisionModel) writes them, with one
deliberate difference. The converter's tensor map gives the vision layers'
`post_attention_layernorm` the name Gemma 4 uses for a norm *after* attention (`attn_post_norm`),
where clip.cpp's Llama 4 graph reads the pre-FFN norm as `ln2`: mtmd then normalises at the wrong
place and without the bias, and its image embeddings drift from transformers' (cosine ~0.8 on the
tiny model). l4q writes `ln2`, which mtmd runs as transformers does (tests/test_gguf_mmproj.py).
Written through `GGUFTarget`: streaming, atomic, resumable, like the text GGUF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import arch, walk
from ..errors import UsageError
from ..model import Model
from .gguf import GGUFTarget, GGUFTensor, add_general
from .gguf_types import MMPROJ_TYPES

Q8_0_BLOCK = 32

# HF names -> clip.cpp's (and the converter's) names
_NAMES = {
    "vision_model.class_embedding": "v.class_embd",
    "vision_model.positional_embedding_vlm": "v.position_embd.weight",
    "vision_model.patch_embedding.linear.weight": "v.patch_embd.weight",
    "vision_model.layernorm_pre.weight": "v.pre_ln.weight",
    "vision_model.layernorm_pre.bias": "v.pre_ln.bias",
    "vision_model.layernorm_post.weight": "v.post_ln.weight",
    "vision_model.layernorm_post.bias": "v.post_ln.bias",
    "vision_model.vision_adapter.mlp.fc1.weight": "mm.model.mlp.1.weight",
    "vision_model.vision_adapter.mlp.fc2.weight": "mm.model.mlp.2.weight",
    "multi_modal_projector.linear_1.weight": "mm.model.fc.weight",
}
_LAYER = re.compile(r"vision_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
    "input_layernorm": "ln1",
    "post_attention_layernorm": "ln2",  # the pre-FFN norm (see the module's docstring)
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"v.blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise UsageError(f"{hf_name}: a vision tensor llama.cpp's Llama 4 mmproj has no place for")


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The converter's choice for one tensor of an mmproj of type `qtype`."""
    if len(shape) <= 1 or not name.endswith(".weight") or name == "v.position_embd.weight":
        return "F32"
    if name == "v.patch_embd.weight":
        return "F16" if qtype == "F16" else "F32"
    if qtype == "Q8_0" and shape[-1] % Q8_0_BLOCK:
        return "F16"  # the converter's fallback where rows do not split into blocks
    return qtype


def plan(model: Model, qtype: str) -> list[GGUFTensor]:
    """Every tensor of the mmproj, in the walk's order."""
    if qtype not in MMPROJ_TYPES:
        raise UsageError(f"unknown mmproj type {qtype!r}; choose one of {', '.join(MMPROJ_TYPES)}")
    out = []
    for w in walk.weights(model):
        if w.role in (arch.VISION, arch.PROJECTOR):
            name = gguf_name(w.name)
            out.append(GGUFTensor(name, w.shape, tensor_type(name, w.shape, qtype), source=w.name,
                                  source_bytes=w.source_bytes))
    return out


def processor_config(model_dir: Path) -> dict:
    """preprocessor_config.json, then processor_config.json's image processor over it, as the converter
    merges them."""
    merged: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            merged.update({**cfg, **cfg.get("image_processor", {})})
    return merged


def add_metadata(writer, model: Model, qtype: str) -> None:
    """general.* and clip.* keys as llama.cpp's converter writes them for Llama 4's vision tower."""
    import gguf

    add_general(writer, model.dir, model.source, MMPROJ_TYPES[qtype], gguf.GGUFType.MMPROJ)
    vision, processor = model.config["vision_config"], processor_config(model.dir)
    if vision.get("hidden_act") != "gelu":
        raise UsageError(f"vision hidden_act is {vision.get('hidden_act')!r}; llama.cpp's Llama 4 mmproj runs gelu only")
    if "image_mean" not in processor or "image_std" not in processor:
        raise UsageError(f"{model.dir}: no image_mean / image_std in preprocessor_config.json; the mmproj needs them")
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(model.spec.hidden_size)
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(processor["image_mean"])
    writer.add_vision_image_std(processor["image_std"])
    writer.add_clip_projector_type(gguf.VisionProjectorType.LLAMA4)
    writer.add_vision_attention_layernorm_eps(vision["norm_eps"])
    writer.add_vision_projector_scale_factor(int(1.0 / vision["pixel_shuffle_ratio"]))
    writer.add_vision_use_gelu(True)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


class MmprojTarget(GGUFTarget):
    """The mmproj file at `out`, written from the walk beside any other target."""

    arch_name = "clip"

    def plan_tensors(self, overrides) -> list[GGUFTensor]:
        return plan(self.model, self.ftype)

    def add_metadata(self, writer) -> None:
        add_metadata(writer, self.model, self.ftype)

    def check_source(self) -> None:
        if not self.model.spec.has_vision:
            raise UsageError(f"{self.model.source.label}: no vision tower (no vision_config), so no mmproj to write")
