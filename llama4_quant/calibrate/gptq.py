"""GPTQ (Frantar et al., 2022) for one Linear weight with fixed ("static") scales.

GPTQ quantizes the columns of W one at a time and spreads each column's rounding error over the
not-yet-quantized columns, weighted by the inverse of the input Hessian H = sum x x^T, so that the
layer output error ||(W - Wq) X|| rather than the weight error is minimized.

Conventions here:

* The scales are chosen before GPTQ (RTN or `scale_search`) and never change, so the static
  act-order (columns in decreasing diag(H)) cannot break the int4 group structure, and the result
  is stored like any RTN result of the scheme.
* Quantizing one column uses exactly the scheme's float32 rounding and clamping (`round_to_grid`,
  `lower_clamp`), so with a diagonal H (no error to spread) the result is bit-identical to RTN with
  the same scales.
* H is first normalized by the mean diagonal of its live channels (only ratios matter), dead input
  channels (zero diagonal) become decoupled unit channels, and damp * mean(diag) is added to the
  diagonal. If the Cholesky factorization fails, the dampening rises tenfold a few times; if it
  still fails, or H or the updates are not finite, the result is plain RTN with `fell_back` set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import schemes
from ..formats.compressed_tensors import Scheme, as_scheme

_DAMP_RETRIES = 3  # extra tries, each with ten times the previous dampening


@dataclass
class GPTQResult:
    """q: the scheme's values as its quantize returns them (int8 for int4 and int8, float8_e4m3fn for
    fp8), [out, in] in the original column order. scale: the group scale that was passed in.
    fell_back/reason: whether and why q is plain RTN instead."""

    q: Tensor
    scale: Tensor
    fell_back: bool = False
    reason: str = ""


def _prepare_hessian(hessian: Tensor, in_features: int, device: torch.device) -> tuple[Tensor | None, str]:
    """Float64 symmetric H normalized to mean live diagonal 1, dead channels decoupled; or (None, why)."""
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({in_features}, {in_features})")
    h = hessian.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(h).all()):
        return None, "the Hessian holds NaN/Inf values"
    h = h.add(h.T).div_(2)  # a new tensor: the caller's Hessian is never written
    diag = h.diagonal()
    if bool((diag < 0).any()):
        return None, "the Hessian has negative diagonal entries"
    dead = diag == 0
    live = ~dead
    if bool(live.any()):
        h.div_(diag[live].mean())
    # A PSD matrix with a zero diagonal entry has that whole row and column zero; make it exactly so
    # and give the channel a unit diagonal: its column then quantizes as RTN and spreads no error.
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = 1
    return h, ""


def _check_scale(w: Tensor, scale: Tensor, scheme: Scheme) -> None:
    rows, cols = w.shape
    schemes._check_scale(scale, (rows, schemes._check_groups(cols, scheme.group_size(cols))))
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError("scale must be finite and positive")


def _damped_inverse_cholesky(h: Tensor, damp: float) -> tuple[Tensor | None, float]:
    """Upper-triangular U with U^T U = (H + d * mean(diag H) * I)^-1 (the factor GPTQ propagates
    errors with) in float32, raising d until it exists; returns (U or None, the last d tried).

    With J the reversal permutation and J H J = L L^T: H^-1 = (J L^-T J)(J L^-1 J), and J L^-1 J is
    upper triangular. One Cholesky and one triangular solve, no explicit inverse, and at most four
    matrices of H's size alive at once (an 8192-wide float64 H is 0.5 GB).
    """
    mean_diag = float(h.diagonal().mean())
    dampings = [damp] + [max(damp, 0.01) * 10**k for k in range(1, _DAMP_RETRIES + 1)]
    for d in dampings:
        reversed_h = h.flip(0, 1)  # J H J, a copy; its diagonal is H's reversed, so damping it in place is alike
        reversed_h.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        del reversed_h
        if int(info) != 0:
            continue
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        u = torch.linalg.solve_triangular(lower, eye, upper=False)
        del lower, eye
        u = u.flip(0, 1)
        if bool(torch.isfinite(u).all()) and bool((u.diagonal() > 0).all()):
            return u.to(torch.float32), d
    return None, dampings[-1]


def _quantize_columns(work: Tensor, u: Tensor, scheme: Scheme, scale: Tensor, col_group: Tensor, block_size: int) -> bool:
    """GPTQ's column loop, in place on float32 `work` [out, in] (columns in processing order): each
    column is rounded to its group's grid and its error spread over the later columns through `u`,
    in lazy batches of `block_size`. Leaves the rounded grid values in `work`; False on NaN/Inf."""
    rows, cols = work.shape
    s_all = scale.to(torch.float32)
    low_all = scheme.lower_clamp(scale)
    bad = torch.zeros((), dtype=torch.bool, device=work.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        blk = work[:, i1:i2]  # a view: updated in place, quantized columns overwritten by their q values
        s_blk = s_all[:, col_group[i1:i2]]
        low_blk = low_all[:, col_group[i1:i2]] if low_all is not None else None
        err_blk = torch.empty((rows, i2 - i1), dtype=torch.float32, device=work.device)
        for i in range(i2 - i1):
            x = blk[:, i]
            s = s_blk[:, i]
            q = scheme.round_to_grid(x / s, None if low_blk is None else low_blk[:, i])
            err = (x - q * s).div_(u[i1 + i, i1 + i])
            blk[:, i + 1 :].addr_(err, u[i1 + i, i1 + i + 1 : i2], alpha=-1)
            blk[:, i] = q
            err_blk[:, i] = err
        bad |= ~torch.isfinite(err_blk).all()
        if i2 < cols:
            work[:, i2:].addmm_(err_blk, u[i1:i2, i2:], alpha=-1)
    return not bool(bad)


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    scheme: Scheme | str,
    scale: Tensor,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> GPTQResult:
    """GPTQ-quantize `w` [out, in] with the fixed group scale `scale` of `scheme` (a Scheme or its name).

    `hessian` [in, in] is sum x x^T over the layer's inputs at any positive scaling. Columns are
    processed in decreasing diag(H) order when `act_order`, in lazy batches of `block_size`; the
    weight updates run in float32 on w's device, the factorization in float64. The result is always
    valid for `scale`: on a failed factorization or non-finite values it is RTN with `fell_back` set.
    """
    scheme = as_scheme(scheme)
    schemes._check_weight(w)
    _check_scale(w, scale, scheme)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not damp >= 0 or damp == float("inf"):
        raise ValueError(f"damp must be a finite non-negative number, got {damp}")
    schemes.check_finite(w, "weight")
    rows, cols = w.shape
    device = w.device

    def fallback(reason: str) -> GPTQResult:
        return GPTQResult(scheme.quantize(w, scheme.scales_with(w, scale)), scale, True, reason)

    h, reason = _prepare_hessian(hessian, cols, device)
    if h is None:
        return fallback(reason)

    perm = None
    if act_order:
        perm = torch.argsort(hessian.diagonal().to(device), descending=True, stable=True)
        h = h[perm[:, None], perm]

    u, tried = _damped_inverse_cholesky(h, damp)
    del h
    if u is None:
        return fallback(f"Cholesky failed even with dampening {tried:g} * mean(diag H)")

    # Per-column scale and lower clamp (if any), looked up through the column's group.
    col_group = torch.arange(cols, device=device) // scheme.group_size(cols)
    if perm is not None:
        col_group = col_group[perm]
    work = (w if perm is None else w[:, perm]).to(torch.float32, copy=True)
    if not _quantize_columns(work, u, scheme, scale, col_group, block_size):
        return fallback("the GPTQ updates produced NaN/Inf values")

    q_all = scheme.to_values(work)
    if perm is not None:
        inverse = torch.argsort(perm)
        q_all = q_all.view(torch.int8)[:, inverse].contiguous().view(q_all.dtype)
    return GPTQResult(q_all, scale)
