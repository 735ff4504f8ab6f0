"""Tests for llama4_quant.schemes: float64 references, compressed-tensors as an independent implementation, edges."""

from __future__ import annotations

import json

import pytest
import torch

from llama4_quant import schemes as S
from llama4_quant.errors import NonFiniteWeightError
from llama4_quant.formats import compressed_tensors as ct

BF16 = torch.bfloat16
TINY = torch.finfo(BF16).tiny
BF16_MAX = torch.finfo(BF16).max


# ----------------------------------------------------------------------------- float64 references


def ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x (x positive, normal), computed in float64 from the significand."""
    m, e = torch.frexp(x.double())  # x = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ceil(m * 256) / 256, e.double())


def ref_scales(w: torch.Tensor, group: int, half_range: float) -> torch.Tensor:
    absmax = w.double().abs().unflatten(-1, (w.shape[1] // group, group)).amax(-1)
    return ceil_bf16(torch.clamp(absmax / half_range, min=TINY))


def ref_int(w: torch.Tensor, s: torch.Tensor, group: int, qmin: int, qmax: int) -> torch.Tensor:
    x = w.double().unflatten(-1, (w.shape[1] // group, group)) / s.double().unsqueeze(-1)
    return torch.round(x).clamp(qmin, qmax).flatten(-2)  # torch.round: half to even


def e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """All non-negative finite e4m3fn values (ascending) and their 7-bit codes, from the format definition."""
    values, codes = [], []
    for exp in range(16):
        for man in range(8):
            if exp == 15 and man == 7:
                continue  # NaN
            values.append(man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
            codes.append(exp * 8 + man)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(codes)


def ref_fp8(x: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3fn value (ties to even code) of float64 x, saturating at 448."""
    values, codes = e4m3_table()
    a = x.abs().clamp(max=448.0)
    hi = torch.searchsorted(values, a).clamp(max=len(values) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    return torch.where(pick_hi, values[hi], values[lo]) * torch.sign(x)


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """BF16 matrix ~N(0, 0.02) with outliers, a zero group, a tiny-valued group and one wide-range row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    idx = torch.randint(0, rows * cols, (rows * cols // 200,), generator=g)
    w.view(-1)[idx] *= 40.0
    w[0, :128] = 0.0
    w[1, :128] *= 1e-30
    w[2] *= torch.logspace(-20, 20, cols)
    return w.to(BF16)


def fp8_bound(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.maximum(w.double().abs() * 2.0**-4, s.double() * 2.0**-10)


# ------------------------------------------------------------------------------------- int4 / int8


@pytest.mark.parametrize("seed", [0, 1])
def test_int4_matches_float64_reference(seed: int) -> None:
    w = random_weight(48, 1024, seed)
    s = S.int4_scales(w)
    assert s.dtype == BF16 and s.shape == (48, 8)
    ref_s = ref_scales(w, 128, 7.5)
    assert torch.equal(s.double(), ref_s)
    q = S.int4_quantize(w, s)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert torch.equal(q.double(), ref_int(w, ref_s, 128, -8, 7))
    d = S.int4_dequantize(q, s)
    assert d.dtype == torch.float32
    s_full = ref_s.repeat_interleave(128, dim=1)
    assert torch.equal(d.double(), q.double() * s_full)
    err = (w.double() - d.double()).abs()
    assert bool((err <= s_full / 2).all())
    assert float((err / s_full).max()) > 0.4  # the bound is tight: a wrong scale would fail one side


def test_int8_matches_float64_reference() -> None:
    w = random_weight(64, 384, 3)
    s = S.int8_scales(w)
    assert s.dtype == BF16 and s.shape == (64, 1)
    ref_s = ref_scales(w, 384, 127.5)
    assert torch.equal(s.double(), ref_s)
    q = S.int8_quantize(w, s)
    assert q.dtype == torch.int8
    assert torch.equal(q.double(), ref_int(w, ref_s, 384, -128, 127))
    d = S.int8_dequantize(q, s)
    assert torch.equal(d.double(), q.double() * ref_s)
    err = (w.double() - d.double()).abs()
    assert bool((err <= ref_s / 2).all())
    assert float((err / ref_s).max()) > 0.4


def test_fp8_matches_float64_reference() -> None:
    w = random_weight(64, 384, 4)
    s = S.fp8_scales(w)
    assert s.dtype == BF16 and s.shape == (64, 1)
    ref_s = ref_scales(w, 384, 448.0)
    assert torch.equal(s.double(), ref_s)
    q = S.fp8_quantize(w, s)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.double(), ref_fp8(w.double() / ref_s))
    d = S.fp8_dequantize(q, s)
    assert torch.equal(d.double(), q.double() * ref_s)
    err = (w.double() - d.double()).abs()
    bound = fp8_bound(w, ref_s)
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.4


def test_scales_round_up_never_clamp() -> None:
    """The stored scale covers absmax, and is the smallest bf16 that does."""
    w = random_weight(64, 1024, 5)
    absmax = w.double().abs().unflatten(-1, (8, 128)).amax(-1)
    s = S.int4_scales(w)
    below = (s.view(torch.int16) - 1).view(BF16).double()  # the previous bf16 value
    assert bool((s.double() * 7.5 >= absmax).all())
    assert bool(((below * 7.5 < absmax) | (s == TINY)).all())


@pytest.mark.parametrize("half_range", [7.5, 127.5, 448.0])
def test_bf16_scales_are_the_smallest_covering_absmax_for_every_bf16_absmax(half_range: float) -> None:
    """The compiled scale rule against a float64 search, for every finite bf16 absmax (all a bf16
    weight can have) and float32 ones (shrunk by the mse search): the smallest bf16 s >= the
    smallest normal with s * half_range >= absmax."""
    every = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(BF16).float()
    shrunk = torch.rand(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    absmax = torch.cat([every, (every[::7] * shrunk[:len(every[::7])]).float()])
    candidates = torch.arange(0x0080, 0x7F80, dtype=torch.int32).to(torch.int16).view(BF16).double()  # normals
    ref = candidates[torch.searchsorted(candidates * half_range, absmax.double())]
    got = S._symmetric_scale(absmax, half_range, BF16)
    assert got.dtype == BF16 and torch.equal(got.double(), ref)
    with pytest.raises(NonFiniteWeightError):
        S._symmetric_scale(torch.tensor([1.0, float("inf")]), half_range, BF16)


def test_float32_input_within_slack() -> None:
    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, 512, generator=g) * 3.0
    w_before = w.clone()
    for scale_dtype in (BF16, torch.float32):
        s = S.int4_scales(w, scale_dtype=scale_dtype)
        assert s.dtype == scale_dtype
        d = S.int4_dequantize(S.int4_quantize(w, s), s)
        s_full = s.double().repeat_interleave(128, dim=1)
        err = (w.double() - d.double()).abs()
        assert bool((err <= s_full / 2 + 2.0**-22 * (w.double().abs() + s_full)).all())
    assert torch.equal(w, w_before)  # the input is never modified in place


def test_other_group_sizes_and_fp16_scales() -> None:
    w = (torch.randn(16, 256, generator=torch.Generator().manual_seed(7)) * 100).to(BF16)
    s = S.int4_scales(w, group_size=32, scale_dtype=torch.float16)
    assert s.shape == (16, 8) and s.dtype == torch.float16
    d = S.int4_dequantize(S.int4_quantize(w, s, 32), s, 32)
    assert bool(((w.double() - d.double()).abs() <= s.double().repeat_interleave(32, 1) / 2).all())
    with pytest.raises(ValueError, match="group_size"):
        S.int4_scales(w, group_size=100)
    with pytest.raises(ValueError, match="float16"):
        S.int4_scales(torch.full((2, 128), 1e6, dtype=BF16), scale_dtype=torch.float16)


# ----------------------------------------------------------------------------------------- packing


def all_values_all_positions() -> torch.Tensor:
    """Rows (v, p): value v at position p of every 8-word, the other positions a different pattern."""
    rows = []
    for v in range(-8, 8):
        for p in range(8):
            row = torch.tensor([(v + 3 * k + 5) % 16 - 8 for k in range(8)] * 4, dtype=torch.int8)
            row[p::8] = v
            rows.append(row)
    return torch.stack(rows)


def test_pack_layout_and_roundtrip() -> None:
    q = all_values_all_positions()  # [128, 32]
    packed = S.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (128, 4)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    for j in range(32):
        nibble = (words[:, j // 8] >> (4 * (j % 8))) & 0xF
        assert torch.equal(nibble, q[:, j].to(torch.int64) + 8)
    assert bool((packed < 0).any())  # top nibble >= 8 makes a negative signed word
    assert torch.equal(S.unpack_int4(packed, 32), q)


def test_pack_matches_compressed_tensors() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(8)
    stored = torch.randint(-8, 8, (256, 150), generator=g, dtype=torch.int8)  # an expert's [in, out] layout
    transposed = stored[:, 3:140].T  # 137 rows: a partial tile of the compiled packer
    assert S.stored_transposed(transposed)
    for q in (all_values_all_positions(), torch.randint(-8, 8, (37, 256), generator=g, dtype=torch.int8), transposed):
        ours = S.pack_int4(q)
        theirs = pack_to_int32(q, 4)
        assert torch.equal(ours, theirs)
        assert torch.equal(unpack_from_int32(ours, 4, q.shape), q)
        assert torch.equal(S.unpack_int4(theirs, q.shape[1]), q)
    # compressed-tensors pads rows that are not a multiple of 8; unpack accepts its words
    q = torch.randint(-8, 8, (5, 20), generator=g, dtype=torch.int8)
    assert torch.equal(S.unpack_int4(pack_to_int32(q, 4), 20), q)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        S.pack_int4(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        S.pack_int4(torch.full((2, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        S.pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="in_features"):
        S.unpack_int4(torch.zeros(2, 4, dtype=torch.int32), 40)


# ------------------------------------------------------------------------- compressed-tensors agreement


def ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(symmetric=True, **kw)


def test_agrees_with_compressed_tensors_quantize_dequantize() -> None:
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    w = random_weight(32, 512, 9)
    cases = [
        (S.int4_scales, S.int4_quantize, S.int4_dequantize, ct_args(num_bits=4, type="int", strategy="group", group_size=128), torch.int8),
        (S.int8_scales, S.int8_quantize, S.int8_dequantize, ct_args(num_bits=8, type="int", strategy="channel"), torch.int8),
        (S.fp8_scales, S.fp8_quantize, S.fp8_dequantize, ct_args(num_bits=8, type="float", strategy="channel"), torch.float8_e4m3fn),
    ]
    for scales, quant, dequant, args, qdtype in cases:
        s = scales(w)
        q = quant(w, s)
        # same stored scale, float32 arithmetic: identical values
        ct_q = quantize(x=w.float(), scale=s.float(), zero_point=None, args=args, dtype=qdtype)
        assert torch.equal(ct_q.view(torch.int8), q.view(torch.int8))
        ours = dequant(q, s)
        assert torch.equal(dequantize(x_q=q, scale=s.float(), args=args, dtype=torch.float32), ours)
        # with the bf16 scale compressed-tensors multiplies in bf16: the bf16 rounding of ours
        assert torch.equal(dequantize(x_q=q, scale=s, args=args), ours.to(BF16))


def test_scale_is_compressed_tensors_scale_or_one_step_above() -> None:
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = random_weight(64, 1024, 10)
    groups = w.unflatten(-1, (8, 128))
    ct_s, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), ct_args(num_bits=4, type="int", strategy="group", group_size=128))
    s = S.int4_scales(w)
    nonzero = ct_s > torch.finfo(BF16).eps  # compressed-tensors gives zero groups eps, l4q gives tiny
    assert bool((s[nonzero] >= ct_s[nonzero]).all())
    step_up = (ct_s.view(torch.int16) + 1).view(BF16)
    assert bool(((s == ct_s) | (s == step_up))[nonzero].all())


# ------------------------------------------------------------------------------------------- edges


def all_quantizers(w: torch.Tensor):
    """(name, dequantized float32, scale broadcast to w, q, per-element bound, bf16 decode) for each scheme."""
    out = []
    s = S.int4_scales(w)
    q = S.int4_quantize(w, s)
    sf = s.double().repeat_interleave(128, 1)
    bf16_decode = q.to(BF16).unflatten(-1, (w.shape[1] // 128, 128)) * s.unsqueeze(-1)
    out.append(("int4", S.int4_dequantize(q, s), sf, q, sf / 2, bf16_decode))
    s = S.int8_scales(w)
    q = S.int8_quantize(w, s)
    out.append(("int8", S.int8_dequantize(q, s), s.double().expand_as(w), q, s.double() / 2, q.to(BF16) * s))
    s = S.fp8_scales(w)
    q = S.fp8_quantize(w, s)
    out.append(("fp8", S.fp8_dequantize(q, s), s.double().expand_as(w), q, fp8_bound(w, s), q.to(BF16) * s))
    return out


def assert_sound(w: torch.Tensor) -> None:
    for name, d, s, q, bound, bf16_decode in all_quantizers(w):
        assert bool(torch.isfinite(s).all() & (s > 0).all()), name
        assert bool(torch.isfinite(d).all()), name
        assert bool(torch.isfinite(bf16_decode).all()), name  # what transformers computes on load
        assert bool(((w.double() - d.double()).abs() <= bound).all()), name
        assert bool((d[w == 0] == 0).all()), name
        if name != "fp8":
            assert int(q.min()) >= (-8 if name == "int4" else -128) and int(q.max()) <= (7 if name == "int4" else 127)


def test_all_zero_matrix() -> None:
    w = torch.zeros(4, 256, dtype=BF16)
    for name, d, s, q, _, _ in all_quantizers(w):
        assert bool((s == TINY).all()), name
        assert bool((q.float() == 0).all()) and bool((d == 0).all()), name
    assert_sound(w)


@pytest.mark.parametrize(
    "fill",
    [
        pytest.param({(0, 0): 3e38}, id="huge"),
        pytest.param({(0, 5): -3e38, (1, 200): 3e38}, id="huge-negative"),
        pytest.param({(0, 0): BF16_MAX, (1, 0): -BF16_MAX, (2, 0): -torch.finfo(BF16).min}, id="bf16-max"),
        pytest.param({(0, 0): 1e-40, (0, 1): -9.2e-41, (1, 3): TINY / 2}, id="subnormal"),
        pytest.param({(0, 0): 3e38, (0, 1): 1e-40, (0, 2): -1.0, (0, 3): 1e-30}, id="mixed"),
    ],
)
def test_extreme_values(fill: dict) -> None:
    w = torch.zeros(3, 256, dtype=BF16)
    for (r, c), v in fill.items():
        w[r, c] = v
    assert_sound(w)


def test_every_positive_bf16_magnitude() -> None:
    """Rows [a, -a, 0, ...] for all 32640 finite positive bf16 a (subnormals to max): every bound and decode holds."""
    a = torch.arange(1, 0x7F80, dtype=torch.int16).view(BF16)
    w = torch.zeros(a.numel(), 128, dtype=BF16)
    w[:, 0], w[:, 1] = a, -a
    assert_sound(w)


def test_top_range_negative_tie_clamps_at_minus_qmax() -> None:
    """-bf16 max is an exact -127.5 tie for int8 (scale 2**121): q must be -127, since -128 * 2**121 is Inf."""
    w = torch.zeros(1, 128, dtype=BF16)
    w[0, 0] = -BF16_MAX
    s = S.int8_scales(w)
    assert float(s) == 2.0**121
    assert int(S.int8_quantize(w, s)[0, 0]) == -127
    w[0, 0] = -127.5  # scale 1.0, an ordinary -127.5 tie keeps compressed-tensors' -128 (round half to even, clamp at qmin)
    s = S.int8_scales(w)
    assert int(S.int8_quantize(w, s)[0, 0]) == -128


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_int_lower_clamp_marks_exactly_the_scales_whose_qmin_multiple_overflows(dtype) -> None:
    """-qmax where qmin * scale overflows `dtype`, else qmin; None where no scale does. Scales at and
    one step either side of the largest that still fits, with NaN beside them, against the
    elementwise float64 test."""
    big = torch.finfo(dtype).max
    for qmin, qmax in ((-8, 7), (-128, 127)):
        edge = torch.tensor(big / -qmin, dtype=torch.float64).to(dtype)  # nearest: one side of the edge
        bits = edge.view(S._BITS_VIEW[dtype])
        around = torch.stack([bits - 1, bits, bits + 1]).view(dtype)
        for scale in (around[:1], around, torch.cat([around[:2], torch.tensor([float("nan")], dtype=dtype)]),
                      torch.cat([torch.tensor([float("nan")], dtype=dtype), around]), around[:0]):
            over = scale.double() * -qmin > big
            low = S.int_lower_clamp(scale.reshape(-1, 1), qmin, qmax)
            if not bool(over.any()):
                assert low is None
            else:
                expected = torch.where(over, float(-qmax), float(qmin)).to(torch.float32).reshape(-1, 1)
                assert torch.equal(low, expected)
        assert S.int_lower_clamp(around.reshape(-1, 1), qmin, qmax) is not None  # the case is covered


def test_non_finite_input_to_scales_raises() -> None:
    w = torch.zeros(2, 128, dtype=BF16)
    w[1, 7] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        S.int4_scales(w)


@pytest.mark.parametrize("name", [n for n, s in ct.SCHEMES.items() if s.rtn_refuses_non_finite])
def test_schemes_that_say_so_refuse_non_finite_weights_in_their_rtn_encoding(name: str) -> None:
    """The walk's reader skips its own NaN/Inf pass over a weight that such a scheme encodes by RTN,
    so the encoding must refuse one anywhere: NaN and both infinities, in the first and last row and
    column, in a Linear's own rows and in an expert's transposed view (the compiled kernels' inputs)."""
    scheme = ct.get_scheme(name)
    g = torch.Generator().manual_seed(3)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for row, col in ((0, 0), (255, 511), (130, 3)):
            stored = torch.randn(512, 256, generator=g).to(BF16)  # an expert's [in, out]
            stored[col, row] = bad
            for w in (stored.T, stored.T.contiguous()):  # [out, in]: the view, and a Linear's own rows
                with pytest.raises(NonFiniteWeightError):
                    scheme.encode_weight("m", w)


# ---------------------------------------------------------------------------------------- check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_raises_with_name_and_count(bad: float) -> None:
    w = torch.randn(8, 64).to(BF16)
    w[1, 2] = w[5, 60] = w[7, 0] = bad
    with pytest.raises(NonFiniteWeightError) as info:
        S.check_finite(w, "model.layers.0.mlp.down_proj.weight")
    assert str(info.value) == "model.layers.0.mlp.down_proj.weight: 3 non-finite values (NaN/Inf) in the source weight"


def test_check_finite_passes_finite() -> None:
    w = torch.tensor([[BF16_MAX, -BF16_MAX, 1e-40, 0.0]], dtype=BF16)
    S.check_finite(w, "w")
    S.check_finite(torch.zeros(0, 8, dtype=BF16), "empty")
    S.check_finite(torch.randn(4, 4, dtype=torch.float32), "f32")


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32, torch.float64])
def test_count_non_finite_agrees_with_torch_on_every_bit_pattern_class(dtype) -> None:
    from llama4_quant.cpu_kernels import count_non_finite

    bits = {BF16: 16, torch.float16: 16, torch.float32: 32, torch.float64: 64}[dtype]
    int_dtype = {16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]
    g = torch.Generator().manual_seed(0)
    # random bit patterns: NaNs with payloads, both infinities, subnormals, -0, the largest finite
    raw = torch.randint(-(2 ** (min(bits, 63) - 1)), 2 ** (min(bits, 63) - 1), (64, 96), generator=g, dtype=torch.int64)
    w = raw.to(int_dtype).view(dtype)
    w[0, :4] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, float("inf"), -0.0], dtype=dtype)
    expected = int((~torch.isfinite(w)).sum())
    assert expected > 0
    assert count_non_finite(w) == expected
    assert count_non_finite(w.T) == expected  # not contiguous: torch's own count
    assert count_non_finite(w[:, :0]) == 0


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_count_non_finite_finds_one_among_the_largest_finite_values(dtype) -> None:
    """The fast path (no NaN/Inf when the largest magnitude is below the exponent mask) at its edge:
    +-max finite gives 0, and a single NaN or Inf of either sign anywhere is found."""
    from llama4_quant.cpu_kernels import count_non_finite

    big = torch.finfo(dtype).max
    w = torch.tensor([big, -big] * 500, dtype=dtype)
    assert count_non_finite(w) == 0
    for bad in (float("inf"), -float("inf"), float("nan"), -float("nan")):
        for at in (0, 517, 999):
            v = w.clone()
            v[at] = bad
            assert count_non_finite(v) == 1


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_group_absmax_of_rows_equals_torch(dtype, threads) -> None:
    """Groups of 128 rows, and one group of all 512 (a per-channel maximum: on two threads its parts'
    maxima combine)."""
    from llama4_quant import parallel
    from llama4_quant.cpu_kernels import group_absmax_of_rows

    g = torch.Generator().manual_seed(1)
    stored = (torch.randn(512, 96, generator=g) * torch.logspace(-30, 4, 96)).to(dtype)  # subnormals to large
    stored[3, 21], stored[130, 23], stored[511, 24] = -torch.finfo(dtype).max, -0.0, torch.finfo(dtype).max
    w = stored[:, 16:80]  # a strided view, as the gate half of gate_up_proj is
    parallel.set_threads(threads)
    try:
        for group_rows in (128, 512):
            expected = w.abs().unflatten(0, (512 // group_rows, group_rows)).amax(dim=1)
            assert torch.equal(group_absmax_of_rows(w, group_rows), expected)
        poisoned = w.clone()
        poisoned[200, 3] = float("nan")
        assert group_absmax_of_rows(poisoned, 128)[1, 3].isnan() and not group_absmax_of_rows(poisoned, 128)[0, 3].isnan()
        assert group_absmax_of_rows(poisoned, 512)[0, 3].isnan() and not group_absmax_of_rows(poisoned, 512)[0, 4].isnan()
    finally:
        parallel.set_threads(None)


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
def test_group_absmax_in_rows_equals_torch(dtype) -> None:
    from llama4_quant.cpu_kernels import group_absmax_in_rows

    g = torch.Generator().manual_seed(5)
    wide = (torch.randn(96, 384, generator=g) * torch.logspace(-30, 4, 96)[:, None]).to(dtype)  # subnormals to large
    wide[3, 5], wide[50, 130] = -torch.finfo(dtype).max, -0.0
    w = wide[:, 64:320]  # rows with a stride, as a Linear's slice of rows or columns may be
    expected = w.abs().unflatten(1, (2, 128)).amax(dim=2)
    assert torch.equal(group_absmax_in_rows(w, 128), expected)
    assert torch.equal(S._group_absmax(w, 128), expected.float())
    assert torch.equal(S._group_absmax(w, 256), expected.float().amax(dim=1, keepdim=True))  # one per row
    w = w.clone()
    w[40, 200] = float("nan")
    assert group_absmax_in_rows(w, 128)[40, 1].isnan() and not group_absmax_in_rows(w, 128)[40, 0].isnan()
    planted = torch.rand(128, 256, generator=g).to(dtype)  # row r: the maxima at positions r and 127 - r
    planted[range(128), range(128)] = 2.0
    planted[range(128), range(255, 127, -1)] = -3.0
    assert torch.equal(group_absmax_in_rows(planted, 128), torch.tensor([2.0, 3.0]).to(dtype).expand(128, 2))


def test_transposed_group_absmax_is_the_same_with_and_without_the_compiled_kernel() -> None:
    """A stored expert's transposed view: bf16 through the compiled kernel, and the same values as
    float64 (which the kernel does not take: torch's reduction, as on a GPU), give the plain absmax."""
    g = torch.Generator().manual_seed(2)
    stored = (torch.randn(2, 256, 96, generator=g) * torch.logspace(-20, 4, 96)).to(BF16)  # [E, in, out]
    w = stored[1].T
    assert S.stored_transposed(w) and S.stored_transposed(w.double())
    expected = w.float().abs().unflatten(1, (2, 128)).amax(dim=2)
    assert torch.equal(S._group_absmax(w, 128), expected)
    assert torch.equal(S._group_absmax(w.double(), 128), expected)
    assert torch.equal(S._group_absmax(w.double(), 256), expected.amax(dim=1, keepdim=True))


def test_true_div_rounds_the_exact_quotient() -> None:
    """a / b correctly rounded to float32 whichever side is a number (the reference: float64 division,
    exact enough that rounding it to float32 gives the correctly rounded float32 quotient)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1 << 16, generator=g) * 1e3 + 1e-3
    for a, b in ((x, 6.0), (x, 7.5), (2688.0, x), (x, x.flip(0))):
        exact = (a.double() if isinstance(a, torch.Tensor) else a) / (b.double() if isinstance(b, torch.Tensor) else b)
        assert torch.equal(S.true_div(a, b), exact.float())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("group_rows, qmin, qmax", [(128, -8, 7), (256, -128, 127)])
def test_compiled_int_quantize_equals_float32_torch(group_rows, qmin, qmax, threads) -> None:
    """The transposed int values of a strided bf16 view, as float32 torch gives them: half steps
    (round-half-even ties), a lower clamp, one strip of columns, several with a partial one; and the
    same values as contiguous rows."""
    from llama4_quant import parallel
    from llama4_quant.cpu_kernels import quantize_rows, quantize_transposed, supports_transposed

    g = torch.Generator().manual_seed(2)
    parallel.set_threads(threads)
    try:
        for cols in (64, 200):
            scale = (torch.rand(256 // group_rows, cols, generator=g) + 0.01).to(BF16).float()
            steps = torch.randint(-4 * qmax, 4 * qmax, (256, cols), generator=g) / 2
            stored = torch.empty(256, cols + 32, dtype=BF16)
            stored[:, 16:cols + 16] = (steps * scale.repeat_interleave(group_rows, 0)).to(BF16)
            w = stored[:, 16:cols + 16]
            assert supports_transposed(w) and not supports_transposed(stored[:, 16:cols + 12])
            x = w.float() / scale.repeat_interleave(group_rows, 0)
            expected = x.round().clamp(qmin, qmax).to(torch.int8)
            assert torch.equal(quantize_transposed(w, group_rows, scale, None, qmin, qmax), expected.T.contiguous())
            low = torch.full_like(scale, float(qmin))
            low[0, :8] = float(-qmax)
            expected = torch.maximum(x.round().clamp(qmin, qmax), low.repeat_interleave(group_rows, 0)).to(torch.int8)
            assert torch.equal(quantize_transposed(w, group_rows, scale, low, qmin, qmax), expected.T.contiguous())
            # the same values as a Linear's own [out, in] rows: groups of columns
            rows, row_scale, row_low = w.T.contiguous(), scale.T.contiguous(), low.T.contiguous()
            assert torch.equal(quantize_rows(rows, group_rows, row_scale, row_low, qmin, qmax), expected.T)
            expected = x.round().clamp(qmin, qmax).to(torch.int8)
            assert torch.equal(quantize_rows(rows, group_rows, row_scale, None, qmin, qmax), expected.T)
    finally:
        parallel.set_threads(None)


def test_fused_int4_quantize_and_pack_equals_the_two_steps() -> None:
    """A routed expert's projection (a strided transposed view of bf16 [in, out]: 100 of its 120
    columns, 128 row pairs in two blocks), and its contiguous copy (100 rows: two blocks of
    rows), packed in one pass give the bytes of float32 torch
    rounding then packing, with scales that tie on half steps and ones whose -8 * scale overflows
    bf16 (the -7 clamp)."""
    from llama4_quant.formats.compressed_tensors import get_scheme

    g = torch.Generator().manual_seed(4)
    scale = (torch.rand(100, 2, generator=g) + 0.01).to(BF16)  # [out, in / 128]
    scale[:5] = torch.finfo(BF16).max
    steps = torch.randint(-16, 16, (100, 256), generator=g) / 2
    stored = torch.zeros(256, 120, dtype=BF16)  # [in, out] with 20 more columns beside
    big = torch.finfo(BF16).max
    stored[:, 10:110] = (steps * scale.float().repeat_interleave(128, 1)).clamp(-big, big).to(BF16).T
    stored[:7, 12] = -big
    w = stored[:, 10:110].T
    assert S.stored_transposed(w)
    low = S.int_lower_clamp(scale, -8, 7)
    assert low is not None and int(low.max()) == -7
    x = torch.maximum(S.true_div(w.float(), scale.float().repeat_interleave(128, 1)).round().clamp(-8, 7),
                      low.repeat_interleave(128, 1))
    expected = S.pack_int4(x.to(torch.int8))
    assert torch.equal(S.int4_quantize_packed(w, scale), expected)
    assert torch.equal(S.int4_quantize_packed(w, scale), S.pack_int4(S.int4_quantize(w, scale)))
    # a Linear's own rows (the contiguous copy) take the other compiled pass; float32, the two steps
    assert torch.equal(S.int4_quantize_packed(w.contiguous(), scale), expected)
    assert S.int4_quantize_packed(w.float(), scale) is None
    int4 = get_scheme("int4")
    general = int4.encode_weight("m", w.float())  # torch's kernels, on the same (bf16-exact) values
    for weight in (w, w.contiguous()):
        for (name, ours), (_, theirs) in zip(int4.encode_weight("m", weight), general):
            assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("width", [1200, 1196])
def test_fused_int4_tiles_cover_every_row_pair_and_column(width) -> None:
    """An expert view wide and tall enough for several tiles of the compiled pass in both directions
    (`width` of 1300 stored columns: tiles of 512, 512 and the rest; 192 row pairs: three blocks),
    against torch's float32 division, rounding and clamping, then packing; with and without a lower
    clamp. A tile whose width is a multiple of 8 is stored by 8 x 8 blocks, the last of 1196 columns
    (172) byte by byte."""
    g = torch.Generator().manual_seed(5)
    stored = (torch.randn(384, 1300, generator=g) * 0.02).to(BF16)  # [in, out]
    w = stored[:, 50:50 + width].T
    assert S.stored_transposed(w)
    scale = S.int4_scales(w)
    x = S.true_div(w.float(), scale.float().repeat_interleave(128, 1)).round().clamp(-8, 7)
    assert torch.equal(S.int4_quantize_packed(w, scale), S.pack_int4(x.to(torch.int8)))
    scale[:, 1] = torch.finfo(BF16).max  # -8 * scale overflows bf16: the lower clamp is -7
    low = S.int_lower_clamp(scale, -8, 7)
    x = torch.maximum(S.true_div(w.float(), scale.float().repeat_interleave(128, 1)).round().clamp(-8, 7),
                      low.repeat_interleave(128, 1))
    assert torch.equal(S.int4_quantize_packed(w, scale), S.pack_int4(x.to(torch.int8)))


@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_int4_rtn_equals_its_scales_then_the_values(threads) -> None:
    """The one-pass RTN int4 of an expert view (1200 of 1300 stored columns: column tiles of 512,
    512 and the rest; 3 groups of 128 rows) gives the scales of `int4_scales` and the values of
    `int4_quantize_packed` with them, and so the float64 reference's: magnitudes over 40 binades per
    column, a group of zeros (the smallest normal scale), subnormals, -bf16 max (whose -8 * scale
    overflows: the -7 clamp), exact half-step ties. NaN or Inf anywhere: None, and the scheme's
    encoder then refuses the weight."""
    from llama4_quant import parallel

    g = torch.Generator().manual_seed(6)
    stored = (torch.randn(384, 1300, generator=g) * torch.logspace(-30, 10, 1300, base=2)).to(BF16)  # [in, out]
    stored[128:256, 60] = 0
    stored[:, 61] = torch.tensor(2.0**-130).to(BF16)  # subnormal
    stored[:128, 62] = (torch.arange(128) % 31 - 15).to(BF16) / 2  # absmax 7.5: scale 1, ties at every half
    stored[300, 600] = -BF16_MAX
    w = stored[:, 50:1250].T
    parallel.set_threads(threads)
    try:
        packed, scale = S.int4_rtn_packed(w)
        expected_scale = S.int4_scales(w)
        assert torch.equal(scale, expected_scale)
        assert torch.equal(scale.double(), ref_scales(w, 128, 7.5))
        assert S.int_lower_clamp(scale, -8, 7) is not None  # the -7 clamp is exercised
        assert torch.equal(packed, S.int4_quantize_packed(w, expected_scale))
        int4 = ct.get_scheme("int4")
        assert int4.rtn_stored_from_weight(w) is not None  # the encoder takes this pass
        for (name, ours), (_, theirs) in zip(int4.encode_weight("m", w), int4.encode_weight("m", w.float())):
            assert torch.equal(ours, theirs), name  # torch's kernels on the same values
        for bad in (float("nan"), float("inf"), float("-inf")):
            poisoned = stored.clone()
            poisoned[383, 1249] = bad  # the last row of the last tile
            assert S.int4_rtn_packed(poisoned[:, 50:1250].T) is None
            with pytest.raises(NonFiniteWeightError):
                int4.encode_weight("m", poisoned[:, 50:1250].T)
    finally:
        parallel.set_threads(None)
    # elsewhere the two steps run: a contiguous matrix, float32, another group size
    assert S.int4_rtn_packed(w.contiguous()) is None and S.int4_rtn_packed(w.float()) is None
    assert S.int4_rtn_packed(w, 64) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_fp8_quantize_equals_torch_on_every_bf16_value(threads) -> None:
    """Every finite bf16 value, by scales around 1, ones that push values into e4m3's subnormals, its
    top and past 448; then a strided view of several strips of columns, the last one partial; both
    also as contiguous rows."""
    from llama4_quant import parallel
    from llama4_quant.cpu_kernels import quantize_fp8_rows, quantize_fp8_transposed

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(BF16)
    every = every[torch.isfinite(every)]
    every = every[: every.numel() // 64 * 64].reshape(-1, 8)  # [rows, 8]: 8 columns, one scale each
    scale = torch.tensor([1.0, 0.5, 3.0, 1e-3, 7e-5, 2.0**-20, 1e30, 1.7e-38]).to(BF16).float()
    stored = random_weight(96, 240, 5).to(BF16)
    strided, strided_scale = stored[:, 8:208], stored[:, 8:208].float().abs().amax(0) / 448
    parallel.set_threads(threads)
    try:
        for w, s in ((every, scale), (strided, strided_scale)):
            expected = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).T.contiguous()
            assert torch.equal(quantize_fp8_transposed(w, s).view(torch.uint8), expected.view(torch.uint8))
            rows = quantize_fp8_rows(w.T.contiguous(), s)  # a Linear's own rows, one scale each
            assert torch.equal(rows.view(torch.uint8), expected.view(torch.uint8))
    finally:
        parallel.set_threads(None)


def test_expert_views_quantize_the_same_through_the_compiled_pass_and_torch() -> None:
    """int8 and FP8 of an expert's transposed bf16 view: the compiled pass (rows and columns multiples
    of 8), torch's loop (95 columns, or the same values as float32) and the contiguous weight all
    give the same values, in the layout the view reads."""
    stored = random_weight(256, 100, 9).to(BF16)  # an expert's [in, out] slice
    for w in (stored[:, 2:98].T, stored[:, 2:97].T):
        assert S.stored_transposed(w)
        for scale, quantize in ((S.int8_scales(w), S.int8_quantize), (S.fp8_scales(w), S.fp8_quantize)):
            ours = quantize(w, scale)
            assert ours.shape == w.shape
            for other in (w.float(), w.contiguous()):
                assert torch.equal(ours.view(torch.uint8), quantize(other, scale).view(torch.uint8))


# --------------------------------------------------------------------------- determinism and layout


def quantize_all_bytes(w: torch.Tensor) -> list[bytes]:
    s4 = S.int4_scales(w)
    s8 = S.int8_scales(w)
    sf = S.fp8_scales(w)
    tensors = [s4, S.pack_int4(S.int4_quantize(w, s4)), s8, S.int8_quantize(w, s8), sf, S.fp8_quantize(w, sf)]
    return [t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors]


def test_deterministic_and_chunking_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    w = random_weight(96, 512, 11)
    first = quantize_all_bytes(w)
    assert quantize_all_bytes(w.clone()) == first
    monkeypatch.setattr(S, "_CHUNK_ELEMENTS", 3 * 512)  # 32 row slices, the last one short
    assert quantize_all_bytes(w) == first


def test_non_contiguous_input() -> None:
    w = random_weight(256, 128, 12)
    wt = w.t().contiguous().t()  # same values, column-major strides
    assert not wt.is_contiguous()
    assert quantize_all_bytes(wt) == quantize_all_bytes(w)


# ------------------------------------------------------------------------------- the scheme registry


def test_registry() -> None:
    from llama4_quant.model import QUANTIZED_SUFFIXES

    assert ct.scheme_names() == list(ct.SCHEMES) == ["int4", "int8", "fp8", "fp8-block", "nvfp4a16", "nvfp4", "mxfp4a16", "mxfp4"]
    for name, scheme in ct.SCHEMES.items():
        assert isinstance(scheme, ct.Scheme) and scheme.name == name
        assert ct.get_scheme(name) is scheme and ct.as_scheme(name) is scheme and ct.as_scheme(scheme) is scheme
        assert ct.scheme_for_format(scheme.format, scheme.strategy, scheme.inputs) is scheme
        assert ct.scheme_for_config(ct.quantization_config(scheme, [])) is scheme
        assert scheme.suffixes[:len(QUANTIZED_SUFFIXES[scheme.format])] == QUANTIZED_SUFFIXES[scheme.format]
        assert set(scheme.scale_suffixes) <= set(scheme.suffixes) and scheme.group_scale in scheme.scale_suffixes
        group = ct.quantization_config(scheme, [])["config_groups"]["group_0"]
        assert group["format"] == scheme.format and group["targets"] == ["Linear"]
        assert group["weights"]["strategy"] == scheme.strategy
    assert ct.scheme_for_format("marlin-24") is None and ct.scheme_for_format(None) is None
    with pytest.raises(ValueError, match="unknown scheme 'int2'; choose one of int4, int8, fp8, fp8-block, nvfp4a16, nvfp4, mxfp4a16, mxfp4"):
        ct.get_scheme("int2")
    with pytest.raises(ValueError, match="twice"):
        ct.register_scheme(type(ct.get_scheme("int4")))
    assert ct.scheme_names() == ["int4", "int8", "fp8", "fp8-block", "nvfp4a16", "nvfp4", "mxfp4a16", "mxfp4"]


@pytest.mark.parametrize("name", ct.scheme_names())
def test_quantization_config_is_the_one_compressed_tensors_builds(name: str) -> None:
    """l4q writes `quantization_config` without importing compressed-tensors (seconds of every run):
    the JSON must be the library's, from the scheme's preset, key order included, and parse back."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme, ignore = ct.get_scheme(name), ["lm_head", r".*\.router"]
    group = preset_name_to_scheme(scheme.preset, ["Linear"])
    group.format = scheme.format
    theirs = QuantizationConfig(config_groups={"group_0": group}, format=scheme.format, quantization_status="compressed",
                                ignore=[f"re:{p}" for p in ignore]).model_dump()
    ours = ct.quantization_config(scheme, ignore)
    assert json.dumps(ours) == json.dumps(theirs)
    assert QuantizationConfig.model_validate(ours).model_dump() == ours
    ours["config_groups"]["group_0"]["weights"]["num_bits"] = 2  # a copy: the scheme's own args stay
    assert ct.quantization_config(scheme, ignore) == theirs


