"""Numeric kernels: symmetric int4 / int8 / fp8 weight quantization in the compressed-tensors convention.

Pure torch functions on one weight matrix `w` of shape [out_features, in_features] (any float dtype,
BF16 in practice). They run on the tensor's own device (CPU or CUDA) and compute in float32.
Nothing here dispatches by scheme name: the scheme classes in `formats.compressed_tensors` pick the kernels.

Convention (compressed-tensors 0.20 symmetric min-max observer, `calculate_qparams` and `_quantize`):

    scale = absmax / (q_range / 2)          q_range = qmax - qmin
    q     = clamp(round_half_even(w / scale), qmin, qmax)        int4 [-8, 7], int8 [-128, 127]
    q     = clamp(w / scale, -448, 448).to(float8_e4m3fn)        fp8 (round to nearest even)
    w'    = q * scale

so int4 divides by 7.5, int8 by 127.5, fp8 by 448. absmax is taken per group of `group_size`
input columns (int4) or per output row (int8, fp8).

Where l4q deliberately differs from compressed-tensors (its decoders do not care, they only compute
q * scale):

* The stored scale (`scale_dtype`, BF16 = the model dtype) is rounded *up*: it is the smallest
  `scale_dtype` value >= max(absmax / (q_range/2), finfo(scale_dtype).tiny). compressed-tensors rounds
  to nearest, which about half the time lands below absmax / (q_range/2) and makes the clamp cut the
  group's largest value by more than half a step. Quantizing always uses this stored scale.
* All-zero (or all-subnormal) groups get scale = finfo(scale_dtype).tiny, a positive normal number,
  and dequantize to exactly 0 (compressed-tensors replaces a zero scale with finfo.eps).
* Near the top of the BF16 range, q * scale must stay finite when a decoder multiplies in BF16:
  int4/int8 clamp at -qmax instead of qmin in groups where |qmin| * scale would overflow
  `scale_dtype` (this only changes a -7.5 / -127.5 tie, same error), and fp8 steps such a scale
  one value down (448 * scale overflows; the clamp to 448 then still costs < half an fp8 ulp).

Error bounds, for BF16 or FP16 weights with BF16 scales (the pipeline's case), exactly:

    int4, int8:  |w - q*s| <= s / 2
    fp8:         |w - q*s| <= max(|w| * 2**-4, s * 2**-10)     (half an e4m3 ulp, subnormals incl.)

No float32 rounding can break them: w / s is a quotient of two 8-bit significands, which is either
exactly on a rounding midpoint or at least 2**-9 (relative) away from it, far beyond float32's
2**-24; and q * s is exact in float32. For float32 weights or float32 scales, the float32 division
and product add at most 2**-22 * (|w| + s) on top.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import NonFiniteWeightError

INT4_GROUP_SIZE = 128
INT4_MIN, INT4_MAX = -8, 7
INT8_MIN, INT8_MAX = -128, 127
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448

# Rows are processed in slices of at most this many elements, so quantizing a [16384, 5120] matrix
# needs one 64 MiB float32 buffer rather than a full-size float32 copy.
_CHUNK_ELEMENTS = 1 << 24

# Below this many values a compiled parallel loop costs more to start (~0.4 ms) than torch takes
# (the scale searches call the group maxima of small slices thousands of times).
_COMPILED_MIN_ELEMENTS = 1 << 20

# Same-width integer views: positive finite floats are ordered like their bit patterns.
_BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# --------------------------------------------------------------------------------------- helpers


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a [out_features, in_features] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")


def _check_groups(in_features: int, group_size: int) -> int:
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
    return in_features // group_size


def _check_scale(scale: Tensor, shape: tuple[int, int]) -> None:
    if tuple(scale.shape) != shape:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {shape}")
    if scale.dtype not in _BITS_VIEW:
        raise ValueError(f"scale dtype must be one of {list(_BITS_VIEW)}, got {scale.dtype}")


def _row_chunks(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def stored_transposed(w: Tensor) -> bool:
    """Whether [out, in] `w` is a transposed view of rows of [in, out] values, as a routed expert's
    projection is (Llama 4 stores experts [E, in, out], gate and up side by side). The kernels then
    work in that layout, where a group of input columns is a run of rows, instead of paying for a
    transposed copy first."""
    return w.ndim == 2 and min(w.shape) > 1 and w.stride(0) == 1 and w.stride(1) >= w.shape[0]


def _group_absmax(w: Tensor, group_size: int) -> Tensor:
    """Float32 max |w| over consecutive groups of `group_size` columns: [out, in / group_size]."""
    from . import cpu_kernels

    compiled = w.dtype in (torch.bfloat16, torch.float16, torch.float32)
    if stored_transposed(w):
        if compiled and cpu_kernels.supports_rows(w.T):
            return cpu_kernels.group_absmax_of_rows(w.T, group_size).float().T.contiguous()
        rows = w.T.unflatten(0, (w.shape[1] // group_size, group_size))  # [groups, group_size, out]
        lo, hi = torch.aminmax(rows, dim=1)
        return torch.maximum(hi.float(), lo.float().neg_()).T.contiguous()
    if compiled and w.numel() >= _COMPILED_MIN_ELEMENTS and cpu_kernels.supports_rows(w):
        return cpu_kernels.group_absmax_in_rows(w, group_size).float()
    lo, hi = torch.aminmax(w.unflatten(-1, (w.shape[-1] // group_size, group_size)), dim=-1)
    return torch.maximum(hi.float(), lo.float().neg_())


def _step(s: Tensor, mask: Tensor, direction: int) -> Tensor:
    """Move the positive finite entries of `s` selected by `mask` one representable value up (+1) or down (-1)."""
    bits = s.view(_BITS_VIEW[s.dtype])
    return torch.where(mask, bits + direction, bits).view(s.dtype)


def true_div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """a / b correctly rounded in float32, as C divides, on every device. Written out because torch
    turns `number / tensor` into a reciprocal times the number, and on CUDA `tensor / number` too."""
    like = a if isinstance(a, Tensor) else b
    if not isinstance(a, Tensor):
        a = torch.tensor(a, dtype=torch.float32, device=like.device)
    if not isinstance(b, Tensor):
        b = torch.tensor(b, dtype=torch.float32, device=like.device)
    return torch.div(a, b)


def _symmetric_scale(absmax: Tensor, half_range: float, scale_dtype: torch.dtype) -> Tensor:
    """Smallest `scale_dtype` value >= max(absmax / half_range, tiny), elementwise.

    The float32 quotient is cast to nearest and stepped up where that landed below the exact
    quotient; the float64 check `s * half_range < absmax` is exact (both factors have few bits).
    """
    if scale_dtype not in _BITS_VIEW:
        raise ValueError(f"scale_dtype must be one of {list(_BITS_VIEW)}, got {scale_dtype}")
    if scale_dtype == torch.bfloat16 and absmax.device.type == "cpu" and absmax.dtype == torch.float32:
        from .cpu_kernels import symmetric_scale_bf16

        s = symmetric_scale_bf16(absmax, half_range)
        if s is not None:
            return s
    if not bool(torch.isfinite(absmax).all()):
        raise NonFiniteWeightError("the weight holds NaN/Inf values; check it with check_finite() first")
    finfo = torch.finfo(scale_dtype)
    s = true_div(absmax, half_range).clamp_(min=finfo.tiny).to(scale_dtype)
    s = _step(s, s.double() * half_range < absmax.double(), +1)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"weights up to {float(absmax.max()):.4g} need scales beyond the {scale_dtype} range "
            f"(max {finfo.max:.4g}); choose a wider scale dtype"
        )
    return s


def int_lower_clamp(scale: Tensor, qmin: int, qmax: int) -> Tensor | None:
    """Float32 lower clamp per scale entry, or None where no entry needs one.

    Where |qmin| * scale overflows the scale dtype, a decoder computing q * scale in that dtype would
    get -Inf for qmin; clamping at -qmax there only changes the -(qmax + 0.5) tie.
    """
    limit = torch.finfo(scale.dtype).max
    if scale.numel() == 0 or float(scale.max()) * -qmin <= limit:  # the common case, in one reduction
        return None  # (a NaN maximum fails the test and takes the elementwise path)
    overflow = scale.double() * -qmin > limit
    if not bool(overflow.any()):
        return None
    return torch.where(overflow, float(-qmax), float(qmin)).to(torch.float32)


def round_int_(x: Tensor, qmin: int, qmax: int, lower: Tensor | None = None) -> Tensor:
    """Float32 x = w / scale rounded half to even and clamped to [qmin, qmax] (and at `lower`, from
    `int_lower_clamp`, broadcast to x), in place."""
    x.round_().clamp_(qmin, qmax)
    if lower is not None:
        x.clamp_(min=lower)
    return x


def round_fp8(x: Tensor) -> Tensor:
    """float8_e4m3fn values of float32 x = w / scale: clamped to +-448 in place, then rounded to nearest even."""
    return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _quantize_int(w: Tensor, scale: Tensor, group_size: int, qmin: int, qmax: int) -> Tensor:
    """int8 q = clamp(round_half_even(w / scale), qmin, qmax) per group: for bf16 on the CPU one
    compiled pass (`cpu_kernels`), else one float32 slice at a time (of rows; of input columns when
    `w` is `stored_transposed`: then the compiled pass returns q contiguous, as it is stored, and
    torch's a transposed view)."""
    rows, cols = w.shape
    groups = _check_groups(cols, group_size)
    _check_scale(scale, (rows, groups))
    low = int_lower_clamp(scale, qmin, qmax)
    from . import cpu_kernels

    if stored_transposed(w):
        if cpu_kernels.supports_transposed(w.T):  # one compiled pass, [out, in] as stored, contiguous
            return cpu_kernels.quantize_transposed(w.T, group_size, scale.to(torch.float32).T.contiguous(),
                                                   None if low is None else low.T.contiguous(), qmin, qmax)
        wt, s = w.T, scale.to(torch.float32).T.unsqueeze(1)  # [in, out]; [groups, 1, out]
        low = None if low is None else low.T.unsqueeze(1)
        qt = torch.empty((cols, rows), dtype=torch.int8, device=w.device)
        unit = group_size if groups > 1 else 1  # slices of whole groups; any rows for one per channel
        step = max(1, _CHUNK_ELEMENTS // (unit * rows)) * unit
        for start in range(0, cols, step):
            r = slice(start, min(start + step, cols))
            x = wt[r].to(torch.float32, copy=True)
            # group by group: a broadcast division over [groups, size, out] runs 1.5x slower
            spans = [(a, min(a + group_size, r.stop)) for a in range(start, r.stop, group_size)]
            for a, b in spans:
                x[a - start:b - start].div_(s[a // group_size])
            round_int_(x, qmin, qmax)
            if low is not None:
                for a, b in spans:
                    x[a - start:b - start].clamp_(min=low[a // group_size])
            qt[r].copy_(x)
        return qt.T
    if w.dtype == torch.bfloat16 and cpu_kernels.supports_rows(w):  # one compiled pass over the rows
        return cpu_kernels.quantize_rows(w, group_size, scale.to(torch.float32).contiguous(), low, qmin, qmax)
    s = scale.to(torch.float32).unsqueeze(-1)  # [rows, groups, 1]
    if low is not None:
        low = low.unsqueeze(-1)
    q = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    for r in _row_chunks(rows, cols):
        x = w[r].to(torch.float32, copy=True)
        round_int_(x.unflatten(-1, (groups, group_size)).div_(s[r]), qmin, qmax, None if low is None else low[r])
        q[r].copy_(x)
    return q


def _dequantize(q: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """Float32 q * scale, scale broadcast over groups of `group_size` columns."""
    if q.ndim != 2:
        raise ValueError(f"expected a [out_features, in_features] tensor, got shape {tuple(q.shape)}")
    rows, cols = q.shape
    groups = _check_groups(cols, group_size)
    _check_scale(scale, (rows, groups))
    x = q.to(torch.float32)
    x.unflatten(-1, (groups, group_size)).mul_(scale.to(torch.float32).unsqueeze(-1))
    return x


# ------------------------------------------------------------------------------------------ int4


def int4_scales(w: Tensor, group_size: int = INT4_GROUP_SIZE, scale_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-group symmetric int4 scales [out, in / group_size] in `scale_dtype`.

    The smallest `scale_dtype` value >= max(absmax / 7.5, tiny): rounding up guarantees the clamp to
    [-8, 7] never costs more than half a step, and zero groups still get a positive scale.
    """
    _check_weight(w)
    _check_groups(w.shape[1], group_size)
    return _symmetric_scale(_group_absmax(w, group_size), (INT4_MAX - INT4_MIN) / 2, scale_dtype)


def int4_quantize(w: Tensor, scale: Tensor, group_size: int = INT4_GROUP_SIZE) -> Tensor:
    """int4 values as int8 [out, in] in [-8, 7]: clamp(round_half_even(w / scale)) with the stored scale."""
    _check_weight(w)
    return _quantize_int(w, scale, group_size, INT4_MIN, INT4_MAX)


def int4_rtn_packed(w: Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[Tensor, Tensor] | None:
    """(`int4_quantize_packed(w, s)`, s) with s = `int4_scales(w, group_size)`, in one compiled pass
    over a routed expert's bf16 projection on the CPU (stored transposed, groups of 128 input
    columns): each group's rows are quantized while they are in cache after its maxima are taken,
    where the two steps read the weight twice. None elsewhere, and where the scales would be refused
    (NaN/Inf, overflow): the two steps then raise."""
    from . import cpu_kernels

    if not (w.dtype == torch.bfloat16 and stored_transposed(w) and cpu_kernels.supports_rows(w.T)
            and group_size == cpu_kernels.RTN_INT4_GROUP and sys.byteorder == "little"):
        return None
    _check_groups(w.shape[1], group_size)
    done = cpu_kernels.rtn_int4_transposed(w.T, (INT4_MAX - INT4_MIN) / 2)
    if done is None:
        return None
    packed, scale = done
    return packed.view(torch.int32), scale.T.contiguous()


def int4_quantize_packed(w: Tensor, scale: Tensor, group_size: int = INT4_GROUP_SIZE) -> Tensor | None:
    """`pack_int4(int4_quantize(w, scale, group_size))` in one compiled pass, where that applies: a
    bf16 weight on the CPU of a little-endian machine, a routed expert's projection (stored
    transposed) or a Linear's own rows. None elsewhere: use the two steps."""
    from . import cpu_kernels

    transposed = stored_transposed(w)
    if not (w.dtype == torch.bfloat16 and cpu_kernels.supports_rows(w.T if transposed else w)
            and group_size % 2 == 0 and sys.byteorder == "little"):
        return None
    rows, cols = w.shape
    _check_scale(scale, (rows, _check_groups(cols, group_size)))
    low = int_lower_clamp(scale, INT4_MIN, INT4_MAX)
    scale = scale.to(torch.float32)
    if transposed:
        packed = cpu_kernels.quantize_pack_int4_transposed(w.T, group_size, scale.T.contiguous(),
                                                           None if low is None else low.T.contiguous())
    else:
        packed = cpu_kernels.quantize_pack_int4_rows(w, group_size, scale.contiguous(), low)
    return packed.view(torch.int32)


def int4_dequantize(q: Tensor, scale: Tensor, group_size: int = INT4_GROUP_SIZE) -> Tensor:
    """Float32 [out, in] weight q * scale, as vLLM and transformers decode pack-quantized int4."""
    return _dequantize(q, scale, group_size)


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 [out, in] values in [-8, 7] into int32 [out, in / 8] (compressed-tensors pack-quantized).

    Each value is offset by 8 to 0..15; element j goes to word j // 8 at bits 4 * (j % 8), lowest
    nibble first; words are signed int32. in_features must be a multiple of 8.
    """
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"expected int8 [out_features, in_features] values, got {q.dtype} {tuple(q.shape)}")
    rows, cols = q.shape
    if cols % 8 != 0:
        raise ValueError(f"in_features {cols} must be a multiple of 8 to pack int4 into int32 words")
    if q.numel() > 0:
        lo, hi = torch.aminmax(q.T if stored_transposed(q) else q)  # in memory order: 3x faster
        if int(lo) < INT4_MIN or int(hi) > INT4_MAX:
            raise ValueError(f"int4 values must lie in [-8, 7], got [{int(lo)}, {int(hi)}]")
    if stored_transposed(q) and sys.byteorder == "little":
        # the bytes in the stored [in, out] layout (two rows of values make one row of bytes), then
        # one transposed copy of half as many bytes as a bf16 copy of the weight
        qt = q.T
        from . import cpu_kernels

        if cpu_kernels.supports_rows(qt):
            return cpu_kernels.pack_int4_transposed(qt).view(torch.int32)
        packed_t = (qt[0::2] + 8).view(torch.uint8)
        packed_t |= (qt[1::2] + 8).view(torch.uint8).bitwise_left_shift_(4)
        return packed_t.T.contiguous().view(torch.int32)
    # Two nibbles per byte: byte k of a little-endian word holds elements 2k (low) and 2k + 1 (high).
    packed_bytes = (q[:, 0::2] + 8).view(torch.uint8)
    packed_bytes |= (q[:, 1::2] + 8).view(torch.uint8).bitwise_left_shift_(4)
    if sys.byteorder == "big" and packed_bytes.device.type == "cpu":
        packed_bytes = packed_bytes.view(rows, cols // 8, 4).flip(-1).reshape(rows, cols // 2)
    return packed_bytes.contiguous().view(torch.int32)


def unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of `pack_int4`: int32 [out, words] -> int8 [out, in_features] in [-8, 7].

    Accepts compressed-tensors' padded words too (in_features not a multiple of 8, trailing nibbles dropped).
    """
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"expected int32 [out_features, words], got {packed.dtype} {tuple(packed.shape)}")
    rows, words = packed.shape
    if not 8 * (words - 1) < in_features <= 8 * words:
        raise ValueError(f"{words} packed int32 words per row cannot hold in_features {in_features}")
    b = packed.contiguous().view(torch.uint8)  # [rows, 4 * words]
    if sys.byteorder == "big" and b.device.type == "cpu":
        b = b.view(rows, words, 4).flip(-1).reshape(rows, 4 * words)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).view(rows, 8 * words)
    return (nibbles[:, :in_features].view(torch.int8) - 8).contiguous()


# ------------------------------------------------------------------------------------------ int8


def int8_scales(w: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-output-channel symmetric int8 scales [out, 1]: smallest `scale_dtype` value >= max(absmax / 127.5, tiny)."""
    _check_weight(w)
    return _symmetric_scale(_group_absmax(w, w.shape[1]), (INT8_MAX - INT8_MIN) / 2, scale_dtype)


def int8_quantize(w: Tensor, scale: Tensor) -> Tensor:
    """int8 [out, in] in [-128, 127]: clamp(round_half_even(w / scale)) with the stored per-row scale."""
    _check_weight(w)
    return _quantize_int(w, scale, w.shape[1], INT8_MIN, INT8_MAX)


def int8_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Float32 [out, in] weight q * scale (per-row scale [out, 1])."""
    return _dequantize(q, scale, q.shape[-1])


# ------------------------------------------------------------------------------------------- fp8


def fp8_scales(w: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Per-output-channel FP8 (e4m3) scales [out, 1]: smallest `scale_dtype` value >= max(absmax / 448, tiny).

    Exception at the top of the range: where 448 * scale would overflow `scale_dtype` (a decoder
    multiplying in BF16 would get Inf), the scale steps one value down; absmax / scale then stays
    below 464, so the clamp to 448 still costs less than half an e4m3 ulp.
    """
    _check_weight(w)
    return fp8_absmax_scale(_group_absmax(w, w.shape[1]), scale_dtype)


def fp8_absmax_scale(absmax: Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The `fp8_scales` rule for float32 absmax values: `_symmetric_scale` by 448, one value down
    where 448 * scale overflows `scale_dtype`."""
    s = _symmetric_scale(absmax, FP8_MAX, scale_dtype)
    return _step(s, s.double() * FP8_MAX > torch.finfo(scale_dtype).max, -1)


def fp8_quantize(w: Tensor, scale: Tensor) -> Tensor:
    """float8_e4m3fn [out, in]: clamp(w / scale, -448, 448) rounded to nearest even, with the stored per-row scale."""
    _check_weight(w)
    rows, cols = w.shape
    _check_scale(scale, (rows, 1))
    s = scale.to(torch.float32)
    from . import cpu_kernels

    if stored_transposed(w):  # work in the stored [in, out] layout, return the same layout
        if cpu_kernels.supports_transposed(w.T):  # one compiled pass, [out, in] as stored, contiguous
            return cpu_kernels.quantize_fp8_transposed(w.T, s[:, 0])
        wt, st = w.T, s.T  # [in, out]; [1, out]
        qt = torch.empty((cols, rows), dtype=torch.float8_e4m3fn, device=w.device)
        for r in _row_chunks(cols, rows):
            qt[r].copy_(round_fp8(wt[r].to(torch.float32, copy=True).div_(st)))
        return qt.T
    if w.dtype == torch.bfloat16 and cpu_kernels.supports_rows(w):  # one compiled pass over the rows
        return cpu_kernels.quantize_fp8_rows(w, s[:, 0])
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=w.device)
    for r in _row_chunks(rows, cols):
        x = w[r].to(torch.float32, copy=True)
        q[r].copy_(round_fp8(x.div_(s[r])))
    return q


def fp8_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Float32 [out, in] weight q * scale (per-row scale [out, 1])."""
    return _dequantize(q, scale, q.shape[-1])


# ------------------------------------------------------------------------------------- fp8 block


def block_absmax(w: Tensor, block: int) -> Tensor:
    """Float32 max |w| per block of `block` x `block` weights: [out / block, in / block]."""
    _check_weight(w)
    rows, cols = w.shape
    _check_groups(rows, block)
    out = torch.empty((rows // block, _check_groups(cols, block)), dtype=torch.float32, device=w.device)
    step = max(block, _CHUNK_ELEMENTS // max(cols, 1) // block * block)
    for start in range(0, rows, step):
        x = w[start:start + step].to(torch.float32, copy=True).abs_()
        out[start // block:(start + x.shape[0]) // block] = x.unflatten(0, (-1, block)).unflatten(-1, (-1, block)).amax((1, 3))
    return out


def fp8_block_quantize(w: Tensor, scale: Tensor, block: int) -> Tensor:
    """float8_e4m3fn [out, in]: clamp(w / scale, +-448) rounded to nearest even, scale per block."""
    _check_weight(w)
    rows, cols = w.shape
    _check_scale(scale, (rows // block, _check_groups(cols, block)))
    s = scale.to(torch.float32).repeat_interleave(block, 1)  # [rows / block, in]
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=w.device)
    step = max(block, _CHUNK_ELEMENTS // max(cols, 1) // block * block)
    for start in range(0, rows, step):
        x = w[start:start + step].to(torch.float32, copy=True)
        x.unflatten(0, (-1, block)).div_(s[start // block:(start + x.shape[0]) // block].unsqueeze(1))
        q[start:start + x.shape[0]] = round_fp8(x)
    return q


def fp8_block_dequantize(q: Tensor, scale: Tensor, block: int) -> Tensor:
    """Float32 [out, in] weight q * scale, scale per block."""
    s = scale.to(torch.float32).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.to(torch.float32).mul_(s)


# ----------------------------------------------------------------------------------------- nvfp4
# NVFP4 (compressed-tensors `nvfp4-pack-quantized`, as llm-compressor writes it): FP4 e2m1 values in
# groups of 16 input columns, one FP8 e4m3 scale per group and one float32 global scale per tensor.
#
#     global = 448 * 6 / absmax(tensor)                      (1 where that is not finite)
#     scale  = fp8(clamp(absmax(group) / 6 * global, +-448)) (round to nearest; 0 -> 0.125)
#     step   = float32(scale) / global                       (the divisor, in float32)
#     q      = fp4(clamp(w / step, +-6))                     (nearest; ties to the even code)
#
# exactly compressed-tensors' arithmetic. Round to nearest (not up, as the int schemes) costs
# nothing under a normal FP8 scale: a group's largest |w / step| is then at most 6 * (1 + 2**-4) =
# 6.375, and clamping it to 6 errs by 0.375 step, less than the half spacing (1 step) of the grid's
# top interval. A group whose absmax is below 2**-6 / 448 of the tensor's gets a subnormal FP8 scale,
# coarser relative to it, and may clip more: the format's limit (the mse method weighs it).

NVFP4_GROUP_SIZE = 16
FP4_MAX = 6.0
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # by 3-bit code; bit 3 is the sign
def nvfp4_global_scale(absmax: Tensor) -> Tensor:
    """float32 [1]: 448 * 6 / absmax of the whole tensor (or fused group), 1 where not finite."""
    a = absmax.to(torch.float32).reshape(1).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num((FP8_MAX * FP4_MAX) / a, nan=1.0, posinf=1.0, neginf=1.0)


def nvfp4_scales(absmax: Tensor, global_scale: Tensor) -> Tensor:
    """FP8 e4m3 group scales for float32 group absmax values under `global_scale`."""
    s = global_scale * true_div(absmax.to(torch.float32), FP4_MAX)
    s = s.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.where(s.float() == 0, torch.tensor(0.125, device=s.device), s.float()).to(torch.float8_e4m3fn)


def nvfp4_steps(scale: Tensor, global_scale: Tensor) -> Tensor:
    """float32 divisors of the groups: scale / global, as compressed-tensors computes them."""
    return scale.to(torch.float32) / global_scale


# The midpoints between neighbouring FP4 magnitudes. A tie rounds to the even code: down at 0.25,
# 1.25, 2.5 and 5 (to 0, 1, 2, 4), up at 0.75, 1.75 and 3.5 (to 1, 2, 4); those three midpoints are
# moved one float32 value down, so that `bucketize` (which puts a value equal to a boundary below
# it) sends them up.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_FP4_TIES_UP = (0.75, 1.75, 3.5)
_FP4_BOUNDARIES: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _fp4_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    if device not in _FP4_BOUNDARIES:
        b = torch.tensor(_FP4_MIDPOINTS, dtype=torch.float32)
        up = torch.tensor([m in _FP4_TIES_UP for m in _FP4_MIDPOINTS])
        b = torch.where(up, torch.nextafter(b, torch.zeros_like(b)), b)
        _FP4_BOUNDARIES[device] = (b.to(device), torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=device))
    return _FP4_BOUNDARIES[device]


def round_fp4_(x: Tensor) -> Tensor:
    """float32 x rounded to the signed FP4 grid (clamped to +-6, nearest, ties to the even code), in place:
    the magnitude is looked up among the midpoints of the grid in one pass (the GPTQ column loop
    calls this once per column)."""
    boundaries, magnitudes = _fp4_tables(x.device)
    q = magnitudes[torch.bucketize(x.abs().contiguous(), boundaries)]
    return x.copy_(torch.copysign(q, x))


def fp4_codes(values: Tensor) -> Tensor:
    """uint8 4-bit codes of FP4 grid values (float): magnitude index | 8 for a set sign bit (-0 included)."""
    a = values.abs()
    code = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4)).to(torch.uint8)
    return code | (torch.signbit(values).to(torch.uint8) << 3)


def fp4_values(codes: Tensor) -> Tensor:
    """float32 values of 4-bit codes."""
    mag = torch.tensor(FP4_MAGNITUDES, device=codes.device)[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -mag, mag)


def nvfp4_quantize(w: Tensor, scale: Tensor, global_scale: Tensor, group_size: int = NVFP4_GROUP_SIZE) -> Tensor:
    """uint8 [out, in] FP4 codes of w / step."""
    return fp4_quantize(w, nvfp4_steps(scale, global_scale), group_size)


def nvfp4_dequantize(codes: Tensor, scale: Tensor, global_scale: Tensor, group_size: int = NVFP4_GROUP_SIZE) -> Tensor:
    """float32 [out, in] weight: FP4 values times their group's step."""
    return fp4_dequantize(codes, nvfp4_steps(scale, global_scale), group_size)


def nvfp4_fake_quantize_input(x: Tensor, input_global_scale: Tensor) -> Tensor:
    """x as an NVFP4 kernel sees it: per group of 16 along the last dim, a dynamic FP8 scale under the
    static `input_global_scale`, values rounded to FP4; returned dequantized, in x's dtype."""
    cols = x.shape[-1]
    if cols % NVFP4_GROUP_SIZE:
        raise ValueError(f"an NVFP4 input needs a multiple of {NVFP4_GROUP_SIZE} features, got {cols}")
    g = input_global_scale.to(device=x.device, dtype=torch.float32)
    groups = x.to(torch.float32).unflatten(-1, (cols // NVFP4_GROUP_SIZE, NVFP4_GROUP_SIZE))
    steps = nvfp4_steps(nvfp4_scales(groups.abs().amax(-1), g), g).unsqueeze(-1)
    q = round_fp4_((groups / steps).clamp_(-FP4_MAX, FP4_MAX))
    return (q * steps).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------- mxfp4
# MXFP4 (OCP microscaling; compressed-tensors `mxfp4-pack-quantized`): FP4 e2m1 values in groups of
# 32 input columns, each group's scale a power of two stored as its E8M0 biased exponent (uint8):
#
#     p     = floor(log2(absmax(group))), plus 1 where absmax >= 1.75 * 2**p  (to a power of two)
#     e     = clamp(p - 2 + 127, 0, 252)                                      (2**2: FP4's top power)
#     step  = 2**(e - 127)
#     q     = fp4(clamp(w / step, +-6))                                        (nearest; ties to even)
#
# compressed-tensors' rule, except the cap at 252: a group within 2**-2 of BF16's largest value would
# get 253, where its values (4 or 6 times 2**126) overflow BF16 and float32 to infinity; at 252 they
# clip instead. Otherwise a group's largest |w / step| is below 1.75 * 4 = 7, so clamping it to 6
# errs by less than one step, the top interval's half spacing. Dividing by a power of two is exact.


MXFP4_GROUP_SIZE = 32
E8M0_BIAS = 127
MXFP4_MAX_EXPONENT = 252


def mxfp4_exponents(absmax: Tensor) -> Tensor:
    """uint8 E8M0 exponents of the MXFP4 group scales for float32 group absmax values."""
    mantissa, exponent = torch.frexp(absmax.to(torch.float32))  # absmax = mantissa * 2**exponent, mantissa in [0.5, 1)
    p = exponent - 1 + (mantissa >= 0.875).to(exponent.dtype)
    e = (p - 2 + E8M0_BIAS).clamp_(0, MXFP4_MAX_EXPONENT)
    return torch.where(absmax > 0, e, 0).to(torch.uint8)


def mxfp4_steps(exponents: Tensor) -> Tensor:
    """float32 group scales 2**(e - 127) of E8M0 exponents (exact: 2**-127 is a float32 subnormal)."""
    e = exponents.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e)


def mxfp4_exponents_of_steps(steps: Tensor) -> Tensor:
    """uint8 E8M0 exponents of float32 power-of-two group scales (`mxfp4_steps`' inverse)."""
    mantissa, exponent = torch.frexp(steps.to(torch.float32))
    if not bool((mantissa == 0.5).all()):
        raise ValueError("MXFP4 group scales must be powers of two")
    e = exponent - 1 + E8M0_BIAS
    if not bool(((e >= 0) & (e <= MXFP4_MAX_EXPONENT)).all()):
        raise ValueError(f"MXFP4 group scales must lie within 2**-127 .. 2**{MXFP4_MAX_EXPONENT - E8M0_BIAS}")
    return e.to(torch.uint8)


def fp4_quantize(w: Tensor, steps: Tensor, group_size: int) -> Tensor:
    """uint8 [out, in] FP4 codes of clamp(w / step, +-6), one float32 step per group, a slice of rows at a time."""
    _check_weight(w)
    rows, cols = w.shape
    groups = _check_groups(cols, group_size)
    _check_scale(steps, (rows, groups))
    steps = steps.to(torch.float32).unsqueeze(-1)  # [rows, groups, 1]
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=w.device)
    for r in _row_chunks(rows, cols):
        x = w[r].to(torch.float32, copy=True)
        x.unflatten(-1, (groups, group_size)).div_(steps[r])
        codes[r] = fp4_codes(round_fp4_(x.clamp_(-FP4_MAX, FP4_MAX)))
    return codes


def fp4_dequantize(codes: Tensor, steps: Tensor, group_size: int) -> Tensor:
    """float32 [out, in] weight: FP4 values times their group's float32 step."""
    rows, cols = codes.shape
    groups = _check_groups(cols, group_size)
    x = fp4_values(codes)
    x.unflatten(-1, (groups, group_size)).mul_(steps.to(torch.float32).unsqueeze(-1))
    return x


def mxfp4_fake_quantize_input(x: Tensor) -> Tensor:
    """x as a W4A4 MXFP4 kernel sees it: per group of 32 along the last dim, the weights' rule with a
    dynamic E8M0 scale, values rounded to FP4; returned dequantized, in x's dtype."""
    cols = x.shape[-1]
    if cols % MXFP4_GROUP_SIZE:
        raise ValueError(f"an MXFP4 input needs a multiple of {MXFP4_GROUP_SIZE} features, got {cols}")
    groups = x.to(torch.float32).unflatten(-1, (cols // MXFP4_GROUP_SIZE, MXFP4_GROUP_SIZE))
    steps = mxfp4_steps(mxfp4_exponents(groups.abs().amax(-1))).unsqueeze(-1)
    q = round_fp4_((groups / steps).clamp_(-FP4_MAX, FP4_MAX))
    return (q * steps).flatten(-2).to(x.dtype)


def pack_fp4(codes: Tensor) -> Tensor:
    """uint8 [out, in / 2]: two 4-bit codes per byte, the even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"in_features {codes.shape[-1]} must be even to pack FP4 two to a byte")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_fp4(packed: Tensor) -> Tensor:
    """uint8 [out, in] codes from `pack_fp4`'s bytes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------------ checks


def check_finite(w: Tensor, name: str) -> None:
    """Raise NonFiniteWeightError naming `name` and the count if `w` holds NaN or +-Inf."""
    if not w.is_floating_point():
        return
    from .cpu_kernels import count_non_finite

    count = count_non_finite(w)
    if count:
        raise NonFiniteWeightError(f"{name}: {count} non-finite values (NaN/Inf) in the source weight")
