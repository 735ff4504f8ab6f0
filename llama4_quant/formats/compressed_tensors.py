"""The compressed-tensors layout that vLLM and transformers load, one registered class per scheme.

A scheme (`--to int4`, ...) is one `Scheme` subclass registered with `register_scheme`, in the manner
of compressed-tensors' compressor registry; `SCHEMES` maps each name to its one instance. The class
holds everything scheme-specific: the compressed-tensors preset and format, the rounding rule that
`scale_search` and GPTQ use, RTN scales, quantize / dequantize (through the kernels in
`llama4_quant.schemes`), the stored tensors of one Linear (names, dtypes, shapes, encoding, decoding)
and the `quantization_config` group. Adding a scheme is one new class here (plus the torch-free row
of its stored suffixes in `model.QUANTIZED_SUFFIXES`, when its format is new) and its tests.

One module per quantized Linear, experts unfused (`experts.{i}.{gate,up,down}_proj`), each with its
own scales. Scale tensors travel as an ordered mapping suffix -> tensor, so a scheme may have several
(say FP8 group scales plus a per-tensor global scale).

torch is imported inside the methods: the registry (names, formats, suffixes) loads without it, for
the CLI's option choices and model validation.
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from ..checkpoint import TensorEntry
from ..model import QUANTIZED_SUFFIXES

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# Modules that always stay BF16 (compressed-tensors `ignore` patterns, matched with re.match against
# module names). The router is a Linear subclass in transformers, and vLLM never quantizes it.
ALWAYS_IGNORED = (".*lm_head", ".*feed_forward\\.router", ".*vision_model\\..*", ".*multi_modal_projector\\..*")


class Scheme(ABC):
    """One compressed-tensors weight scheme; use the registered instance, `get_scheme(name)`.

    Weights are [out_features, in_features]. Scales are an ordered mapping suffix -> tensor, keys in
    `scale_suffixes` order. `scale_search` and GPTQ work on one of them, the group scale
    (`group_scale`): one value per group of `group_size(in_features)` input columns, the step that
    float32 `w / s` is rounded on; `scales_with` completes the mapping from it.
    """

    name: ClassVar[str]  # as given to --to
    preset: ClassVar[str]  # the compressed-tensors preset scheme that `weights_args` and `input_args` equal
    format: ClassVar[str]  # compressed-tensors compression format
    description: ClassVar[str]  # one line, for help texts
    suffixes: ClassVar[tuple[str, ...]]  # the stored tensors of one Linear, in write order: QUANTIZED_SUFFIXES[format]
    scale_suffixes: ClassVar[tuple[str, ...]]  # the scale tensors among them, in mapping order
    group_scale: ClassVar[str]  # the scale tensor scale_search picks and GPTQ divides by
    half_range: ClassVar[float]  # the absmax rule's divisor: group scale >= absmax / half_range

    shares_global: ClassVar[bool] = False  # one per-tensor scale for each fused group (q/k/v, gate/up)
    # whether `rtn_scales` raises NonFiniteWeightError for any NaN/Inf in the weight (then the walk's
    # reader need not look for them first)
    rtn_refuses_non_finite: ClassVar[bool] = False
    rows_per_scale: ClassVar[int] = 1  # rows that share one group scale (fp8-block: 128, a block's rows)
    inputs: ClassVar[str] = "none"  # activations as served: "none" (16-bit), "dynamic", "static" (`with_inputs`)
    strategy: ClassVar[str] = ""  # compressed-tensors' weight strategy (channel, group, block ...)
    weights_args: ClassVar[dict]  # the config group's `weights`, as compressed-tensors dumps them (`quant_args`)
    input_args: ClassVar[dict | None] = None  # its `input_activations`

    def __repr__(self) -> str:
        return f"<scheme {self.name}>"

    @property
    def activations(self) -> bool:
        """Whether activation scales come from calibration (static inputs: `with_inputs`, `--calib`)."""
        return self.inputs == "static"

    def served_input(self, stored: Mapping[str, Tensor]):
        """For a scheme whose served kernels quantize activations coarsely (FP4): a function that
        quantizes a Linear's input as they do, given that Linear's stored tensors; else None."""
        return None

    def for_weight(self, w: Tensor) -> Scheme:
        """The scheme for one weight: itself, or for a scheme with a per-tensor scale, an instance bound
        to w's (an already bound instance stays as it is)."""
        return self.for_group([w])

    def for_group(self, ws: list[Tensor]) -> Scheme:
        """`for_weight` for the members of one fused group (q/k/v, gate/up), which share the scale."""
        return self

    def with_inputs(self, input_absmax: Tensor) -> Scheme:
        """For a scheme with static activation scales (`activations`): bound to its input's range."""
        return self

    # ------------------------------------------------------------------ rounding rule (scale_search, GPTQ)

    @abstractmethod
    def group_size(self, in_features: int) -> int:
        """Input columns that share one group scale."""

    def group_absmax(self, w: Tensor) -> Tensor:
        """Float32 [out, in / group_size] max |w| over the weights that share each row's group scale
        (for block scales the whole block's, repeated over its rows): `absmax_scale`'s input."""
        from .. import schemes

        return schemes._group_absmax(w, self.group_size(w.shape[1]))

    @abstractmethod
    def absmax_scale(self, absmax: Tensor, scale_dtype: torch.dtype) -> Tensor:
        """The group scale for float32 group absmax values: the RTN rule, which scale_search also
        applies to shrunk absmax values."""

    def lower_clamp(self, group_scale: Tensor) -> Tensor | None:
        """Float32 lower clamp per group, where it is tighter than the grid's own minimum, else None."""
        return None

    @abstractmethod
    def round_to_grid(self, x: Tensor, lower: Tensor | None = None) -> Tensor:
        """Float32 x = w / s rounded to the scheme's grid, as float32 (x may be overwritten); `lower`
        is `lower_clamp`'s result, broadcast to x."""

    @abstractmethod
    def to_values(self, grid: Tensor) -> Tensor:
        """`round_to_grid`'s float32 values in the dtype `quantize` returns (exact)."""

    # ------------------------------------------------------------------------------- scales and values

    @abstractmethod
    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        """Absmax (round-to-nearest) scales for w, in `scale_suffixes` order."""

    @abstractmethod
    def scales_with(self, w: Tensor, group_scale: Tensor) -> dict[str, Tensor]:
        """All scales for w when the group scale is `group_scale` (chosen by scale_search)."""

    @abstractmethod
    def quantize(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        """Round-to-nearest values for w with the given scales."""

    @abstractmethod
    def dequantize(self, q: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        """Float32 [out, in] weight from values and scales."""

    @abstractmethod
    def error_bound(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        """Float64 [out, in] bound on |w - dequantize(quantize(w, scales), scales)| that the scheme
        guarantees for BF16 or FP16 weights and its RTN scales."""

    # --------------------------------------------------------------------------------- stored tensors

    def can_quantize(self, out_features: int, in_features: int) -> bool:
        """Whether a [out, in] weight fits the layout; those that do not stay BF16."""
        return True

    @abstractmethod
    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """suffix -> (safetensors dtype, shape) of each stored tensor of one [out, in] Linear."""

    @abstractmethod
    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """suffix -> stored tensor, for values from `quantize` (or GPTQ) and their scales."""

    @abstractmethod
    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Float32 weight of one module from its suffix -> stored tensor mapping (the inverse of `encode`)."""

    @abstractmethod
    def decode_as_loaded(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Float32 copy of the weight transformers decompresses to (`decode` in the model dtype)."""

    def entries(self, module: str, out_features: int, in_features: int) -> list[TensorEntry]:
        """The tensors one quantized Linear becomes, in the order they are written."""
        layout = self.layout(out_features, in_features)
        return [TensorEntry(f"{module}.{s}", *layout[s]) for s in self.suffixes]

    def stored_from_weight(self, w: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """`stored(quantize(w, scales), scales)` in one pass where the scheme has a kernel for that
        (for w's layout and device), else None."""
        return None

    def rtn_stored_from_weight(self, w: Tensor) -> dict[str, Tensor] | None:
        """`stored_from_weight(w, rtn_scales(w))` in one pass where the scheme has a kernel for that
        (for w's layout and device), else None."""
        return None

    def encode(self, module: str, q: Tensor, scales: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        """(name, tensor) on the CPU in `entries` order, for values and their scales."""
        return self._named(module, self.stored(q, scales))

    def encode_weight(self, module: str, w: Tensor, group_scale: Tensor | None = None) -> list[tuple[str, Tensor]]:
        """Quantize one [out, in] weight (RTN scales unless `group_scale` is given) and encode it."""
        bound = self.for_weight(w)
        if group_scale is None:
            tensors = bound.rtn_stored_from_weight(w)
            if tensors is not None:
                return self._named(module, tensors)
        scales = bound.rtn_scales(w) if group_scale is None else bound.scales_with(w, group_scale)
        tensors = bound.stored_from_weight(w, scales)
        return self._named(module, bound.stored(bound.quantize(w, scales), scales) if tensors is None else tensors)

    def _named(self, module: str, tensors: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        return [(f"{module}.{s}", tensors[s].cpu()) for s in self.suffixes]

    def config_group(self) -> dict:
        """This scheme's `config_groups` entry, as compressed-tensors' `QuantizationScheme` dumps it."""
        return copy.deepcopy({"targets": ["Linear"], "weights": self.weights_args, "input_activations": self.input_args,
                              "output_activations": None, "format": self.format})


def quant_args(num_bits: int, value_type: str, strategy: str, group_size: int | None = None, dynamic: bool | str = False,
               block_structure: list[int] | None = None, scale_dtype: str | None = None,
               observer: str | None = None) -> dict:
    """compressed-tensors' `QuantizationArgs` (symmetric) as its `model_dump` writes them: the
    optional fields only where set, in its order. Built here rather than with the library, whose
    import (transformers with it) took 2.5-3 s of a quantize run; tests compare every scheme's
    `quantization_config` with the one the library's own classes build from `preset`."""
    args = {"num_bits": num_bits, "type": value_type, "symmetric": True, "group_size": group_size, "strategy": strategy}
    if block_structure is not None:
        args["block_structure"] = block_structure
    args["dynamic"] = dynamic
    if scale_dtype is not None:
        args["scale_dtype"] = scale_dtype
    if observer is not None:
        args["observer"] = observer
    return args


# --------------------------------------------------------------------------------------- registry

SCHEMES: dict[str, Scheme] = {}


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: registers one instance of `cls` under `cls.name`."""
    if cls.name in SCHEMES:
        raise ValueError(f"scheme {cls.name!r} is registered twice")
    SCHEMES[cls.name] = cls()
    return cls


def scheme_names() -> list[str]:
    """The registered names, in registration order (no torch needed)."""
    return list(SCHEMES)


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


def as_scheme(scheme: Scheme | str) -> Scheme:
    """A scheme, or the registered one of that name."""
    return get_scheme(scheme) if isinstance(scheme, str) else scheme


def scheme_for_format(fmt: str | None, strategy: str | None = None, inputs: str | None = None) -> Scheme | None:
    """The scheme that writes compressed-tensors format `fmt`, or None; where several share a format,
    the one with weight `strategy` (fp8 per channel, fp8-block) and activations `inputs` (nvfp4 and
    nvfp4a16, mxfp4 and mxfp4a16)."""
    found = [s for s in SCHEMES.values() if s.format == fmt]
    if strategy is not None:
        found = [s for s in found if s.strategy == strategy] or found
    if inputs is not None:
        found = [s for s in found if s.inputs == inputs] or found
    return found[0] if found else None


def scheme_for_config(qc: dict | None) -> Scheme | None:
    """The scheme of a derivative's `quantization_config`, or None."""
    if not qc:
        return None
    groups = list((qc.get("config_groups") or {}).values())
    group = (groups[0] or {}) if groups else {}
    acts = group.get("input_activations") or {}
    inputs = "none" if not acts else "dynamic" if acts.get("dynamic") is True else "static"
    return scheme_for_format(qc.get("format"), (group.get("weights") or {}).get("strategy"), inputs)


# ----------------------------------------------------------------------------------------- schemes
# Symmetric absmax schemes with one scale tensor, `weight_scale` (BF16): see llama4_quant/schemes.py
# for the rounding rules and their exact error bounds.


class _SymmetricScheme(Scheme):
    scale_suffixes = ("weight_scale",)
    group_scale = "weight_scale"

    def absmax_scale(self, absmax: Tensor, scale_dtype: torch.dtype) -> Tensor:
        from .. import schemes

        return schemes._symmetric_scale(absmax, self.half_range, scale_dtype)

    def scales_with(self, w: Tensor, group_scale: Tensor) -> dict[str, Tensor]:
        return {"weight_scale": group_scale}

    def _scale_per_element(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        return scales["weight_scale"].double().repeat_interleave(self.group_size(w.shape[1]), dim=1)

    def decode_as_loaded(self, tensors: Mapping[str, Tensor]) -> Tensor:
        # compressed-tensors' decompressor and half-precision kernels compute q * scale in the scale's
        # dtype, the model dtype (BF16)
        return self.decode(tensors).to(tensors["weight_scale"].dtype).float()


class _IntScheme(_SymmetricScheme):
    qmin: ClassVar[int]
    qmax: ClassVar[int]
    # its RTN scales come from the group maxima, which a NaN or Inf in the group makes NaN or Inf,
    # and `schemes._symmetric_scale` refuses those
    rtn_refuses_non_finite = True

    def lower_clamp(self, group_scale: Tensor) -> Tensor | None:
        from .. import schemes

        return schemes.int_lower_clamp(group_scale, self.qmin, self.qmax)

    def round_to_grid(self, x: Tensor, lower: Tensor | None = None) -> Tensor:
        from .. import schemes

        return schemes.round_int_(x, self.qmin, self.qmax, lower)

    def to_values(self, grid: Tensor) -> Tensor:
        import torch

        return grid.to(torch.int8)

    def error_bound(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        return self._scale_per_element(w, scales) / 2  # half a step


class _PerChannel:
    """Storage of a per-output-channel scheme: `weight` [out, in] in `weight_dtype`, `weight_scale` [out, 1]."""

    weight_dtype: ClassVar[str]  # safetensors dtype of the values
    kernels: ClassVar[str]  # prefix of its kernels in `llama4_quant.schemes`: <k>_scales, _quantize, _dequantize

    def _kernel(self, what: str):
        from .. import schemes

        return getattr(schemes, f"{self.kernels}_{what}")

    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        return {"weight_scale": self._kernel("scales")(w)}

    def quantize(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        return self._kernel("quantize")(w, scales["weight_scale"])

    def dequantize(self, q: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        return self._kernel("dequantize")(q, scales["weight_scale"])

    def group_size(self, in_features: int) -> int:
        return in_features

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": (self.weight_dtype, (out_features, in_features)), "weight_scale": ("BF16", (out_features, 1))}

    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"weight": q, "weight_scale": scales["weight_scale"]}

    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return self.dequantize(tensors["weight"], {"weight_scale": tensors["weight_scale"]})


@register_scheme
class Int4(_IntScheme):
    """int4 values in [-8, 7] per group of 128 input columns, packed eight to an int32 word."""

    name = "int4"
    preset = "W4A16"
    weights_args = quant_args(4, "int", "group", group_size=128)
    format = "pack-quantized"
    strategy = "group"
    description = "int4 weights, symmetric, group 128, 16-bit activations"
    suffixes = QUANTIZED_SUFFIXES[format]
    qmin, qmax = -8, 7
    half_range = (qmax - qmin) / 2
    group = 128

    def group_size(self, in_features: int) -> int:
        return self.group

    def can_quantize(self, out_features: int, in_features: int) -> bool:
        return in_features % self.group == 0  # whole groups (and so whole packed words)

    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        from .. import schemes

        return {"weight_scale": schemes.int4_scales(w, self.group)}

    def quantize(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.int4_quantize(w, scales["weight_scale"], self.group)

    def dequantize(self, q: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.int4_dequantize(q, scales["weight_scale"], self.group)

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {
            "weight_packed": ("I32", (out_features, in_features // 8)),
            "weight_scale": ("BF16", (out_features, in_features // self.group)),
            "weight_shape": ("I64", (2,)),
        }

    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from .. import schemes

        return self._stored_packed(schemes.pack_int4(q), scales, q.shape)

    def stored_from_weight(self, w: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        from .. import schemes

        packed = schemes.int4_quantize_packed(w, scales["weight_scale"], self.group)
        return None if packed is None else self._stored_packed(packed, scales, w.shape)

    def rtn_stored_from_weight(self, w: Tensor) -> dict[str, Tensor] | None:
        from .. import schemes

        done = schemes.int4_rtn_packed(w, self.group)
        return None if done is None else self._stored_packed(done[0], {"weight_scale": done[1]}, w.shape)

    @staticmethod
    def _stored_packed(packed: Tensor, scales: Mapping[str, Tensor], shape) -> dict[str, Tensor]:
        import torch

        return {
            "weight_packed": packed,
            "weight_scale": scales["weight_scale"],
            "weight_shape": torch.tensor(list(shape), dtype=torch.int64),
        }

    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        _, in_features = (int(x) for x in tensors["weight_shape"])
        q = schemes.unpack_int4(tensors["weight_packed"], in_features)
        return self.dequantize(q, {"weight_scale": tensors["weight_scale"]})


@register_scheme
class Int8(_PerChannel, _IntScheme):
    """int8 values in [-128, 127], one scale per output channel."""

    name = "int8"
    preset = "W8A8"
    weights_args = quant_args(8, "int", "channel")
    input_args = quant_args(8, "int", "token", dynamic=True)
    format = "int-quantized"
    strategy = "channel"
    description = "int8 per-channel weights, dynamic per-token int8 activations"
    inputs = "dynamic"
    suffixes = QUANTIZED_SUFFIXES[format]
    weight_dtype = "I8"
    kernels = "int8"
    qmin, qmax = -128, 127
    half_range = (qmax - qmin) / 2


class _Fp8Grid:
    """fp8's rounding rule: the smallest scale >= absmax / 448 (one step down where 448 * scale
    overflows), values rounded to nearest even e4m3 and saturated at +-448."""

    # its RTN scales come from the channel's or block's absmax, which a NaN or Inf makes NaN or Inf,
    # and `schemes._symmetric_scale` refuses those (as for int)
    rtn_refuses_non_finite = True

    def absmax_scale(self, absmax: Tensor, scale_dtype: torch.dtype) -> Tensor:
        from .. import schemes

        return schemes.fp8_absmax_scale(absmax, scale_dtype)

    def round_to_grid(self, x: Tensor, lower: Tensor | None = None) -> Tensor:
        from .. import schemes

        return schemes.round_fp8(x).float()

    def to_values(self, grid: Tensor) -> Tensor:
        import torch

        return grid.to(torch.float8_e4m3fn)


@register_scheme
class Fp8(_Fp8Grid, _PerChannel, _SymmetricScheme):
    """float8_e4m3fn values (saturating at +-448), one scale per output channel."""

    name = "fp8"
    preset = "FP8_DYNAMIC"
    weights_args = quant_args(8, "float", "channel")
    input_args = quant_args(8, "float", "token", dynamic=True)
    format = "float-quantized"
    strategy = "channel"
    description = "FP8 e4m3 per-channel weights, dynamic per-token FP8 activations"
    inputs = "dynamic"
    suffixes = QUANTIZED_SUFFIXES[format]
    weight_dtype = "F8_E4M3"
    kernels = "fp8"
    half_range = 448.0  # the largest e4m3fn value

    def error_bound(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        import torch

        # half an e4m3 ulp: 2**-4 relative for normals, 2**-10 * scale for subnormals
        return torch.maximum(w.double().abs() * 2.0**-4, self._scale_per_element(w, scales) * 2.0**-10)


@register_scheme
class Fp8Block(_Fp8Grid, Scheme):
    """float8_e4m3fn values with one BF16 scale per block of 128 x 128 weights (compressed-tensors
    FP8_BLOCK: dynamic FP8 activations per group of 128). The rounding rule is fp8's: the smallest
    BF16 scale >= block absmax / 448, one value down where 448 * scale overflows, values rounded to
    nearest even and saturated at +-448."""

    name = "fp8-block"
    preset = "FP8_BLOCK"
    weights_args = quant_args(8, "float", "block", block_structure=[128, 128])
    input_args = quant_args(8, "float", "group", group_size=128, dynamic=True)
    format = "float-quantized"
    strategy = "block"
    description = "FP8 e4m3 weights with 128x128 block scales, dynamic per-group FP8 activations"
    inputs = "dynamic"
    suffixes = QUANTIZED_SUFFIXES[format]
    scale_suffixes = ("weight_scale",)
    group_scale = "weight_scale"
    half_range = 448.0
    block = 128
    rows_per_scale = block  # scale_search and GPTQ see each block's scale repeated over its 128 rows

    def group_size(self, in_features: int) -> int:
        return self.block

    def can_quantize(self, out_features: int, in_features: int) -> bool:
        return out_features % self.block == 0 and in_features % self.block == 0  # whole blocks, as vLLM needs

    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        from .. import schemes

        return {"weight_scale": schemes.fp8_absmax_scale(schemes.block_absmax(w, self.block))}

    def group_absmax(self, w: Tensor) -> Tensor:
        from .. import schemes

        return schemes.block_absmax(w, self.block).repeat_interleave(self.block, 0)

    def scales_with(self, w: Tensor, group_scale: Tensor) -> dict[str, Tensor]:
        import torch

        block_scale = group_scale[:: self.block]
        if not torch.equal(group_scale, block_scale.repeat_interleave(self.block, 0)):
            raise ValueError("fp8-block group scales must be equal over each block's 128 rows")
        return {"weight_scale": block_scale}

    def quantize(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.fp8_block_quantize(w, scales["weight_scale"], self.block)

    def dequantize(self, q: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.fp8_block_dequantize(q, scales["weight_scale"], self.block)

    def error_bound(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        import torch

        s = scales["weight_scale"].double().repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
        return torch.maximum(w.double().abs() * 2.0**-4, s * 2.0**-10)  # half an e4m3 ulp, as fp8

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": ("F8_E4M3", (out_features, in_features)),
                "weight_scale": ("BF16", (out_features // self.block, in_features // self.block))}

    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"weight": q, "weight_scale": scales["weight_scale"]}

    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return self.dequantize(tensors["weight"], {"weight_scale": tensors["weight_scale"]})

    def decode_as_loaded(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return self.decode(tensors).to(tensors["weight_scale"].dtype).float()


class _Fp4Values:
    """FP4 e2m1 values (nearest, ties to the even code, clamped to +-6) stored as 4-bit codes, two
    to a byte (`weight_packed`)."""

    def round_to_grid(self, x: Tensor, lower: Tensor | None = None) -> Tensor:
        from .. import schemes

        return schemes.round_fp4_(x)

    def to_values(self, grid: Tensor) -> Tensor:
        from .. import schemes

        return schemes.fp4_codes(grid)


@register_scheme
class NvFp4A16(_Fp4Values, Scheme):
    """FP4 e2m1 values in groups of 16 input columns, FP8 e4m3 group scales and a float32 global scale
    per tensor, shared by the members of a fused group (gate/up, q/k/v) as vLLM loads them fused.

    The group scale that `scale_search` and GPTQ work on is the float32 step, scale / global, that w is
    divided by; `scales_with` turns it back into the FP8 scale (exactly: the step is within float32
    rounding of an FP8 value over the global scale, and FP8's grid is far coarser)."""

    name = "nvfp4a16"
    preset = "NVFP4A16"
    weights_args = quant_args(4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
    format = "nvfp4-pack-quantized"
    strategy = "tensor_group"
    description = "NVFP4 weights (FP4 e2m1, group 16, FP8 scales, global scale), 16-bit activations"
    suffixes = QUANTIZED_SUFFIXES[format]
    scale_suffixes = ("weight_scale", "weight_global_scale")
    group_scale = "weight_scale"
    half_range = 6.0
    shares_global = True

    def __init__(self, global_scale: Tensor | None = None):
        self.global_scale = global_scale

    def for_group(self, ws: list[Tensor]) -> Scheme:
        if self.global_scale is not None:
            return self
        import torch

        from .. import schemes

        absmax = torch.stack([schemes._group_absmax(w, w.shape[1]).max().cpu() for w in ws]).max()
        return self._bound(schemes.nvfp4_global_scale(absmax))

    def _bound(self, global_scale: Tensor) -> Scheme:
        return type(self)(global_scale)

    def _global(self, w: Tensor) -> Tensor:
        return self.for_weight(w).global_scale.to(w.device)

    def group_size(self, in_features: int) -> int:
        from .. import schemes

        return schemes.NVFP4_GROUP_SIZE

    def can_quantize(self, out_features: int, in_features: int) -> bool:
        return in_features % self.group_size(in_features) == 0

    def absmax_scale(self, absmax: Tensor, scale_dtype: torch.dtype) -> Tensor:
        from .. import schemes

        if self.global_scale is None:
            raise ValueError("nvfp4 group scales need the tensor's global scale: use scheme.for_weight(w)")
        g = self.global_scale.to(absmax.device)
        return schemes.nvfp4_steps(schemes.nvfp4_scales(absmax, g), g)

    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        from .. import schemes

        g = self._global(w)
        absmax = schemes._group_absmax(w, self.group_size(w.shape[1]))
        return {"weight_scale": schemes.nvfp4_scales(absmax, g), "weight_global_scale": g}

    def scales_with(self, w: Tensor, group_scale: Tensor) -> dict[str, Tensor]:
        import torch

        g = self._global(w)
        return {"weight_scale": (group_scale.to(torch.float32) * g).to(torch.float8_e4m3fn), "weight_global_scale": g}

    def quantize(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.nvfp4_quantize(w, scales["weight_scale"], scales["weight_global_scale"])

    def dequantize(self, q: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.nvfp4_dequantize(q, scales["weight_scale"], scales["weight_global_scale"])

    def error_bound(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        import torch

        from .. import schemes

        group = self.group_size(w.shape[1])
        step = schemes.nvfp4_steps(scales["weight_scale"], scales["weight_global_scale"]).double()
        step = step.repeat_interleave(group, dim=1)
        x = w.double().abs() / step
        # half the grid's spacing where |w / step| lies (0.5 up to 2, 1 up to 4, 2 above), or what the
        # clamp at 6 cuts: at most 0.375 step under a normal FP8 scale (see schemes.py), more where a
        # group's scale rounds into FP8's subnormals, far below the tensor's largest group; plus float32
        # rounding of the division
        half = torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, 1.0))
        return torch.maximum(half, x - 6) * step + 2.0**-20 * (w.double().abs() + step)

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {
            "weight_packed": ("U8", (out_features, in_features // 2)),
            "weight_scale": ("F8_E4M3", (out_features, in_features // self.group_size(in_features))),
            "weight_global_scale": ("F32", (1,)),
        }

    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from .. import schemes

        # a copy of the global scale per module: fused members must not share storage (safetensors refuses)
        return {"weight_packed": schemes.pack_fp4(q), "weight_scale": scales["weight_scale"],
                "weight_global_scale": scales["weight_global_scale"].clone()}

    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.nvfp4_dequantize(schemes.unpack_fp4(tensors["weight_packed"]), tensors["weight_scale"],
                                        tensors["weight_global_scale"])

    def decode_as_loaded(self, tensors: Mapping[str, Tensor]) -> Tensor:
        import torch

        # compressed-tensors multiplies in float32 and casts the product to the model dtype
        return self.decode(tensors).to(torch.bfloat16).float()


@register_scheme
class NvFp4(NvFp4A16):
    """NVFP4 weights (as nvfp4a16) and FP4 activations: vLLM quantizes each Linear's input per group of
    16 with dynamic FP8 group scales under a static float32 `input_global_scale`, 448 * 6 over the
    largest |x| its input reached in calibration (per expert, from the tokens routed to it)."""

    name = "nvfp4"
    preset = "NVFP4"
    input_args = quant_args(4, "float", "tensor_group", group_size=16, dynamic="local",
                            scale_dtype="torch.float8_e4m3fn", observer="static_minmax")
    description = "NVFP4 weights and activations (W4A4; static input scales from --calib)"
    suffixes = (*QUANTIZED_SUFFIXES[NvFp4A16.format], "input_global_scale")
    scale_suffixes = ("weight_scale", "weight_global_scale", "input_global_scale")
    inputs = "static"

    def __init__(self, global_scale: Tensor | None = None, input_global_scale: Tensor | None = None):
        super().__init__(global_scale)
        self.input_global_scale = input_global_scale

    def _bound(self, global_scale: Tensor) -> Scheme:
        return type(self)(global_scale, self.input_global_scale)

    def with_inputs(self, input_absmax: Tensor) -> Scheme:
        """This scheme with the static input scale for inputs that reached `input_absmax`."""
        from .. import schemes

        return type(self)(self.global_scale, schemes.nvfp4_global_scale(input_absmax))

    def _inputs(self) -> dict[str, Tensor]:
        if self.input_global_scale is None:
            raise ValueError("nvfp4 needs the input's range from calibration: use scheme.with_inputs(absmax)")
        return {"input_global_scale": self.input_global_scale}

    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        return {**super().rtn_scales(w), **self._inputs()}

    def scales_with(self, w: Tensor, group_scale: Tensor) -> dict[str, Tensor]:
        return {**super().scales_with(w, group_scale), **self._inputs()}

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {**super().layout(out_features, in_features), "input_global_scale": ("F32", (1,))}

    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {**super().stored(q, scales), "input_global_scale": scales["input_global_scale"].clone()}

    def served_input(self, stored: Mapping[str, Tensor]):
        from .. import schemes

        g = stored["input_global_scale"]
        return lambda x: schemes.nvfp4_fake_quantize_input(x, g)


@register_scheme
class MxFp4A16(_Fp4Values, Scheme):
    """MXFP4: FP4 e2m1 values in groups of 32 input columns, each group's scale a power of two stored
    as its uint8 E8M0 exponent (compressed-tensors' rule, see schemes.py). The group scale that
    `scale_search` and GPTQ work on is the float32 power of two; the search's shrunken candidates
    reach at most one power of two below the RTN scale."""

    name = "mxfp4a16"
    preset = "MXFP4A16"
    weights_args = quant_args(4, "float", "group", group_size=32, scale_dtype="torch.uint8")
    format = "mxfp4-pack-quantized"
    strategy = "group"
    description = "MXFP4 weights (FP4 e2m1, group 32, power-of-two E8M0 scales), 16-bit activations"
    suffixes = QUANTIZED_SUFFIXES[format]
    scale_suffixes = ("weight_scale",)
    group_scale = "weight_scale"
    half_range = 6.0

    def group_size(self, in_features: int) -> int:
        from .. import schemes

        return schemes.MXFP4_GROUP_SIZE

    def can_quantize(self, out_features: int, in_features: int) -> bool:
        return in_features % self.group_size(in_features) == 0

    def absmax_scale(self, absmax: Tensor, scale_dtype: torch.dtype) -> Tensor:
        from .. import schemes

        return schemes.mxfp4_steps(schemes.mxfp4_exponents(absmax))

    def rtn_scales(self, w: Tensor) -> dict[str, Tensor]:
        from .. import schemes

        return {"weight_scale": schemes.mxfp4_exponents(self.group_absmax(w))}

    def scales_with(self, w: Tensor, group_scale: Tensor) -> dict[str, Tensor]:
        from .. import schemes

        return {"weight_scale": schemes.mxfp4_exponents_of_steps(group_scale)}

    def _steps(self, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.mxfp4_steps(scales["weight_scale"])

    def quantize(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.fp4_quantize(w, self._steps(scales), self.group_size(w.shape[1]))

    def dequantize(self, q: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return schemes.fp4_dequantize(q, self._steps(scales), self.group_size(q.shape[1]))

    def error_bound(self, w: Tensor, scales: Mapping[str, Tensor]) -> Tensor:
        import torch

        step = self._steps(scales).double().repeat_interleave(self.group_size(w.shape[1]), dim=1)
        x = w.double().abs() / step
        # half the grid's spacing where |w / step| lies, or what the clamp at 6 cuts (below one step:
        # a group's |w / step| stays under 7); the division and product are exact
        half = torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, 1.0))
        return torch.maximum(half, x - 6) * step

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight_packed": ("U8", (out_features, in_features // 2)),
                "weight_scale": ("U8", (out_features, in_features // self.group_size(in_features)))}

    def stored(self, q: Tensor, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from .. import schemes

        return {"weight_packed": schemes.pack_fp4(q), "weight_scale": scales["weight_scale"]}

    def decode(self, tensors: Mapping[str, Tensor]) -> Tensor:
        from .. import schemes

        return self.dequantize(schemes.unpack_fp4(tensors["weight_packed"]), tensors)

    def decode_as_loaded(self, tensors: Mapping[str, Tensor]) -> Tensor:
        import torch

        return self.decode(tensors).to(torch.bfloat16).float()


@register_scheme
class MxFp4(MxFp4A16):
    """MXFP4 weights (as mxfp4a16) and activations: the served kernel quantizes each Linear's input
    per group of 32 with a dynamic power-of-two scale by the weights' rule; no calibration needed."""

    name = "mxfp4"
    preset = "MXFP4"
    input_args = quant_args(4, "float", "group", group_size=32, dynamic=True, scale_dtype="torch.uint8")
    description = "MXFP4 weights and activations (W4A4; dynamic power-of-two input scales)"
    inputs = "dynamic"

    def served_input(self, stored: Mapping[str, Tensor]):
        from .. import schemes

        return schemes.mxfp4_fake_quantize_input


FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_group(module: str) -> tuple[str, ...]:
    """The modules vLLM loads fused with `module` (itself included, in order): q/k/v and gate/up
    siblings, routed experts' per expert; just `module` for any other."""
    base, _, proj = module.rpartition(".")
    for group in FUSED_PROJECTIONS:
        if proj in group:
            return tuple(f"{base}.{p}" for p in group)
    return (module,)


def ignore_matches(patterns: list[str], module: str) -> bool:
    return any(re.match(p, module) for p in patterns)


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict:
    """`config.json`'s `quantization_config`, as compressed-tensors' `QuantizationConfig` dumps it."""
    return {"config_groups": {"group_0": scheme.config_group()}, "quant_method": "compressed-tensors",
            "kv_cache_scheme": None, "format": scheme.format, "quantization_status": "compressed",
            "global_compression_ratio": None, "ignore": [f"re:{p}" for p in ignore], "moe_sparsity_config": None}