def test_registry_loads_without_torch() -> None:
    """The CLI reads its --to choices from the registry before anything heavy is imported."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from llama4_quant.formats import compressed_tensors as ct; "
            "assert ct.scheme_names() == ['int4', 'int8', 'fp8', 'fp8-block', 'nvfp4a16', 'nvfp4', 'mxfp4a16', 'mxfp4']; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def scheme_test_weight(extreme: bool = True) -> torch.Tensor:
    """random_weight plus a -bf16 max entry, whose scale needs the int lower clamp (not for a scheme
    with a per-tensor global scale: one such entry leaves every other group of the tensor at zero)."""
    w = random_weight(256, 1024, 13)  # whole 128 x 128 blocks for fp8-block
    if extreme:
        w[3, 5] = -BF16_MAX
    return w


@pytest.mark.parametrize("name", ct.scheme_names())
def test_scheme_round_trips_within_its_bound(name: str) -> None:
    """encode -> decode stays within the scheme's error bound, and entries() is exactly what encode writes."""
    from llama4_quant.checkpoint import torch_to_st

    scheme = ct.get_scheme(name).with_inputs(torch.tensor([4.0]))  # nvfp4: its inputs reached |x| = 4
    w = scheme_test_weight(extreme=not scheme.shares_global)
    module = "model.layers.0.feed_forward.experts.3.up_proj"
    assert scheme.can_quantize(*w.shape)
    parts = scheme.encode_weight(module, w)
    entries = scheme.entries(module, *w.shape)
    assert [n for n, _ in parts] == [e.name for e in entries] == [f"{module}.{s}" for s in scheme.suffixes]
    for entry, (_, t) in zip(entries, parts):
        assert (torch_to_st()[t.dtype], tuple(t.shape)) == (entry.dtype, entry.shape), entry.name
        assert t.device.type == "cpu" and entry.nbytes == t.numel() * t.element_size()
    tensors = {n.removeprefix(module + "."): t for n, t in parts}
    scales = scheme.rtn_scales(w)
    assert list(scales) == list(scheme.scale_suffixes)
    for s, t in scales.items():
        assert torch.equal(t, tensors[s]), s
    d = scheme.decode(tensors)
    assert d.dtype == torch.float32 and d.shape == w.shape
    assert torch.equal(d, scheme.dequantize(scheme.quantize(w, scales), scales))
    assert torch.equal(scheme.decode_as_loaded(tensors), d.to(BF16).float())
    err = (w.double() - d.double()).abs()
    bound = scheme.error_bound(w, scales)
    assert bound.shape == w.shape
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.4  # the bound is tight
    # a given group scale is what gets stored (nvfp4 stores the step as its FP8 scale, mxfp4 the power
    # of two as its E8M0 exponent)
    bound = scheme.for_weight(w)
    half = bound.absmax_scale(bound.group_absmax(w) / 2, BF16)  # a valid scale of the scheme: for half the range
    again = dict(scheme.encode_weight(module, w, half))
    stored = bound.scales_with(w, half)[scheme.group_scale]
    assert torch.equal(again[f"{module}.{scheme.group_scale}"].float(), stored.float())
    if scheme.format == "mxfp4-pack-quantized":
        stored = S.mxfp4_steps(stored)
    if not scheme.shares_global:
        assert torch.equal(stored, half[:: scheme.rows_per_scale])


