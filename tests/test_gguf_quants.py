"""GGML block quantizers: bytes against gguf-py (Q8_0, Q4_0), against ggml itself where llama-cpp-python's
libggml-base is installed (all four types, with and without importance), and against a scalar float32
port of ggml-quants.c written here (Q4_K, Q6_K; Q2_K, Q3_K and Q5_K against libggml only); decoding against gguf-py; error sizes; edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libggml import ggml_quantize, needs_ggml
from llama4_quant import parallel
from llama4_quant.errors import NonFiniteWeightError
from llama4_quant.formats import gguf_kernels, gguf_quants as gq

import gguf.quants as gguf_quants  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

F = np.float32
ALL_TYPES = ["Q8_0", "Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
GGML_TYPE = {"Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q2_K": T.Q2_K, "Q3_K": T.Q3_K, "Q4_K": T.Q4_K, "Q5_K": T.Q5_K, "Q6_K": T.Q6_K, "IQ4_NL": T.IQ4_NL,
             "IQ4_XS": T.IQ4_XS}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return rng(seed).standard_normal((rows, cols), dtype=np.float32)


def awkward(rows: int, cols: int, seed: int = 1) -> np.ndarray:
    """Weight-like data with outliers, zero rows, constant and sparse runs, and bf16 rounding."""
    r = rng(seed)
    x = (r.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[r.random((rows, cols)) < 0.002] *= 80  # outliers
    x[1] = 0  # zero row
    x[2, :64] = 0.25  # positive constant run
    x[3, :64] = -0.125  # negative constant run
    x[4, x[4] < 0.01] = 0  # sparse, non-negative
    x[5] = np.abs(x[5]) + 1.0  # all positive, offset
    x[6] = -np.abs(x[6]) - 1.0  # all negative
    x[7, 32:48] = 1e-3  # a tiny half sub-block next to large ones
    x[7, 64:96] *= 1e-3  # a tiny sub-block: its 6-bit scale rounds to 0 and ggml keeps the search's quants
    x[7, 160:176] *= 1e-3
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


# ---------------------------------------------------------------------------------------------
# A scalar port of ggml-quants.c, one C statement per line, every value a numpy float32 scalar


def nearest_int(v) -> int:
    bits = int(np.array([F(v) + F(12582912.0)], dtype=np.float32).view(np.int32)[0])
    return (bits & 0x007FFFFF) - 0x00400000


def fp16(v) -> np.float16:
    with np.errstate(over="ignore"):
        return np.float16(F(v))


def make_qkx2(x, weights, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), -mn, [0] * n
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    L = [0] * n
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        diff = scale * F(L[i]) + mn - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
        sum_l = sum_l2 = sum_xl = F(0)
        laux = [0] * n
        for i in range(n):
            lv = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
            laux[i] = lv
            w = weights[i]
            sum_l += w * F(lv)
            sum_l2 += w * F(lv) * F(lv)
            sum_xl += w * F(lv) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                L = laux
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn, L


def make_qx(x, nmax, qw=None):
    n = len(x)
    mx = amax = F(0)
    for i in range(n):
        if abs(x[i]) > amax:
            amax = abs(x[i])
            mx = x[i]
    if amax < F(1e-15):
        return F(0), [0] * n

    def weight(i):
        return qw[i] if qw is not None else x[i] * x[i]

    iscale = F(-nmax) / mx
    sumlx = suml2 = F(0)
    L = [0] * n
    for i in range(n):
        lv = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = lv + nmax
        sumlx += weight(i) * x[i] * F(lv)
        suml2 += weight(i) * F(lv) * F(lv)
    scale = sumlx / suml2 if suml2 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        sumlx = suml2 = F(0)
        for i in range(n):
            lv = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            sumlx += weight(i) * x[i] * F(lv)
            suml2 += weight(i) * F(lv) * F(lv)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = [nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) for i in range(n)]
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def pack_k4(ls, lm) -> list[int]:
    s = [0] * 12
    for j in range(8):
        if j < 4:
            s[j] = ls[j] & 0xFF
            s[j + 4] = lm[j] & 0xFF
        else:
            s[j + 4] = ((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)) & 0xFF
            s[j - 4] = (s[j - 4] | ((ls[j] >> 4) << 6)) & 0xFF
            s[j] = (s[j] | ((lm[j] >> 4) << 6)) & 0xFF
    return s


def scale_min_k4(j, s):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def make_qp(x, nmax, qw):
    n = len(x)
    mx = F(0)
    for v in x:
        mx = mx if mx > v else v
    if mx < F(1e-15):
        return F(0), [0] * n
    iscale = F(nmax) / mx
    L = [nearest_int(iscale * v) & 0xFF for v in x]
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            diff = x[i] - scale_is * F(min(nmax, nearest_int(iscale_is * x[i])))
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = suml2 = F(0)
    for i in range(n):
        lv = min(nmax, nearest_int(iscale * x[i]))
        L[i] = lv & 0xFF
        sumlx += qw[i] * x[i] * F(lv)
        suml2 += qw[i] * F(lv) * F(lv)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), L


def ref_q4_k_block(x, qw=None) -> bytes:
    """quantize_row_q4_K_ref (qw None) / quantize_row_q4_K_impl for one block of 256 float32 values."""
    L = [0] * 256
    scales, mins, sw = [F(0)] * 8, [F(0)] * 8, [F(0)] * 8
    max_scale = max_min = F(0)
    sigma2 = F(0)
    if qw is not None:
        for v in x:
            sigma2 += v * v
        sigma2 = F(2) * sigma2 / F(256)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        if qw is None:
            sum_x2 = F(0)
            for v in xs:
                sum_x2 += v * v
            av_x = np.sqrt(sum_x2 / F(32))
            weights = [av_x + abs(v) for v in xs]
            scales[j], mins[j], L[32 * j : 32 * j + 32] = make_qkx2(xs, weights, 15, -1.0, 0.1, 20)
        else:
            weights = [qw[32 * j + i] * np.sqrt(sigma2 + xs[i] * xs[i]) for i in range(32)]
            for v in weights:
                sw[j] += v
            scales[j], mins[j], L[32 * j : 32 * j + 32] = make_qkx2(xs, weights, 15, -0.9, 0.05, 36)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if qw is None:
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        ls = [min(63, nearest_int(inv_scale * scales[j]) & 0xFF) for j in range(8)]
        lm = [min(63, nearest_int(inv_min * mins[j]) & 0xFF) for j in range(8)]
        d_block, m_block = max_scale / F(63), max_min / F(63)
    else:
        d_block, ls = make_qp(scales, 63, sw)
        m_block, lm = make_qp(mins, 63, sw)
    packed = pack_k4(ls, lm)
    d16, m16 = fp16(d_block), fp16(m_block)
    for j in range(8):
        sc, m = scale_min_k4(j, packed)
        d = F(d16) * F(sc)
        if not d:
            continue
        dm = F(m16) * F(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(15, nearest_int((x[32 * j + ii] + dm) / d)))
    qs = [L[c * 64 + i] | (L[c * 64 + 32 + i] << 4) for c in range(4) for i in range(32)]
    return d16.tobytes() + m16.tobytes() + bytes(packed) + bytes(qs)


def ref_q6_k_block(x, qw=None) -> bytes:
    """quantize_row_q6_K_ref (qw None) / quantize_row_q6_K_impl for one block of 256 float32 values."""
    L = [0] * 256
    scales = [F(0)] * 16
    max_scale = max_abs = F(0)
    for ib in range(16):
        sub_qw = None if qw is None else qw[16 * ib : 16 * ib + 16]
        scales[ib], L[16 * ib : 16 * ib + 16] = make_qx(x[16 * ib : 16 * ib + 16], 32, sub_qw)
        if abs(scales[ib]) > max_abs:
            max_abs = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs < F(1e-15):
        return bytes(210)
    iscale = F(-128) / max_scale
    d16 = fp16(F(1) / iscale)
    sc = [np.int8(min(127, nearest_int(iscale * scales[ib]))) for ib in range(16)]
    for j in range(16):
        d = F(d16) * F(sc[j])
        if not d:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(x[16 * j + ii] / d))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        for i in range(32):
            q = [L[128 * h + 32 * k + i] for k in range(4)]
            ql[64 * h + i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
            ql[64 * h + 32 + i] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
            qh[32 * h + i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(sc, dtype=np.int8).tobytes() + d16.tobytes()


def ref_blocks(qtype: str, x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    out = []
    for row in x:
        for b in range(0, len(row), 256):
            vals = [F(v) for v in row[b : b + 256]]
            block_qw = None if qw is None else [F(v) for v in qw[b : b + 256]]
            with np.errstate(all="ignore"):
                out.append((ref_q4_k_block if qtype == "Q4_K" else ref_q6_k_block)(vals, block_qw))
    return np.frombuffer(b"".join(out), dtype=np.uint8).reshape(x.shape[0], -1)


def reference_input() -> np.ndarray:
    """Four blocks that reach the search's corners: Gaussian, outliers, constant and zero sub-blocks."""
    x = np.concatenate([gaussian(1, 256, 3), awkward(8, 256, 4)[[2, 3, 7]]], axis=0)
    x[0, :32] = 0  # an all-zero sub-block inside a normal block
    return x


