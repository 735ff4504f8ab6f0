"""Tests for llama4_quant.scale_search: a float64 brute-force reference over the same grid, RTN as the floor, edges."""

from __future__ import annotations

import pytest
import torch

from llama4_quant import scale_search as SS
from llama4_quant import schemes as S
from llama4_quant.formats.compressed_tensors import get_scheme

BF16 = torch.bfloat16
TINY = torch.finfo(BF16).tiny
SCHEMES = ("int4", "int8", "fp8")
HALF_RANGE = {"int4": 7.5, "int8": 127.5, "fp8": 448.0}


# ----------------------------------------------------------------------------------- helpers

def rtn_scale(w: torch.Tensor, scheme: str) -> torch.Tensor:
    return get_scheme(scheme).rtn_scales(w)["weight_scale"]


def quantize(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return get_scheme(scheme).quantize(w, {"weight_scale": scale})


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return get_scheme(scheme).dequantize(q, {"weight_scale": scale})


def group_size(scheme: str, cols: int) -> int:
    return S.INT4_GROUP_SIZE if scheme == "int4" else cols


def student_t(rows: int, cols: int, seed: int, df: float = 3.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return (0.02 * torch.distributions.StudentT(df).sample((rows, cols))).to(BF16)


def group_errors(w, scale, scheme, importance=None) -> torch.Tensor:
    """Float64 sum_j imp_j (w_j - q_j s)^2 per group, q from `schemes`' real quantizer."""
    cols = w.shape[1]
    gs = group_size(scheme, cols)
    imp = torch.ones(cols, dtype=torch.float64) if importance is None else importance.double()
    diff = w.double() - dequantize(quantize(w, scale, scheme), scale, scheme).double()
    return (diff.square() * imp).unflatten(-1, (cols // gs, gs)).sum(-1)


def ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= x (x positive, normal), computed in float64 from the significand."""
    m, e = torch.frexp(x.double())
    return torch.ldexp(torch.ceil(m * 256) / 256, e.double())


def ref_search(w: torch.Tensor, scheme: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 brute force over the grid: every candidate, every group, first (largest) minimum wins."""
    cols = w.shape[1]
    gs = group_size(scheme, cols)
    x = w.double().unflatten(-1, (cols // gs, gs))
    imp = torch.ones(cols, dtype=torch.float64) if importance is None else importance.double()
    imp = imp.view(cols // gs, gs)
    absmax = x.abs().amax(-1)
    cands, errs = [], []
    for f in SS.GRID_FACTORS:
        s = ceil_bf16(torch.clamp(absmax * f / HALF_RANGE[scheme], min=TINY))
        if scheme == "fp8":
            q = (x / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        else:
            lo, hi = (-8, 7) if scheme == "int4" else (-128, 127)
            q = torch.round(x / s[..., None]).clamp(lo, hi)
        cands.append(s)
        errs.append((imp * (x - q * s[..., None]).square()).sum(-1))
    best = torch.stack(errs).argmin(0)  # the first minimum: the largest scale among ties
    return torch.stack(cands).gather(0, best[None]).squeeze(0)


# ------------------------------------------------------------------------------------- tests


def test_grid():
    assert len(SS.GRID_FACTORS) <= 25
    assert SS.GRID_FACTORS[0] == 1.0 and min(SS.GRID_FACTORS) <= 0.65
    assert 7.5 / 8 in SS.GRID_FACTORS  # absmax / 8: the asymmetric int4 range
    assert list(SS.GRID_FACTORS) == sorted(SS.GRID_FACTORS, reverse=True)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_float64_brute_force(scheme, weighted):
    cols = 384 if scheme == "int4" else 300
    w = student_t(48, cols, seed=1)
    importance = torch.rand(cols, generator=torch.Generator().manual_seed(2)) ** 3 if weighted else None
    got = SS.search_scales(w, get_scheme(scheme), importance)
    ref = ref_search(w, scheme, importance)
    assert got.shape == rtn_scale(w, scheme).shape and got.dtype == BF16
    # float32 vs float64 objective: only near-ties may pick another candidate, at (almost) the same error.
    assert (got.double() == ref).double().mean() >= 0.97
    e_got, e_ref = group_errors(w, got, scheme, importance), group_errors(w, ref.to(BF16), scheme, importance)
    assert torch.all(e_got <= e_ref * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_first_candidate_is_rtn(scheme):
    w = student_t(16, 256, seed=3)
    w[0] = 0
    w[1, :128] = 1e-39  # subnormal in bf16
    w[2, 5] = -3e38
    absmax = S._group_absmax(w, group_size(scheme, 256))
    cands = SS.candidate_scales(absmax, get_scheme(scheme))
    assert cands.shape == (len(SS.GRID_FACTORS), *rtn_scale(w, scheme).shape)
    assert torch.equal(cands[0].view(torch.int16), rtn_scale(w, scheme).view(torch.int16))
    assert torch.isfinite(cands.float()).all() and (cands > 0).all()
    assert torch.all(cands[1:] <= cands[:-1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_never_worse_than_rtn(scheme):
    w = student_t(64, 512, seed=4, df=5.0)
    importance = torch.rand(512, generator=torch.Generator().manual_seed(5))
    for imp in (None, importance):
        s = SS.search_scales(w, get_scheme(scheme), imp)
        rtn = rtn_scale(w, scheme)
        assert torch.all(group_errors(w, s, scheme, imp) <= group_errors(w, rtn, scheme, imp) * (1 + 1e-5))


def test_heavy_tails_improve_on_rtn():
    w = student_t(256, 1024, seed=6)
    for scheme, gain in (("int4", 0.9), ("int8", 1.0), ("fp8", 1.0)):
        mse = group_errors(w, SS.search_scales(w, get_scheme(scheme)), scheme).sum()
        rtn = group_errors(w, rtn_scale(w, scheme), scheme).sum()
        assert mse <= gain * rtn, (scheme, float(mse / rtn))


def test_importance_changes_the_choice():
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(1, 128, generator=g) * 0.6 - 0.3).to(BF16)
    w[0, 0] = 1.0  # one outlier
    rtn = S.int4_scales(w)
    smallest = SS.candidate_scales(S._group_absmax(w, 128), get_scheme("int4"))[-1]
    care = torch.ones(128)
    care[0] = 1000.0
    ignore = torch.ones(128)
    ignore[0] = 0.0
    assert torch.equal(SS.search_scales(w, get_scheme("int4"), care), rtn)  # keep the outlier exact
    assert torch.equal(SS.search_scales(w, get_scheme("int4"), ignore), smallest)  # clip it, round the rest finely
    # Only ratios matter.
    assert torch.equal(SS.search_scales(w, get_scheme("int4"), care * 1e-20), rtn)


def test_negative_absmax_uses_the_full_int4_range():
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(1, 128, generator=g) * 0.05).to(BF16)
    w[0, 3] = -1.0
    s = SS.search_scales(w, get_scheme("int4"))
    assert float(s) < float(S.int4_scales(w))
    assert int(S.int4_quantize(w, s)[0, 3]) == -8


def test_deterministic_and_independent_of_row_slicing(monkeypatch):
    w = student_t(40, 512, seed=9)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(10))
    for scheme in SCHEMES:
        a = SS.search_scales(w, get_scheme(scheme), imp)
        assert torch.equal(a, SS.search_scales(w, get_scheme(scheme), imp))
        monkeypatch.setattr(S, "_CHUNK_ELEMENTS", 3 * 512)
        b = SS.search_scales(w, get_scheme(scheme), imp)
        monkeypatch.undo()
        assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_rows_and_groups(scheme):
    w = student_t(4, 256, seed=11)
    w[0] = 0
    w[1, :128] = 0
    s = SS.search_scales(w, get_scheme(scheme))
    assert torch.isfinite(s.float()).all() and (s > 0).all()
    assert float(s[0, 0]) == TINY
    if scheme == "int4":
        assert float(s[1, 0]) == TINY
    assert torch.all(dequantize(quantize(w, s, scheme), s, scheme)[0] == 0)
    # All-zero importance (say, an expert no calibration token reached) means uniform importance.
    assert torch.equal(SS.search_scales(w, get_scheme(scheme), torch.zeros(256)), s)
    if scheme == "int4":
        # An int4 group with zero importance: every candidate ties, RTN's (largest) scale is kept.
        imp = torch.ones(256)
        imp[128:] = 0
        assert torch.equal(SS.search_scales(w, get_scheme(scheme), imp)[:, 1], rtn_scale(w, scheme)[:, 1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_extreme_magnitudes_stay_finite(scheme):
    w = student_t(4, 256, seed=12)
    w[0] = w[0] * 1e38 / w[0].abs().max()
    w[0, 7] = -torch.finfo(BF16).max
    w[1] = w[1] * 1e-38
    s = SS.search_scales(w, get_scheme(scheme))
    assert torch.isfinite(s.float()).all() and (s > 0).all()
    q = quantize(w, s, scheme)
    deq_bf16 = q.to(BF16).unflatten(-1, (s.shape[1], -1)) * s.unsqueeze(-1)  # a decoder's BF16 product
    assert torch.isfinite(deq_bf16.float()).all()
    assert torch.all(group_errors(w, s, scheme) <= group_errors(w, rtn_scale(w, scheme), scheme) * (1 + 1e-5))


def test_other_scale_dtypes():
    w = student_t(8, 256, seed=13)
    for dtype in (torch.float16, torch.float32):
        for scheme in SCHEMES:
            s = SS.search_scales(w, get_scheme(scheme), scale_dtype=dtype)
            assert s.dtype == dtype and s.shape == rtn_scale(w, scheme).shape
            assert torch.isfinite(s.float()).all() and (s > 0).all()


def test_scheme_by_name():
    """A registered name stands for its scheme (the pipeline passes names for now)."""
    w = student_t(8, 256, seed=16)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(17))
    for scheme in SCHEMES:
        assert torch.equal(SS.search_scales(w, scheme, imp), SS.search_scales(w, get_scheme(scheme), imp))


def test_invalid_arguments():
    w = student_t(4, 256, seed=14)
    with pytest.raises(ValueError):
        SS.search_scales(w, "int2")
    with pytest.raises(ValueError):
        SS.search_scales(w, get_scheme("int4"), torch.ones(128))
    with pytest.raises(ValueError):
        SS.search_scales(w, get_scheme("int4"), -torch.ones(256))
    with pytest.raises(ValueError):
        SS.search_scales(w, get_scheme("int4"), torch.full((256,), float("nan")))
    with pytest.raises(ValueError):
        SS.search_scales(student_t(4, 200, seed=15), get_scheme("int4"))