@pytest.mark.parametrize("name", ct.scheme_names())
def test_scheme_rounding_rule_is_its_quantize(name: str) -> None:
    """What scale_search and GPTQ use (group size, absmax rule, lower clamp, grid) reproduces RTN bit for bit."""
    scheme = ct.get_scheme(name).with_inputs(torch.tensor([4.0]))
    w = scheme_test_weight(extreme=not scheme.shares_global)
    rows, cols = w.shape
    scales = scheme.rtn_scales(w)
    gs = scheme.group_size(cols)
    bound = scheme.for_weight(w)
    s = bound.absmax_scale(bound.group_absmax(w), BF16)  # the group scale: for nvfp4 the float32 step
    assert s.shape == (rows, cols // gs)
    for suffix, t in bound.scales_with(w, s).items():
        assert torch.equal(t.float(), scales[suffix].float()), suffix
    low = scheme.lower_clamp(s)
    x = w.float().unflatten(-1, (cols // gs, gs)) / s.float().unsqueeze(-1)
    grid = scheme.round_to_grid(x, None if low is None else low.unsqueeze(-1))
    assert grid.dtype == torch.float32
    q = scheme.to_values(grid.flatten(-2))
    expected = scheme.quantize(w, scales)
    assert q.dtype == expected.dtype
    assert torch.equal(q.view(torch.int8), expected.view(torch.int8))


def test_scheme_kernels_match_named_kernels() -> None:
    """The int4 / int8 / fp8 classes call these kernels with the same constants."""
    w = scheme_test_weight()
    for name, scales, quant in (("int4", S.int4_scales, S.int4_quantize), ("int8", S.int8_scales, S.int8_quantize),
                                ("fp8", S.fp8_scales, S.fp8_quantize)):
        scheme = ct.get_scheme(name)
        s = scheme.rtn_scales(w)["weight_scale"]
        assert torch.equal(s, scales(w))
        assert torch.equal(scheme.quantize(w, {"weight_scale": s}).view(torch.int8), quant(w, s).view(torch.int8))
    int4, int8 = ct.get_scheme("int4"), ct.get_scheme("int8")
    assert (int4.qmin, int4.qmax, int4.group) == (S.INT4_MIN, S.INT4_MAX, S.INT4_GROUP_SIZE)
    assert (int8.qmin, int8.qmax) == (S.INT8_MIN, S.INT8_MAX)
    assert (int4.half_range, int8.half_range, ct.get_scheme("fp8").half_range) == (7.5, 127.5, S.FP8_MAX)
    for scheme in (int4, int8):
        s = scheme.rtn_scales(w)["weight_scale"]
        low = scheme.lower_clamp(s)  # only the -bf16 max group clamps at -qmax
        expected = torch.full_like(s, float(scheme.qmin), dtype=torch.float32)
        expected[3, 5 // scheme.group_size(w.shape[1])] = -scheme.qmax
        assert torch.equal(low, expected), scheme.name
    assert ct.get_scheme("fp8").lower_clamp(S.fp8_scales(w)) is None
