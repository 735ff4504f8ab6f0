"""GGML block quantizers (Q8_0, Q4_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), vectorized over every block of a matrix.

Input is a 2-D float matrix in GGUF row order (rows = output features, cols = the contiguous input
dim); output is the raw bytes GGUF stores for it, a uint8 array [rows, cols // block * type_size].

- Q8_0 and Q4_0 are byte-identical to gguf-py's `gguf.quants.quantize` (itself bit-exact with ggml).
- Q3_K, Q4_K, Q5_K and Q6_K follow ggml-quants.c: without importance `quantize_row_q3_K_ref`
  (make_q3_quants), `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` (make_qkx2_quants, weights
  av_x + |x|) and `quantize_row_q6_K_ref` (make_qx_quants, rmse_type 1); with importance
  `quantize_row_q3_K_impl` (make_qx_quants on qw * sqrt(sigma2 + x^2), and on the scales),
  `quantize_row_q4_K_impl` / `q5_K_impl` (make_qkx3_quants on the same weights, make_qp_quants for
  the 6-bit scales) and `quantize_row_q6_K_impl` (make_qx_quants weighted by qw). They reproduce ggml's
  bytes exactly: every float32 operation is done in the C code's order (sums sequential, never
  pairwise), and `nearest_int` is emulated bit for bit.

Layout inside the K-quants: a chunk of rows is cut into sub-blocks and transposed to
[values_per_subblock, n_subblocks], so a per-block scalar is a 1-D tensor and a sequential C sum is
a short Python loop of vector adds. Rows go in chunks of about `_CHUNK_ELEMS` values (converted to
float32 chunk by chunk), so the working memory is a few MB plus the output, whatever the matrix.
The encoders are torch code with no reductions (every sum is that loop of elementwise adds, every
maximum a loop of comparisons or a first-index argmax), so they give the same bytes on the CPU and
on a GPU. On the CPU `quantize` runs the compiled copies of these encoders (`gguf_kernels`, the same
bytes, faster, on every kernel thread); `quantize_reference` runs these, the independent
implementation the tests compare with; on a CUDA device `quantize` runs these on the GPU.

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
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from ..errors import L4QError, NonFiniteWeightError
from ..schemes import true_div as _div

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 to an integer (nearest_int)
_CHUNK_ELEMS = 1 << 17  # values per chunk of rows on the CPU: 512 KB float32 temporaries stay in L2
_CHUNK_ELEMS_CUDA = 1 << 26  # on a GPU: enough sub-blocks per op to fill it, a few GB of temporaries


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
    encode_chunk: Callable[[Tensor, Tensor | None], Tensor]  # torch: (float32 rows, importance) -> blocks
    decode: Callable[[Tensor], Tensor]  # blocks [n, type_size] uint8 -> float32 [n, block_size]
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


def quantize(weights: Any, qtype: str, importance: Any = None, device: Any = "cpu") -> np.ndarray:
    """Quantize a [rows, cols] float matrix to `qtype`'s GGUF bytes, uint8 [rows, cols // block * size].

    `importance` (length `cols`, e.g. an imatrix's mean x^2 per input channel) steers the K-quants'
    scale search toward the channels that matter; Q8_0 and Q4_0 ignore it, as llama.cpp does.
    On the CPU the compiled encoders run; on a CUDA `device` the torch encoders of this module.
    """
    bt = block_type(qtype)
    importance = importance if bt.uses_importance else None
    if torch.device(device).type == "cuda":
        return _encode_rows(weights, bt, importance, torch.device(device))
    return _encode_compiled(weights, bt, importance)


def quantize_reference(weights: Any, qtype: str, importance: Any = None) -> np.ndarray:
    """`quantize` by the torch encoders of this module on the CPU: the independent implementation
    that the compiled kernels are tested against (and the one a GPU runs)."""
    bt = block_type(qtype)
    return _encode_rows(weights, bt, importance if bt.uses_importance else None, torch.device("cpu"))


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
    return bt.decode(torch.from_numpy(raw.reshape(-1, ts))).reshape(-1, cols).numpy()


def quantize_q8_0(w: Any) -> np.ndarray:
    """Q8_0: per 32 values an f16 d = max|x| / 127 and 32 int8 round(x / d), half away from zero."""
    return quantize(w, "Q8_0")


def quantize_q4_0(w: Any) -> np.ndarray:
    """Q4_0: per 32 values an f16 d = x[argmax |x|] / -8 and nibbles trunc(x / d + 8.5), clipped to 15."""
    return quantize(w, "Q4_0")


def _q8_0_chunk(chunk: Tensor, _qw: None) -> Tensor:
    b = chunk.reshape(-1, 32)
    d = _div(b.abs().amax(dim=1, keepdim=True), 127.0)
    inv = torch.where(d == 0, 0.0, _div(1.0, d))  # subnormal d: 1 / d overflows, as in gguf-py and ggml
    q = _c_int(_round_half_away(b * inv)).to(torch.int8)
    o = torch.empty((b.shape[0], 34), dtype=torch.uint8, device=b.device)
    o[:, :2] = _to_f16(d, "Q8_0").view(torch.uint8).reshape(-1, 2)
    o[:, 2:] = q.view(torch.uint8)
    return o


def _q4_0_chunk(chunk: Tensor, _qw: None) -> Tensor:
    b = chunk.reshape(-1, 32)
    imax = b.abs().argmax(dim=1, keepdim=True)  # the first of equal maxima, as the C loop keeps
    d = _div(torch.gather(b, 1, imax), -8.0)
    inv = torch.where(d == 0, 0.0, _div(1.0, d))
    q = _c_int(b * inv + 8.5).clamp_(max=15).to(torch.uint8)
    o = torch.empty((b.shape[0], 18), dtype=torch.uint8, device=b.device)
    o[:, :2] = _to_f16(d, "Q4_0").view(torch.uint8).reshape(-1, 2)
    o[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return o


def quantize_q4_k(w: Any, importance: Any = None) -> np.ndarray:
    """Q4_K as ggml's quantize_q4_K: 8 sub-blocks of 32 with 6-bit scale and min per 256 values."""
    return quantize(w, "Q4_K", importance)


def quantize_q6_k(w: Any, importance: Any = None) -> np.ndarray:
    """Q6_K as ggml's quantize_q6_K: 16 sub-blocks of 16 with int8 scales and an f16 d per 256 values."""
    return quantize(w, "Q6_K", importance)


def _encode_compiled(w: Any, bt: BlockType, qw: Any) -> np.ndarray:
    """Encode a matrix with the compiled kernel, its rows spread over `parallel.threads()` threads."""
    from .. import cpu_kernels, parallel
    from . import gguf_kernels

    src, rows, cols = _matrix(w, bt.name)
    qw = _as_importance(qw, cols)
    parallel.use_kernel_threads()
    bits, shift = _as_bits(src)
    out = np.empty((rows, cols // bt.block_size * bt.type_size), dtype=np.uint8)
    bad, overflow = np.zeros(rows, dtype=bool), np.zeros(rows, dtype=np.float32)
    kernel = getattr(gguf_kernels, bt.kernel)
    if bt.name == "Q8_0" and shift == 16 and cols % 128 == 0 and cpu_kernels.supports_rows(src.T):
        # an expert's view of its stored slice: the stored rows whole, the output rows whole words
        gguf_kernels.encode_q8_0_stored_transposed(*cpu_kernels.row_bits(src.T), out, out.view(np.uint64), bad,
                                                   overflow)
    elif bt.uses_importance:
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
    """The matrix as bits the kernels widen to float32 themselves, in its own layout (the kernels
    read a transposed view in tiles of rows): bf16 as uint16 (shift 16), else float32's uint32."""
    if _is_torch(src) and src.dtype == torch.bfloat16:
        return src.view(torch.int16).numpy().view(np.uint16), 16
    return np.asarray(src.to(torch.float32) if _is_torch(src) else src, dtype=np.float32).view(np.uint32), 0


def _encode_rows(w: Any, bt: BlockType, qw: Any, device: torch.device) -> np.ndarray:
    """Encode a matrix with the torch encoder on `device`, a chunk of rows at a time."""
    src, rows, cols = _matrix(w, bt.name)
    qw = _as_importance(qw, cols)
    qw = None if qw is None else torch.from_numpy(qw).to(device)
    out = np.empty((rows, cols // bt.block_size * bt.type_size), dtype=np.uint8)
    elems = _CHUNK_ELEMS_CUDA if device.type == "cuda" else _CHUNK_ELEMS
    for a, b in _row_spans(rows, cols, elems):
        chunk = torch.as_tensor(src[a:b]).to(device=device, dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(chunk).all()):
            raise NonFiniteWeightError(f"cannot quantize weights holding NaN or Inf (rows {a}..{b - 1})")
        out[a:b] = bt.encode_chunk(chunk, qw).reshape(b - a, -1).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Input handling and small helpers


def _is_torch(a: Any) -> bool:
    return isinstance(a, Tensor)


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


def _to_f16(d: Tensor, qtype: str) -> Tensor:
    """float32 -> float16 with round-to-nearest-even (what GGML_FP32_TO_FP16 does); refuse overflow."""
    h = d.to(torch.float16).contiguous()
    bad = ~torch.isfinite(h)
    if bool(bad.any()):
        _raise_overflow(float(d[bad].abs().max()), qtype)
    return h


def _raise_overflow(big: float, qtype: str) -> None:
    raise ScaleOverflowError(
        f"a {qtype} block scale ({big:.4g}) overflows float16: the weights are too large for {qtype}; "
        "keep this tensor in F32 or BF16"
    )


def _c_int(v: Tensor) -> Tensor:
    """C's float -> int conversion (truncation) as int32; a NaN or Inf becomes 0, which is what the
    x86 conversion (INT_MIN) leaves in the int8 / uint8 the C code stores it in."""
    return torch.where(torch.isfinite(v), v, 0.0).trunc_().to(torch.int32)


def _round_half_away(v: Tensor) -> Tensor:
    """C roundf: nearest integer, halves away from zero (exact: the fraction a - floor(a) is exact)."""
    a = v.abs()
    f = a.floor()
    f += (a - f >= 0.5).to(f.dtype)
    return torch.copysign(f, v)


def _nearest_int(v: Tensor) -> Tensor:
    """ggml's nearest_int bit for bit: add 1.5 * 2**23, read the low mantissa bits (int32).

    Round-half-even for |v| < 2**22; NaN and +-Inf come out as 0 and -4194304 as in the C code.
    """
    return ((v + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _sqrt(v: Tensor) -> Tensor:
    """sqrtf of float32 values, correctly rounded as C's, on every device. torch 2.13's CPU sqrt was
    an ulp off on about 17% of float32 values on an AMD EPYC, even one value at a time: the float64
    root rounded to float32 is within an ulp, then moved by one where the square of the midpoint to
    its neighbour, exact in float64 (25 significant bits), says the value lies beyond it."""
    wide = v.double()
    r = torch.sqrt(wide).float()
    for toward, beyond in ((torch.inf, torch.lt), (0.0, torch.gt)):
        other = torch.nextafter(r, torch.full_like(r, toward))
        mid = (r.double() + other.double()) * 0.5
        r = torch.where(beyond(mid * mid, wide), other, r)
    return r


def _seqsum0(t: Tensor) -> Tensor:
    """Sum over axis 0 in index order, starting from +0.0: the C loop `s = 0; s += t[i]` exactly."""
    s = t[0] + 0.0
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _seqsum1(t: Tensor) -> Tensor:
    """Sum over axis 0 in index order, starting from t[0] (C: `s = t[0]; for i >= 1: s += t[i]`)."""
    s = t[0].clone()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _sub_blocks_t(chunk: Tensor, n: int) -> Tensor:
    """[rows, cols] -> [n, n_subblocks]: column k is the k-th run of n contiguous values."""
    return chunk.reshape(-1, n).T.contiguous()


def _importance_t(qw: Tensor, rows: int, n: int) -> Tensor:
    """Per-column importance laid out like `_sub_blocks_t` of a [rows, cols] chunk."""
    return qw.reshape(-1, n).T.repeat(1, rows).contiguous()  # [n, cols // n] once per row


# ---------------------------------------------------------------------------------------------
# Q4_K


def _sigma_weights(x: Tensor, qw: Tensor, rows: int, super_size: int, factor: float) -> Tensor:
    """The importance-weighted K-quant weights qw * sqrt(sigma2 + x^2) for x [n, S] in sub-blocks of
    n, sigma2 = factor * sum(x^2) / super_size over each super-block (summed in memory order)."""
    n = x.shape[0]
    per = super_size // n
    xb = x.reshape(n, -1, per)
    s2 = torch.zeros(xb.shape[1], dtype=torch.float32, device=x.device)
    for j in range(per):
        for i in range(n):
            s2 += xb[i, :, j] * xb[i, :, j]
    sigma2 = _div(factor * s2, float(super_size))
    w = x * x
    w += torch.repeat_interleave(sigma2, per)
    w = _sqrt(w)
    w *= _importance_t(qw, rows, n)
    return w


def _round_clip(v: Tensor, lo: int, hi: int, in_range: bool, out: Tensor) -> Tensor:
    """out = clamp(nearest_int(v), lo, hi) as float32; `v` is clobbered.

    When the caller knows |v| < 2**21 everywhere (`in_range`), (v + 1.5*2**23) - 1.5*2**23 is the
    same round-half-even integer as nearest_int, in three float passes; otherwise the bit-exact
    emulation runs (it also maps NaN and Inf as the C code does).
    """
    if in_range:
        v += _MAGIC
        v -= _MAGIC
        return torch.clamp(v, lo, hi, out=out)
    out.copy_(_nearest_int(v).clamp_(lo, hi))
    return out


_SAFE = 2.0**21


def _error_(diff: Tensor, mad: bool) -> Tensor:
    """|diff| (use_mad) or diff^2, in place."""
    return diff.abs_() if mad else diff.mul_(diff)


def _make_qkx(x, w, sum_w, sum_x, nmax, rmin, rdelta, nstep, mad=False):
    """ggml make_qkx2_quants / make_qkx3_quants (same code when weights are given), per column;
    `mad`: the error is sum w |diff| (use_mad) instead of sum w diff^2.

    x, w: [n, N] float32. Returns (scale [N], the_min [N], L [n, N] int32 in 0..nmax).
    """
    xmin = x.amin(dim=0)
    mx = x.amax(dim=0)
    mn = torch.clamp(xmin, max=0.0)
    flat = mx == mn  # C returns scale 0, L = 0, the_min = -min (qkx3 tests max <= min: same for finite x)
    v, l, wl, t = (torch.empty_like(x) for _ in range(4))

    def in_range(isc, off):  # every |isc * (x - off)| of a column is below 2**21
        span = torch.maximum((mx - off).abs(), (xmin - off).abs())
        return bool((isc.abs() * span < _SAFE).all())

    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    torch.sub(x, mn, out=v)
    v *= iscale
    _round_clip(v, 0, nmax, in_range(iscale, mn), out=l)
    torch.mul(l, scale, out=t)
    t += mn
    t -= x
    _error_(t, mad)
    t *= w
    best_err = _seqsum0(t)
    best_is, best_off = iscale, mn  # the L kept so far is nearest_int(best_is * (x - best_off)), clamped
    cur_min = mn.clone()
    for step in range(nstep + 1):
        isc = _div(float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)), mx - cur_min)
        torch.sub(x, cur_min, out=v)
        v *= isc
        _round_clip(v, 0, nmax, in_range(isc, cur_min), out=l)
        torch.mul(w, l, out=wl)
        sum_l = _seqsum0(wl)
        torch.mul(wl, x, out=t)
        sum_xl = _seqsum0(t)
        torch.mul(wl, l, out=t)
        sum_l2 = _seqsum0(t)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        torch.mul(l, this_scale, out=t)
        t += this_min
        t -= x
        _error_(t, mad)
        t *= w
        err = _seqsum0(t)
        upd = (D > 0) & (err < best_err) & ~flat
        if bool(upd.any()):
            best_err = torch.where(upd, err, best_err)
            best_is = torch.where(upd, isc, best_is)
            best_off = torch.where(upd, cur_min, best_off)
            scale = torch.where(upd, this_scale, scale)
            cur_min = torch.where(upd, this_min, cur_min)
    del v, l, wl, t
    L = _nearest_int(best_is * (x - best_off)).clamp_(0, nmax)
    L[:, flat] = 0
    scale = torch.where(flat, 0.0, scale)
    return scale, -cur_min, L


def _make_qp(x, qw, nmax):
    """ggml make_qp_quants over the last axis: x, qw [B, n] float32 -> (scale [B], L [B, n] int)."""
    B, n = x.shape
    mx = torch.zeros(B, dtype=torch.float32, device=x.device)
    for i in range(n):  # MAX(max, x[i]) from 0
        mx = torch.where(mx > x[:, i], mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    iscale = _div(float(nmax), mx)
    Lw = _nearest_int(iscale[:, None] * x) & 0xFF  # stored in uint8_t
    scale = _div(1.0, iscale)
    best_mse = torch.zeros(B, dtype=torch.float32, device=x.device)
    for i in range(n):
        diff = x[:, i] - scale * Lw[:, i].float()
        best_mse += qw[:, i] * diff * diff
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = _div(float(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
        sc = _div(1.0, isc)
        mse = torch.zeros(B, dtype=torch.float32, device=x.device)
        for i in range(n):
            li = _nearest_int(isc * x[:, i]).clamp_(max=nmax).float()
            diff = x[:, i] - sc * li
            mse += qw[:, i] * diff * diff
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, isc, iscale)
    sumlx = torch.zeros(B, dtype=torch.float32, device=x.device)
    suml2 = torch.zeros(B, dtype=torch.float32, device=x.device)
    li = _nearest_int(iscale[:, None] * x).clamp_(max=nmax)
    Lw = li & 0xFF
    for i in range(n):
        lf = li[:, i].float()
        sumlx += qw[:, i] * x[:, i] * lf
        suml2 += qw[:, i] * lf * lf
    active = ~zero
    for _ in range(5):
        changed = torch.zeros(B, dtype=torch.bool, device=x.device)
        for i in range(n):
            w, xi = qw[:, i], x[:, i]
            Li = Lw[:, i].float()
            slx = sumlx - w * xi * Li
            sl2 = suml2 - w * Li * Li
            ok = active & (slx > 0) & (sl2 > 0)
            new_l = _nearest_int(xi * sl2 / slx).clamp_(max=nmax)
            ok &= new_l != Lw[:, i]
            nf = new_l.float()
            slx = slx + w * xi * nf
            sl2 = sl2 + w * nf * nf
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            Lw[:, i] = torch.where(ok, new_l & 0xFF, Lw[:, i])
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        active &= changed
        if not bool(active.any()):
            break
    out = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    out[zero] = 0
    Lw[zero] = 0
    return out, Lw


def _pack_scale_min_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """Eight 6-bit scales and mins -> ggml's 12-byte layout (ls, lm: [B, 8] ints 0..255)."""
    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    s = torch.empty((ls.shape[0], 12), dtype=torch.uint8, device=ls.device)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return s


def _unpack_scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """ggml get_scale_min_k4 for j = 0..7: 12 bytes -> (scales, mins) [B, 8] uint8."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


# Q4_K and Q5_K share everything up to their levels' packing: per 32-value sub-block a scale and a
# min searched by make_qkx2 (without importance; Q4_K with rmin -1, 20 steps, Q5_K with rmin -0.5,
# 15 steps) or make_qkx3 (with importance: rmin -0.9, 36 steps, both), then six-bit quantized
# scales and mins under f16 super-block factors, and the levels recomputed from those.
_QKX_REF_SEARCH = {15: (-1.0, 0.1, 20), 31: (-0.5, 0.1, 15)}
_QKX_IMATRIX_SEARCH = (-0.9, 0.05, 36)


def _qkx_super_blocks(chunk: Tensor, qw: Tensor | None, nmax: int, qtype: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Q4_K (nmax 15) / Q5_K (nmax 31) up to the packing: (d f16 [B], dmin f16 [B], the 12 packed
    scale bytes [B, 12], levels [32, S] int in 0..nmax, sub-block s = 8 * super-block + j)."""
    rows = chunk.shape[0]
    x = _sub_blocks_t(chunk, 32)  # [32, S]
    S = x.shape[1]
    B = S // 8
    if qw is None:
        av_x = _sqrt(_div(_seqsum0(x * x), 32.0))
        w = x.abs()
        w += av_x
        rmin, rdelta, nstep = _QKX_REF_SEARCH[nmax]
    else:
        w = _sigma_weights(x, qw, rows, QK_K, 2.0)
        rmin, rdelta, nstep = _QKX_IMATRIX_SEARCH
    sum_w = _seqsum1(w)
    sum_x = _seqsum1(w * x)
    scales, mins, L = _make_qkx(x, w, sum_w, sum_x, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(B, 8)
    mins = mins.reshape(B, 8)
    if qw is None:
        max_scale = torch.zeros(B, dtype=torch.float32, device=x.device)
        max_min = torch.zeros(B, dtype=torch.float32, device=x.device)
        for j in range(8):
            max_scale = torch.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = torch.where(mins[:, j] > max_min, mins[:, j], max_min)
        inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, _div(63.0, max_min), 0.0)
        ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
        lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
        d_block = _div(max_scale, 63.0)
        m_block = _div(max_min, 63.0)
    else:
        sw = _seqsum0(w).reshape(B, 8)
        d_block, ls = _make_qp(scales, sw, 63)
        m_block, lm = _make_qp(mins, sw, 63)
    del w
    packed = _pack_scale_min_k4(ls, lm)
    d16 = _to_f16(d_block, qtype)
    m16 = _to_f16(m_block, qtype)
    sc, m = _unpack_scale_min_k4(packed)
    d = (d16.float()[:, None] * sc.float()).reshape(S)
    dm = (m16.float()[:, None] * m.float()).reshape(S)
    v = x + dm
    v /= d
    L = torch.where(d != 0, _nearest_int(v).clamp_(0, nmax), L)
    return d16, m16, packed, L


def _q4_k_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    d16, m16, packed, L = _qkx_super_blocks(chunk, qw, 15, "Q4_K")
    B = d16.shape[0]
    Lb = L.T.reshape(B, 4, 2, 32).to(torch.uint8)  # [block, 64-chunk, low/high half, 32]
    out = torch.empty((B, 144), dtype=torch.uint8, device=L.device)
    out[:, 0:2] = d16.view(torch.uint8).reshape(B, 2)
    out[:, 2:4] = m16.view(torch.uint8).reshape(B, 2)
    out[:, 4:16] = packed
    out[:, 16:] = (Lb[:, :, 0] | (Lb[:, :, 1] << 4)).reshape(B, 128)
    return out


def _q5_k_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    d16, m16, packed, L = _qkx_super_blocks(chunk, qw, 31, "Q5_K")
    B = d16.shape[0]
    Lb = L.T.reshape(B, 4, 2, 32).to(torch.uint8)  # [block, 64-chunk, first/second 32, 32]
    out = torch.empty((B, 176), dtype=torch.uint8, device=L.device)
    out[:, 0:2] = d16.view(torch.uint8).reshape(B, 2)
    out[:, 2:4] = m16.view(torch.uint8).reshape(B, 2)
    out[:, 4:16] = packed
    # qh[j]: bit 2c the fifth bit of value j of 64-chunk c's first 32, bit 2c + 1 of its second 32
    high = (Lb >> 4) & 1
    shifts = (2 * torch.arange(4, device=L.device, dtype=torch.uint8)).reshape(1, 4, 1)
    qh = torch.zeros((B, 32), dtype=torch.uint8, device=L.device)
    for half in range(2):
        qh |= (high[:, :, half] << (shifts + half)).sum(1, dtype=torch.uint8)
    out[:, 16:48] = qh
    low = Lb & 0xF
    out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(B, 128)
    return out


# ---------------------------------------------------------------------------------------------
# Q6_K


def _make_qx(x, qw, nmax):
    """ggml make_qx_quants with rmse_type 1 (weights x^2, or qw when given), per column.

    x: [n, N] float32. Returns (scale [N], L [n, N] int32 in 0..2*nmax-1).
    """
    ax = x.abs()
    imax = ax.argmax(dim=0, keepdim=True)  # the first of equal maxima, as the C loop keeps
    mx = torch.gather(x, 0, imax)[0]
    amax = torch.gather(ax, 0, imax)[0]
    zero = amax < GROUP_MAX_EPS
    del ax
    w = x * x if qw is None else qw
    wx = w * x
    t = torch.empty_like(x)
    l = torch.empty_like(x)

    def sums(isc):
        torch.mul(x, isc, out=t)
        _round_clip(t, -nmax, nmax - 1, bool((isc.abs() * amax < _SAFE).all()), out=l)
        torch.mul(wx, l, out=t)
        slx = _seqsum0(t)
        torch.mul(w, l, out=t)
        torch.mul(t, l, out=t)
        return slx, _seqsum0(t)

    iscale = _div(-float(nmax), mx)
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    best_is = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = _div(-float(np.float32(nmax) + np.float32(0.1) * np.float32(step)), mx)
        sumlx, suml2 = sums(isc)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if bool(upd.any()):
            scale = torch.where(upd, sumlx / suml2, scale)
            best = torch.where(upd, scale * sumlx, best)
            best_is = torch.where(upd, isc, best_is)
    del t, l
    L = _nearest_int(best_is * x).clamp_(-nmax, nmax - 1) + nmax
    L[:, zero] = 0
    scale = torch.where(zero, 0.0, scale)
    return scale, L


def _q6_k_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    rows = chunk.shape[0]
    x = _sub_blocks_t(chunk, 16)  # [16, S]; sub-block s = 16 * superblock + ib
    S = x.shape[1]
    B = S // 16
    qwt = None if qw is None else _importance_t(qw, rows, 16)
    scales, L = _make_qx(x, qwt, 32)
    del qwt
    scales = scales.reshape(B, 16)
    imax = scales.abs().argmax(dim=1, keepdim=True)
    max_scale = torch.gather(scales, 1, imax)[:, 0]
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _div(-128.0, max_scale)
    d16 = _to_f16(torch.where(zero, 0.0, _div(1.0, iscale)), "Q6_K")
    sc = _nearest_int(iscale[:, None] * scales).clamp_(max=127).to(torch.int8)
    sc[zero] = 0
    d = (d16.float()[:, None] * sc.float()).reshape(S)
    L = torch.where(d != 0, _nearest_int(x / d).clamp_(-32, 31) + 32, L)
    L = L.T.reshape(B, 256)
    L[zero] = 0
    Lb = L.reshape(B, 2, 4, 32).to(torch.uint8)  # [block, 128-half, quarter, 32]
    out = torch.empty((B, 210), dtype=torch.uint8, device=x.device)
    ql = out[:, :128].view(B, 2, 2, 32)
    ql[:, :, 0] = (Lb[:, :, 0] & 0xF) | ((Lb[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (Lb[:, :, 1] & 0xF) | ((Lb[:, :, 3] & 0xF) << 4)
    out[:, 128:192] = (
        (Lb[:, :, 0] >> 4) | ((Lb[:, :, 1] >> 4) << 2) | ((Lb[:, :, 2] >> 4) << 4) | ((Lb[:, :, 3] >> 4) << 6)
    ).reshape(B, 64)
    out[:, 192:208] = sc.view(torch.uint8)
    out[:, 208:210] = d16.view(torch.uint8).reshape(B, 2)
    return out


# ---------------------------------------------------------------------------------------------
# Q2_K


def _q2_k_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    rows = chunk.shape[0]
    x = _sub_blocks_t(chunk, 16)  # [16, S]; sub-block s = 16 * superblock + j
    S = x.shape[1]
    B = S // 16
    if qw is None:  # quantize_row_q2_K_ref: make_qkx2 on |x| weights, least absolute deviation
        w = x.abs()
        scales, mins, L = _make_qkx(x, w, _seqsum1(w), _seqsum1(w * x), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        max_scale = torch.zeros(B, dtype=torch.float32, device=x.device)
        max_min = torch.zeros_like(max_scale)
        for j in range(16):
            max_scale = torch.where(scales[:, j] > max_scale, scales[:, j], max_scale)
            max_min = torch.where(mins[:, j] > max_min, mins[:, j], max_min)
        iscale = torch.where(max_scale > 0, _div(15.0, max_scale), 0.0)
        imin = torch.where(max_min > 0, _div(15.0, max_min), 0.0)
        ls = torch.where(max_scale[:, None] > 0, _nearest_int(iscale[:, None] * scales), 0) & 0xFF
        lm = torch.where(max_min[:, None] > 0, _nearest_int(imin[:, None] * mins), 0)
        d_block = torch.where(max_scale > 0, _div(max_scale, 15.0), 0.0)
        m_block = torch.where(max_min > 0, _div(max_min, 15.0), 0.0)
    else:  # quantize_row_q2_K_impl
        w = _sigma_weights(x, qw, rows, QK_K, 1.0)
        scales, mins, L = _make_qkx(x, w, _seqsum1(w), _seqsum1(w * x), 3, -0.9, 0.05, 36)
        sw = _seqsum0(w).reshape(B, 16)
        d_block, ls = _make_qp(scales.reshape(B, 16), sw, 15)
        m_block, lm = _make_qp(mins.reshape(B, 16), sw, 15)
    sc_bytes = (ls | (lm << 4)) & 0xFF
    d16 = _to_f16(d_block, "Q2_K")
    m16 = _to_f16(m_block, "Q2_K")
    d = (d16.float()[:, None] * (sc_bytes & 0xF).float()).reshape(S)
    dm = (m16.float()[:, None] * (sc_bytes >> 4).float()).reshape(S)
    v = x + dm
    v /= d
    L = torch.where(d != 0, _nearest_int(v).clamp_(0, 3), L)
    Lv = L.T.reshape(B, 2, 4, 32).to(torch.uint8)  # [block, 128-half, quarter, 32]
    out = torch.empty((B, 84), dtype=torch.uint8, device=x.device)
    out[:, 0:16] = sc_bytes.to(torch.uint8)
    out[:, 16:80] = (Lv[:, :, 0] | (Lv[:, :, 1] << 2) | (Lv[:, :, 2] << 4) | (Lv[:, :, 3] << 6)).reshape(B, 64)
    out[:, 80:82] = d16.view(torch.uint8).reshape(B, 2)
    out[:, 82:84] = m16.view(torch.uint8).reshape(B, 2)
    return out


# ---------------------------------------------------------------------------------------------
# Q3_K


def _make_q3(x, nmax):
    """ggml make_q3_quants with do_rmse, per column: x [n, N] float32 -> (scale [N], L [n, N] int32
    in 0..2*nmax-1, or all 0 for an all-zero column)."""
    n = x.shape[0]
    amax = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    mx = torch.zeros_like(amax)
    for i in range(n):  # the first of equal largest |x|, as the C loop keeps
        take = x[i].abs() > amax
        amax = torch.where(take, x[i].abs(), amax)
        mx = torch.where(take, x[i], mx)
    zero = amax < GROUP_MAX_EPS
    iscale = _div(-float(nmax), mx)
    L = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = torch.zeros_like(amax)
    suml2 = torch.zeros_like(amax)
    for i in range(n):
        li = L[i].float()
        sumlx += wx[i] * li
        suml2 += w[i] * li * li
    active = ~zero
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(n):
            li = L[i].float()
            slx = sumlx - wx[i] * li
            ok = active & (slx > 0)
            sl2 = suml2 - w[i] * li * li
            new_l = _nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            ok &= new_l != L[i]
            nf = new_l.float()
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            ok &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(ok, new_l, L[i])
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        active &= changed
        if not bool(active.any()):
            break
    L += nmax
    L[:, zero] = 0
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), L


def _q3_k_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    rows = chunk.shape[0]
    x = _sub_blocks_t(chunk, 16)  # [16, S]; sub-block s = 16 * superblock + j
    S = x.shape[1]
    B = S // 16
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = _make_q3(x, 4)
        scales = scales.reshape(B, 16)
        max_scale = torch.zeros(B, dtype=torch.float32, device=x.device)
        amax = torch.zeros_like(max_scale)
        for j in range(16):  # the first of equal largest |scale|
            take = scales[:, j].abs() > amax
            amax = torch.where(take, scales[:, j].abs(), amax)
            max_scale = torch.where(take, scales[:, j], max_scale)
        live = max_scale != 0
        iscale = _div(-32.0, max_scale)
        ls = _nearest_int(iscale[:, None] * scales).clamp_(-32, 31) + 32
        ls[~live] = 0
        d_block = torch.where(live, _div(1.0, iscale), 0.0)
    else:  # quantize_row_q3_K_impl
        w = _sigma_weights(x, qw, rows, QK_K, 2.0)
        scales, L = _make_qx(x, w, 4)
        sw = _seqsum0(w)
        d_block, Ls = _make_qx(scales.reshape(B, 16).T.contiguous(), sw.reshape(B, 16).T.contiguous(), 32)
        ls = Ls.T
    packed = torch.zeros((B, 12), dtype=torch.int32, device=x.device)
    packed[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    high = ls >> 4
    for k in range(4):
        packed[:, 8:12] |= high[:, 4 * k:4 * k + 4] << (2 * k)
    d16 = _to_f16(d_block, "Q3_K")
    d = (d16.float()[:, None] * (ls - 32).float()).reshape(S)
    L = torch.where(d != 0, _nearest_int(x / d).clamp_(-4, 3) + 4, L)
    Lv = L.T.reshape(B, 256)  # value v of each super-block
    hmask = (Lv > 3).to(torch.uint8).reshape(B, 8, 32)  # bit v // 32 of byte v % 32
    Lv = torch.where(Lv > 3, Lv - 4, Lv).to(torch.uint8).reshape(B, 2, 4, 32)  # [block, 128-half, quarter, 32]
    out = torch.empty((B, 110), dtype=torch.uint8, device=x.device)
    out[:, 0:32] = (hmask << torch.arange(8, dtype=torch.uint8, device=x.device).reshape(1, 8, 1)).sum(1, dtype=torch.uint8)
    out[:, 32:96] = (Lv[:, :, 0] | (Lv[:, :, 1] << 2) | (Lv[:, :, 2] << 4) | (Lv[:, :, 3] << 6)).reshape(B, 64)
    out[:, 96:108] = packed.to(torch.uint8)
    out[:, 108:110] = d16.view(torch.uint8).reshape(B, 2)
    return out


# ---------------------------------------------------------------------------------------------
# IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-uniform grid, blocks of 32 (quantize_row_iq4_nl_impl
# with ntry 7, the path ggml's quantize_iq4_nl / quantize_iq4_xs take with or without importance)

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_NTRY = 7


def _best_index_iq4(x: Tensor) -> Tensor:
    """ggml best_index_int8 over KVALUES_IQ4NL, elementwise: the nearest value's index, ties upward."""
    vals = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=x.device)
    mu = torch.searchsorted(vals, x.contiguous(), right=True).clamp_(1, 15)  # vals[mu - 1] <= x < vals[mu] inside
    lower = (x - vals[mu - 1]) < (vals[mu] - x)
    idx = mu - lower.long()
    idx = torch.where(x <= vals[0], 0, idx)
    return torch.where(x >= vals[15], 15, idx)


def _iq4_block_scales(x: Tensor, w: Tensor) -> Tensor:
    """Per column (32-value block) of x [32, N]: the least-squares scale of the best of ntry = 7
    grid fits, as quantize_row_iq4_nl_impl's search; 0 for an all-zero block."""
    vals = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=x.device)
    n = x.shape[0]
    amax = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    mx = torch.zeros_like(amax)
    for j in range(n):  # the first of equal largest |x|
        take = x[j].abs() > amax
        amax = torch.where(take, x[j].abs(), amax)
        mx = torch.where(take, x[j], mx)
    zero = amax < GROUP_MAX_EPS

    def sums(iscale):
        q = vals[_best_index_iq4(iscale * x)]
        wq = w * q
        sumqx = torch.zeros_like(amax)
        sumq2 = torch.zeros_like(amax)
        for j in range(n):
            sumqx += wq[j] * x[j]
            sumq2 += wq[j] * q[j]
        return sumqx, sumq2

    d = _div(-mx, float(KVALUES_IQ4NL[0]))
    sumqx, sumq2 = sums(_div(1.0, d))
    d = torch.where(sumq2 > 0, sumqx / sumq2, 0.0)
    best = d * sumqx
    for itry in range(-_IQ4_NTRY, _IQ4_NTRY + 1):
        sumqx, sumq2 = sums(_div(float(itry + KVALUES_IQ4NL[0]), mx))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, 0.0, d)


def _iq4_weights(x: Tensor, qw: Tensor | None, rows: int, super_size: int) -> Tensor:
    """x [32, S] in blocks of 32: x^2, or qw * sqrt(sigma2 + x^2) with sigma2 = 2 mean x^2 over each
    super-block of `super_size` values."""
    return x * x if qw is None else _sigma_weights(x, qw, rows, super_size, 2.0)


def _pack_iq4(L: Tensor) -> Tensor:
    """Indices [32, S] -> 16 bytes per block: value j in the low nibble of byte j, value 16 + j high."""
    Lb = L.T.to(torch.uint8)
    return Lb[:, :16] | (Lb[:, 16:] << 4)


def _iq4_nl_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    x = _sub_blocks_t(chunk, 32)  # [32, S]
    S = x.shape[1]
    scales = _iq4_block_scales(x, _iq4_weights(x, qw, chunk.shape[0], 32))
    d16 = _to_f16(scales, "IQ4_NL")
    inv = torch.where(scales != 0, _div(1.0, scales), 0.0)  # from the float scale, as ggml
    out = torch.empty((S, 18), dtype=torch.uint8, device=x.device)
    out[:, 0:2] = d16.view(torch.uint8).reshape(S, 2)
    out[:, 2:] = _pack_iq4(_best_index_iq4(inv * x))
    return out


def _iq4_xs_chunk(chunk: Tensor, qw: Tensor | None) -> Tensor:
    x = _sub_blocks_t(chunk, 32)  # [32, S]; block s = 8 * super-block + ib
    S = x.shape[1]
    B = S // 8
    scales = _iq4_block_scales(x, _iq4_weights(x, qw, chunk.shape[0], QK_K)).reshape(B, 8)
    amax = torch.zeros(B, dtype=torch.float32, device=x.device)
    max_scale = torch.zeros_like(amax)
    for ib in range(8):
        take = scales[:, ib].abs() > amax
        amax = torch.where(take, scales[:, ib].abs(), amax)
        max_scale = torch.where(take, scales[:, ib], max_scale)
    d = -max_scale / 32  # -0.0 for an all-zero super-block, kept in its f16 bits as in ggml
    d16 = _to_f16(d, "IQ4_XS")
    inv = torch.where(d != 0, _div(1.0, d), 0.0)
    ls = _nearest_int(inv[:, None] * scales).clamp_(-32, 31)
    dl = (d[:, None] * ls.float()).reshape(S)
    idl = torch.where(dl != 0, _div(1.0, dl), 0.0)
    L = _best_index_iq4(idl * x)
    ls = (ls + 32).to(torch.int32)
    out = torch.empty((B, 136), dtype=torch.uint8, device=x.device)
    out[:, 0:2] = d16.view(torch.uint8).reshape(B, 2)
    high = torch.zeros(B, dtype=torch.int32, device=x.device)
    for ib in range(8):
        high |= (ls[:, ib] >> 4) << (2 * ib)
    out[:, 2] = (high & 0xFF).to(torch.uint8)
    out[:, 3] = (high >> 8).to(torch.uint8)
    low = (ls & 0xF).to(torch.uint8)
    out[:, 4:8] = low[:, 0::2] | (low[:, 1::2] << 4)
    out[:, 8:] = _pack_iq4(L).reshape(B, 128)
    return out


# ---------------------------------------------------------------------------------------------
# Decoders (same float32 arithmetic as ggml's dequantize_row_* and gguf-py)


def _f16(blocks: Tensor, at: int) -> Tensor:
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _dequant_q8_0(blocks: Tensor) -> Tensor:
    return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _dequant_q4_0(blocks: Tensor) -> Tensor:
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=1).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


def _dequant_q2_k(blocks: Tensor) -> Tensor:
    B = blocks.shape[0]
    sc = blocks[:, 0:16]
    qs = blocks[:, 16:80].reshape(B, 2, 1, 32)
    shifts = (2 * torch.arange(4, device=blocks.device, dtype=torch.uint8)).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(B, 16, 16).float()
    d = (_f16(blocks, 80) * (sc & 0xF).float())[:, :, None]
    dm = (_f16(blocks, 82) * (sc >> 4).float())[:, :, None]
    return (d * q - dm).reshape(B, QK_K)


def _dequant_q3_k(blocks: Tensor) -> Tensor:
    B = blocks.shape[0]
    hm = blocks[:, 0:32].reshape(B, 1, 32)
    qs = blocks[:, 32:96].reshape(B, 2, 1, 32)
    sb = blocks[:, 96:108].long()
    j = torch.arange(16, device=blocks.device)
    sc = ((sb[:, j % 8] >> (4 * (j // 8))) & 0xF) | (((sb[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)
    shifts = (2 * torch.arange(4, device=blocks.device, dtype=torch.uint8)).reshape(1, 1, 4, 1)
    low = ((qs >> shifts) & 3).reshape(B, 8, 32).to(torch.int8)  # value v: bits of qs[32 * (v // 128) + v % 32]
    bit = (torch.arange(8, device=blocks.device, dtype=torch.uint8)).reshape(1, 8, 1)
    high = (hm >> bit) & 1  # [B, 8, 32]: bit v // 32 of hmask[v % 32]
    q = (low - torch.where(high.bool(), 0, 4).to(torch.int8)).reshape(B, 16, 16).float()
    d = (_f16(blocks, 108) * (sc - 32).float())[:, :, None]
    return (d * q).reshape(B, QK_K)


def _dequant_q4_k(blocks: Tensor) -> Tensor:
    B = blocks.shape[0]
    sc, m = _unpack_scale_min_k4(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float())[:, :, None]  # [B, 8, 1]
    dm = (_f16(blocks, 2) * m.float())[:, :, None]
    qs = blocks[:, 16:].reshape(B, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(B, 8, 32).float()
    return (d * q - dm).reshape(B, QK_K)


def _dequant_q5_k(blocks: Tensor) -> Tensor:
    B = blocks.shape[0]
    sc, m = _unpack_scale_min_k4(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float())[:, :, None]  # [B, 8, 1]
    dm = (_f16(blocks, 2) * m.float())[:, :, None]
    qh = blocks[:, 16:48].reshape(B, 1, 1, 32)
    shifts = (2 * torch.arange(4, device=blocks.device, dtype=torch.uint8)).reshape(1, 4, 1, 1)
    high = (qh >> (shifts + torch.tensor([0, 1], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 2, 1))) & 1
    qs = blocks[:, 48:].reshape(B, 4, 1, 32)
    low = torch.cat([qs & 0xF, qs >> 4], dim=2)  # [B, 64-chunk, first/second 32, 32]
    q = (low | (high << 4)).reshape(B, 8, 32).float()
    return (d * q - dm).reshape(B, QK_K)


def _dequant_q6_k(blocks: Tensor) -> Tensor:
    B = blocks.shape[0]
    ql = blocks[:, :128].reshape(B, 2, 2, 32)  # [B, half, l / l+32, 32]
    qh = blocks[:, 128:192].reshape(B, 2, 1, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # quarters 0, 1, 2, 3 of each half
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(B, 16, 16).float()
    d = (_f16(blocks, 208) * scales)[:, :, None]
    return (d * q).reshape(B, QK_K)


def _dequant_iq4_nl(blocks: Tensor) -> Tensor:
    vals = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=blocks.device)
    qs = blocks[:, 2:18].long()
    return _f16(blocks, 0) * torch.cat([vals[qs & 0xF], vals[qs >> 4]], dim=1)


def _dequant_iq4_xs(blocks: Tensor) -> Tensor:
    B = blocks.shape[0]
    vals = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=blocks.device)
    high = blocks[:, 2].long() | (blocks[:, 3].long() << 8)
    ib = torch.arange(8, device=blocks.device)
    low = (blocks[:, 4 + ib // 2].long() >> (4 * (ib % 2))) & 0xF
    ls = (low | (((high[:, None] >> (2 * ib)) & 3) << 4)) - 32
    dl = (_f16(blocks, 0) * ls.float())[:, :, None]  # [B, 8, 1]
    qs = blocks[:, 8:].reshape(B, 8, 16).long()
    return (dl * torch.cat([vals[qs & 0xF], vals[qs >> 4]], dim=2)).reshape(B, QK_K)


# ---------------------------------------------------------------------------------------------
# The registry. llama.cpp's fallbacks (llama-quant.cpp): Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0.

BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", "encode_q8_0", _q8_0_chunk, _dequant_q8_0, uses_importance=False, fallback=None),
    BlockType("Q4_0", "encode_q4_0", _q4_0_chunk, _dequant_q4_0, uses_importance=False, fallback=None),
    BlockType("Q2_K", "encode_q2_k", _q2_k_chunk, _dequant_q2_k, uses_importance=True, fallback="Q4_0"),
    BlockType("Q3_K", "encode_q3_k", _q3_k_chunk, _dequant_q3_k, uses_importance=True, fallback="Q4_0"),
    BlockType("Q4_K", "encode_q4_k", _q4_k_chunk, _dequant_q4_k, uses_importance=True, fallback="Q5_0"),
    BlockType("Q5_K", "encode_q5_k", _q5_k_chunk, _dequant_q5_k, uses_importance=True, fallback="Q5_1"),
    BlockType("Q6_K", "encode_q6_k", _q6_k_chunk, _dequant_q6_k, uses_importance=True, fallback="Q8_0"),
    BlockType("IQ4_NL", "encode_iq4_nl", _iq4_nl_chunk, _dequant_iq4_nl, uses_importance=True, fallback=None),
    BlockType("IQ4_XS", "encode_iq4_xs", _iq4_xs_chunk, _dequant_iq4_xs, uses_importance=True, fallback="IQ4_NL"),
)}
