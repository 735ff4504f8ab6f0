"""Calibration-free MSE scale search: pick, per int4 group, int8/fp8 row or fp8 128x128 block, the
stored scale that minimizes the (optionally importance-weighted) squared quantization error.

Absmax RTN sizes every scale so that nothing clips. For heavy-tailed groups that wastes most of the
grid on one outlier; a slightly smaller scale clips the outlier a little and rounds everything else
more finely. `search_scales` tries a fixed grid of candidates

    s_k = smallest scale_dtype value >= max(absmax * k / 64 / half_range, tiny),   k = 64, 63, ..., 40

(the scheme's `absmax_scale` rule, half_range 7.5 / 127.5 / 448, exactly how it rounds its RTN
scale) and keeps, per group, the one minimizing sum_j imp_j * (w_j - q_j * s)^2 with the scheme's own
rounding and clamping (`round_to_grid`, `lower_clamp`).

* k = 64 is exactly the RTN scale, so the result is never worse than RTN (in the float32 objective).
* k = 60 gives absmax / 8: int4 groups whose absmax is negative use the full [-8, 7] range.
* Ties keep the larger scale, so all-zero groups (and groups with zero importance) keep RTN's scale.
* Every candidate is at most the RTN scale, so it is finite, and fp8 candidates take the same
  one-step-down rule as `schemes.fp8_scales` where 448 * scale would overflow the scale dtype (both
  come from `absmax_scale`). The int4/int8 `-qmax` clamp for overflowing scales is the scheme's
  `lower_clamp`, as in its quantize.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import schemes
from .formats.compressed_tensors import Scheme, as_scheme

# Grid factors k / 64 applied to absmax, largest first (so ties keep the larger scale). Multiples of
# 1/64 keep absmax * factor exact in float32 for BF16/FP16 weights.
GRID_STEPS = tuple(range(64, 39, -1))
GRID_FACTORS = tuple(k / 64 for k in GRID_STEPS)


def candidate_scales(absmax: Tensor, scheme: Scheme | str, scale_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The grid of group scales [len(GRID_FACTORS), *absmax.shape] for float32 group absmax values.

    Row 0 is bit-identical to the scheme's RTN scale (`rtn_scales`).
    """
    scheme = as_scheme(scheme)
    return torch.stack([scheme.absmax_scale(absmax * (k / 64), scale_dtype) for k in GRID_STEPS])


def normalized_importance(importance: Tensor | None, in_features: int, device: torch.device) -> Tensor:
    """Float32 [in] importance scaled to max 1 (only ratios matter); None or all-zero -> all ones."""
    if importance is None:
        return torch.ones(in_features, dtype=torch.float32, device=device)
    if importance.shape != (in_features,):
        raise ValueError(f"importance has shape {tuple(importance.shape)}, expected ({in_features},)")
    imp = importance.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    top = imp.max()
    if float(top) == 0:
        return torch.ones_like(imp)
    return imp / top


def _group_error(x: Tensor, scale: Tensor, imp: Tensor, norm: Tensor, scheme: Scheme, buf: Tensor) -> Tensor:
    """sum_j imp_j * ((x_j - q_j * s) / norm)^2 per group: x [rows, groups, gs] float32, scale [rows, groups].

    q uses the same float32 operations as the scheme's quantize; dividing by the group's absmax
    (`norm`) only keeps the squares away from float32 overflow and underflow. `buf` is scratch space
    shaped like x.
    """
    s = scale.to(torch.float32).unsqueeze(-1)
    lower = scheme.lower_clamp(scale)
    q = scheme.round_to_grid(torch.div(x, s, out=buf), None if lower is None else lower.unsqueeze(-1))
    return q.mul_(s).sub_(x).div_(norm).square_().mul_(imp).sum(-1)


def search_scales(
    w: Tensor, scheme: Scheme | str, importance: Tensor | None = None, scale_dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """MSE-optimal group scales for `w` [out, in] from a fixed grid that includes the RTN scale.

    `scheme` is a Scheme or its registered name. Returns the scheme's group scale (for int4, int8 and
    fp8 the `weight_scale` their quantize takes: int4 [out, in / 128], int8 and fp8 [out, 1]; for
    fp8-block each block's scale repeated over its rows), in `scale_dtype`, on w's device;
    `scheme.scales_with` completes the scales. `importance` [in] weights the squared error per input
    column (e.g. E[x^2] from calibration); None weights all columns equally. Where rows share a scale
    (`rows_per_scale`), their errors are summed before choosing. Rows are processed in slices of
    whole row blocks, about `schemes._CHUNK_ELEMENTS` weights each, with about three float32 copies
    of one slice alive at a time.
    """
    scheme = as_scheme(scheme).for_weight(w)  # a scheme with a global scale: bound to w's (or its group's)
    schemes._check_weight(w)
    rows, cols = w.shape
    group_size = scheme.group_size(cols)
    groups = schemes._check_groups(cols, group_size)
    if rows % scheme.rows_per_scale:
        raise ValueError(f"{scheme.name} shares a scale over {scheme.rows_per_scale} rows; w has {rows}")
    imp = normalized_importance(importance, cols, w.device).view(1, groups, group_size)
    absmax = scheme.group_absmax(w)
    cands = candidate_scales(absmax, scheme, scale_dtype)  # [C, rows, groups]
    norm = absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    shared = scheme.rows_per_scale
    best = torch.zeros((rows // shared, groups), dtype=torch.int64, device=w.device)
    # slices of whole row blocks, about _CHUNK_ELEMENTS weights each
    step = max(shared, schemes._CHUNK_ELEMENTS // max(cols, 1) // shared * shared)
    for start in range(0, rows, step):
        r = slice(start, min(start + step, rows))
        x = w[r].to(torch.float32).unflatten(-1, (groups, group_size))
        buf = torch.empty_like(x)
        best_err = None
        for c in range(len(GRID_FACTORS)):
            err = _group_error(x, cands[c, r], imp, norm[r], scheme, buf)
            if shared > 1:
                err = err.unflatten(0, (-1, shared)).sum(1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err  # strict: ties keep the earlier, larger scale
            best_err = torch.where(better, err, best_err)
            best[start // shared:r.stop // shared] = torch.where(better, c, best[start // shared:r.stop // shared])
    if shared > 1:
        best = best.repeat_interleave(shared, 0)
    return cands.gather(0, best.unsqueeze(0)).squeeze(0)
