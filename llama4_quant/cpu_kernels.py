"""Compiled CPU loops (numba) over the raw bits of a weight, where torch's kernels are slow.

Counting NaN/Inf and the largest |w| per group only need the bits: a float is NaN or Inf exactly
when its exponent bits are all ones, and for floats of one sign the order of the values is the order
of their bits, so max |w| is an integer max of the bits with the sign cleared. The int and FP8
quantizers of a routed expert (an [out, in] view of its stored [in, out] slice) run here in one pass
over the stored rows, where torch makes several passes of small ops, and write the transposed
bytes as stored directly, eight bytes a store (int4 packed two values a byte); those of a Linear's
own bf16 weight run in one pass along its rows. Every loop
gives the bytes of the torch code it replaces (tests compare them, FP8 on every bf16 value); the
walk's reader thread runs the NaN count beside the kernels (where no target finds NaN/Inf in its
own pass), which spread rows or columns over `--threads` numba threads.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from . import parallel
from .byte_transpose import store_transposed

# dtype -> (same-width int dtype, numpy unsigned view, exponent mask, magnitude mask: all but the sign)
_BITS = {
    torch.bfloat16: (torch.int16, np.uint16, 0x7F80, 0x7FFF),
    torch.float16: (torch.int16, np.uint16, 0x7C00, 0x7FFF),
    torch.float32: (torch.int32, np.uint32, 0x7F800000, 0x7FFFFFFF),
}


def _bits(w: torch.Tensor) -> np.ndarray:
    """The bits of CPU tensor `w` as an unsigned numpy view of the same memory (any strides)."""
    int_dtype, np_dtype, _, _ = _BITS[w.dtype]
    return w.view(int_dtype).numpy().view(np_dtype)


def row_bits(w: torch.Tensor) -> tuple[np.ndarray, int]:
    """The bits of 2-D CPU tensor `w` (rows contiguous) as one contiguous 1-D array from its first
    value to its last, and how far apart its rows start. numba vectorizes loops over arrays it knows
    are contiguous, and an expert's gate or up projection is a view whose rows lie apart: the group
    maxima of one took 6x as long as those of a contiguous copy."""
    rows, cols = w.shape
    if cols > 1 and w.stride(1) != 1:
        raise ValueError("the row kernels take rows whose values are contiguous (see supports_rows)")
    stride = w.stride(0) if rows > 1 else cols
    return _bits(torch.as_strided(w, ((rows - 1) * stride + cols if rows else 0,), (1,))), stride


@njit(nogil=True, cache=True)
def _count_exponent_all_ones(bits, mask):
    n = 0
    for i in range(bits.shape[0]):
        n += (bits[i] & mask) == mask
    return n


# The largest magnitude (bits with the sign cleared) of 16- and 32-bit floats: one SIMD max pass, about
# twice as fast as counting. The casts keep the loop in the input's width; numba would widen to int64.
@njit(nogil=True, cache=True)
def _max_magnitude_16(bits):
    m = np.uint16(0)
    for i in range(bits.shape[0]):
        m = max(m, np.uint16(bits[i] & np.uint16(0x7FFF)))
    return m


@njit(nogil=True, cache=True)
def _max_magnitude_32(bits):
    m = np.uint32(0)
    for i in range(bits.shape[0]):
        m = max(m, np.uint32(bits[i] & np.uint32(0x7FFFFFFF)))
    return m


def count_non_finite(w: torch.Tensor) -> int:
    """How many values of floating-point tensor `w` are NaN or +-Inf."""
    if w.numel() == 0:
        return 0
    if w.device.type == "cpu" and w.dtype in _BITS and w.is_contiguous():
        _, np_dtype, exponent, _ = _BITS[w.dtype]
        bits = _bits(w.reshape(-1))
        # NaN/Inf are the magnitudes at or above the exponent mask: count them only where there are any
        largest = _max_magnitude_16(bits) if bits.itemsize == 2 else _max_magnitude_32(bits)
        if largest < exponent:
            return 0
        return int(_count_exponent_all_ones(bits, np_dtype(exponent)))
    return int((~torch.isfinite(w)).sum())


@njit(nogil=True, cache=True)
def _bf16_scale_bits(a, half_range32, half_range, scratch):
    """The bf16 bits of the smallest bf16 >= max(a / half_range, smallest normal), for finite float32
    `a`: the float32 quotient rounded to nearest even, one step up where that fell below the exact
    quotient; 0x7F80 or more where it overflows. `scratch`: two uint32 to see float32 bits through."""
    f = scratch.view(np.float32)
    f[0] = max(a / half_range32, np.float32(2.0**-126))
    b = scratch[0]
    s = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    scratch[1] = s << np.uint32(16)
    if np.float64(f[1]) * half_range < np.float64(a):
        s += np.uint32(1)
    return s


@njit(nogil=True, cache=True)
def _symmetric_scale_bf16_bits(absmax, half_range32, half_range, out):
    """out[i] = `_bf16_scale_bits(absmax[i])`; False at the first NaN/Inf absmax or infinite scale
    (out is then not used)."""
    scratch = np.empty(2, np.uint32)
    for i in range(absmax.shape[0]):
        a = absmax[i]
        if not np.isfinite(a):
            return False
        s = _bf16_scale_bits(a, half_range32, half_range, scratch)
        if s >= np.uint32(0x7F80):
            return False
        out[i] = np.uint16(s)
    return True


def symmetric_scale_bf16(absmax: torch.Tensor, half_range: float) -> torch.Tensor | None:
    """`schemes._symmetric_scale(absmax, half_range, torch.bfloat16)` for float32 `absmax` on the
    CPU, in one pass instead of torch's ten; None where that would raise (NaN/Inf, overflow)."""
    flat = absmax.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.int16)
    if not _symmetric_scale_bf16_bits(flat.numpy(), np.float32(half_range), float(half_range), out.numpy().view(np.uint16)):
        return None
    return out.view(torch.bfloat16).reshape(absmax.shape)


