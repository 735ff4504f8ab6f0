"""Tests for llama4_quant.calibrate.gptq against an independent float64, column-by-column GPTQ reference."""

from __future__ import annotations

import pytest
import torch

from llama4_quant.calibrate.gptq import GPTQResult, gptq_quantize
from llama4_quant.formats.compressed_tensors import get_scheme

SCHEMES = ("int4", "int8", "fp8")


# ----------------------------------------------------------------------------------- helpers

def rtn_scale(w: torch.Tensor, scheme: str) -> torch.Tensor:
    return get_scheme(scheme).rtn_scales(w)["weight_scale"]


def rtn_q(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return get_scheme(scheme).quantize(w, {"weight_scale": scale})


def dequant(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return get_scheme(scheme).dequantize(q, {"weight_scale": scale})


def group_size(scheme: str, cols: int) -> int:
    return get_scheme(scheme).group_size(cols)


def correlated_inputs(in_features: int = 256, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """X [in, n] = (Z @ A)^T with a decaying spectrum and uneven channel magnitudes."""
    g = torch.Generator().manual_seed(seed)
    spectrum = 0.97 ** torch.arange(in_features, dtype=torch.float64)
    a = torch.randn(in_features, in_features, generator=g, dtype=torch.float64) * spectrum[:, None]
    z = torch.randn(n, in_features, generator=g, dtype=torch.float64)
    channel = torch.exp(0.7 * torch.randn(in_features, generator=g, dtype=torch.float64))
    return (z @ a).T * channel[:, None]


def weight(out_features: int = 64, in_features: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.02 * torch.randn(out_features, in_features, generator=g)).to(torch.bfloat16)


def output_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scheme: str, x: torch.Tensor) -> float:
    return float(torch.linalg.norm((w.double() - dequant(q, scale, scheme).double()) @ x))


def ref_gptq(w, hessian, scheme, scale, damp=0.01, act_order=True) -> torch.Tensor:
    """Float64 GPTQ, one column at a time, with the explicit inverse-Hessian downdate (no Cholesky, no blocks).

    Returns q as float64 values in the original column order. Same H conventions as the module:
    normalized by the live mean diagonal, dead channels decoupled with unit diagonal, damp * mean(diag).
    """
    cols = w.shape[1]
    h = hessian.double()
    h = (h + h.T) / 2
    dead = h.diagonal() == 0
    if (~dead).any():
        h = h / h.diagonal()[~dead].mean()
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    h = h[order][:, order]
    h = h + damp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    wk = w.double()[:, order].clone()
    s_col = scale.double()[:, order // group_size(scheme, cols)]
    q_all = torch.zeros_like(wk)
    for j in range(cols):
        x, s = wk[:, j], s_col[:, j]
        if scheme.startswith("fp8"):
            q = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        else:
            lo, hi = (-8, 7) if scheme == "int4" else (-128, 127)
            q = torch.round(x / s).clamp(lo, hi)
        err = (x - q * s) / hinv[j, j]
        wk[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        q_all[:, j] = q
    out = torch.empty_like(q_all)
    out[:, order] = q_all
    return out


def check_valid(res: GPTQResult, w: torch.Tensor, scale: torch.Tensor, scheme: str) -> None:
    assert res.scale is scale
    assert res.q.shape == w.shape
    if scheme == "fp8":
        assert res.q.dtype == torch.float8_e4m3fn
        assert torch.isfinite(res.q.float()).all()
    else:
        lo, hi = (-8, 7) if scheme == "int4" else (-128, 127)
        assert res.q.dtype == torch.int8
        assert int(res.q.min()) >= lo and int(res.q.max()) <= hi
    assert torch.isfinite(dequant(res.q, scale, scheme)).all()


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_matches_float64_reference(scheme, act_order):
    w = weight()
    x = correlated_inputs()
    h = x @ x.T
    scale = rtn_scale(w, scheme)
    ref = ref_gptq(w, h, scheme, scale, act_order=act_order)
    for block_size in (128, 48):
        res = gptq_quantize(w, h.float(), get_scheme(scheme), scale, block_size=block_size, act_order=act_order)
        check_valid(res, w, scale, scheme)
        assert not res.fell_back
        mismatch = (res.q.double() != ref).double().mean()
        assert mismatch < 0.005, f"{float(mismatch):.4%} of the rounding decisions differ from the reference"


@pytest.mark.parametrize("act_order", [True, False])
def test_fp8_block_matches_float64_reference(act_order):
    """Block scales reach GPTQ as each row's group scale (the block's, repeated over its 128 rows)."""
    scheme = get_scheme("fp8-block")
    w = weight(256, 256, seed=2)
    x = correlated_inputs()
    h = x @ x.T
    scale = scheme.absmax_scale(scheme.group_absmax(w), torch.bfloat16)
    assert torch.equal(scheme.scales_with(w, scale)["weight_scale"], scheme.rtn_scales(w)["weight_scale"])
    ref = ref_gptq(w, h, "fp8-block", scale, act_order=act_order)
    res = gptq_quantize(w, h.float(), scheme, scale, act_order=act_order)
    assert not res.fell_back and res.q.dtype == torch.float8_e4m3fn
    mismatch = (res.q.double() != ref).double().mean()
    assert mismatch < 0.005, f"{float(mismatch):.4%} of the rounding decisions differ from the reference"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_diagonal_hessian_equals_rtn(scheme):
    w = weight(32, 384, seed=3)
    scale = rtn_scale(w, scheme)
    expected = rtn_q(w, scale, scheme)
    diag = torch.diag(torch.rand(384, generator=torch.Generator().manual_seed(0)) + 0.1)
    for h in (torch.eye(384), torch.eye(384, dtype=torch.float64) * 1e-9, diag):
        for act_order in (True, False):
            res = gptq_quantize(w, h, get_scheme(scheme), scale, act_order=act_order)
            assert not res.fell_back
            assert torch.equal(res.q.view(torch.int8), expected.view(torch.int8))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_lower_output_error_than_rtn(scheme):
    w = weight()
    x = correlated_inputs()
    scale = rtn_scale(w, scheme)
    res = gptq_quantize(w, x @ x.T, get_scheme(scheme), scale)
    e_gptq = output_error(w, res.q, scale, scheme, x)
    e_rtn = output_error(w, rtn_q(w, scale, scheme), scale, scheme, x)
    assert e_gptq <= 0.8 * e_rtn, (e_gptq, e_rtn)


def test_fp8_output_error_not_worse_than_rtn():
    w = weight()
    x = correlated_inputs()
    scale = rtn_scale(w, "fp8")
    res = gptq_quantize(w, x @ x.T, get_scheme("fp8"), scale)
    assert output_error(w, res.q, scale, "fp8", x) < output_error(w, rtn_q(w, scale, "fp8"), scale, "fp8", x)


def test_act_order_usually_better():
    wins = 0
    for seed in range(6):
        w = weight(seed=10 + seed)
        x = correlated_inputs(seed=20 + seed)
        scale = rtn_scale(w, "int4")
        errors = []
        for act_order in (True, False):
            res = gptq_quantize(w, x @ x.T, get_scheme("int4"), scale, act_order=act_order)
            check_valid(res, w, scale, "int4")
            errors.append(output_error(w, res.q, scale, "int4", x))
        wins += errors[0] < errors[1]
    assert wins >= 4


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rank_deficient_hessian(scheme):
    w = weight()
    x = correlated_inputs(n=32)
    scale = rtn_scale(w, scheme)
    res = gptq_quantize(w, (x @ x.T).float(), get_scheme(scheme), scale)
    check_valid(res, w, scale, scheme)
    assert not res.fell_back


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_hessian_is_rtn(scheme):
    w = weight()
    scale = rtn_scale(w, scheme)
    res = gptq_quantize(w, torch.zeros(256, 256), get_scheme(scheme), scale)
    check_valid(res, w, scale, scheme)
    assert not res.fell_back
    assert torch.equal(res.q.view(torch.int8), rtn_q(w, scale, scheme).view(torch.int8))


def test_dead_channels_keep_their_weights():
    w = weight()
    x = correlated_inputs()
    dead = torch.zeros(256, dtype=torch.bool)
    dead[[0, 5, 130, 255]] = True
    x[dead] = 0
    scale = rtn_scale(w, "int4")
    res = gptq_quantize(w, x @ x.T, get_scheme("int4"), scale)
    assert not res.fell_back
    # No error flows into or out of a dead channel, so its column is exactly RTN (not zeroed).
    assert torch.equal(res.q[:, dead], rtn_q(w, scale, "int4")[:, dead])
    assert res.q[:, dead].abs().sum() > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_finite_hessian_falls_back_to_rtn(scheme):
    w = weight()
    x = correlated_inputs()
    h = x @ x.T
    h[3, 7] = float("nan")
    scale = rtn_scale(w, scheme)
    res = gptq_quantize(w, h, get_scheme(scheme), scale)
    check_valid(res, w, scale, scheme)
    assert res.fell_back and "NaN" in res.reason
    assert torch.equal(res.q.view(torch.int8), rtn_q(w, scale, scheme).view(torch.int8))


def test_indefinite_hessian_falls_back_after_raising_dampening():
    v = torch.full((256,), 1 / 16, dtype=torch.float64)
    h = torch.eye(256, dtype=torch.float64) - 100 * torch.outer(v, v)  # positive diagonal, eigenvalue -99
    w = weight()
    scale = rtn_scale(w, "int4")
    res = gptq_quantize(w, h, get_scheme("int4"), scale)
    check_valid(res, w, scale, "int4")
    assert res.fell_back and "Cholesky" in res.reason
    # Mildly indefinite (eigenvalue -0.05): the first raised dampening succeeds.
    res = gptq_quantize(w, torch.eye(256, dtype=torch.float64) - 1.05 * torch.outer(v, v), get_scheme("int4"), scale)
    assert not res.fell_back


def test_scaling_invariance_and_determinism():
    w = weight()
    x = correlated_inputs()
    h = x @ x.T
    scale = rtn_scale(w, "int4")
    a = gptq_quantize(w, h, get_scheme("int4"), scale)
    b = gptq_quantize(w, h, get_scheme("int4"), scale)
    assert torch.equal(a.q, b.q)
    c = gptq_quantize(w, h * 2.0**-40, get_scheme("int4"), scale)
    assert (a.q != c.q).double().mean() < 0.005


def test_a_perturbed_hessian_changes_values_but_not_the_output_error():
    """Why CUDA and CPU GPTQ differ in some values (another summation order, and in the sequential
    pass the differences grow layer by layer): each rounding decision feeds the next columns, so a
    1e-4 relative change of H moves a few percent of the values, at the same output error."""
    w = weight()
    x = correlated_inputs()
    h = x @ x.T
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(5), dtype=h.dtype) * 1e-4
    scale = rtn_scale(w, "int4")
    a = gptq_quantize(w, h, get_scheme("int4"), scale)
    b = gptq_quantize(w, h * (1 + (noise + noise.T) / 2), get_scheme("int4"), scale)
    changed = (a.q != b.q).double().mean()
    assert 0 < changed < 0.2, changed
    e_a, e_b = (output_error(w, r.q, scale, "int4", x) for r in (a, b))
    assert abs(e_a - e_b) < 0.02 * e_a, (e_a, e_b)


def test_block_size_not_dividing_in_features():
    w = weight(16, 384)
    x = correlated_inputs(384, 1024)
    scale = rtn_scale(w, "int4")
    h = x @ x.T
    base = gptq_quantize(w, h, get_scheme("int4"), scale, block_size=128).q
    for block_size in (1, 100, 1000):
        res = gptq_quantize(w, h, get_scheme("int4"), scale, block_size=block_size)
        check_valid(res, w, scale, "int4")
        assert (res.q != base).double().mean() < 0.005


def test_custom_scale_is_respected():
    w = weight()
    x = correlated_inputs()
    scale = (rtn_scale(w, "int4").float() * 0.8).to(torch.bfloat16)  # clips: values beyond [-8, 7] saturate
    res = gptq_quantize(w, x @ x.T, get_scheme("int4"), scale)
    check_valid(res, w, scale, "int4")
    assert int(res.q.min()) == -8 or int(res.q.max()) == 7


def test_scheme_by_name():
    w = weight()
    x = correlated_inputs()
    for scheme in SCHEMES:
        scale = rtn_scale(w, scheme)
        by_name = gptq_quantize(w, x @ x.T, scheme, scale).q
        by_object = gptq_quantize(w, x @ x.T, get_scheme(scheme), scale).q
        assert torch.equal(by_name.view(torch.int8), by_object.view(torch.int8))


def test_invalid_arguments():
    w = weight()
    scale = rtn_scale(w, "int4")
    h = torch.eye(256)
    with pytest.raises(ValueError):
        gptq_quantize(w, torch.eye(128), get_scheme("int4"), scale)
    with pytest.raises(ValueError):
        gptq_quantize(w, h, get_scheme("int4"), rtn_scale(w, "int8"))
    with pytest.raises(ValueError):
        gptq_quantize(w, h, "int2", scale)
    with pytest.raises(ValueError):
        gptq_quantize(w, h, get_scheme("int4"), torch.zeros_like(scale))
    with pytest.raises(ValueError):
        gptq_quantize(w, h, get_scheme("int4"), scale, block_size=0)
