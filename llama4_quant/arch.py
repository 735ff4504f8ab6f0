"""Llama 4 knowledge: config.json -> `Llama4Spec`, tensor names -> roles and expected shapes.

Everything here is pure: it reads a config dict and tensor names, never weights. Both config
spellings are accepted: the released checkpoints were written by transformers 4.x (`rope_scaling`,
`rope_theta`), transformers 5.x writes `rope_parameters` and `layer_types`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import NotLlama4Error, ShapeMismatchError


@dataclass(frozen=True)
class Llama4Spec:
    """The text model's dimensions and layer pattern, plus where its tensors live."""

    hidden_size: int
    intermediate_size: int  # per expert and shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[int, ...]  # layers that use RoPE (and chunked attention); the rest are NoPE
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    text_prefix: str  # "language_model." for Llama4ForConditionalGeneration, "" for Llama4ForCausalLM
    has_vision: bool

    @property
    def layer_prefix(self) -> str:
        return f"{self.text_prefix}model.layers."

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def kind(self) -> str:
        return "Maverick-like" if self.num_experts == 128 else "Scout-like"


def load_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise NotLlama4Error(f"{model_dir}: no config.json, so this is not a Hugging Face Llama 4 checkpoint")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotLlama4Error(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise NotLlama4Error(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(config, dict):
        raise NotLlama4Error(f"{path}: not a JSON object")
    return config


def spec_from_config(config: dict, source: str = "config.json") -> Llama4Spec:
    """Read a Llama 4 config (multimodal `llama4` or text-only `llama4_text`) into a spec."""
    model_type = config.get("model_type")
    if model_type == "llama4":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise NotLlama4Error(f"{source}: model_type llama4 without a text_config")
        text_prefix = "language_model."
        has_vision = isinstance(config.get("vision_config"), dict)
    elif model_type == "llama4_text":
        text, text_prefix, has_vision = config, "", False
    else:
        raise NotLlama4Error(
            f"{source}: model_type is {model_type!r}, not a Llama 4 model (expected 'llama4' or 'llama4_text')"
        )
    try:
        num_layers = int(text["num_hidden_layers"])
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        step = int(text.get("interleave_moe_layer_step", 1))
        moe_layers = text.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, num_layers, step))
        no_rope = text.get("no_rope_layers") or [
            int((i + 1) % int(text.get("no_rope_layer_interval", 4)) != 0) for i in range(num_layers)
        ]
        rope_params = text.get("rope_parameters") or {}
        rope_scaling = text.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        spec = Llama4Spec(
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            intermediate_size_mlp=int(text.get("intermediate_size_mlp", 0) or 0),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            num_experts=int(text["num_local_experts"]),
            experts_per_token=int(text.get("num_experts_per_tok", 1)),
            vocab_size=int(text["vocab_size"]),
            moe_layers=tuple(int(i) for i in moe_layers),
            rope_layers=tuple(i for i, r in enumerate(no_rope) if int(r)),
            attention_chunk_size=text.get("attention_chunk_size"),
            use_qk_norm=bool(text.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
            floor_scale=float(text.get("floor_scale", 8192)),
            attn_scale=float(text.get("attn_scale", 0.1)),
            rope_theta=float(text.get("rope_theta") or rope_params.get("rope_theta") or 500000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            text_prefix=text_prefix,
            has_vision=has_vision,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NotLlama4Error(f"{source}: incomplete Llama 4 text config ({exc!r})") from None
    sizes = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
             "experts_per_token", "vocab_size")
    bad = [f for f in sizes if getattr(spec, f) < 1]
    if bad or any(not 0 <= i < spec.num_layers for i in spec.moe_layers):
        raise NotLlama4Error(f"{source}: impossible Llama 4 text config ({', '.join(bad) or 'moe_layers'} out of range)")
    return spec


# ---------------------------------------------------------------------------------------------
# Tensor roles

# Roles a tensor can have. Only the linear roles are ever quantized.
EMBED, LM_HEAD, NORM, ATTN, ROUTER = "embed", "lm_head", "norm", "attention", "router"
EXPERTS_GATE_UP, EXPERTS_DOWN = "experts_gate_up", "experts_down"
SHARED_EXPERT, DENSE_MLP = "shared_expert", "dense_mlp"
VISION, PROJECTOR, OTHER = "vision", "projector", "other"
LINEAR_ROLES = (ATTN, SHARED_EXPERT, DENSE_MLP)
EXPERT_ROLES = (EXPERTS_GATE_UP, EXPERTS_DOWN)

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorRole:
    role: str
    layer: int | None = None
    expected_shape: tuple[int, ...] | None = None  # None where the config does not pin it


def classify(name: str, spec: Llama4Spec) -> TensorRole:
    """The role of a checkpoint tensor and the shape the config implies for it."""
    p = spec.text_prefix
    h, e = spec.hidden_size, spec.num_experts
    if name.startswith("vision_model."):
        return TensorRole(VISION)
    if name.startswith("multi_modal_projector."):
        return TensorRole(PROJECTOR)
    if name == f"{p}model.embed_tokens.weight":
        return TensorRole(EMBED, None, (spec.vocab_size, h))
    if name == f"{p}lm_head.weight":
        return TensorRole(LM_HEAD, None, (spec.vocab_size, h))
    if name == f"{p}model.norm.weight":
        return TensorRole(NORM, None, (h,))
    if not name.startswith(p):
        return TensorRole(OTHER)
    m = _LAYER_RE.match(name[len(p) :])
    if not m:
        return TensorRole(OTHER)
    layer, rest = int(m.group(1)), m.group(2)
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {
        "input_layernorm.weight": (NORM, (h,)),
        "post_attention_layernorm.weight": (NORM, (h,)),
        "self_attn.q_proj.weight": (ATTN, (q_out, h)),
        "self_attn.k_proj.weight": (ATTN, (kv_out, h)),
        "self_attn.v_proj.weight": (ATTN, (kv_out, h)),
        "self_attn.o_proj.weight": (ATTN, (h, q_out)),
    }
    if spec.is_moe(layer):
        i = spec.intermediate_size
        shapes.update(
            {
                "feed_forward.router.weight": (ROUTER, (e, h)),
                "feed_forward.experts.gate_up_proj": (EXPERTS_GATE_UP, (e, h, 2 * i)),
                "feed_forward.experts.down_proj": (EXPERTS_DOWN, (e, i, h)),
                "feed_forward.shared_expert.gate_proj.weight": (SHARED_EXPERT, (i, h)),
                "feed_forward.shared_expert.up_proj.weight": (SHARED_EXPERT, (i, h)),
                "feed_forward.shared_expert.down_proj.weight": (SHARED_EXPERT, (h, i)),
            }
        )
    else:
        i = spec.intermediate_size_mlp
        shapes.update(
            {
                "feed_forward.gate_proj.weight": (DENSE_MLP, (i, h)),
                "feed_forward.up_proj.weight": (DENSE_MLP, (i, h)),
                "feed_forward.down_proj.weight": (DENSE_MLP, (h, i)),
            }
        )
    if rest in shapes:
        role, shape = shapes[rest]
        return TensorRole(role, layer, shape)
    return TensorRole(OTHER, layer)


def expected_tensor_names(spec: Llama4Spec) -> list[str]:
    """Every text tensor a complete checkpoint of this spec must contain."""
    p = spec.text_prefix
    names = [f"{p}model.embed_tokens.weight", f"{p}model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append(f"{p}lm_head.weight")
    for layer in range(spec.num_layers):
        lp = f"{spec.layer_prefix}{layer}."
        names += [lp + "input_layernorm.weight", lp + "post_attention_layernorm.weight"]
        names += [lp + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if spec.is_moe(layer):
            names += [lp + "feed_forward.router.weight"]
            names += [lp + "feed_forward.experts.gate_up_proj", lp + "feed_forward.experts.down_proj"]
            names += [lp + f"feed_forward.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:
            names += [lp + f"feed_forward.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def check_shape(name: str, role: TensorRole, shape: tuple[int, ...]) -> None:
    if role.expected_shape is not None and tuple(shape) != role.expected_shape:
        raise ShapeMismatchError(
            f"{name}: shape {list(shape)} disagrees with config.json, which implies {list(role.expected_shape)}"
        )
