"""The compressed-tensors layout that vLLM and transformers load: tensor names, encodings, config.

One module per quantized Linear, experts unfused (`experts.{i}.{gate,up,down}_proj`), each with its
own scales. This module decides names and dtypes; the numbers come from `llama4_quant.schemes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .. import schemes
from ..checkpoint import TensorEntry


@dataclass(frozen=True)
class Scheme:
    name: str  # l4q's name, as given to --to
    preset: str  # compressed-tensors preset scheme
    format: str  # compressed-tensors compression format
    description: str


SCHEMES = {
    "int4": Scheme("int4", "W4A16", "pack-quantized", "int4 weights, symmetric, group 128, 16-bit activations"),
    "int8": Scheme("int8", "W8A8", "int-quantized", "int8 per-channel weights, dynamic per-token int8 activations"),
    "fp8": Scheme("fp8", "FP8_DYNAMIC", "float-quantized", "FP8 e4m3 per-channel weights, dynamic per-token FP8 activations"),
}

# Modules that always stay BF16 (compressed-tensors `ignore` patterns, matched with re.match against
# module names). The router is a Linear subclass in transformers, and vLLM never quantizes it.
ALWAYS_IGNORED = (".*lm_head", ".*feed_forward\\.router", ".*vision_model\\..*", ".*multi_modal_projector\\..*")


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


def can_quantize(scheme: Scheme, out_features: int, in_features: int) -> bool:
    """Whether a [out, in] weight fits the scheme's layout (int4 needs whole groups and packed words)."""
    if scheme.name == "int4":
        return in_features % schemes.INT4_GROUP_SIZE == 0
    return True


def linear_entries(module: str, out_features: int, in_features: int, scheme: Scheme) -> list[TensorEntry]:
    """The tensors one quantized Linear becomes, in the order they are written."""
    if scheme.name == "int4":
        return [
            TensorEntry(f"{module}.weight_packed", "I32", (out_features, in_features // 8)),
            TensorEntry(f"{module}.weight_scale", "BF16", (out_features, in_features // schemes.INT4_GROUP_SIZE)),
            TensorEntry(f"{module}.weight_shape", "I64", (2,)),
        ]
    weight_dtype = "I8" if scheme.name == "int8" else "F8_E4M3"
    return [
        TensorEntry(f"{module}.weight", weight_dtype, (out_features, in_features)),
        TensorEntry(f"{module}.weight_scale", "BF16", (out_features, 1)),
    ]


def encode_linear(module: str, weight: torch.Tensor, scheme: Scheme, scale: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """Quantize one [out, in] weight (absmax scales unless `scale` is given); returns (name, tensor) in
    `linear_entries` order, on the CPU."""
    scale = schemes.rtn_scales(weight, scheme.name) if scale is None else scale
    return encode_quantized(module, schemes.quantize(weight, scale, scheme.name), scale, scheme)


def encode_quantized(module: str, q: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> list[tuple[str, torch.Tensor]]:
    """Already-quantized values (int8 holding int4/int8, or float8) and their scales, as stored tensors."""
    if scheme.name == "int4":
        shape = torch.tensor(list(q.shape), dtype=torch.int64)
        out = [("weight_packed", schemes.pack_int4(q)), ("weight_scale", scale), ("weight_shape", shape)]
    else:
        out = [("weight", q), ("weight_scale", scale)]
    return [(f"{module}.{suffix}", t.cpu()) for suffix, t in out]


def decode_linear(tensors: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """Float32 weight of one module from its suffix -> tensor dict (the inverse of `encode_linear`)."""
    scale = tensors["weight_scale"]
    if scheme.name == "int4":
        out_features, in_features = (int(x) for x in tensors["weight_shape"])
        q = schemes.unpack_int4(tensors["weight_packed"], in_features)
        return schemes.int4_dequantize(q, scale)
    if scheme.name == "int8":
        return schemes.int8_dequantize(tensors["weight"], scale)
    return schemes.fp8_dequantize(tensors["weight"], scale)


def decode_linear_as_loaded(tensors: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """Float32 copy of the weight transformers decompresses to: q * scale rounded to the scale's dtype
    (the model dtype, BF16), as compressed-tensors' decompressor and half-precision kernels compute it."""
    return decode_linear(tensors, scheme).to(tensors["weight_scale"].dtype).float()


def ignore_matches(patterns: list[str], module: str) -> bool:
    return any(re.match(p, module) for p in patterns)


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict:
    """`config.json`'s `quantization_config`, built with compressed-tensors' own classes."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        preset_name_to_scheme,
    )

    group = preset_name_to_scheme(scheme.preset, ["Linear"])
    group.format = scheme.format
    config = QuantizationConfig(
        config_groups={"group_0": group},
        format=scheme.format,
        quantization_status="compressed",
        ignore=[f"re:{p}" for p in ignore],
    )
    return config.model_dump()
