"""Compiled GGML block encoders (numba): the same bytes as `gguf_quants`' torch encoders, written as
the loops of ggml-quants.c and run over the rows of a matrix on every kernel thread.

Why a second implementation on the CPU: the torch encoders search the K-quant scales in many passes
over memory, one small op at a time. Compiled loops release the GIL (so
the walk's reader keeps reading) and spread rows over `numba`'s threads. The K-quant scale searches
run on all sub-blocks of a row at once, one SIMD lane per sub-block: each lane does the C code's
scalar operations in the C order, so the bytes are ggml's while a core does several sub-blocks per
instruction (2-3x ggml's scalar C per core, `benchmarks/kernel_speed.py`). The torch encoders stay as
the independent implementation the tests compare these with, value for value.

Exactness rules, as in the torch module: every value is float32 and every float32 operation is the
C code's, in its order (a float32 times a Python int or float would widen to float64 in numba, so
every constant is an `f32`); `nearest_int` is C's bit trick, taken on the fast path as
(v + 1.5 * 2**23) - 1.5 * 2**23 where that is the same integer (|v| < 2**22), else bit for bit.

Input rows are bf16 bits (uint16) or float32 bits (uint32), widened in the kernel; a row holding
NaN or Inf is flagged (`bad`) and not encoded, a block whose f16 scale overflows is flagged with the
scale (`overflow`): the caller raises for either.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..byte_transpose import store_transposed

f32 = np.float32
QK_K = 256
_MAGIC = f32(12582912.0)  # 1.5 * 2**23
_FAST_LIMIT = f32(4194304.0)  # 2**22
_EPS = f32(1e-15)  # GROUP_MAX_EPS
_TWO_POW_24 = f32(2.0**24)
_TWO_POW_M24 = f32(2.0**-24)
_F16_EXP_SCALE = np.array([2.0 ** (e - 25) for e in range(32)], dtype=np.float32)  # (1024 + m) * this
_KERNEL = {"nogil": True, "cache": True, "error_model": "numpy"}  # numpy: x / 0 is inf or NaN, as in C


# ---------------------------------------------------------------------------------------------
# Scalar helpers. `bits` is a 1-element uint32 scratch array and `bits_f` its float32 view: a store
# and a load through them is C's memcpy between float and int.


@njit(**_KERNEL)
def _nearest_int(v, bits, bits_f):
    if abs(v) < _FAST_LIMIT:  # the float round trip is the same round-half-even integer
        return np.int32((v + _MAGIC) - _MAGIC)
    bits_f[0] = v + _MAGIC  # also NaN and Inf, which give 0 and -4194304 as in C
    return np.int32(bits[0] & np.uint32(0x007FFFFF)) - np.int32(0x00400000)


@njit(**_KERNEL)
def _in_fast_range(iscale, span):
    """Whether every |iscale * v| with |v| <= span is below 2**21, so `_nearest_int` is the float
    round trip; checked once per search step, the loops then skip the per-value test."""
    return abs(iscale) * span < _FAST_LIMIT * f32(0.5)


@njit(**_KERNEL)
def _rint(v):
    """nearest_int for |v| < 2**22: round half to even by the float round trip."""
    return np.int32((v + _MAGIC) - _MAGIC)


@njit(**_KERNEL)
def _f16_bits(v, bits, bits_f):
    """float32 -> IEEE half bits, round to nearest even; an overflow gives the infinity bits."""
    bits_f[0] = v
    x = bits[0]
    sign = np.uint32((x >> np.uint32(16)) & np.uint32(0x8000))
    ax = x & np.uint32(0x7FFFFFFF)
    if ax >= np.uint32(0x477FF000):  # 65520 and up round to infinity (inputs are finite)
        return np.uint16(sign | np.uint32(0x7C00))
    if ax < np.uint32(0x38800000):  # below 2**-14: a subnormal half, exact scaling then rounding
        t = (abs(v) * _TWO_POW_24 + _MAGIC) - _MAGIC
        return np.uint16(sign | np.uint32(t))
    odd = (ax >> np.uint32(13)) & np.uint32(1)
    h = (ax - np.uint32(0x38000000) + np.uint32(0x0FFF) + odd) >> np.uint32(13)
    return np.uint16(sign | h)


@njit(**_KERNEL)
def _f16_value(h):
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = f32(m) * _TWO_POW_M24
    else:
        v = f32(1024 + m) * _F16_EXP_SCALE[e]
    return -v if h & 0x8000 else v


@njit(**_KERNEL)
def _bit_cell():
    """A one-value scratch, uint32 and its float32 view: a store and a load through them is C's
    memcpy between float and int."""
    bits = np.empty(1, np.uint32)
    return bits, bits.view(np.float32)


@njit(**_KERNEL)
def _finite(row_bits):
    """False when the float32 bits hold a NaN or Inf (all exponent bits set)."""
    for u in row_bits:
        if u & np.uint32(0x7F800000) == np.uint32(0x7F800000):
            return False
    return True


@njit(**_KERNEL)
def _round_half_away(v):
    """C roundf."""
    a = abs(v)
    f = np.floor(a)
    if a - f >= f32(0.5):
        f += f32(1)
    return -f if v < 0 else f


_TILE_ROWS = 32  # rows a thread loads together: one 64-byte line of a transposed bf16 view each


@njit(**_KERNEL)
def _load_tile(src, t, shift):
    """Rows [32 t, 32 t + 32) of src (bf16 bits, shift 16; float32 bits, shift 0) widened to float32
    bits [rows, cols]. A transposed view (an expert's [out, in] view of its stored [in, out] slice)
    is read in runs of columns, so each cache line read holds the tile's values of one column."""
    r0 = t * _TILE_ROWS
    r1 = min(src.shape[0], r0 + _TILE_ROWS)
    cols = src.shape[1]
    tile = np.empty((r1 - r0, cols), np.uint32)
    if src.strides[1] == src.itemsize:
        for r in range(r0, r1):
            for i in range(cols):
                tile[r - r0, i] = np.uint32(src[r, i]) << np.uint32(shift)
    else:  # 16 columns at a time (cols is whole blocks of 32 or more): 16 cache lines read, then
        # 64 bytes written per row, 3x as fast as a column at a time
        for i0 in range(0, cols, 16):
            for r in range(r0, r1):
                for i in range(i0, i0 + 16):
                    tile[r - r0, i] = np.uint32(src[r, i]) << np.uint32(shift)
    return r0, r1, tile


@njit(parallel=True, **_KERNEL)
def encode_q8_0(src, shift, out, bad, overflow):
    cols = src.shape[1]
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bits, bits_f = _bit_cell()
            x = tile[r - r0].view(np.float32)
            if not _finite(tile[r - r0]):
                bad[r] = True
                continue
            for b in range(cols // 32):
                amax = f32(0)
                for i in range(32):
                    amax = max(amax, abs(x[32 * b + i]))
                d = amax / f32(127)
                inv = f32(1) / d if d != 0 else f32(0)
                h = _f16_bits(d, bits, bits_f)
                if h & 0x7FFF == 0x7C00:
                    overflow[r] = max(overflow[r], d)
                o = 34 * b
                out[r, o] = h & 0xFF
                out[r, o + 1] = h >> 8
                for i in range(32):
                    out[r, o + 2 + i] = np.uint8(np.int8(_round_half_away(x[32 * b + i] * inv)))


_Q8_0_STRIP = 64  # output columns a thread encodes together: 32 stored rows of them are 4 KB, in L1
_Q8_0_QUAD = 4  # blocks a tile holds: 4 x 34 bytes of an output row are 17 whole words


@njit(parallel=True, **_KERNEL)
def encode_q8_0_stored_transposed(flat, stride, out, words, bad, overflow):
    """`encode_q8_0` of the transposed view of a bf16 [in, out] matrix whose rows are contiguous (a
    routed expert's slice as stored), in = 128 k: row i of it is flat[i * stride:][:out.shape[0]], and
    block b of output row o is its rows [32 b, 32 b + 32) at column o. Each thread takes strips of
    _Q8_0_STRIP output columns and, four blocks at a time, builds the strip's 136 bytes of every
    output row as the rows of a tile (scale low and high byte, then 32 values, per block), which it
    stores transposed by 8 x 8 byte blocks into `words`, out's uint64 view (a strip whose width is no
    multiple of 8 stores byte by byte). The block maximum is the largest magnitude bits, which also
    finds NaN and Inf (at or above the exponent mask). Each output row is one thread's, so `bad` and
    `overflow` (the largest overflowing f16 scale) are kept per output row. On one core a Scout gate
    view took 39-41 ms, against 48-57 for bands of 512 columns written byte by byte (down: the same)."""
    n_out = out.shape[0]
    for strip in prange((n_out + _Q8_0_STRIP - 1) // _Q8_0_STRIP):
        c0 = strip * _Q8_0_STRIP
        w = min(_Q8_0_STRIP, n_out - c0)
        magnitude = np.empty(_Q8_0_STRIP, np.uint16)
        wide = np.empty(_Q8_0_STRIP, np.uint32)  # float32 bits, and their float32 view x
        x = wide.view(np.float32)
        inv = np.empty(_Q8_0_STRIP, np.float32)
        tile = np.empty(34 * _Q8_0_QUAD * _Q8_0_STRIP, np.uint8)
        bits, bits_f = _bit_cell()
        for quad in range(out.shape[1] // (34 * _Q8_0_QUAD)):
            for j in range(_Q8_0_QUAD):
                first = 32 * (_Q8_0_QUAD * quad + j)
                magnitude[:w] = 0
                for i in range(32):
                    row = flat[(first + i) * stride + c0:(first + i) * stride + c0 + w]
                    for o in range(w):
                        magnitude[o] = max(magnitude[o], np.uint16(row[o] & np.uint16(0x7FFF)))
                low, high = tile[34 * j * _Q8_0_STRIP:], tile[(34 * j + 1) * _Q8_0_STRIP:]
                for o in range(w):
                    if magnitude[o] >= np.uint16(0x7F80):
                        bad[c0 + o] = True
                    wide[o] = np.uint32(magnitude[o]) << np.uint32(16)
                    d = x[o] / f32(127)
                    inv[o] = f32(1) / d if d != 0 else f32(0)
                    h = _f16_bits(d, bits, bits_f)
                    if h & 0x7FFF == 0x7C00:
                        overflow[c0 + o] = max(overflow[c0 + o], d)
                    low[o] = h & 0xFF
                    high[o] = h >> 8
                for i in range(32):
                    row = flat[(first + i) * stride + c0:(first + i) * stride + c0 + w]
                    q = tile[(34 * j + 2 + i) * _Q8_0_STRIP:]
                    for o in range(w):
                        wide[o] = np.uint32(row[o]) << np.uint32(16)
                    for o in range(w):
                        q[o] = np.uint8(np.int8(_round_half_away(x[o] * inv[o])))
            at = 34 * _Q8_0_QUAD * quad  # the tile's first byte in each output row, a word's start
            if w % 8 == 0:
                for g in range(34 * _Q8_0_QUAD // 8):
                    store_transposed(tile[8 * g * _Q8_0_STRIP:], _Q8_0_STRIP // 8, w, words, c0, at // 8 + g)
            else:
                for o in range(w):
                    dst = out[c0 + o]
                    for r in range(34 * _Q8_0_QUAD):
                        dst[at + r] = tile[r * _Q8_0_STRIP + o]


@njit(**_KERNEL)
def _q4_0_row(row_bits, out_row, bits, bits_f, magnitude, inv):
    """One row of ggml's quantize_row_q4_0_ref; returns (has NaN or Inf, overflowing f16 scale or 0).
    A block's scale is its first value of largest magnitude over -8. ggml's one loop keeping the
    running maximum and its value does not vectorize; here the largest magnitude bits of each block
    are a SIMD reduction (two halves, then across; NaN and Inf meet the exponent mask), a short scan
    finds the first value with them, and the nibbles are a SIMD pass of their own."""
    x = row_bits.view(np.float32)
    blocks = x.shape[0] // 32
    pair = np.empty(16, np.uint32)
    for b in range(blocks):
        a = 32 * b
        for i in range(16):
            pair[i] = max(row_bits[a + i] & np.uint32(0x7FFFFFFF), row_bits[a + 16 + i] & np.uint32(0x7FFFFFFF))
        m = np.uint32(0)
        for i in range(16):
            m = max(m, pair[i])
        magnitude[b] = m
    too_big = f32(0)
    finite_inv = True
    for b in range(blocks):
        m = magnitude[b]
        if m >= np.uint32(0x7F800000):
            return True, too_big
        mx = f32(0)  # all zeros: ggml's initial max, +0, whatever the zeros' signs
        if m != 0:
            k = 32 * b
            while row_bits[k] & np.uint32(0x7FFFFFFF) != m:
                k += 1
            mx = x[k]
        d = mx / f32(-8)
        inv[b] = f32(1) / d if d != 0 else f32(0)
        finite_inv &= abs(inv[b]) < np.inf
        h = _f16_bits(d, bits, bits_f)
        if h & 0x7FFF == 0x7C00:
            too_big = max(too_big, abs(d))
        out_row[18 * b] = h & 0xFF
        out_row[18 * b + 1] = h >> 8
    if finite_inv:  # x inv + 8.5 is in [0.5, 16.5], where C's truncation is the floor (faster)
        for b in range(blocks):
            a, o, ib = 32 * b, 18 * b + 2, inv[b]
            for i in range(16):
                lo = np.uint8(min(f32(15), np.floor(x[a + i] * ib + f32(8.5))))
                hi = np.uint8(min(f32(15), np.floor(x[a + 16 + i] * ib + f32(8.5))))
                out_row[o + i] = lo | (hi << np.uint8(4))
    else:  # 1 / d overflowed (d subnormal): NaN and Inf convert as C's (int8_t) does on x86
        for b in range(blocks):
            a, o, ib = 32 * b, 18 * b + 2, inv[b]
            for i in range(16):
                lo = min(15, np.int32(x[a + i] * ib + f32(8.5)))
                hi = min(15, np.int32(x[a + 16 + i] * ib + f32(8.5)))
                out_row[o + i] = np.uint8(lo | (hi << 4))
    return False, too_big


@njit(parallel=True, **_KERNEL)
def encode_q4_0(src, shift, out, bad, overflow):
    cols = src.shape[1]
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        bits, bits_f = _bit_cell()
        magnitude, inv = np.empty(cols // 32, np.uint32), np.empty(cols // 32, np.float32)
        for r in range(r0, r1):
            bad[r], overflow[r] = _q4_0_row(tile[r - r0], out[r], bits, bits_f, magnitude, inv)


# ---------------------------------------------------------------------------------------------
# Q4_K and Q5_K


@njit(**_KERNEL)
def _search_q4_k(xt, wt, nmax, rmin, rdelta, nstep, Lt, Laux, st, scales, mins, bits, bits_f, mad=False):
    """ggml make_qkx2_quants / make_qkx3_quants (the same with MSE) on many sub-blocks at once:
    column j of xt (32 x n) is sub-block j, wt its weights, Lt gets its levels and scales[j],
    mins[j] its (scale, the_min). Each column follows the C code's operations in its order; the
    columns are independent, so the loops over them compile to SIMD lanes (a row's sub-blocks make
    enough columns for the vectorizer, one super-block's eight do not). `st` [17, n] holds the
    per-column state, one row per C variable (see `_q4_k_first_guess`). `mad`: the error is
    sum w |diff| (make_qkx2's use_mad, Q2_K) instead of sum w diff^2."""
    _q4_k_first_guess(xt, wt, nmax, Lt, st, mad)
    for step in range(nstep + 1):
        _q4_k_levels(xt, wt, nmax, rmin + rdelta * f32(step) + f32(nmax), Laux, st, bits, bits_f)
        _q4_k_keep_better(xt, wt, Lt, Laux, st, mad)
    mn, scale, live = st[0], st[7], st[16]
    for j in range(xt.shape[1]):
        scales[j] = scale[j] if live[j] != 0 else f32(0)
        mins[j] = -mn[j]


@njit(**_KERNEL)
def _q4_k_first_guess(xt, wt, nmax, Lt, st, mad):
    """The C code up to its search loop: min and max, the weight sums, levels and error at
    iscale = nmax / (max - min)."""
    n, lanes = xt.shape
    mn, mx, xmin, sum_w, sum_x, rng, iscale, scale, best = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8]
    live = st[16]
    for j in range(lanes):
        mn[j] = xt[0, j]
        mx[j] = xt[0, j]
        sum_w[j] = wt[0, j]
        sum_x[j] = wt[0, j] * xt[0, j]
    for i in range(1, n):
        for j in range(lanes):
            v = xt[i, j]
            mn[j] = v if v < mn[j] else mn[j]
            mx[j] = v if v > mx[j] else mx[j]
            sum_w[j] += wt[i, j]
            sum_x[j] += wt[i, j] * v
    for j in range(lanes):
        xmin[j] = mn[j]
        mn[j] = f32(0) if mn[j] > 0 else mn[j]
        # A constant sub-block (max == min) keeps levels 0 and scale 0; its lane computes with a
        # range of 1 and never improves (all its levels are 0, so D == 0).
        live[j] = f32(1) if mx[j] != mn[j] else f32(0)
        rng[j] = mx[j] - mn[j] if mx[j] != mn[j] else f32(1)
        iscale[j] = f32(nmax) / rng[j]
        scale[j] = f32(1) / iscale[j]
        best[j] = f32(0)
    for i in range(n):  # |iscale * (x - min)| <= nmax here: the fast nearest_int holds
        for j in range(lanes):
            l = min(nmax, max(0, _rint(iscale[j] * (xt[i, j] - mn[j]))))
            Lt[i, j] = l
            diff = scale[j] * f32(l) + mn[j] - xt[i, j]
            best[j] += wt[i, j] * (abs(diff) if mad else diff * diff)


@njit(**_KERNEL)
def _q4_k_levels(xt, wt, nmax, numerator, Laux, st, bits, bits_f):
    """One search step: iscale = numerator / (max - min), its levels into Laux and their sums."""
    n, lanes = xt.shape
    mn, xmin, rng, iscale, sum_l, sum_l2, sum_xl = st[0], st[2], st[5], st[6], st[9], st[10], st[11]
    fast = True
    for j in range(lanes):
        iscale[j] = numerator / rng[j]
        fast &= _in_fast_range(iscale[j], max(abs(rng[j]), abs(xmin[j] - mn[j])))
        sum_l[j] = f32(0)
        sum_l2[j] = f32(0)
        sum_xl[j] = f32(0)
    if fast:
        for i in range(n):
            for j in range(lanes):
                Laux[i, j] = min(nmax, max(0, _rint(iscale[j] * (xt[i, j] - mn[j]))))
    else:
        for i in range(n):
            for j in range(lanes):
                Laux[i, j] = min(nmax, max(0, _nearest_int(iscale[j] * (xt[i, j] - mn[j]), bits, bits_f)))
    for i in range(n):
        for j in range(lanes):
            wl = wt[i, j] * f32(Laux[i, j])
            sum_l[j] += wl
            sum_l2[j] += wl * f32(Laux[i, j])
            sum_xl[j] += wl * xt[i, j]


@njit(**_KERNEL)
def _q4_k_keep_better(xt, wt, Lt, Laux, st, mad):
    """The step's least-squares scale and min, their error, and the columns where it is lower."""
    n, lanes = xt.shape
    mn, mx, sum_w, sum_x, rng, scale, best = st[0], st[1], st[3], st[4], st[5], st[7], st[8]
    sum_l, sum_l2, sum_xl, t_scale, t_min, err, better = st[9], st[10], st[11], st[12], st[13], st[14], st[15]
    for j in range(lanes):
        D = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
        a = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / D
        b = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / D
        t_scale[j] = sum_xl[j] / sum_l2[j] if b > 0 else a
        t_min[j] = f32(0) if b > 0 else b
        err[j] = f32(0)
    for i in range(n):
        for j in range(lanes):
            diff = t_scale[j] * f32(Laux[i, j]) + t_min[j] - xt[i, j]
            err[j] += wt[i, j] * (abs(diff) if mad else diff * diff)
    improved = False
    for j in range(lanes):
        D = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
        ok = D > 0 and err[j] < best[j]
        better[j] = f32(1) if ok else f32(0)
        improved |= ok
        if ok:
            best[j] = err[j]
            scale[j] = t_scale[j]
            mn[j] = t_min[j]
            rng[j] = mx[j] - mn[j]
    if improved:
        for i in range(n):
            for j in range(lanes):
                if better[j] != 0:
                    Lt[i, j] = Laux[i, j]


@njit(**_KERNEL)
def _make_qp(x, qw, Lout, nmax, bits, bits_f):
    """ggml make_qp_quants over the n values of x (>= 0) with weights qw; Lout gets the levels."""
    n = x.shape[0]
    mx = f32(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            Lout[i] = 0
        return f32(0)
    f_nmax = f32(nmax)
    iscale = f_nmax / mx
    scale = f32(1) / iscale
    best_mse = f32(0)
    for i in range(n):
        Lout[i] = _nearest_int(iscale * x[i], bits, bits_f) & 0xFF
        diff = x[i] - scale * f32(Lout[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = (f32(0.1) * f32(step) + f_nmax) / mx
        sc = f32(1) / isc
        mse = f32(0)
        for i in range(n):
            li = min(_nearest_int(isc * x[i], bits, bits_f), nmax)
            diff = x[i] - sc * f32(li)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = isc
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        li = min(_nearest_int(iscale * x[i], bits, bits_f), nmax)
        Lout[i] = li & 0xFF
        sumlx += qw[i] * x[i] * f32(li)
        suml2 += qw[i] * f32(li) * f32(li)
    for _ in range(5):
        changed = False
        for i in range(n):
            w, xi, li = qw[i], x[i], f32(Lout[i])
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(_nearest_int(xi * sl2 / slx, bits, bits_f), nmax)
                if new_l != Lout[i]:
                    slx += w * xi * f32(new_l)
                    sl2 += w * f32(new_l) * f32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        Lout[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed = True
        if not changed:
            break
    return sumlx / suml2 if suml2 > 0 else f32(0)


@njit(**_KERNEL)
def _q4_k_row_search(x, qw, use_qw, xt, wt, Lt, Laux, st, scales, mins, sw, bits, bits_f, nmax, rmin, rdelta, nstep):
    """The scale search of every 32-value sub-block of row x, as ggml's quantize_row_q4_K / q5_K
    (their weights, then make_qkx2 with (nmax, rmin, rdelta, nstep) or, with importance, make_qkx3)
    in one pass over the row's sub-blocks."""
    for j in range(x.shape[0] // 32):
        for i in range(32):
            xt[i, j] = x[32 * j + i]
    if use_qw:
        for b in range(x.shape[0] // QK_K):
            s2 = f32(0)
            for i in range(QK_K):
                s2 += x[QK_K * b + i] * x[QK_K * b + i]
            sigma2 = f32(2) * s2 / f32(QK_K)
            for j in range(8 * b, 8 * b + 8):
                s = f32(0)
                for i in range(32):
                    wt[i, j] = np.sqrt(xt[i, j] * xt[i, j] + sigma2) * qw[32 * j + i]
                    s += wt[i, j]
                sw[j] = s
        _search_q4_k(xt, wt, nmax, f32(-0.9), f32(0.05), 36, Lt, Laux, st, scales, mins, bits, bits_f)
    else:
        for j in range(x.shape[0] // 32):
            s = f32(0)
            for i in range(32):
                s += xt[i, j] * xt[i, j]
            av_x = np.sqrt(s / f32(32))
            for i in range(32):
                wt[i, j] = abs(xt[i, j]) + av_x
        _search_q4_k(xt, wt, nmax, rmin, rdelta, nstep, Lt, Laux, st, scales, mins, bits, bits_f)


@njit(**_KERNEL)
def _q4_k_block(x, a, use_qw, out, o, bits, bits_f, L, scales, mins, sw, ls, lm, nmax):
    """Super-block x[a:a+256] into out[o:], from its sub-blocks' searched scales and mins: the
    header (d, dmin, packed scales) and the levels 0..nmax in L; returns the largest overflowing
    f16 scale or 0. The caller packs the levels (Q4_K's nibbles, Q5_K's nibbles and high bits)."""
    if use_qw:
        d_block = _make_qp(scales, sw, ls, 63, bits, bits_f)
        m_block = _make_qp(mins, sw, lm, 63, bits, bits_f)
    else:
        max_scale = f32(0)
        max_min = f32(0)
        for j in range(8):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
        inv_min = f32(63) / max_min if max_min > 0 else f32(0)
        for j in range(8):
            ls[j] = min(63, _nearest_int(inv_scale * scales[j], bits, bits_f) & 0xFF)
            lm[j] = min(63, _nearest_int(inv_min * mins[j], bits, bits_f) & 0xFF)
        d_block = max_scale / f32(63)
        m_block = max_min / f32(63)
    hd = _f16_bits(d_block, bits, bits_f)
    hm = _f16_bits(m_block, bits, bits_f)
    too_big = f32(0)
    if hd & 0x7FFF == 0x7C00:
        too_big = abs(d_block)
    if hm & 0x7FFF == 0x7C00:
        too_big = max(too_big, abs(m_block))
    out[o] = hd & 0xFF
    out[o + 1] = hd >> 8
    out[o + 2] = hm & 0xFF
    out[o + 3] = hm >> 8
    for j in range(4):  # ggml's 12-byte packing of eight 6-bit scales and mins
        out[o + 4 + j] = np.uint8((ls[j] & 63) | ((ls[j + 4] >> 4) << 6))
        out[o + 8 + j] = np.uint8((lm[j] & 63) | ((lm[j + 4] >> 4) << 6))
        out[o + 12 + j] = np.uint8((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4))
    dv = _f16_value(hd)
    mv = _f16_value(hm)
    for j in range(8):
        d = dv * f32(ls[j])
        if d == 0:
            continue
        dm = mv * f32(lm[j])
        for i in range(32):
            L[a + 32 * j + i] = min(nmax, max(0, _nearest_int((x[a + 32 * j + i] + dm) / d, bits, bits_f)))
    return too_big


@njit(**_KERNEL)
def _qkx_row(row_bits, out_row, qw, use_qw, nmax):
    """One row of Q4_K (nmax 15) or Q5_K (nmax 31): the search, the headers, then the levels packed.
    Returns (row holds NaN/Inf, the largest overflowing f16 scale or 0)."""
    bits, bits_f = _bit_cell()
    if not _finite(row_bits):
        return True, f32(0)
    x = row_bits.view(np.float32)
    cols = x.shape[0]
    subs = cols // 32
    size = 144 if nmax == 15 else 176
    rmin, rdelta, nstep = (f32(-1.0), f32(0.1), 20) if nmax == 15 else (f32(-0.5), f32(0.1), 15)
    xt, wt, st = np.empty((32, subs), np.float32), np.empty((32, subs), np.float32), np.empty((17, subs), np.float32)
    Lt, Laux = np.empty((32, subs), np.int32), np.empty((32, subs), np.int32)
    scales, mins, sw = np.empty(subs, np.float32), np.empty(subs, np.float32), np.empty(subs, np.float32)
    L, ls, lm = np.empty(cols, np.int32), np.empty(8, np.int32), np.empty(8, np.int32)
    _q4_k_row_search(x, qw, use_qw, xt, wt, Lt, Laux, st, scales, mins, sw, bits, bits_f, nmax, rmin, rdelta, nstep)
    for j in range(subs):
        for i in range(32):
            L[32 * j + i] = Lt[i, j]
    too_big = f32(0)
    for b in range(cols // QK_K):
        s = slice(8 * b, 8 * b + 8)
        o, a = size * b, QK_K * b
        big = _q4_k_block(x, a, use_qw, out_row, o, bits, bits_f, L, scales[s], mins[s], sw[s], ls, lm, nmax)
        too_big = max(too_big, big)
        if nmax == 15:
            for c in range(4):
                for i in range(32):
                    out_row[o + 16 + 32 * c + i] = np.uint8(L[a + 64 * c + i] | (L[a + 64 * c + 32 + i] << 4))
        else:  # qh[i]: bit 2c the fifth bit of L[64c + i], bit 2c + 1 that of L[64c + 32 + i]
            for i in range(32):
                h = 0
                for c in range(4):
                    l1, l2 = L[a + 64 * c + i], L[a + 64 * c + 32 + i]
                    h |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1))
                    out_row[o + 48 + 32 * c + i] = np.uint8((l1 & 0xF) | ((l2 & 0xF) << 4))
                out_row[o + 16 + i] = np.uint8(h)
    return False, too_big


# One small parallel kernel per type (the same five lines each) rather than one over every row
# function: numba compiles a kernel with everything it calls, and a user's first --type should not
# wait for every type's encoder to compile.
@njit(parallel=True, **_KERNEL)
def encode_q4_k(src, shift, qw, use_qw, out, bad, overflow):
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bad[r], overflow[r] = _qkx_row(tile[r - r0], out[r], qw, use_qw, 15)


@njit(parallel=True, **_KERNEL)
def encode_q5_k(src, shift, qw, use_qw, out, bad, overflow):
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bad[r], overflow[r] = _qkx_row(tile[r - r0], out[r], qw, use_qw, 31)


# ---------------------------------------------------------------------------------------------
# Q6_K


@njit(**_KERNEL)
def _search_q6_k(xt, wt, nmax, Lt, st, scales, bits, bits_f):
    """ggml make_qx_quants (rmse_type 1: weights x^2, or the importance) on many 16-value sub-blocks
    at once, column j of xt (16 x n) being sub-block j and wt its weights, as `_search_q4_k` does;
    Lt gets the levels + nmax and scales[j] the scale."""
    n, lanes = xt.shape
    amax, mx, best_is, isc, sumlx, suml2, scale, best = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    f_nmax = f32(nmax)
    for j in range(lanes):
        amax[j] = f32(0)
        mx[j] = f32(0)
    for i in range(n):
        for j in range(lanes):
            ax = abs(xt[i, j])
            mx[j] = xt[i, j] if ax > amax[j] else mx[j]
            amax[j] = ax if ax > amax[j] else amax[j]
    for j in range(lanes):
        # An all-zero sub-block (amax < eps) gets levels 0 and scale 0; its lane computes with a
        # max of 1 and is overwritten at the end.
        mx[j] = mx[j] if amax[j] >= _EPS else f32(1)
        best_is[j] = -f_nmax / mx[j]
        sumlx[j] = f32(0)
        suml2[j] = f32(0)
    for i in range(n):  # |best_is * x| <= nmax here: the fast nearest_int holds
        for j in range(lanes):
            v = xt[i, j]
            l = f32(min(nmax - 1, max(-nmax, _rint(best_is[j] * v))))
            sumlx[j] += wt[i, j] * v * l
            suml2[j] += wt[i, j] * l * l
    for j in range(lanes):
        scale[j] = sumlx[j] / suml2[j] if suml2[j] != 0 else f32(0)
        best[j] = scale[j] * sumlx[j]
    for step in range(-9, 10):
        if step == 0:
            continue
        fast = True
        for j in range(lanes):
            isc[j] = -(f_nmax + f32(0.1) * f32(step)) / mx[j]
            fast &= _in_fast_range(isc[j], amax[j])
            sumlx[j] = f32(0)
            suml2[j] = f32(0)
        for i in range(n):
            for j in range(lanes):
                v = xt[i, j]
                q = _rint(isc[j] * v) if fast else _nearest_int(isc[j] * v, bits, bits_f)
                l = f32(min(nmax - 1, max(-nmax, q)))
                sumlx[j] += wt[i, j] * v * l
                suml2[j] += wt[i, j] * l * l
        for j in range(lanes):
            if suml2[j] > 0 and sumlx[j] * sumlx[j] > best[j] * suml2[j]:
                scale[j] = sumlx[j] / suml2[j]
                best[j] = scale[j] * sumlx[j]
                best_is[j] = isc[j]
    for i in range(n):
        for j in range(lanes):
            l = min(nmax - 1, max(-nmax, _nearest_int(best_is[j] * xt[i, j], bits, bits_f))) + nmax
            Lt[i, j] = l if amax[j] >= _EPS else 0
    for j in range(lanes):
        scales[j] = scale[j] if amax[j] >= _EPS else f32(0)


@njit(**_KERNEL)
def _q6_k_block(x, a, out, o, bits, bits_f, L, scales, sc):
    """Super-block x[a:a+256] into out[o:o+210], from its sub-blocks' searched scales; returns the
    overflowing f16 scale or 0."""
    max_scale = f32(0)
    max_abs = f32(0)
    for j in range(16):
        if abs(scales[j]) > max_abs:
            max_abs = abs(scales[j])
            max_scale = scales[j]
    if max_abs < _EPS:
        for i in range(210):
            out[o + i] = 0
        return f32(0)
    iscale = f32(-128) / max_scale
    d_block = f32(1) / iscale
    hd = _f16_bits(d_block, bits, bits_f)
    too_big = abs(d_block) if hd & 0x7FFF == 0x7C00 else f32(0)
    for j in range(16):
        sc[j] = np.int8(min(127, _nearest_int(iscale * scales[j], bits, bits_f)))
    dv = _f16_value(hd)
    for j in range(16):
        d = dv * f32(sc[j])
        if d == 0:
            continue
        for i in range(16):
            L[a + 16 * j + i] = min(31, max(-32, _nearest_int(x[a + 16 * j + i] / d, bits, bits_f))) + 32
    for h in range(2):  # ggml's layout: low nibbles of two 64-value halves, then the high 2 bits
        base = a + 128 * h
        for i in range(32):
            q0, q1 = L[base + i], L[base + 32 + i]
            q2, q3 = L[base + 64 + i], L[base + 96 + i]
            out[o + 64 * h + i] = np.uint8((q0 & 0xF) | ((q2 & 0xF) << 4))
            out[o + 64 * h + 32 + i] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
            out[o + 128 + 32 * h + i] = np.uint8((q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6))
    for j in range(16):
        out[o + 192 + j] = np.uint8(sc[j])
    out[o + 208] = hd & 0xFF
    out[o + 209] = hd >> 8
    return too_big


@njit(parallel=True, **_KERNEL)
def encode_q6_k(src, shift, qw, use_qw, out, bad, overflow):
    cols = src.shape[1]
    subs = cols // 16
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bits, bits_f = _bit_cell()
            x = tile[r - r0].view(np.float32)
            xt, wt, st = np.empty((16, subs), np.float32), np.empty((16, subs), np.float32), np.empty((8, subs), np.float32)
            Lt, L = np.empty((16, subs), np.int32), np.empty(cols, np.int32)
            scales, sc = np.empty(subs, np.float32), np.empty(16, np.int8)
            if not _finite(tile[r - r0]):
                bad[r] = True
                continue
            for j in range(subs):
                for i in range(16):
                    v = x[16 * j + i]
                    xt[i, j] = v
                    wt[i, j] = qw[16 * j + i] if use_qw else v * v
            _search_q6_k(xt, wt, 32, Lt, st, scales, bits, bits_f)
            for j in range(subs):
                for i in range(16):
                    L[16 * j + i] = Lt[i, j]
            for b in range(cols // QK_K):
                big = _q6_k_block(x, QK_K * b, out[r], 210 * b, bits, bits_f, L, scales[16 * b:16 * b + 16], sc)
                overflow[r] = max(overflow[r], big)


# ---------------------------------------------------------------------------------------------
# Q3_K


@njit(**_KERNEL)
def _search_q3(xt, nmax, Lt, st, scales, bits, bits_f):
    """ggml make_q3_quants with do_rmse on many 16-value sub-blocks at once (column j of xt is
    sub-block j): Lt gets the levels + nmax (0 for an all-zero sub-block), scales[j] the scale."""
    n, lanes = xt.shape
    amax, mx, sumlx, suml2, active, iscale = st[0], st[1], st[2], st[3], st[4], st[5]
    for j in range(lanes):
        amax[j] = f32(0)
        mx[j] = f32(0)
        sumlx[j] = f32(0)
        suml2[j] = f32(0)
    # Loops over the lanes innermost, each step a select, so they vectorize; every lane still adds
    # its values in ggml's order.
    for i in range(n):
        for j in range(lanes):
            v = xt[i, j]
            better = abs(v) > amax[j]
            mx[j] = v if better else mx[j]
            amax[j] = abs(v) if better else amax[j]
    for j in range(lanes):
        active[j] = f32(1) if amax[j] >= _EPS else f32(0)
        iscale[j] = -f32(nmax) / mx[j] if active[j] != 0 else f32(0)
    for i in range(n):
        for j in range(lanes):
            v = xt[i, j]
            l = min(nmax - 1, max(-nmax, _rint(iscale[j] * v)))  # |iscale v| <= nmax: no slow path
            Lt[i, j] = l
            w = v * v
            sumlx[j] += w * v * f32(l)
            suml2[j] += w * f32(l) * f32(l)
    for j in range(lanes):
        if active[j] == 0:
            for i in range(n):
                Lt[i, j] = 0
            scales[j] = f32(0)
            continue
        slx_all, sl2_all = sumlx[j], suml2[j]
        for _ in range(5):
            changed = False
            for i in range(n):
                v = xt[i, j]
                w = v * v
                li = f32(Lt[i, j])
                slx = slx_all - w * v * li
                if slx > 0:
                    sl2 = sl2_all - w * li * li
                    new_l = min(nmax - 1, max(-nmax, _nearest_int(v * sl2 / slx, bits, bits_f)))
                    if new_l != Lt[i, j]:
                        slx += w * v * f32(new_l)
                        sl2 += w * f32(new_l) * f32(new_l)
                        if sl2 > 0 and slx * slx * sl2_all > slx_all * slx_all * sl2:
                            Lt[i, j] = new_l
                            slx_all = slx
                            sl2_all = sl2
                            changed = True
            if not changed:
                break
        for i in range(n):
            Lt[i, j] += nmax
        scales[j] = slx_all / sl2_all if sl2_all > 0 else f32(0)


@njit(**_KERNEL)
def _q3_k_block(x, a, out, o, bits, bits_f, L, ls, d_block, q):
    """Super-block x[a:a+256] into out[o:o+110] from its sixteen 6-bit scales ls (0..63, stored
    scale + 32) and d; returns the overflowing f16 scale or 0. q: 16 values of scratch."""
    hd = _f16_bits(d_block, bits, bits_f)
    too_big = abs(d_block) if hd & 0x7FFF == 0x7C00 else f32(0)
    for i in range(12):
        out[o + 96 + i] = 0
    for j in range(16):
        if j < 8:
            out[o + 96 + j] = np.uint8(ls[j] & 0xF)
        else:
            out[o + 96 + j - 8] |= np.uint8((ls[j] & 0xF) << 4)
        out[o + 96 + 8 + j % 4] |= np.uint8((ls[j] >> 4) << (2 * (j // 4)))
    dv = _f16_value(hd)
    for j in range(16):
        d = dv * f32(ls[j] - 32)
        if d == 0:
            continue
        b = a + 16 * j
        largest = f32(0)  # the quotients first, so that without a huge one the rounding vectorizes
        for i in range(16):
            q[i] = x[b + i] / d
            largest = max(largest, abs(q[i]))
        if largest < _FAST_LIMIT:
            for i in range(16):
                L[b + i] = min(3, max(-4, _rint(q[i]))) + 4
        else:
            for i in range(16):
                L[b + i] = min(3, max(-4, _nearest_int(q[i], bits, bits_f))) + 4
    for i in range(32):
        out[o + i] = 0
    for k in range(8):  # bit k of hmask[i]: the high bit of value 32 k + i
        for i in range(32):
            v = L[a + 32 * k + i]
            out[o + i] |= np.uint8(v >> 2) << np.uint8(k)
            L[a + 32 * k + i] = v & 3
    for half in range(2):
        for i in range(32):
            b = a + 128 * half + i
            out[o + 32 + 32 * half + i] = np.uint8(L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6))
    out[o + 108] = hd & 0xFF
    out[o + 109] = hd >> 8
    return too_big


@njit(**_KERNEL)
def _q3_k_row(row_bits, out_row, qw, use_qw):
    """One row of Q3_K: quantize_row_q3_K_ref, or with importance quantize_row_q3_K_impl."""
    bits, bits_f = _bit_cell()
    if not _finite(row_bits):
        return True, f32(0)
    x = row_bits.view(np.float32)
    cols = x.shape[0]
    subs, supers = cols // 16, cols // QK_K
    xt, wt, st = np.empty((16, subs), np.float32), np.empty((16, subs), np.float32), np.empty((8, subs), np.float32)
    Lt, L = np.empty((16, subs), np.int32), np.empty(cols, np.int32)
    scales, ls = np.empty(subs, np.float32), np.empty(16, np.int32)
    for j in range(subs):
        for i in range(16):
            xt[i, j] = x[16 * j + i]
    d_blocks = np.empty(supers, np.float32)
    Ls = np.empty((16, supers), np.int32)
    if use_qw:
        for b in range(supers):
            s2 = f32(0)
            for i in range(QK_K):
                s2 += x[QK_K * b + i] * x[QK_K * b + i]
            sigma2 = f32(2) * s2 / f32(QK_K)
            for j in range(16 * b, 16 * b + 16):
                for i in range(16):
                    wt[i, j] = qw[16 * j + i] * np.sqrt(sigma2 + xt[i, j] * xt[i, j])
        _search_q6_k(xt, wt, 4, Lt, st, scales, bits, bits_f)  # make_qx_quants(16, 4, ...)
        st2 = np.empty((8, supers), np.float32)
        xs, ws = np.empty((16, supers), np.float32), np.empty((16, supers), np.float32)
        for b in range(supers):
            for i in range(16):
                xs[i, b] = scales[16 * b + i]
                sw = f32(0)
                for k in range(16):
                    sw += wt[k, 16 * b + i]
                ws[i, b] = sw
        _search_q6_k(xs, ws, 32, Ls, st2, d_blocks, bits, bits_f)  # make_qx_quants(16, 32, scales, ...)
    else:
        _search_q3(xt, 4, Lt, st, scales, bits, bits_f)
        for b in range(supers):
            max_scale = f32(0)
            amax = f32(0)
            for j in range(16):
                if abs(scales[16 * b + j]) > amax:
                    amax = abs(scales[16 * b + j])
                    max_scale = scales[16 * b + j]
            if max_scale != 0:
                iscale = f32(-32) / max_scale
                for j in range(16):
                    Ls[j, b] = min(31, max(-32, _nearest_int(iscale * scales[16 * b + j], bits, bits_f))) + 32
                d_blocks[b] = f32(1) / iscale
            else:
                for j in range(16):
                    Ls[j, b] = 0
                d_blocks[b] = f32(0)
    for j in range(subs):
        for i in range(16):
            L[16 * j + i] = Lt[i, j]
    too_big = f32(0)
    q = np.empty(16, np.float32)
    for b in range(supers):
        for j in range(16):
            ls[j] = Ls[j, b]
        too_big = max(too_big, _q3_k_block(x, QK_K * b, out_row, 110 * b, bits, bits_f, L, ls, d_blocks[b], q))
    return False, too_big


@njit(parallel=True, **_KERNEL)
def encode_q3_k(src, shift, qw, use_qw, out, bad, overflow):
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bad[r], overflow[r] = _q3_k_row(tile[r - r0], out[r], qw, use_qw)


# ---------------------------------------------------------------------------------------------
# Q2_K


@njit(**_KERNEL)
def _q2_k_block(x, b, out_row, use_qw, Lt, scales, mins, sw, ls, lm, bits, bits_f):
    """Super-block b of a Q2_K row into out_row[84 b:], from its sub-blocks' searched scales and
    mins (levels in Lt, recomputed from the 4-bit scales); returns the overflowing f16 scale or 0."""
    too_big = f32(0)
    o, a = 84 * b, QK_K * b
    sc, mn = scales[16 * b:16 * b + 16], mins[16 * b:16 * b + 16]
    if use_qw:
        d_block = _make_qp(sc, sw[16 * b:16 * b + 16], ls, 15, bits, bits_f)
        m_block = _make_qp(mn, sw[16 * b:16 * b + 16], lm, 15, bits, bits_f)
    else:
        max_scale, max_min = f32(0), f32(0)
        for j in range(16):
            max_scale = sc[j] if sc[j] > max_scale else max_scale
            max_min = mn[j] if mn[j] > max_min else max_min
        iscale = f32(15) / max_scale if max_scale > 0 else f32(0)
        imin = f32(15) / max_min if max_min > 0 else f32(0)
        for j in range(16):
            ls[j] = _nearest_int(iscale * sc[j], bits, bits_f) if max_scale > 0 else 0
            lm[j] = _nearest_int(imin * mn[j], bits, bits_f) if max_min > 0 else 0
        d_block = max_scale / f32(15) if max_scale > 0 else f32(0)
        m_block = max_min / f32(15) if max_min > 0 else f32(0)
    hd = _f16_bits(d_block, bits, bits_f)
    hm = _f16_bits(m_block, bits, bits_f)
    if hd & 0x7FFF == 0x7C00:
        too_big = max(too_big, abs(d_block))
    if hm & 0x7FFF == 0x7C00:
        too_big = max(too_big, abs(m_block))
    dv, mv = _f16_value(hd), _f16_value(hm)
    for j in range(16):
        byte = (ls[j] | (lm[j] << 4)) & 0xFF
        out_row[o + j] = np.uint8(byte)
        d = dv * f32(byte & 0xF)
        if d == 0:
            continue
        dm = mv * f32(byte >> 4)
        for i in range(16):
            Lt[i, 16 * b + j] = min(3, max(0, _nearest_int((x[a + 16 * j + i] + dm) / d, bits, bits_f)))
    for half in range(2):
        for i in range(32):
            q = 0
            for k in range(4):  # value 128 half + 32 k + i: sub-block 8 half + 2 k + i // 16
                v = 128 * half + 32 * k + i
                q |= Lt[v % 16, 16 * b + v // 16] << (2 * k)
            out_row[o + 16 + 32 * half + i] = np.uint8(q)
    out_row[o + 80] = hd & 0xFF
    out_row[o + 81] = hd >> 8
    out_row[o + 82] = hm & 0xFF
    out_row[o + 83] = hm >> 8
    return too_big


@njit(**_KERNEL)
def _q2_k_row(row_bits, out_row, qw, use_qw):
    """One row of Q2_K: quantize_row_q2_K_ref (make_qkx2 with |x| weights and absolute error), or
    with importance quantize_row_q2_K_impl (make_qkx3, make_qp_quants for the 4-bit scales)."""
    bits, bits_f = _bit_cell()
    if not _finite(row_bits):
        return True, f32(0)
    x = row_bits.view(np.float32)
    cols = x.shape[0]
    subs = cols // 16
    xt, wt, st = np.empty((16, subs), np.float32), np.empty((16, subs), np.float32), np.empty((17, subs), np.float32)
    Lt, Laux = np.empty((16, subs), np.int32), np.empty((16, subs), np.int32)
    scales, mins, sw = np.empty(subs, np.float32), np.empty(subs, np.float32), np.empty(subs, np.float32)
    ls, lm = np.empty(16, np.int32), np.empty(16, np.int32)
    for j in range(subs):
        for i in range(16):
            xt[i, j] = x[16 * j + i]
    if use_qw:
        for b in range(cols // QK_K):
            s2 = f32(0)
            for i in range(QK_K):
                s2 += x[QK_K * b + i] * x[QK_K * b + i]
            sigma2 = s2 / f32(QK_K)
            for j in range(16 * b, 16 * b + 16):
                s = f32(0)
                for i in range(16):
                    wt[i, j] = qw[16 * j + i] * np.sqrt(sigma2 + xt[i, j] * xt[i, j])
                    s += wt[i, j]
                sw[j] = s
        _search_q4_k(xt, wt, 3, f32(-0.9), f32(0.05), 36, Lt, Laux, st, scales, mins, bits, bits_f)
    else:
        for j in range(subs):
            for i in range(16):
                wt[i, j] = abs(xt[i, j])
        _search_q4_k(xt, wt, 3, f32(-0.5), f32(0.1), 15, Lt, Laux, st, scales, mins, bits, bits_f, True)
    too_big = f32(0)
    for b in range(cols // QK_K):
        too_big = max(too_big, _q2_k_block(x, b, out_row, use_qw, Lt, scales, mins, sw, ls, lm, bits, bits_f))
    return False, too_big


@njit(parallel=True, **_KERNEL)
def encode_q2_k(src, shift, qw, use_qw, out, bad, overflow):
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bad[r], overflow[r] = _q2_k_row(tile[r - r0], out[r], qw, use_qw)


# ---------------------------------------------------------------------------------------------
# IQ4_NL and IQ4_XS (quantize_row_iq4_nl_impl with ntry 7)

_KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


@njit(**_KERNEL)
def _best_index_iq4(x):
    """ggml best_index_int8 over the IQ4_NL grid."""
    vals = _KVALUES_IQ4NL
    if x <= vals[0]:
        return 0
    if x >= vals[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < vals[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - vals[mu - 1] < vals[mu] - x else mu


def _iq4_thresholds() -> np.ndarray:
    """For k = 1..15, the smallest float32 v for which ggml's best_index_int8 over the IQ4_NL grid
    returns k or more: the first v above grid[k - 1] where not (v - grid[k - 1] < grid[k] - v), in
    float32 as ggml computes it (the test is monotone in v, so it is a threshold). The index of a
    finite v is then the number of thresholds at or below it, with no branches."""
    def rounds_up(v, lo, hi):
        return not np.float32(v - lo) < np.float32(hi - v)

    grid = _KVALUES_IQ4NL
    out = np.empty(15, np.float32)
    for k in range(1, 16):
        lo, hi = grid[k - 1], grid[k]
        v = np.float32((lo + hi) / 2)  # exact: halves of small integers
        while rounds_up(np.nextafter(v, lo), lo, hi):
            v = np.nextafter(v, lo)
        while not rounds_up(v, lo, hi):
            v = np.nextafter(v, hi)
        out[k - 1] = v
    return out


_IQ4_THRESHOLDS = _iq4_thresholds()
_IQ4_STEPS = np.diff(_KVALUES_IQ4NL).astype(np.float32)  # grid[k] - grid[k - 1]: small integers, exact


@njit(**_KERNEL)
def _iq4_index(v):
    """`_best_index_iq4(v)` by counting thresholds, which vectorizes (also for +-Inf; NaN gives 0
    where ggml gives 15, so a NaN-free input is the caller's to ensure)."""
    k = 0
    for t in range(15):
        k += 1 if v >= _IQ4_THRESHOLDS[t] else 0
    return k


@njit(**_KERNEL)
def _iq4_grid_value(v):
    """grid[_best_index_iq4(v)] for finite v, as a float: the lowest level plus every step passed."""
    q = _KVALUES_IQ4NL[0]
    for t in range(15):
        q += _IQ4_STEPS[t] if v >= _IQ4_THRESHOLDS[t] else f32(0)
    return q


@njit(**_KERNEL)
def _iq4_sums(xt, wt, iscale, sqx, sq2):
    """Per lane j: sum w q x and sum w q q over its 32 values, q the grid value nearest iscale[j] x."""
    n, lanes = xt.shape
    for j in range(lanes):
        sqx[j] = f32(0)
        sq2[j] = f32(0)
    for i in range(n):
        for j in range(lanes):
            v = xt[i, j]
            q = _iq4_grid_value(iscale[j] * v)
            w = wt[i, j]
            sqx[j] += w * q * v
            sq2[j] += w * q * q


@njit(**_KERNEL)
def _iq4_scales(x, qw, use_qw, group, d):
    """The searched scale of every 32-value block of row x into d (0 for an all-zero block), as
    ggml's quantize_row_iq4_nl_impl: weights (qw sqrt(sigma2 + x^2), sigma2 over `group` values, or
    x^2 without importance), d = max / grid[0] and then 15 scales around it, keeping the one whose
    least-squares fit is best. All blocks of the row at once, one SIMD lane each (column j of xt is
    block j), every lane adding in ggml's order; one block at a time, ggml's binary search for
    each value's grid point does not vectorize and mispredicts."""
    lanes = x.shape[0] // 32
    xt, wt = np.empty((32, lanes), np.float32), np.empty((32, lanes), np.float32)
    st = np.empty((7, lanes), np.float32)
    amax, mx, iscale, sqx, sq2, best, active = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    for j in range(lanes):
        for i in range(32):
            xt[i, j] = x[32 * j + i]
    for g in range(0, x.shape[0], group):
        sigma2 = _sigma2(x, g, group)
        for j in range(g // 32, (g + group) // 32):
            for i in range(32):
                v = xt[i, j]
                wt[i, j] = qw[32 * j + i] * np.sqrt(sigma2 + v * v) if use_qw else v * v
    for j in range(lanes):
        amax[j] = f32(0)
        mx[j] = f32(0)
    for i in range(32):
        for j in range(lanes):
            v = xt[i, j]
            better = abs(v) > amax[j]
            mx[j] = v if better else mx[j]
            amax[j] = abs(v) if better else amax[j]
    grid0 = _KVALUES_IQ4NL[0]
    for j in range(lanes):
        active[j] = f32(1) if amax[j] >= _EPS else f32(0)
        iscale[j] = f32(1) / (-mx[j] / grid0) if active[j] != 0 else f32(0)
    _iq4_sums(xt, wt, iscale, sqx, sq2)
    for j in range(lanes):
        d[j] = sqx[j] / sq2[j] if sq2[j] > 0 else f32(0)
        best[j] = d[j] * sqx[j]
    for itry in range(-7, 8):
        for j in range(lanes):
            iscale[j] = f32(itry + -127) / mx[j] if active[j] != 0 else f32(0)
        _iq4_sums(xt, wt, iscale, sqx, sq2)
        for j in range(lanes):
            if sq2[j] > 0 and sqx[j] * sqx[j] > best[j] * sq2[j]:
                d[j] = sqx[j] / sq2[j]
                best[j] = d[j] * sqx[j]
    for j in range(lanes):
        d[j] = d[j] if active[j] != 0 else f32(0)


@njit(**_KERNEL)
def _iq4_pack(x, a, inv, out_row, o):
    if abs(inv) < np.inf:
        for j in range(16):
            out_row[o + j] = np.uint8(_iq4_index(inv * x[a + j]) | (_iq4_index(inv * x[a + 16 + j]) << 4))
    else:  # 1 / d overflowed: inv x may be NaN, which ggml's search sends to the top
        for j in range(16):
            out_row[o + j] = np.uint8(_best_index_iq4(inv * x[a + j]) | (_best_index_iq4(inv * x[a + 16 + j]) << 4))


@njit(**_KERNEL)
def _sigma2(x, a, n):
    s = f32(0)
    for j in range(n):
        s += x[a + j] * x[a + j]
    return s * (f32(2) / f32(n))


@njit(**_KERNEL)
def _iq4_nl_row(row_bits, out_row, qw, use_qw):
    bits, bits_f = _bit_cell()
    if not _finite(row_bits):
        return True, f32(0)
    x = row_bits.view(np.float32)
    scales = np.empty(x.shape[0] // 32, np.float32)
    _iq4_scales(x, qw, use_qw, 32, scales)
    too_big = f32(0)
    for b in range(x.shape[0] // 32):
        a, o, d = 32 * b, 18 * b, scales[b]
        hd = _f16_bits(d, bits, bits_f)
        if hd & 0x7FFF == 0x7C00:
            too_big = max(too_big, abs(d))
        out_row[o] = hd & 0xFF
        out_row[o + 1] = hd >> 8
        _iq4_pack(x, a, f32(1) / d if d != 0 else f32(0), out_row, o + 2)
    return False, too_big


@njit(**_KERNEL)
def _iq4_xs_row(row_bits, out_row, qw, use_qw):
    bits, bits_f = _bit_cell()
    if not _finite(row_bits):
        return True, f32(0)
    x = row_bits.view(np.float32)
    all_scales = np.empty(x.shape[0] // 32, np.float32)
    _iq4_scales(x, qw, use_qw, QK_K, all_scales)
    too_big = f32(0)
    for b in range(x.shape[0] // QK_K):
        a0, o = QK_K * b, 136 * b
        scales = all_scales[8 * b:8 * b + 8]
        amax, max_scale = f32(0), f32(0)
        for ib in range(8):
            if abs(scales[ib]) > amax:
                amax = abs(scales[ib])
                max_scale = scales[ib]
        d = -max_scale / f32(32)
        hd = _f16_bits(d, bits, bits_f)
        if hd & 0x7FFF == 0x7C00:
            too_big = max(too_big, abs(d))
        out_row[o] = hd & 0xFF
        out_row[o + 1] = hd >> 8
        inv = f32(1) / d if d != 0 else f32(0)
        high = 0
        for ib in range(8):
            l = min(31, max(-32, _nearest_int(inv * scales[ib], bits, bits_f)))
            dl = d * f32(l)
            _iq4_pack(x, a0 + 32 * ib, f32(1) / dl if dl != 0 else f32(0), out_row, o + 8 + 16 * ib)
            l += 32
            if ib % 2 == 0:
                out_row[o + 4 + ib // 2] = np.uint8(l & 0xF)
            else:
                out_row[o + 4 + ib // 2] |= np.uint8((l & 0xF) << 4)
            high |= (l >> 4) << (2 * ib)
        out_row[o + 2] = np.uint8(high & 0xFF)
        out_row[o + 3] = np.uint8(high >> 8)
    return False, too_big


@njit(parallel=True, **_KERNEL)
def encode_iq4_nl(src, shift, qw, use_qw, out, bad, overflow):
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bad[r], overflow[r] = _iq4_nl_row(tile[r - r0], out[r], qw, use_qw)


@njit(parallel=True, **_KERNEL)
def encode_iq4_xs(src, shift, qw, use_qw, out, bad, overflow):
    for t in prange((src.shape[0] + _TILE_ROWS - 1) // _TILE_ROWS):
        r0, r1, tile = _load_tile(src, t, shift)
        for r in range(r0, r1):
            bad[r], overflow[r] = _iq4_xs_row(tile[r - r0], out[r], qw, use_qw)