# ---------------------------------------------------------------------------------------------
# Q8_0 / Q4_0: byte-identical to gguf-py


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("make", [gaussian, awkward])
def test_legacy_types_match_gguf_py(qtype, make):
    x = make(48, 512)
    x[9, :32] = 3e-39  # subnormal block: 1 / d overflows in every implementation
    ours = gq.quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == (48, 512 // 32 * gq.block_type(qtype).type_size)
    with np.errstate(all="ignore"):
        theirs = gguf_quants.quantize(x, GGML_TYPE[qtype])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(gq.dequantize(ours, qtype, 512), gguf_quants.dequantize(ours, GGML_TYPE[qtype]))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_legacy_types_ignore_importance(qtype):
    x = awkward(16, 256)
    np.testing.assert_array_equal(gq.quantize(x, qtype, np.arange(256, dtype=np.float32)), gq.quantize(x, qtype))


@needs_ggml
def test_q4_0_scale_is_the_first_value_of_largest_magnitude():
    """Q4_0's scale takes its sign from the block's first value of largest magnitude; a block of
    zeros keeps ggml's initial +0 (d = -0) whatever the zeros' signs, where gguf-py's argmax takes
    the first zero's sign. Each case sits in a different block position against ggml itself."""
    x = np.zeros((6, 128), dtype=np.float32)
    x[0, :32] = -0.0
    x[1, 3], x[1, 7] = -0.5, 0.5
    x[2, 35], x[2, 39] = 0.5, -0.5
    x[3, 64 + 31], x[3, 64] = -2.0, 1.5  # largest last in its block
    x[4, 96 + 16], x[4, 96 + 15] = 0.75, -0.25  # largest first in the block's second half
    x[5] = gaussian(1, 128, 3) * F(0.02)
    x[5, 40] = 3e-39  # one subnormal-scale block in a row of others: 1 / d overflows there only
    x[5, 32:40] = 0
    x[5, 41:64] = 0
    np.testing.assert_array_equal(gq.quantize(x, "Q4_0"), ggml_quantize(x, "Q4_0"))
    assert gq.quantize(x[:1], "Q4_0")[0, :2].tolist() == [0x00, 0x80]


def best_index_int8(grid, v) -> int:
    """ggml's best_index_int8, one C statement per line."""
    if v <= grid[0]:
        return 0
    if v >= grid[-1]:
        return len(grid) - 1
    ml, mu = 0, len(grid) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < grid[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if F(v - grid[mu - 1]) < F(grid[mu] - v) else mu


def test_iq4_grid_index_by_thresholds_is_ggml_binary_search():
    """The IQ4 encoders find a value's grid point by counting thresholds (branch-free, so the scale
    search vectorizes); every float near each threshold and grid point, and a spread of others,
    against ggml's binary search."""
    from numba import njit

    @njit
    def both(values, index, level):
        for i in range(values.size):
            index[i] = gguf_kernels._iq4_index(values[i])
            level[i] = gguf_kernels._iq4_grid_value(values[i])

    grid = gguf_kernels._KVALUES_IQ4NL
    around = np.concatenate([grid, gguf_kernels._IQ4_THRESHOLDS, (grid[1:] + grid[:-1]) / 2]).astype(np.float32)
    near, up, down = [around], around, around
    for _ in range(3):  # three floats either side
        up, down = np.nextafter(up, F(np.inf)), np.nextafter(down, F(-np.inf))
        near += [up, down]
    v = np.concatenate(near + [rng(13).uniform(-140, 130, 20_000).astype(np.float32),
                               np.array([0.0, -0.0, 1e30, -1e30, np.inf, -np.inf], dtype=np.float32)])
    index, level = np.empty(v.size, np.int64), np.empty(v.size, np.float32)
    both(v, index, level)
    expected = np.array([best_index_int8(grid, x) for x in v])
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(level, grid[expected])


def test_q8_0_round_half_away_from_zero():
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 127.0  # d = 1 exactly
    x[0, 1:5] = [2.5, -2.5, 0.5, -1.5]
    q = gq.quantize(x, "Q8_0")[0, 2:].view(np.int8)
    assert list(q[:5]) == [127, 3, -3, 1, -2]
    np.testing.assert_array_equal(q, gguf_quants.quantize(x, T.Q8_0)[0, 2:].view(np.int8))


def test_torch_encoders_take_correctly_rounded_square_roots():
    """The K-quant weights take sqrtf; torch's CPU sqrt was an ulp off on an AMD EPYC, which
    changed Q4_K bytes. Random float32 bit patterns from subnormals to the largest float, and the
    edge values, against numpy's sqrt and the float64 root rounded to float32 (exact for sqrt)."""
    bits = rng(12).integers(0, 0x7F800000, 200_000, dtype=np.int64).astype(np.int32)
    edges = np.array([0.0, -0.0, np.inf, np.nan, 1.0, 2.0, 1e-45, 3.4028235e38], dtype=np.float32)
    v = np.concatenate([bits.view(np.float32), edges])
    got = gq._sqrt(torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, np.sqrt(v))
    np.testing.assert_array_equal(got, np.sqrt(v.astype(np.float64)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Q4_K / Q6_K


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_match_scalar_port_of_ggml(qtype):
    x = reference_input()
    np.testing.assert_array_equal(gq.quantize(x, qtype), ref_blocks(qtype, x))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_with_importance_match_scalar_port_of_ggml(qtype):
    x = np.concatenate([reference_input(), gaussian(4, 256, 6)], axis=0)
    qw = rng(5).uniform(0, 3, 256).astype(np.float32) ** 3
    qw[::9] = 0
    np.testing.assert_array_equal(gq.quantize(x, qtype, qw), ref_blocks(qtype, x, qw))


@needs_ggml
@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("importance", [None, "uniform", "spiky"])
def test_bytes_identical_to_ggml(qtype, importance):
    x = np.concatenate([gaussian(32, 768, 7), awkward(64, 768, 8), gaussian(2, 768, 9) * F(1e-37),
                        np.zeros((1, 768), dtype=np.float32)], axis=0)
    qw = None
    if importance == "uniform":
        qw = rng(10).uniform(0.5, 2, 768).astype(np.float32)
    elif importance == "spiky":
        qw = (rng(11).standard_normal(768) ** 4).astype(np.float32)
        qw[::7] = 0
    expected = ggml_quantize(x, qtype, qw if gq.block_type(qtype).uses_importance else None)
    np.testing.assert_array_equal(gq.quantize(x, qtype, qw), expected)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_k_quants_decode_like_gguf_py(qtype):
    x = awkward(32, 1024)
    raw = gq.quantize(x, qtype)
    bt = gq.block_type(qtype)
    assert raw.shape == (32, 1024 // bt.block_size * bt.type_size) and raw.dtype == np.uint8
    ours = gq.dequantize(raw, qtype, 1024)
    np.testing.assert_array_equal(ours, gguf_quants.dequantize(raw, GGML_TYPE[qtype]))
    assert np.isfinite(ours).all()


def rel_rmse(x, y) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x**2)))


def test_k_quant_error_sizes_on_gaussian_data():
    x = gaussian(64, 1024, 12)
    err = {q: rel_rmse(x, gq.dequantize(gq.quantize(x, q), q, 1024))
           for q in ("Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")}
    assert 0.25 < err["Q2_K"] < 0.4
    assert 0.12 < err["Q3_K"] < 0.22 < err["Q2_K"]
    assert 0.07 < err["Q4_K"] < 0.12 < err["Q3_K"]
    assert 0.035 < err["Q5_K"] < 0.06
    assert 0.015 < err["Q6_K"] < 0.035
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"] / 1.7
    assert err["Q6_K"] < err["Q4_K"] / 3 < err["Q4_0"] / 3
    # per-block reconstruction is close to the data everywhere, not just on average
    for q in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        y = gq.dequantize(gq.quantize(x, q), q, 1024)
        blocks = ((x - y) ** 2).reshape(-1, 256).mean(1) / (x**2).reshape(-1, 256).mean(1)
        assert np.sqrt(blocks.max()) < 2.5 * err[q]


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_importance_lowers_weighted_error(qtype):
    x = gaussian(64, 1024, 13)
    imp = np.exp(rng(14).standard_normal(1024) * 2.0).astype(np.float32)  # spans ~e^-6 .. e^6
    imp[rng(15).random(1024) < 0.05] *= 100  # a few channels that dominate, as in real imatrices

    def weighted(raw):
        return float((imp * (x - gq.dequantize(raw, qtype, 1024)) ** 2).sum())

    plain, guided = weighted(gq.quantize(x, qtype)), weighted(gq.quantize(x, qtype, imp))
    assert guided < 0.85 * plain, (guided, plain)


def test_importance_accepts_torch_and_checks_length():
    x = gaussian(4, 256)
    imp = np.linspace(0.1, 3, 256, dtype=np.float32)
    np.testing.assert_array_equal(gq.quantize(x, "Q4_K", torch.from_numpy(imp)), gq.quantize(x, "Q4_K", imp))
    with pytest.raises(ValueError, match="one per input column"):
        gq.quantize(x, "Q4_K", imp[:128])
    with pytest.raises(ValueError, match="non-negative"):
        gq.quantize(x, "Q6_K", -imp)


# ---------------------------------------------------------------------------------------------
# Edges, inputs, chunking


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_zero_constant_tiny_and_large_blocks(qtype):
    cols = 512
    x = np.zeros((8, cols), dtype=np.float32)
    x[1] = 0.75  # positive constant
    x[2] = -0.3  # negative constant
    x[3] = gaussian(1, cols, 16)[0] * F(1e-30)  # tiny: scales underflow f16
    x[4] = gaussian(1, cols, 17)[0] * F(1e-40)  # subnormal float32
    x[5] = gaussian(1, cols, 18)[0] * F(2e3)  # large, scales still fit f16
    x[6, ::2] = 1.0  # alternating
    x[7] = gaussian(1, cols, 19)[0]
    raw = gq.quantize(x, qtype)
    y = gq.dequantize(raw, qtype, cols)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[0], 0)  # zero rows decode to exact zeros
    np.testing.assert_allclose(y[1], 0.75, rtol=0.02)
    np.testing.assert_allclose(y[2], -0.3, rtol=0.02)
    assert np.abs(y[3:5]).max() <= 1e-29
    tol = {"Q8_0": 0.01, "Q6_K": 0.04, "Q5_K": 0.07, "Q4_0": 0.15, "Q4_K": 0.12, "Q3_K": 0.25, "Q2_K": 0.45,
           "IQ4_NL": 0.12, "IQ4_XS": 0.12}[qtype]
    assert rel_rmse(x[5], y[5]) < tol and rel_rmse(x[7], y[7]) < tol
    np.testing.assert_allclose(y[6], x[6], atol=0.02)
    if qtype.endswith("_K"):
        np.testing.assert_array_equal(raw[0], 0)  # ggml's all-zero K block: d = 0 and zero quants


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_scale_overflow_and_non_finite_are_refused(qtype):
    x = gaussian(2, 256)
    with pytest.raises(gq.ScaleOverflowError, match="float16"):
        gq.quantize(x * F(1e12), qtype)
    x[1, 7] = np.nan
    with pytest.raises(NonFiniteWeightError):
        gq.quantize(x, qtype)


def test_inputs_shapes_and_dtypes():
    x = awkward(8, 512)
    t = torch.from_numpy(x).to(torch.bfloat16)
    for q in ("Q8_0", "Q4_K"):
        np.testing.assert_array_equal(gq.quantize(t, q), gq.quantize(t.float().numpy(), q))
    np.testing.assert_array_equal(gq.quantize(x.astype(np.float64), "Q6_K"), gq.quantize(x, "Q6_K"))
    with pytest.raises(ValueError, match="multiple of 256"):
        gq.quantize(gaussian(2, 288), "Q4_K")
    with pytest.raises(ValueError, match="2-D float matrix"):
        gq.quantize(np.zeros(256, dtype=np.float32), "Q6_K")
    with pytest.raises(ValueError, match="unsupported"):
        gq.quantize(x, "IQ2_XXS")
    assert gq.quantize(np.zeros((0, 256), dtype=np.float32), "Q4_K").shape == (0, 144)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_reference_chunking_does_not_change_bytes(qtype, monkeypatch):
    x = awkward(13, 768)
    imp = np.linspace(0.2, 2, 768, dtype=np.float32)
    whole = gq.quantize_reference(x, qtype, imp)
    monkeypatch.setattr(gq, "_CHUNK_ELEMS", 1000)  # one row per chunk
    np.testing.assert_array_equal(gq.quantize_reference(x, qtype, imp), whole)
    monkeypatch.setattr(gq, "_CHUNK_ELEMS", 768 * 5)  # chunks of 5, 5, 3 rows
    np.testing.assert_array_equal(gq.quantize_reference(x, qtype, imp), whole)


def varied_blocks(seed: int) -> np.ndarray:
    """Rows of many magnitudes and shapes, every value bf16-exact: the search's branches all run."""
    r = rng(seed)
    rows = [awkward(8, 1024, seed)]
    for scale in (1e-30, 1e-7, 1e-4, 0.02, 1.0, 300.0, 3e4):
        rows.append((r.standard_normal((2, 1024)) * scale).astype(np.float32))
    rows.append(np.abs(r.standard_normal((2, 1024), dtype=np.float32)))  # no negative value: min 0
    rows.append(np.round(r.standard_normal((2, 1024)) * 4).astype(np.float32))  # few levels, ties
    x = np.concatenate(rows)
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_transposed_views_encode_like_their_copies(qtype):
    """An expert's [out, in] view of its stored [in, out] slice is read in tiles of 32 rows: 70 rows
    make two whole tiles and a partial one, and the view is of a wider stored matrix (gate of gate_up)."""
    stored = torch.from_numpy(varied_blocks(9)[:, :512].T.copy()).bfloat16()  # [512, 26]
    stored = torch.cat([stored] * 6, dim=1)  # [512, 156]: the stored layout, 156 output rows
    view = stored[:, 10:80].T  # [70, 512], strides (1, 156)
    assert view.stride() == (1, 156)
    imp = rng(3).random(512).astype(np.float32)
    np.testing.assert_array_equal(gq.quantize(view, qtype, imp), gq.quantize(view.contiguous(), qtype, imp))
    parallel.set_threads(1)
    try:
        np.testing.assert_array_equal(gq.quantize(view, qtype), gq.quantize_reference(view, qtype))
    finally:
        parallel.set_threads(None)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_transposed_views_refuse_non_finite_and_overflow(qtype):
    stored = torch.from_numpy(gaussian(512, 40, 11)).bfloat16()  # [in, out]: output row o is column o
    with pytest.raises(gq.ScaleOverflowError, match="float16"):
        gq.quantize((stored * 1e12).T, qtype)
    stored[300, 33] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="row 33"):
        gq.quantize(stored.T, qtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_in", [256, 160])
def test_q8_0_of_a_stored_slice_across_strips(threads, n_in):
    """Q8_0 of an expert's view encodes its stored rows a strip of output columns at a time, four
    blocks to a tile stored as whole words: whole strips and a last one whose width is no multiple of
    8 (stored byte by byte), of a wider stored matrix, against the contiguous copy and the torch
    encoder; an overflowing block in a middle strip and a NaN in the last one are found. 160 input
    values (five blocks, not whole tiles) take the general row-tile kernel instead, with the same bytes."""
    strip = gguf_kernels._Q8_0_STRIP
    n_out = 5 * strip + 12
    stored = torch.from_numpy(gaussian(n_in, n_out + 40, 12)).bfloat16()  # [in, out + 40]
    overflowing = 2 * strip + 5
    stored[96:128, 30 + overflowing] = 1.0e7  # block 3 of that output row: d = 1e7 / 127 overflows f16
    view = stored[:, 30:30 + n_out].T
    parallel.set_threads(threads)
    try:
        with pytest.raises(gq.ScaleOverflowError, match="float16"):
            gq.quantize(view, "Q8_0")
        stored[96:128, 30 + overflowing] = 0.5
        q = gq.quantize(view, "Q8_0")
        np.testing.assert_array_equal(q, gq.quantize(view.contiguous(), "Q8_0"))
        np.testing.assert_array_equal(q, gq.quantize_reference(view, "Q8_0"))
        stored[100, 30 + n_out - 3] = float("nan")
        with pytest.raises(NonFiniteWeightError, match=f"row {n_out - 3}"):
            gq.quantize(view, "Q8_0")
    finally:
        parallel.set_threads(None)


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("importance", [None, "random", "sparse"])
def test_compiled_kernels_equal_torch_encoders(qtype, importance):
    """The compiled encoders and the torch ones are independent implementations: same bytes."""
    x = varied_blocks(5)
    imp = None
    if importance == "random":
        imp = rng(6).random(1024).astype(np.float32) * 3
    elif importance == "sparse":  # whole super-blocks of zero importance, others spiky
        imp = np.where(rng(7).random(1024) < 0.1, 50.0, 0.01).astype(np.float32)
        imp[256:512] = 0
    np.testing.assert_array_equal(gq.quantize(x, qtype, imp), gq.quantize_reference(x, qtype, imp))
    t = torch.from_numpy(x).bfloat16()  # bf16 input is widened in the kernel: same bytes
    np.testing.assert_array_equal(gq.quantize(t, qtype, imp), gq.quantize(x, qtype, imp))
    np.testing.assert_array_equal(gq.quantize(t.T.contiguous().T, qtype, imp), gq.quantize(x, qtype, imp))


@pytest.fixture
def two_threads():
    parallel.set_threads(2)
    yield
    parallel.set_threads(None)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_threads_do_not_change_bytes(qtype, two_threads):
    rows = 300
    x = np.concatenate([awkward(rows - 64, 1024, 3), gaussian(64, 1024, 4)], axis=0)
    t = torch.from_numpy(x).bfloat16()
    imp = np.linspace(0.2, 2, 1024, dtype=np.float32)
    spread = gq.quantize(t, qtype, imp)
    parallel.set_threads(1)
    np.testing.assert_array_equal(spread, gq.quantize(t, qtype, imp))
    parallel.set_threads(2)
    x[rows - 5, 17] = np.inf
    with pytest.raises(NonFiniteWeightError, match=f"row {rows - 5}"):
        gq.quantize(x, qtype)


def test_dequantize_checks_sizes():
    raw = gq.quantize(gaussian(2, 512), "Q6_K")
    assert gq.dequantize(raw.reshape(-1), "Q6_K", 512).shape == (2, 512)
    assert gq.dequantize(raw, "Q6_K", 256).shape == (4, 256)  # rows of 256 values: two per stored row
    with pytest.raises(ValueError, match="whole number"):
        gq.dequantize(raw.reshape(-1)[:-1], "Q6_K", 512)


def test_block_geometry_is_gguf_py_s():
    """The registry takes block sizes from gguf-py, and lists llama.cpp's fallback for partial rows."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, bt in gq.BLOCK_TYPES.items():
        assert (bt.block_size, bt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert gq.BLOCK_TYPES["Q6_K"].fallback == "Q8_0" and gq.BLOCK_TYPES["Q4_K"].fallback == "Q5_0"
