"""GGML block quantizers (Q8_0, Q4_0, Q4_K, Q6_K), vectorized over every block of a matrix.

Input is a 2-D float matrix in GGUF row order (rows = output features, cols = the contiguous input
dim); output is the raw bytes GGUF stores for it, a uint8 array [rows, cols // block * type_size].

- Q8_0 and Q4_0 are byte-identical to gguf-py's `gguf.quants.quantize` (itself bit-exact with ggml).
- Q4_K and Q6_K follow ggml-quants.c: without importance `quantize_row_q4_K_ref` (make_qkx2_quants,
  weights av_x + |x|) and `quantize_row_q6_K_ref` (make_qx_quants, rmse_type 1); with importance
  `quantize_row_q4_K_impl` (make_qkx3_quants on qw * sqrt(sigma2 + x^2), make_qp_quants for the
  6-bit scales) and `quantize_row_q6_K_impl` (make_qx_quants weighted by qw). They reproduce ggml's
  bytes exactly: every float32 operation is done in the C code's order (sums sequential, never
  pairwise), and `nearest_int` is emulated bit for bit.

Layout inside the K-quants: a chunk of rows is cut into sub-blocks and transposed to
[values_per_subblock, n_subblocks], so a per-block scalar is a 1-D array and a sequential C sum is
a short Python loop of vector adds. Rows go in chunks of about `_CHUNK_ELEMS` values (converted to
float32 chunk by chunk), so the working memory is a few MB plus the output, whatever the matrix.
`quantize` runs the compiled copies of these encoders (`gguf_kernels`, the same bytes, on every
kernel thread); `quantize_reference` runs the numpy ones, the independent implementation.

What happens at the edges (all as in ggml, except that overflow is refused):
- All-zero blocks encode as ggml does (d = 0), and decode to zeros. Small blocks lose precision as
  the f16 scale goes subnormal and decode to zeros once it rounds to 0, as in ggml: roughly below
  max |w| = 3.8e-6 for Q8_0, 2.4e-7 for Q4_0, 3e-5 for Q4_K, 1.2e-4 for Q6_K (whose d = max|w|/4096
  is already subnormal below max |w| = 0.25, costing it about 0.1-1% of scale precision on
  typical LLM weights).
- With importance, a super-block whose 256 importance values are all zero gets d = 0 and decodes
  to zeros (ggml's quantize_row_q4_K_impl / q6_K_impl do the same): floor the importance, or pass
  None for a slice that calibration never reached.
- Non-finite input raises `NonFiniteWeightError`.
- A block whose f16 scale would overflow (|d| or |dmin| > 65504; for zero-mean data that is
  max |w| beyond about 8.3e6 for Q8_0, 5.2e5 for Q4_0, 4.1e6 for Q4_K (dmin = |min| / 63), 2.7e8
  for Q6_K) raises `ScaleOverflowError`: ggml and gguf-py would silently write an infinite scale
  and the tensor would decode to inf/NaN. Keep such a tensor in F32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import L4QError, NonFiniteWeightError

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer (nearest_int)
_CHUNK_ELEMS = 1 << 17  # values per chunk of rows: 512 KB float32 temporaries stay in L2 (4 MB ones run 2x slower)
_F32 = np.float32


class ScaleOverflowError(L4QError):
    """A block's scale does not fit in float16: the values are too large for this GGML type."""


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class BlockType:
    """One GGML block type: its encoder and decoder, whether importance steers it, and the type
    llama-quantize falls back to for rows that are not whole blocks. Block geometry comes from
    gguf-py's GGML_QUANT_SIZES. Adding a type is one entry in BLOCK_TYPES (at the end of this
    module) plus its exactness tests."""

    name: str
    kernel: str  # the compiled encoder in `gguf_kernels`
    encode_chunk: Callable[[np.ndarray, Any], np.ndarray]  # numpy: (float32 rows, importance or None) -> blocks
    decode: Callable[[np.ndarray], np.ndarray]  # blocks [n, type_size] uint8 -> float32 [n, block_size]
    uses_importance: bool
    fallback: str | None  # llama.cpp's choice when cols % block_size != 0

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[GGMLQuantizationType[self.name]][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[GGMLQuantizationType[self.name]][1]


def block_type(qtype: str) -> BlockType:
    try:
        return BLOCK_TYPES[qtype]
    except KeyError:
        raise ValueError(f"unsupported GGML block type {qtype!r}; expected one of {sorted(BLOCK_TYPES)}") from None


def quantize(weights: Any, qtype: str, importance: Any = None) -> np.ndarray:
    """Quantize a [rows, cols] float matrix to `qtype`'s GGUF bytes, uint8 [rows, cols // block * size].

    `importance` (length `cols`, e.g. an imatrix's mean x^2 per input channel) steers the K-quants'
    scale search toward the channels that matter; Q8_0 and Q4_0 ignore it, as llama.cpp does.
    """
    bt = block_type(qtype)
    return _encode_compiled(weights, bt, importance if bt.uses_importance else None)


def quantize_reference(weights: Any, qtype: str, importance: Any = None) -> np.ndarray:
    """`quantize` by the numpy encoders of this module, on one core: the independent implementation
    that the compiled kernels are tested against."""
    bt = block_type(qtype)
    return _encode_rows(weights, bt, importance if bt.uses_importance else None)


def dequantize(raw: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    """Decode `qtype` bytes (any shape holding whole rows of `cols` values) to float32 [rows, cols]."""
    bt = block_type(qtype)
    bs, ts = bt.block_size, bt.type_size
    if cols % bs:
        raise ValueError(f"{qtype} needs cols to be a multiple of {bs}, got {cols}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    row_bytes = cols // bs * ts
    if raw.size % row_bytes:
        raise ValueError(f"{raw.size} bytes is not a whole number of {qtype} rows of {cols} values")
    return bt.decode(raw.reshape(-1, ts)).reshape(-1, cols)


def quantize_q8_0(w: Any) -> np.ndarray:
    """Q8_0: per 32 values an f16 d = max|x| / 127 and 32 int8 round(x / d), half away from zero."""
    return quantize(w, "Q8_0")


def quantize_q4_0(w: Any) -> np.ndarray:
    """Q4_0: per 32 values an f16 d = x[argmax |x|] / -8 and nibbles trunc(x / d + 8.5), clipped to 15."""
    return quantize(w, "Q4_0")


def _q8_0_chunk(chunk: np.ndarray, _qw: None) -> np.ndarray:
    b = chunk.reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / _F32(127)
    with np.errstate(all="ignore"):  # subnormal d: 1 / d overflows, as in gguf-py and ggml
        inv = np.where(d == 0, _F32(0), _F32(1) / d)
        q = _round_half_away(b * inv).astype(np.int8)
    o = np.empty((b.shape[0], 34), dtype=np.uint8)
    o[:, :2] = _to_f16(d, "Q8_0").view(np.uint8)
    o[:, 2:] = q.view(np.uint8)
    return o


def _q4_0_chunk(chunk: np.ndarray, _qw: None) -> np.ndarray:
    b = chunk.reshape(-1, 32)
    imax = np.abs(b).argmax(axis=1)[:, None]
    d = np.take_along_axis(b, imax, axis=1) / _F32(-8)
    with np.errstate(all="ignore"):
        inv = np.where(d == 0, _F32(0), _F32(1) / d)
        q = np.trunc(b * inv + _F32(8.5)).astype(np.uint8)
    np.minimum(q, 15, out=q)
    o = np.empty((b.shape[0], 18), dtype=np.uint8)
    o[:, :2] = _to_f16(d, "Q4_0").view(np.uint8)
    o[:, 2:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return o


def quantize_q4_k(w: Any, importance: Any = None) -> np.ndarray:
    """Q4_K as ggml's quantize_q4_K: 8 sub-blocks of 32 with 6-bit scale and min per 256 values."""
    return quantize(w, "Q4_K", importance)


def quantize_q6_k(w: Any, importance: Any = None) -> np.ndarray:
    """Q6_K as ggml's quantize_q6_K: 16 sub-blocks of 16 with int8 scales and an f16 d per 256 values."""
    return quantize(w, "Q6_K", importance)


def _encode_compiled(w: Any, bt: BlockType, qw: Any) -> np.ndarray:
    """Encode a matrix with the compiled kernel, its rows spread over `parallel.threads()` threads."""
    from .. import parallel
    from . import gguf_kernels

    src, rows, cols = _matrix(w, bt.name)
    qw = _as_importance(qw, cols)
    bits, shift = _as_bits(src)
    out = np.empty((rows, cols // bt.block_size * bt.type_size), dtype=np.uint8)
    bad, overflow = np.zeros(rows, dtype=bool), np.zeros(rows, dtype=np.float32)
    kernel = getattr(gguf_kernels, bt.kernel)
    parallel.use_kernel_threads()
    if bt.uses_importance:
        use_qw = qw is not None
        kernel(bits, shift, qw if use_qw else np.zeros(cols, dtype=np.float32), use_qw, out, bad, overflow)
    else:
        kernel(bits, shift, out, bad, overflow)
    if bad.any():
        raise NonFiniteWeightError(f"cannot quantize weights holding NaN or Inf (row {int(bad.argmax())})")
    if overflow.any():
        _raise_overflow(float(overflow.max()), bt.name)
    return out


def _as_bits(src: Any) -> tuple[np.ndarray, int]:
    """The matrix as C-contiguous bits the kernels widen to float32 themselves: bf16 as uint16
    (shift 16), anything else as float32's uint32 (shift 0)."""
    if _is_torch(src):
        import torch

        if src.dtype == torch.bfloat16:
            return src.contiguous().view(torch.int16).numpy().view(np.uint16), 16
        src = src.to(torch.float32).contiguous().numpy()
    return np.ascontiguousarray(src, dtype=np.float32).view(np.uint32), 0


def _encode_rows(w: Any, bt: BlockType, qw: Any) -> np.ndarray:
    """Encode a matrix with the numpy encoder, a cache-sized chunk of rows at a time."""
    src, rows, cols = _matrix(w, bt.name)
    qw = _as_importance(qw, cols)
    out = np.empty((rows, cols // bt.block_size * bt.type_size), dtype=np.uint8)
    for a, b in _row_spans(rows, cols, _CHUNK_ELEMS):
        if _is_torch(src):
            import torch

            chunk = src[a:b].to(torch.float32).contiguous().numpy()
        else:
            chunk = np.ascontiguousarray(src[a:b], dtype=np.float32)
        if not np.isfinite(chunk).all():
            raise NonFiniteWeightError(f"cannot quantize weights holding NaN or Inf (rows {a}..{b - 1})")
        out[a:b] = bt.encode_chunk(chunk, qw).reshape(b - a, -1)
    return out


# ---------------------------------------------------------------------------------------------
# Input handling and small helpers


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "torch"  # no torch import unless given a tensor


def _matrix(w: Any, qtype: str) -> tuple[Any, int, int]:
    """Validate a [rows, cols] float matrix; return it (numpy array or CPU torch tensor) and its shape.

    Conversion to float32 happens chunk by chunk, so a bf16 matrix is never copied whole.
    """
    if _is_torch(w):
        if w.ndim != 2 or not w.is_floating_point():
            raise ValueError(f"{qtype} quantization takes a 2-D float matrix, got {tuple(w.shape)} {w.dtype}")
        src = w.detach().cpu()
    else:
        src = np.asarray(w)
        if src.ndim != 2 or not np.issubdtype(src.dtype, np.floating):
            raise ValueError(f"{qtype} quantization takes a 2-D float matrix, got {src.shape} {src.dtype}")
    rows, cols = (int(n) for n in src.shape)
    block = block_type(qtype).block_size
    if cols % block:
        raise ValueError(f"{qtype} needs cols to be a multiple of {block}, got shape {(rows, cols)}")
    return src, rows, cols


def _row_spans(rows: int, cols: int, elems: int) -> list[tuple[int, int]]:
    """(r0, r1) row ranges of about `elems` values each (at least one row)."""
    step = max(1, elems // max(cols, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _as_importance(importance: Any, cols: int) -> np.ndarray | None:
    if importance is None:
        return None
    if _is_torch(importance):
        importance = importance.detach().cpu().float().numpy()
    qw = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if qw.size != cols:
        raise ValueError(f"importance has {qw.size} values, expected one per input column ({cols})")
    if not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError("importance weights must be finite and non-negative")
    return qw


def _to_f16(d: np.ndarray, qtype: str) -> np.ndarray:
    """float32 -> float16 with round-to-nearest-even (what GGML_FP32_TO_FP16 does); refuse overflow."""
    with np.errstate(over="ignore"):
        h = d.astype(np.float16)
    if not np.isfinite(h).all():
        _raise_overflow(float(np.abs(d[~np.isfinite(h)]).max()), qtype)
    return h


def _raise_overflow(big: float, qtype: str) -> None:
    raise ScaleOverflowError(
        f"a {qtype} block scale ({big:.4g}) overflows float16: the weights are too large for {qtype}; "
        "keep this tensor in F32 or BF16"
    )


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf: nearest integer, halves away from zero (exact: the fraction a - floor(a) is exact)."""
    a = np.abs(v)
    f = np.floor(a)
    f += (a - f) >= _F32(0.5)
    return np.copysign(f, v)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit: add 1.5 * 2**23, read the low mantissa bits (int32).

    Round-half-even for |v| < 2**22; NaN and +-Inf come out as 0 and -4194304 as in the C code.
    """
    t = v + _MAGIC
    i = t.view(np.int32)
    i &= 0x007FFFFF
    i -= 0x00400000
    return i


def _seqsum0(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, starting from +0.0: the C loop `s = 0; s += t[i]` exactly."""
    s = t[0] + _F32(0)
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _seqsum1(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, starting from t[0] (C: `s = t[0]; for i >= 1: s += t[i]`)."""
    s = t[0].copy()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _sub_blocks_t(chunk: np.ndarray, n: int) -> np.ndarray:
    """[rows, cols] -> [n, n_subblocks]: column k is the k-th run of n contiguous values."""
    return np.ascontiguousarray(chunk.reshape(-1, n).T)


def _importance_t(qw: np.ndarray, rows: int, n: int) -> np.ndarray:
    """Per-column importance laid out like `_sub_blocks_t` of a [rows, cols] chunk."""
    per_row = qw.reshape(-1, n).T  # [n, cols // n]
    return np.ascontiguousarray(np.tile(per_row, (1, rows)))


# ---------------------------------------------------------------------------------------------
# Q4_K


def _round_clip(v: np.ndarray, lo: int, hi: int, in_range: bool, out: np.ndarray) -> np.ndarray:
    """out = clamp(nearest_int(v), lo, hi) as float32; `v` is clobbered.

    When the caller knows |v| < 2**21 everywhere (`in_range`), (v + 1.5*2**23) - 1.5*2**23 is the
    same round-half-even integer as nearest_int, in three float passes; otherwise the bit-exact
    emulation runs (it also maps NaN and Inf as the C code does).
    """
    if in_range:
        v += _MAGIC
        v -= _MAGIC
        return np.clip(v, lo, hi, out=out)
    out[...] = np.clip(_nearest_int(v), lo, hi)
    return out


_SAFE = np.float32(2.0**21)


def _make_qkx(x, w, sum_w, sum_x, nmax, rmin, rdelta, nstep):
    """ggml make_qkx2_quants / make_qkx3_quants (same code when weights are given), per column.

    x, w: [n, N] float32. Returns (scale [N], the_min [N], L [n, N] int32 in 0..nmax).
    """
    f_nmax = _F32(nmax)
    xmin = x.min(axis=0)
    mx = x.max(axis=0)
    mn = np.minimum(xmin, _F32(0))
    flat = mx == mn  # C returns scale 0, L = 0, the_min = -min (qkx3 tests max <= min: same for finite x)
    v, l, wl, t = (np.empty_like(x) for _ in range(4))

    def in_range(isc, off):  # every |isc * (x - off)| of a column is below 2**21
        span = np.maximum(np.abs(mx - off), np.abs(xmin - off))
        return bool((np.abs(isc) * span < _SAFE).all())

    iscale = f_nmax / (mx - mn)
    scale = _F32(1) / iscale
    np.subtract(x, mn, out=v)
    v *= iscale
    _round_clip(v, 0, nmax, in_range(iscale, mn), out=l)
    np.multiply(l, scale, out=t)
    t += mn
    t -= x
    t *= t
    t *= w
    best_err = _seqsum0(t)
    best_is, best_off = iscale, mn  # the L kept so far is nearest_int(best_is * (x - best_off)), clamped
    cur_min = mn.copy()
    for step in range(nstep + 1):
        isc = (_F32(rmin) + _F32(rdelta) * _F32(step) + f_nmax) / (mx - cur_min)
        np.subtract(x, cur_min, out=v)
        v *= isc
        _round_clip(v, 0, nmax, in_range(isc, cur_min), out=l)
        np.multiply(w, l, out=wl)
        sum_l = _seqsum0(wl)
        np.multiply(wl, x, out=t)
        sum_xl = _seqsum0(t)
        np.multiply(wl, l, out=t)
        sum_l2 = _seqsum0(t)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min[pos] = 0
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        np.multiply(l, this_scale, out=t)
        t += this_min
        t -= x
        t *= t
        t *= w
        err = _seqsum0(t)
        upd = (D > 0) & (err < best_err) & ~flat
        if upd.any():
            best_err = np.where(upd, err, best_err)
            best_is = np.where(upd, isc, best_is)
            best_off = np.where(upd, cur_min, best_off)
            scale = np.where(upd, this_scale, scale)
            cur_min = np.where(upd, this_min, cur_min)
    del v, l, wl, t
    L = np.clip(_nearest_int(best_is * (x - best_off)), 0, nmax)
    L[:, flat] = 0
    scale[flat] = 0
    return scale, -cur_min, L


def _make_qp(x, qw, nmax):
    """ggml make_qp_quants over the last axis: x, qw [B, n] float32 -> (scale [B], L [B, n] int)."""
    B, n = x.shape
    mx = np.zeros(B, dtype=np.float32)
    for i in range(n):  # MAX(max, x[i]) from 0
        mx = np.where(mx > x[:, i], mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    f_nmax = _F32(nmax)
    iscale = f_nmax / mx
    Lw = _nearest_int(iscale[:, None] * x) & 0xFF  # stored in uint8_t
    scale = _F32(1) / iscale
    best_mse = np.zeros(B, dtype=np.float32)
    for i in range(n):
        diff = x[:, i] - scale * Lw[:, i].astype(np.float32)
        best_mse += qw[:, i] * diff * diff
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (_F32(0.1) * _F32(step) + f_nmax) / mx
        sc = _F32(1) / isc
        mse = np.zeros(B, dtype=np.float32)
        for i in range(n):
            li = np.minimum(_nearest_int(isc * x[:, i]), nmax).astype(np.float32)
            diff = x[:, i] - sc * li
            mse += qw[:, i] * diff * diff
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, isc, iscale)
    sumlx = np.zeros(B, dtype=np.float32)
    suml2 = np.zeros(B, dtype=np.float32)
    li = np.minimum(_nearest_int(iscale[:, None] * x), nmax)
    Lw = li & 0xFF
    for i in range(n):
        lf = li[:, i].astype(np.float32)
        sumlx += qw[:, i] * x[:, i] * lf
        suml2 += qw[:, i] * lf * lf
    active = ~zero
    for _ in range(5):
        changed = np.zeros(B, dtype=bool)
        for i in range(n):
            w, xi = qw[:, i], x[:, i]
            Li = Lw[:, i].astype(np.float32)
            slx = sumlx - w * xi * Li
            sl2 = suml2 - w * Li * Li
            ok = active & (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                new_l = np.minimum(_nearest_int(xi * sl2 / slx), nmax)
            ok &= new_l != Lw[:, i]
            nf = new_l.astype(np.float32)
            slx = slx + w * xi * nf
            sl2 = sl2 + w * nf * nf
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            Lw[:, i] = np.where(ok, new_l & 0xFF, Lw[:, i])
            sumlx = np.where(ok, slx, sumlx)
            suml2 = np.where(ok, sl2, suml2)
            changed |= ok
        active &= changed
        if not active.any():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(suml2 > 0, sumlx / suml2, _F32(0)).astype(np.float32)
    out[zero] = 0
    Lw[zero] = 0
    return out, Lw


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> ggml's 12-byte layout (ls, lm: [B, 8] ints 0..255)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    s = np.empty((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, :4]
    s[:, 4:8] = lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return s


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml get_scale_min_k4 for j = 0..7: 12 bytes -> (scales, mins) [B, 8] uint8."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _q4_k_chunk(chunk: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = chunk.shape[0]
    x = _sub_blocks_t(chunk, 32)  # [32, S]; sub-block s = 8 * superblock + j
    S = x.shape[1]
    B = S // 8
    with np.errstate(all="ignore"):
        x2 = x * x
        if qw is None:
            av_x = np.sqrt(_seqsum0(x2) / _F32(32))
            w = np.abs(x)
            w += av_x
            rmin, rdelta, nstep = -1.0, 0.1, 20
        else:
            s2 = np.zeros(B, dtype=np.float32)
            x2b = x2.reshape(32, B, 8)
            for j in range(8):  # sum over the 256 values of the super-block in memory order
                for i in range(32):
                    s2 += x2b[i, :, j]
            sigma2 = _F32(2) * s2 / _F32(QK_K)
            w = x2
            w += np.repeat(sigma2, 8)
            np.sqrt(w, out=w)
            w *= _importance_t(qw, rows, 32)
            rmin, rdelta, nstep = -0.9, 0.05, 36
        del x2
        sum_w = _seqsum1(w)
        sum_x = _seqsum1(w * x)
        scales, mins, L = _make_qkx(x, w, sum_w, sum_x, 15, rmin, rdelta, nstep)
        scales = scales.reshape(B, 8)
        mins = mins.reshape(B, 8)
        if qw is None:
            max_scale = np.zeros(B, dtype=np.float32)
            max_min = np.zeros(B, dtype=np.float32)
            for j in range(8):
                max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
                max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
            inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
            inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
            ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
            lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
            d_block = max_scale / _F32(63)
            m_block = max_min / _F32(63)
        else:
            sw = _seqsum0(w).reshape(B, 8)
            d_block, ls = _make_qp(scales, sw, 63)
            m_block, lm = _make_qp(mins, sw, 63)
        del w
        packed = _pack_scale_min_k4(ls, lm)
        d16 = _to_f16(d_block, "Q4_K")
        m16 = _to_f16(m_block, "Q4_K")
        sc, m = _unpack_scale_min_k4(packed)
        d = (d16.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(S)
        dm = (m16.astype(np.float32)[:, None] * m.astype(np.float32)).reshape(S)
        nz = d != 0
        v = x + dm
        v /= d
        Lq = np.clip(_nearest_int(v), 0, 15)
        L = np.where(nz, Lq, L)
    Lb = L.T.reshape(B, 4, 2, 32).astype(np.uint8)  # [block, 64-chunk, low/high half, 32]
    out = np.empty((B, 144), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(B, 2)
    out[:, 2:4] = m16.view(np.uint8).reshape(B, 2)
    out[:, 4:16] = packed
    out[:, 16:] = (Lb[:, :, 0] | (Lb[:, :, 1] << 4)).reshape(B, 128)
    return out


# ---------------------------------------------------------------------------------------------
# Q6_K


def _make_qx(x, qw, nmax):
    """ggml make_qx_quants with rmse_type 1 (weights x^2, or qw when given), per column.

    x: [n, N] float32. Returns (scale [N], L [n, N] int32 in 0..2*nmax-1).
    """
    N = x.shape[1]
    ax = np.abs(x)
    imax = ax.argmax(axis=0)
    cols = np.arange(N)
    mx = x[imax, cols]
    amax = ax[imax, cols]
    zero = amax < GROUP_MAX_EPS
    del ax
    w = x * x if qw is None else qw
    wx = w * x
    f_nmax = _F32(nmax)
    t = np.empty_like(x)
    l = np.empty_like(x)

    def sums(isc):
        np.multiply(x, isc, out=t)
        _round_clip(t, -nmax, nmax - 1, bool((np.abs(isc) * amax < _SAFE).all()), out=l)
        np.multiply(wx, l, out=t)
        slx = _seqsum0(t)
        np.multiply(w, l, out=t)
        np.multiply(t, l, out=t)
        return slx, _seqsum0(t)

    iscale = -f_nmax / mx
    sumlx, suml2 = sums(iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(np.float32)
    best = scale * sumlx
    best_is = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = -(f_nmax + _F32(0.1) * _F32(step)) / mx
        sumlx, suml2 = sums(isc)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if upd.any():
            scale = np.where(upd, sumlx / suml2, scale)
            best = np.where(upd, scale * sumlx, best)
            best_is = np.where(upd, isc, best_is)
    del t, l
    L = np.clip(_nearest_int(best_is * x), -nmax, nmax - 1) + nmax
    L[:, zero] = 0
    scale[zero] = 0
    return scale, L


def _q6_k_chunk(chunk: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    rows = chunk.shape[0]
    x = _sub_blocks_t(chunk, 16)  # [16, S]; sub-block s = 16 * superblock + ib
    S = x.shape[1]
    B = S // 16
    with np.errstate(all="ignore"):
        qwt = None if qw is None else _importance_t(qw, rows, 16)
        scales, L = _make_qx(x, qwt, 32)
        del qwt
        scales = scales.reshape(B, 16)
        imax = np.abs(scales).argmax(axis=1)
        max_scale = scales[np.arange(B), imax]
        zero = np.abs(max_scale) < GROUP_MAX_EPS
        iscale = _F32(-128) / max_scale
        d16 = _to_f16(np.where(zero, _F32(0), _F32(1) / iscale), "Q6_K")
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
        sc[zero] = 0
        d = (d16.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(S)
        v = x / d
        Lq = np.clip(_nearest_int(v), -32, 31) + 32
        L = np.where(d != 0, Lq, L)
    L = L.T.reshape(B, 256)
    L[zero] = 0
    Lb = L.reshape(B, 2, 4, 32).astype(np.uint8)  # [block, 128-half, quarter, 32]
    out = np.empty((B, 210), dtype=np.uint8)
    ql = out[:, :128].reshape(B, 2, 2, 32)
    ql[:, :, 0] = (Lb[:, :, 0] & 0xF) | ((Lb[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (Lb[:, :, 1] & 0xF) | ((Lb[:, :, 3] & 0xF) << 4)
    out[:, 128:192] = (
        (Lb[:, :, 0] >> 4) | ((Lb[:, :, 1] >> 4) << 2) | ((Lb[:, :, 2] >> 4) << 4) | ((Lb[:, :, 3] >> 4) << 6)
    ).reshape(B, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(B, 2)
    return out


# ---------------------------------------------------------------------------------------------
# Decoders (same float32 arithmetic as ggml's dequantize_row_* and gguf-py)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return _f16(blocks, 0) * q.astype(np.float32)


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    B = blocks.shape[0]
    sc, m = _unpack_scale_min_k4(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.astype(np.float32))[:, :, None]  # [B, 8, 1]
    dm = (_f16(blocks, 2) * m.astype(np.float32))[:, :, None]
    qs = blocks[:, 16:].reshape(B, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(B, 8, 32).astype(np.float32)
    return (d * q - dm).reshape(B, QK_K)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    B = blocks.shape[0]
    ql = blocks[:, :128].reshape(B, 2, 2, 32)  # [B, half, l / l+32, 32]
    qh = blocks[:, 128:192].reshape(B, 2, 1, 32)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # quarters 0, 1, 2, 3 of each half
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(B, 16, 16).astype(np.float32)
    d = (_f16(blocks, 208) * scales)[:, :, None]
    return (d * q).reshape(B, QK_K)


# ---------------------------------------------------------------------------------------------
# The registry. llama.cpp's fallbacks (llama-quant.cpp): Q4_K -> Q5_0, Q6_K -> Q8_0.

BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", "encode_q8_0", _q8_0_chunk, _dequant_q8_0, uses_importance=False, fallback=None),
    BlockType("Q4_0", "encode_q4_0", _q4_0_chunk, _dequant_q4_0, uses_importance=False, fallback=None),
    BlockType("Q4_K", "encode_q4_k", _q4_k_chunk, _dequant_q4_k, uses_importance=True, fallback="Q5_0"),
    BlockType("Q6_K", "encode_q6_k", _q6_k_chunk, _dequant_q6_k, uses_importance=True, fallback="Q8_0"),
)}
