"""Compiled GGML block encoders (numba): the same bytes as `gguf_quants`' numpy encoders, written as
the per-block loops of ggml-quants.c and run over the rows of a matrix on every kernel thread.

Why a second implementation: the numpy encoders search the K-quant scales in many passes over
memory, about 3-6 M values/s per core, while ggml's scalar C does one pass per search step, and a
numpy thread holds the GIL between its operations. Compiled loops run at C speed, release the GIL
(so the walk's reader keeps reading) and spread rows over `numba`'s threads. The numpy encoders stay
as the independent implementation the tests compare these with, value for value.

Exactness rules, as in the numpy module: every value is float32 and every float32 operation is the
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
def _row_scratch(cols):
    """Per-row scratch: the bit-cast cell (uint32 and its float32 view) and a widened row (both)."""
    bits, row_bits = np.empty(1, np.uint32), np.empty(cols, np.uint32)
    return bits, bits.view(np.float32), row_bits, row_bits.view(np.float32)


@njit(**_KERNEL)
def _load_row(src, r, row_bits, shift):
    """Widen row r of bf16 (shift 16) or float32 (shift 0) bits into `row_bits`; False on NaN/Inf."""
    finite = True
    for i in range(src.shape[1]):
        u = np.uint32(src[r, i]) << np.uint32(shift)
        row_bits[i] = u
        if u & np.uint32(0x7F800000) == np.uint32(0x7F800000):
            finite = False
    return finite


@njit(**_KERNEL)
def _round_half_away(v):
    """C roundf."""
    a = abs(v)
    f = np.floor(a)
    if a - f >= f32(0.5):
        f += f32(1)
    return -f if v < 0 else f


# ---------------------------------------------------------------------------------------------
# Q8_0 and Q4_0


@njit(parallel=True, **_KERNEL)
def encode_q8_0(src, shift, out, bad, overflow):
    cols = src.shape[1]
    for r in prange(src.shape[0]):
        bits, bits_f, row_bits, x = _row_scratch(cols)
        if not _load_row(src, r, row_bits, shift):
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


@njit(parallel=True, **_KERNEL)
def encode_q4_0(src, shift, out, bad, overflow):
    cols = src.shape[1]
    for r in prange(src.shape[0]):
        bits, bits_f, row_bits, x = _row_scratch(cols)
        if not _load_row(src, r, row_bits, shift):
            bad[r] = True
            continue
        for b in range(cols // 32):
            amax, mx = f32(0), f32(0)
            for i in range(32):
                v = x[32 * b + i]
                if amax < abs(v):
                    amax, mx = abs(v), v
            d = mx / f32(-8)
            inv = f32(1) / d if d != 0 else f32(0)
            h = _f16_bits(d, bits, bits_f)
            if h & 0x7FFF == 0x7C00:
                overflow[r] = max(overflow[r], abs(d))
            o = 18 * b
            out[r, o] = h & 0xFF
            out[r, o + 1] = h >> 8
            for i in range(16):
                lo = min(15, np.int32(x[32 * b + i] * inv + f32(8.5)))
                hi = min(15, np.int32(x[32 * b + 16 + i] * inv + f32(8.5)))
                out[r, o + 2 + i] = np.uint8(lo | (hi << 4))


# ---------------------------------------------------------------------------------------------
# Q4_K


@njit(**_KERNEL)
def _make_qkx(x, a, w, L, Laux, nmax, rmin, rdelta, nstep, bits, bits_f):
    """ggml make_qkx2_quants / make_qkx3_quants (the same with MSE) on x[a:a+32]; L[a:a+32] gets the
    levels. Returns (scale, the_min)."""
    n = 32
    mn = x[a]
    mx = x[a]
    sum_w = w[0]
    sum_x = sum_w * x[a]
    for i in range(1, n):
        v = x[a + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    xmin = mn
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        for i in range(n):
            L[a + i] = 0
        return f32(0), -mn
    f_nmax = f32(nmax)
    iscale = f_nmax / (mx - mn)
    scale = f32(1) / iscale
    best_error = f32(0)
    for i in range(n):
        l = min(nmax, max(0, _nearest_int(iscale * (x[a + i] - mn), bits, bits_f)))
        L[a + i] = l
        diff = scale * f32(l) + mn - x[a + i]
        best_error += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * f32(step) + f_nmax) / (mx - mn)
        sum_l = f32(0)
        sum_l2 = f32(0)
        sum_xl = f32(0)
        if _in_fast_range(iscale, max(abs(mx - mn), abs(xmin - mn))):
            for i in range(n):
                Laux[i] = min(nmax, max(0, _rint(iscale * (x[a + i] - mn))))
        else:
            for i in range(n):
                Laux[i] = min(nmax, max(0, _nearest_int(iscale * (x[a + i] - mn), bits, bits_f)))
        for i in range(n):
            l = Laux[i]
            wl = w[i] * f32(l)
            sum_l += wl
            sum_l2 += wl * f32(l)
            sum_xl += wl * x[a + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            err = f32(0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[a + i]
                err += w[i] * (diff * diff)
            if err < best_error:
                for i in range(n):
                    L[a + i] = Laux[i]
                best_error = err
                scale = this_scale
                mn = this_min
    return scale, -mn


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
def _q4_k_block(x, a, qw, use_qw, out, o, bits, bits_f, L, Laux, w, scales, mins, sw, ls, lm):
    """One super-block x[a:a+256] into out[o:o+144]; returns the largest overflowing f16 scale or 0."""
    if use_qw:
        s2 = f32(0)
        for i in range(QK_K):
            s2 += x[a + i] * x[a + i]
        sigma2 = f32(2) * s2 / f32(QK_K)
    for j in range(8):
        b = a + 32 * j
        if use_qw:
            for i in range(32):
                w[i] = np.sqrt(x[b + i] * x[b + i] + sigma2) * qw[32 * j + i]
            scales[j], mins[j] = _make_qkx(x, b, w, L, Laux, 15, f32(-0.9), f32(0.05), 36, bits, bits_f)
            s = f32(0)
            for i in range(32):
                s += w[i]
            sw[j] = s
        else:
            s = f32(0)
            for i in range(32):
                s += x[b + i] * x[b + i]
            av_x = np.sqrt(s / f32(32))
            for i in range(32):
                w[i] = abs(x[b + i]) + av_x
            scales[j], mins[j] = _make_qkx(x, b, w, L, Laux, 15, f32(-1.0), f32(0.1), 20, bits, bits_f)
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
            L[a + 32 * j + i] = min(15, max(0, _nearest_int((x[a + 32 * j + i] + dm) / d, bits, bits_f)))
    for c in range(4):
        for i in range(32):
            out[o + 16 + 32 * c + i] = np.uint8(L[a + 64 * c + i] | (L[a + 64 * c + 32 + i] << 4))
    return too_big


@njit(parallel=True, **_KERNEL)
def encode_q4_k(src, shift, qw, use_qw, out, bad, overflow):
    cols = src.shape[1]
    for r in prange(src.shape[0]):
        bits, bits_f, row_bits, x = _row_scratch(cols)
        L, Laux = np.empty(cols, np.int32), np.empty(32, np.int32)
        w, scales, mins, sw = (np.empty(32, np.float32), np.empty(8, np.float32),
                               np.empty(8, np.float32), np.empty(8, np.float32))
        ls, lm = np.empty(8, np.int32), np.empty(8, np.int32)
        if not _load_row(src, r, row_bits, shift):
            bad[r] = True
            continue
        for b in range(cols // QK_K):
            big = _q4_k_block(x, QK_K * b, qw[QK_K * b:QK_K * (b + 1)], use_qw, out[r], 144 * b,
                              bits, bits_f, L, Laux, w, scales, mins, sw, ls, lm)
            overflow[r] = max(overflow[r], big)


# ---------------------------------------------------------------------------------------------
# Q6_K


@njit(**_KERNEL)
def _make_qx(x, a, qw, use_qw, L, nmax, bits, bits_f):
    """ggml make_qx_quants (rmse_type 1: weights x^2, or qw) on x[a:a+16]; L[a:a+16] gets l + nmax."""
    n = 16
    mx = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[a + i])
        if ax > amax:
            amax = ax
            mx = x[a + i]
    if amax < _EPS:
        for i in range(n):
            L[a + i] = 0
        return f32(0)
    f_nmax = f32(nmax)
    best_is = -f_nmax / mx
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        v = x[a + i]
        l = min(nmax - 1, max(-nmax, _nearest_int(best_is * v, bits, bits_f)))
        wi = qw[i] if use_qw else v * v
        sumlx += wi * v * f32(l)
        suml2 += wi * f32(l) * f32(l)
    scale = sumlx / suml2 if suml2 != 0 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = -(f_nmax + f32(0.1) * f32(step)) / mx
        sumlx = f32(0)
        suml2 = f32(0)
        fast = _in_fast_range(isc, amax)
        for i in range(n):
            v = x[a + i]
            l = min(nmax - 1, max(-nmax, _rint(isc * v) if fast else _nearest_int(isc * v, bits, bits_f)))
            wi = qw[i] if use_qw else v * v
            sumlx += wi * v * f32(l)
            suml2 += wi * f32(l) * f32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best = scale * sumlx
            best_is = isc
    for i in range(n):
        L[a + i] = min(nmax - 1, max(-nmax, _nearest_int(best_is * x[a + i], bits, bits_f))) + nmax
    return scale


@njit(**_KERNEL)
def _q6_k_block(x, a, qw, use_qw, out, o, bits, bits_f, L, scales, sc):
    """One super-block x[a:a+256] into out[o:o+210]; returns the overflowing f16 scale or 0."""
    max_scale = f32(0)
    max_abs = f32(0)
    for j in range(16):
        scales[j] = _make_qx(x, a + 16 * j, qw[16 * j:16 * (j + 1)], use_qw, L, 32, bits, bits_f)
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
    for r in prange(src.shape[0]):
        bits, bits_f, row_bits, x = _row_scratch(cols)
        L, scales, sc = np.empty(cols, np.int32), np.empty(16, np.float32), np.empty(16, np.int8)
        if not _load_row(src, r, row_bits, shift):
            bad[r] = True
            continue
        for b in range(cols // QK_K):
            big = _q6_k_block(x, QK_K * b, qw[QK_K * b:QK_K * (b + 1)], use_qw, out[r], 210 * b,
                              bits, bits_f, L, scales, sc)
            overflow[r] = max(overflow[r], big)