@njit(parallel=True, nogil=True, cache=True)
def _group_max_abs_bits(flat, stride, group_rows, magnitude, out):
    """out[g, o] = max over rows r in [g * group_rows, (g + 1) * group_rows) of bits[r, o] &
    magnitude, row r of bits being flat[r * stride:][:cols]."""
    cols = out.shape[1]
    for g in prange(out.shape[0]):
        acc = out[g]
        acc[:] = 0
        for r in range(g * group_rows, (g + 1) * group_rows):
            row = flat[r * stride:r * stride + cols]
            for o in range(cols):
                v = row[o] & magnitude
                acc[o] = v if v > acc[o] else acc[o]


def supports_rows(w: torch.Tensor) -> bool:
    """Whether the row kernels below take `w`: a 2-D CPU tensor with contiguous rows."""
    return w.device.type == "cpu" and w.ndim == 2 and w.stride(1) == 1


_PART_ROWS = 128  # rows of the parts whose maxima combine where there are fewer groups than threads


def group_absmax_of_rows(w: torch.Tensor, group_rows: int) -> torch.Tensor:
    """max |w| over consecutive groups of `group_rows` rows of [rows, cols] `w` (rows contiguous,
    any row stride), as [rows / group_rows, cols] in w's dtype. NaN ranks above every number, so a
    group holding one gets NaN, as torch's maximum gives."""
    int_dtype, np_dtype, _, magnitude = _BITS[w.dtype]
    parallel.use_kernel_threads()
    groups = w.shape[0] // group_rows
    # the threads take a group each, so a per-channel maximum (one group) ran on one thread: with
    # fewer groups than threads they take parts of _PART_ROWS rows, whose maxima then combine (a
    # Scout gate view on two threads: 5.0 ms against 8.9)
    split = groups < parallel.threads() and group_rows % _PART_ROWS == 0
    part_rows = _PART_ROWS if split else group_rows
    out = np.empty((w.shape[0] // part_rows, w.shape[1]), np_dtype)
    _group_max_abs_bits(*row_bits(w), part_rows, np_dtype(magnitude), out)
    if split:
        out = out.reshape(groups, group_rows // part_rows, -1).max(axis=1)
    return torch.from_numpy(out).view(int_dtype).view(w.dtype)


@njit(parallel=True, nogil=True, cache=True)
def _group_max_abs_bits_in_rows(bits, group, magnitude, out):
    """out[r, g] = max over columns [g * group, (g + 1) * group) of bits[r, c] & magnitude."""
    for r in prange(bits.shape[0]):
        row = bits[r]
        for g in range(out.shape[1]):
            run = row[g * group:(g + 1) * group]  # indexed from 0: the loop vectorizes (4x as fast)
            m = run[0] & magnitude
            for c in range(1, group):
                m = max(m, run[c] & magnitude)
            out[r, g] = m


def group_absmax_in_rows(w: torch.Tensor, group: int) -> torch.Tensor:
    """max |w| over consecutive runs of `group` columns of each row of [rows, cols] `w` (rows
    contiguous), as [rows, cols / group] in w's dtype; NaN as in `group_absmax_of_rows`."""
    int_dtype, np_dtype, _, magnitude = _BITS[w.dtype]
    parallel.use_kernel_threads()
    out = torch.empty((w.shape[0], w.shape[1] // group), dtype=int_dtype)
    _group_max_abs_bits_in_rows(_bits(w), group, np_dtype(magnitude), out.numpy().view(np_dtype))
    return out.view(w.dtype)


_STRIP = 64  # columns a thread quantizes at a time: the 64 stored rows it fills stay in L1 (512 ran 1.6x as long)


@njit(parallel=True, nogil=True, cache=True)
def _quantize_bf16_rows_transposed(flat, stride, group_rows, scale, low, qmin, qmax, out):
    """Stored byte [o, r] = clamp(round_half_even(float32(w[r, o]) / scale[r // group_rows, o]), qmin,
    qmax), then at least low[r // group_rows, o] where `low` has rows; w as bf16 bits, row r at
    r * stride; out the uint64 view of the [cols, rows] int8 result. Each thread takes strips of
    _STRIP columns, 8 rows at a time: it quantizes them into a small tile and stores the tile
    transposed (quantizing whole rows, then transposing the int8 result in a second pass, wrote and
    read the result once more: a Scout expert's projection took 1.4-1.5x as long, 2x in fresh memory)."""
    rows, cols = 8 * out.shape[1], out.shape[0]
    for strip in prange((cols + _STRIP - 1) // _STRIP):
        c0 = strip * _STRIP
        width = min(_STRIP, cols - c0)
        wide = np.empty(_STRIP, np.uint32)  # one row's bf16 values as float32 bits
        x = wide.view(np.float32)
        tile = np.empty(8 * _STRIP, np.int8)
        for rb in range(rows // 8):
            for k in range(8):
                r = 8 * rb + k
                g = r // group_rows
                row, s, q = flat[r * stride + c0:r * stride + c0 + width], scale[g, c0:c0 + width], tile[k * _STRIP:]
                for o in range(width):
                    wide[o] = np.uint32(row[o]) << np.uint32(16)
                if low.shape[0] > 0:
                    at_least = low[g, c0:c0 + width]
                    for o in range(width):
                        q[o] = np.int8(max(min(max(np.rint(x[o] / s[o]), qmin), qmax), at_least[o]))
                else:
                    for o in range(width):
                        q[o] = np.int8(min(max(np.rint(x[o] / s[o]), qmin), qmax))
            store_transposed(tile, _STRIP // 8, width, out, c0, rb)


def quantize_transposed(w: torch.Tensor, group_rows: int, scale: torch.Tensor, low: torch.Tensor | None,
                        qmin: int, qmax: int) -> torch.Tensor:
    """int8 [cols, rows], contiguous: the transposed values of bf16 [rows, cols] `w` (rows
    contiguous; see supports_transposed) in groups of `group_rows` rows with float32 scales
    [rows / group_rows, cols], as `schemes._quantize_int` computes them."""
    parallel.use_kernel_threads()
    out = torch.empty((w.shape[1], w.shape[0]), dtype=torch.int8)
    no_low = np.empty((0, 0), np.float32)
    _quantize_bf16_rows_transposed(*row_bits(w), group_rows, scale.numpy(), no_low if low is None else low.numpy(),
                                   np.float32(qmin), np.float32(qmax), out.view(torch.uint8).numpy().view(np.uint64))
    return out


def supports_transposed(w: torch.Tensor) -> bool:
    """Whether `quantize_transposed` and `quantize_fp8_transposed` take `w`: bf16 rows, contiguous,
    whose numbers of rows and columns are multiples of 8 (the 8 x 8 byte blocks they store)."""
    return supports_rows(w) and w.dtype == torch.bfloat16 and w.shape[0] % 8 == 0 and w.shape[1] % 8 == 0


_TILE = 64  # output rows packed together: their bytes advance side by side, each in its own cache line


@njit(parallel=True, nogil=True, cache=True)
def _pack_int4_rows_transposed(q, out):
    for t in prange((q.shape[1] + _TILE - 1) // _TILE):
        for k in range(q.shape[0] // 2):
            for o in range(t * _TILE, min((t + 1) * _TILE, q.shape[1])):
                out[o, k] = np.uint8(q[2 * k, o] + 8) | (np.uint8(q[2 * k + 1, o] + 8) << np.uint8(4))


def pack_int4_transposed(qt: torch.Tensor) -> torch.Tensor:
    """uint8 [cols, rows / 2]: int4 values int8 [rows, cols] (rows contiguous) of the transposed matrix,
    two per byte, value 2k in the low nibble of byte k, each offset by 8; in one pass, where torch
    packs in the stored layout and then copies it transposed byte by byte."""
    parallel.use_kernel_threads()
    out = torch.empty((qt.shape[1], qt.shape[0] // 2), dtype=torch.uint8)
    _pack_int4_rows_transposed(qt.numpy(), out.numpy())
    return out


_ROUNDER = np.float32(1.5 * 2**23)  # x + this - this is x rounded half to even, for float32 |x| < 2**22
_ROW_PAIRS = 64  # pairs of input rows packed together: each output row gets a 64-byte run of them
_COLUMNS = 512  # columns of those row pairs a thread quantizes at a time: its packed bytes stay in L1


def _bytes_and_words(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [cols, pairs] `out` as bytes, and as uint64 words where its rows are whole words (else
    no words: the int4 tiles then store byte by byte)."""
    data = out.numpy()
    return data, data.view(np.uint64) if out.shape[1] % 8 == 0 else np.empty((0, 0), np.uint64)


@njit(nogil=True, cache=True, inline="always")  # inlined: called, it ran at half the speed
def _quantize_pack_int4_tile(flat, stride, group_rows, scale, low, out, words, first, c0):
    """One tile of `_quantize_pack_int4_bf16_rows_transposed`: row pairs [first, first + _ROW_PAIRS)
    by columns [c0, c0 + _COLUMNS), cut at the matrix's edges. `words` is out's words (see
    `_bytes_and_words`): where it has rows and the tile's width is a multiple of 8, the packed tile
    is stored by 8 x 8 byte blocks (byte by byte, a Scout expert's gate projection took 2.1x as long)."""
    cols, pairs = out.shape
    n, m = min(_ROW_PAIRS, pairs - first), min(_COLUMNS, cols - c0)
    wide = np.empty(2 * _COLUMNS, np.uint32)  # the pair's bf16 values as float32 bits
    x = wide.view(np.float32)
    q = np.empty(2 * _COLUMNS, np.float32)
    packed = np.empty((_ROW_PAIRS, _COLUMNS), np.uint8)
    for p in range(n):
        k = first + p
        g = 2 * k // group_rows
        at = 2 * k * stride + c0
        even, odd, s = flat[at:at + m], flat[at + stride:at + stride + m], scale[g, c0:c0 + m]
        for o in range(m):
            wide[o] = np.uint32(even[o]) << np.uint32(16)
            wide[_COLUMNS + o] = np.uint32(odd[o]) << np.uint32(16)
        for o in range(m):
            q[o] = (min(max(x[o] / s[o], np.float32(-8)), np.float32(7)) + _ROUNDER) - _ROUNDER
            q[_COLUMNS + o] = (min(max(x[_COLUMNS + o] / s[o], np.float32(-8)), np.float32(7)) + _ROUNDER) - _ROUNDER
        if low.shape[0] > 0:
            at_least = low[g, c0:c0 + m]
            for o in range(m):
                q[o] = max(q[o], at_least[o])
                q[_COLUMNS + o] = max(q[_COLUMNS + o], at_least[o])
        row = packed[p]
        for o in range(m):
            row[o] = np.uint8(np.int32(q[o]) + 8) | (np.uint8(np.int32(q[_COLUMNS + o]) + 8) << np.uint8(4))
    if words.shape[0] > 0 and m % 8 == 0:
        flat_packed = packed.reshape(-1)
        for pb in range(n // 8):
            store_transposed(flat_packed[8 * pb * _COLUMNS:], _COLUMNS // 8, m, words, c0, first // 8 + pb)
    else:
        for o in range(m):
            dst = out[c0 + o]
            for p in range(n):
                dst[first + p] = packed[p, o]


@njit(parallel=True, nogil=True, cache=True)
def _quantize_pack_int4_bf16_rows_transposed(flat, stride, group_rows, scale, low, out, words):
    """`_quantize_bf16_rows_transposed` into [-8, 7] then packed two values a byte, in one pass: each thread
    takes a tile of _ROW_PAIRS row pairs (2k, 2k + 1 share a group: group_rows is even) by _COLUMNS
    columns, packs it into a small buffer and writes the buffer transposed (with whole rows in the
    tile, a Scout gate_up_proj expert's buffer was 1 MB and took 2.9x as long). Clamping before
    rounding gives what rounding then clamping gives, and lets the rounding be an add and a subtract
    that vectorize. Row r of w is flat[r * stride:][:cols]."""
    cols, pairs = out.shape
    tiles = (cols + _COLUMNS - 1) // _COLUMNS
    for job in prange(((pairs + _ROW_PAIRS - 1) // _ROW_PAIRS) * tiles):
        _quantize_pack_int4_tile(flat, stride, group_rows, scale, low, out, words, (job // tiles) * _ROW_PAIRS,
                                 (job % tiles) * _COLUMNS)


@njit(parallel=True, nogil=True, cache=True)
def _rtn_int4_bf16_rows_transposed(flat, stride, half_range32, half_range, limit, scale_bits, scale, low, out, words,
                                   bad):
    """int4 RTN of the transposed bf16 matrix in one pass over its stored rows, groups of
    2 * _ROW_PAIRS rows: each tile of `_quantize_pack_int4_bf16_rows_transposed` is one group's rows
    by _COLUMNS columns, so the tile first takes its columns' group maxima (the bits with the sign
    cleared), makes their bf16 scales (`_bf16_scale_bits`, into scale_bits and, as float32, scale)
    and lower clamps (-7 where -8 * scale overflows bf16, whose largest value is `limit`; else -8,
    which the clamp to [-8, 7] gives anyway), and then quantizes the rows while they are still in
    cache. bad[job] is set where a maximum is NaN/Inf or a scale overflows (the rest is then void)."""
    cols, pairs = out.shape
    tiles = (cols + _COLUMNS - 1) // _COLUMNS
    for job in prange(((pairs + _ROW_PAIRS - 1) // _ROW_PAIRS) * tiles):
        first, c0 = (job // tiles) * _ROW_PAIRS, (job % tiles) * _COLUMNS
        g, m = first // _ROW_PAIRS, min(_COLUMNS, cols - c0)
        largest = np.zeros(_COLUMNS, np.uint16)
        for r in range(2 * first, 2 * first + 2 * _ROW_PAIRS):
            row = flat[r * stride + c0:r * stride + c0 + m]
            for o in range(m):
                v = row[o] & np.uint16(0x7FFF)
                largest[o] = v if v > largest[o] else largest[o]
        scratch = np.empty(2, np.uint32)
        as_float = scratch.view(np.float32)
        clamped = False
        for o in range(m):
            if largest[o] >= np.uint16(0x7F80):
                bad[job] = True
                break
            scratch[0] = np.uint32(largest[o]) << np.uint32(16)
            sb = _bf16_scale_bits(as_float[0], half_range32, half_range, scratch)
            if sb >= np.uint32(0x7F80):
                bad[job] = True
                break
            scale_bits[g, c0 + o] = np.uint16(sb)
            scratch[0] = sb << np.uint32(16)
            scale[g, c0 + o] = as_float[0]
            overflows = np.float64(as_float[0]) * 8.0 > limit
            low[g, c0 + o] = np.float32(-7) if overflows else np.float32(-8)
            clamped = clamped or overflows
        if not bad[job]:  # the lower clamps only where one is -7: the tile's loop skips them otherwise
            _quantize_pack_int4_tile(flat, stride, 2 * _ROW_PAIRS, scale, low if clamped else low[:0], out, words,
                                     first, c0)


def quantize_pack_int4_transposed(w: torch.Tensor, group_rows: int, scale: torch.Tensor,
                                  low: torch.Tensor | None) -> torch.Tensor:
    """`pack_int4_transposed(quantize_transposed(w, group_rows, scale, low, -8, 7).T)` in one pass, for
    bf16 [rows, cols] `w` (rows contiguous, group_rows even): uint8 [cols, rows / 2]."""
    parallel.use_kernel_threads()
    out = torch.empty((w.shape[1], w.shape[0] // 2), dtype=torch.uint8)
    no_low = np.empty((0, 0), np.float32)
    _quantize_pack_int4_bf16_rows_transposed(*row_bits(w), group_rows, scale.numpy(),
                                             no_low if low is None else low.numpy(), *_bytes_and_words(out))
    return out


RTN_INT4_GROUP = 2 * _ROW_PAIRS  # the group (of stored rows) `rtn_int4_transposed` takes: one tile's rows


def rtn_int4_transposed(w: torch.Tensor, half_range: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quantize_pack_int4_transposed` of bf16 [rows, cols] `w` (rows contiguous) in groups of
    RTN_INT4_GROUP rows with its own RTN scales, in one pass: (uint8 [cols, rows / 2], the bf16
    scales [rows / group, cols]) as `schemes.int4_scales` and `int_lower_clamp` give them; None
    where a group holds NaN/Inf or a scale overflows (the general path then says which)."""
    parallel.use_kernel_threads()
    flat, stride = row_bits(w)
    groups, cols = w.shape[0] // RTN_INT4_GROUP, w.shape[1]
    out = torch.empty((cols, w.shape[0] // 2), dtype=torch.uint8)
    scale_bits = torch.empty((groups, cols), dtype=torch.int16)
    scale, low = np.empty((groups, cols), np.float32), np.empty((groups, cols), np.float32)
    bad = np.zeros(groups * -(-cols // _COLUMNS), dtype=np.bool_)
    _rtn_int4_bf16_rows_transposed(flat, stride, np.float32(half_range), float(half_range),
                                   float(torch.finfo(torch.bfloat16).max), scale_bits.numpy().view(np.uint16),
                                   scale, low, *_bytes_and_words(out), bad)
    return None if bad.any() else (out, scale_bits.view(torch.bfloat16))


_ROWS_TOGETHER = 64  # rows of a contiguous matrix a thread quantizes with one set of buffers


@njit(parallel=True, nogil=True, cache=True)
def _quantize_pack_int4_bf16_rows(bits, group, scale, low, out):
    """int4 of bf16 [rows, cols] (rows contiguous) in groups of `group` consecutive columns with
    float32 scales [rows, cols / group], packed along the row: out[r, k] holds columns 2k (low
    nibble) and 2k + 1, each offset by 8. The arithmetic of `_quantize_pack_int4_bf16_rows_transposed`."""
    rows, cols = bits.shape
    for block in prange((rows + _ROWS_TOGETHER - 1) // _ROWS_TOGETHER):
        wide = np.empty(cols, np.uint32)
        x = wide.view(np.float32)
        q = np.empty(cols, np.float32)
        for r in range(block * _ROWS_TOGETHER, min(rows, (block + 1) * _ROWS_TOGETHER)):
            row = bits[r]
            for i in range(cols):
                wide[i] = np.uint32(row[i]) << np.uint32(16)
            for g in range(cols // group):
                s, xg, qg = scale[r, g], x[g * group:(g + 1) * group], q[g * group:(g + 1) * group]
                for i in range(group):
                    qg[i] = (min(max(xg[i] / s, np.float32(-8)), np.float32(7)) + _ROUNDER) - _ROUNDER
                if low.shape[0] > 0:
                    for i in range(group):
                        qg[i] = max(qg[i], low[r, g])
            packed = out[r]
            for k in range(cols // 2):
                packed[k] = np.uint8(np.int32(q[2 * k]) + 8) | (np.uint8(np.int32(q[2 * k + 1]) + 8) << np.uint8(4))


def quantize_pack_int4_rows(w: torch.Tensor, group: int, scale: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    """`pack_int4_transposed`'s bytes for a Linear's own [out, in] bf16 weight (rows contiguous, `group`
    even): uint8 [out, in / 2], scales float32 [out, in / group]."""
    parallel.use_kernel_threads()
    out = torch.empty((w.shape[0], w.shape[1] // 2), dtype=torch.uint8)
    no_low = np.empty((0, 0), np.float32)
    _quantize_pack_int4_bf16_rows(_bits(w), group, scale.numpy(), no_low if low is None else low.numpy(), out.numpy())
    return out


@njit(parallel=True, nogil=True, cache=True)
def _quantize_bf16_rows(bits, group, scale, low, qmin, qmax, out):
    """out[r, c] = clamp(round_half_even(float32(w[r, c]) / scale[r, c // group]), qmin, qmax), then
    at least low[r, c // group] where `low` has rows: a Linear's own bf16 [rows, cols] weight (rows
    contiguous), the arithmetic of `_quantize_bf16_rows_transposed`."""
    rows, cols = bits.shape
    for block in prange((rows + _ROWS_TOGETHER - 1) // _ROWS_TOGETHER):
        wide = np.empty(cols, np.uint32)
        x = wide.view(np.float32)
        for r in range(block * _ROWS_TOGETHER, min(rows, (block + 1) * _ROWS_TOGETHER)):
            row, q = bits[r], out[r]
            for i in range(cols):
                wide[i] = np.uint32(row[i]) << np.uint32(16)
            for g in range(cols // group):
                # the group's values indexed from 0: with indices from g * group, the loops did not
                # vectorize (4.6x as long)
                s, xg, qg = scale[r, g], x[g * group:(g + 1) * group], q[g * group:(g + 1) * group]
                if low.shape[0] > 0:
                    at_least = low[r, g]
                    for i in range(group):
                        qg[i] = np.int8(max(min(max(np.rint(xg[i] / s), qmin), qmax), at_least))
                else:
                    for i in range(group):
                        qg[i] = np.int8(min(max(np.rint(xg[i] / s), qmin), qmax))


def quantize_rows(w: torch.Tensor, group: int, scale: torch.Tensor, low: torch.Tensor | None, qmin: int,
                  qmax: int) -> torch.Tensor:
    """int8 [rows, cols] of a Linear's own bf16 weight (rows contiguous) in groups of `group` columns
    with float32 scales [rows, cols / group], as `schemes._quantize_int` computes them."""
    parallel.use_kernel_threads()
    out = torch.empty(w.shape, dtype=torch.int8)
    no_low = np.empty((0, 0), np.float32)
    _quantize_bf16_rows(_bits(w), group, scale.numpy(), no_low if low is None else low.numpy(), np.float32(qmin),
                        np.float32(qmax), out.numpy())
    return out


@njit(nogil=True, cache=True, inline="always")
def _e4m3_bits(wide, n, q):
    """q[:n] = the e4m3fn bits of the float32 values (clamped to +-448) whose bits are wide[:n], rounded
    to nearest even as torch's conversion rounds (c10's fp8e4m3fn_from_fp32_value). Both roundings
    are computed for every value and one is kept: a branch between them ran 1.1x as long."""
    x = wide.view(np.float32)
    for o in range(n):
        u = wide[o]
        m = u & np.uint32(0x7FFFFFFF)
        a = abs(x[o])
        # below 2**-6: a subnormal e4m3, a multiple of 2**-9
        subnormal = np.uint32(np.int32(np.rint(min(a, np.float32(0.015625)) * np.float32(512.0))))
        # else drop 20 mantissa bits, ties to even, and rebias the exponent from 127 to 7
        normal = ((m + np.uint32(0x7FFFF) + ((m >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)) - np.uint32(960)
        q[o] = np.uint8(((u >> np.uint32(24)) & np.uint32(0x80)) | (subnormal if a < np.float32(0.015625) else normal))


@njit(parallel=True, nogil=True, cache=True)
def _fp8_bf16_rows_transposed(flat, stride, scale, out):
    """Stored byte [o, r] = e4m3fn bits of clamp(float32(w[r, o]) / scale[o], -448, 448) (see
    `_e4m3_bits`); tiles as in `_quantize_bf16_rows_transposed`."""
    rows, cols = 8 * out.shape[1], out.shape[0]
    for strip in prange((cols + _STRIP - 1) // _STRIP):
        c0 = strip * _STRIP
        width = min(_STRIP, cols - c0)
        wide = np.empty(_STRIP, np.uint32)
        x = wide.view(np.float32)
        tile = np.empty(8 * _STRIP, np.uint8)
        s = scale[c0:c0 + width]
        for rb in range(rows // 8):
            for k in range(8):
                r = 8 * rb + k
                row, q = flat[r * stride + c0:r * stride + c0 + width], tile[k * _STRIP:]
                for o in range(width):
                    wide[o] = np.uint32(row[o]) << np.uint32(16)
                for o in range(width):
                    x[o] = min(max(x[o] / s[o], np.float32(-448.0)), np.float32(448.0))
                _e4m3_bits(wide, width, q)
            store_transposed(tile, _STRIP // 8, width, out, c0, rb)


def quantize_fp8_transposed(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [cols, rows], contiguous: the transposed values of bf16 [rows, cols] `w` (see
    supports_transposed) divided by float32 per-column `scale` [cols], clamped to +-448, as
    `schemes.fp8_quantize` computes them."""
    parallel.use_kernel_threads()
    out = torch.empty((w.shape[1], w.shape[0]), dtype=torch.uint8)
    _fp8_bf16_rows_transposed(*row_bits(w), scale.contiguous().numpy(), out.numpy().view(np.uint64))
    return out.view(torch.float8_e4m3fn)


@njit(parallel=True, nogil=True, cache=True)
def _fp8_bf16_rows(bits, scale, out):
    """out[r, c] = e4m3fn bits of clamp(float32(w[r, c]) / scale[r], -448, 448) (see `_e4m3_bits`):
    a Linear's own bf16 [rows, cols] weight, rows contiguous."""
    rows, cols = bits.shape
    for block in prange((rows + _ROWS_TOGETHER - 1) // _ROWS_TOGETHER):
        wide = np.empty(cols, np.uint32)
        x = wide.view(np.float32)
        for r in range(block * _ROWS_TOGETHER, min(rows, (block + 1) * _ROWS_TOGETHER)):
            row, s = bits[r], scale[r]
            for i in range(cols):
                wide[i] = np.uint32(row[i]) << np.uint32(16)
            for i in range(cols):
                x[i] = min(max(x[i] / s, np.float32(-448.0)), np.float32(448.0))
            _e4m3_bits(wide, cols, out[r])


def quantize_fp8_rows(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [rows, cols] of a Linear's own bf16 weight (rows contiguous) divided by float32
    per-row `scale` [rows], clamped to +-448, as `schemes.fp8_quantize` computes it."""
    parallel.use_kernel_threads()
    out = torch.empty(w.shape, dtype=torch.uint8)
    _fp8_bf16_rows(_bits(w), scale.contiguous().numpy(), out.numpy())
    return out.view(torch.float8_e4m3fn)
