"""Size-targeted GGUF: per-tensor block types chosen to minimise the expected error within a file size
(`--target-size`) or bits per weight (`--target-bpw`).

The expected error of a tensor at a block type is its importance-weighted squared quantization error,
sum over output rows and input channels of E[x_j^2] (w - q(w))^2: the squared error it adds to its
layer's output per token, given the calibration's mean x^2 per input channel (the imatrix). A routed
expert only sees the tokens routed to it, so its error counts with its share of the calibration
tokens. K-quant and Q8_0 blocks are encoded independently of each other, so the error is estimated
from a sample of whole blocks, encoded exactly as the export will encode them (same encoders, same
importance): for each Linear, full rows (about 64K values); for each of up to 8 routed experts of a
tensor, one window of 256 input channels over every output row (a contiguous read in the stored
[in, out] layout). Then, per tensor, the type minimising error + lambda * bytes, with lambda found by
bisection so the file fits, and the bytes left over spent on the upgrades with the best error saved
per byte. Tensors without importance data (token embeddings, output, norms, router) and tensors
pinned by `--tensor-type` (or `--token-embedding-type`, `--output-tensor-type`) keep those choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import arch, walk
from ..checkpoint import read_expert_rows, read_rows
from ..errors import UsageError
from ..model import Model
from . import gguf_quants

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
SAMPLE_VALUES = 1 << 16  # values sampled per matrix
SAMPLED_EXPERTS = 8
WINDOW = 256  # input channels per sampled window of an expert: one K-quant super-block per row


@dataclass
class Option:
    qtype: str
    nbytes: int
    error: float


@dataclass
class Budget:
    """What the file must fit: `size` bytes in all (header included), or `bpw` bits per weight over
    every tensor's elements (as llama-quantize reports a file's BPW)."""

    size: int | None = None
    bpw: float | None = None

    def tensor_bytes(self, tensors, header_bytes: int) -> int:
        if self.bpw is not None:
            return int(self.bpw * sum(int(np.prod(t.shape)) for t in tensors) / 8)
        return self.size - header_bytes - 32 * len(tensors)  # each tensor's data is aligned to 32 bytes

    @property
    def option(self) -> str:
        return "--target-bpw" if self.bpw is not None else "--target-size"


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    bt = gguf_quants.block_type(qtype)
    return int(np.prod(shape)) // bt.block_size * bt.type_size


def weighted_error(values: torch.Tensor, importance: np.ndarray | None, qtype: str) -> float:
    """sum of importance_j * (w - q(w))^2 over `values` [rows, cols] encoded as `qtype` (and encoded
    with that importance, as the export does; None: none, and every channel weighs 1)."""
    raw = gguf_quants.quantize(values, qtype, importance)
    decoded = gguf_quants.dequantize(raw, qtype, values.shape[1]).reshape(values.shape).astype(np.float64)
    squared = (values.double().numpy() - decoded) ** 2
    return float((squared if importance is None else squared * importance.astype(np.float64)).sum())


def _spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def _linear_errors(w: walk.Weight, importance: np.ndarray, types: list[str]) -> dict[str, float]:
    rows, cols = w.shape
    picked = _spread(rows, max(1, SAMPLE_VALUES // cols))
    values = torch.cat([read_rows(w.info, int(r), int(r) + 1) for r in picked]).float()
    scale = rows / len(picked)
    return {q: scale * weighted_error(values, importance, q) for q in types}


def _expert_errors(weights: list[walk.Weight], importance: np.ndarray, shares: np.ndarray | None,
                   types: list[str]) -> dict[str, float]:
    """Every expert's projection of one kind (gate, up or down), as one GGUF tensor."""
    first = weights[0]
    rows, cols = first.shape
    experts = _spread(len(weights), SAMPLED_EXPERTS)
    shares = np.full(len(weights), 1 / len(weights)) if shares is None or shares[experts].sum() == 0 else shares
    picked = _spread(rows, SAMPLE_VALUES // WINDOW)
    total = dict.fromkeys(types, 0.0)
    for i, e in enumerate(experts):
        start = (i * 7 % (cols // WINDOW)) * WINDOW  # a different window for each sampled expert
        window = read_expert_rows(first.info, int(e), start, start + WINDOW).float()  # [WINDOW, out] as stored
        if first.role == arch.EXPERTS_GATE_UP:
            half = window.shape[1] // 2
            window = window[:, :half] if first.name.endswith("gate_proj.weight") else window[:, half:]
        values = window.T[picked].contiguous()
        imp = importance[e, start:start + WINDOW]
        scale = shares[e] * (rows / len(picked)) * (cols / WINDOW)
        for q in types:
            total[q] += scale * weighted_error(values, imp, q)
    weight = shares[experts].sum()
    return {q: err / weight for q, err in total.items()}


def estimate(model: Model, tensors, importance: Callable[[str], np.ndarray | None],
             shares: Callable[[int], np.ndarray | None], pinned: set[str]) -> dict[str, list[Option]]:
    """name -> the block types a tensor can take, with its bytes and expected error at each."""
    by_source: dict[str, list[walk.Weight]] = {}
    for w in walk.weights(model):
        by_source.setdefault(w.name if w.expert is None else w.name.replace(f".experts.{w.expert}.", ".experts.0."),
                             []).append(w)
    options = {}
    for t in tensors:
        types = [q for q in CANDIDATES if t.shape[-1] % gguf_quants.block_type(q).block_size == 0]
        if t.name in pinned or t.source is None or len(t.shape) < 2 or not types or (len(t.shape) == 3 and t.shape[-1] % WINDOW):
            continue
        weights = by_source[t.source]
        imp = importance(t.importance_key) if t.importance_key else None
        if imp is None:
            continue
        if len(t.shape) == 3:
            errors = _expert_errors(weights, imp, shares(t.layer), types)
        else:
            errors = _linear_errors(weights[0], imp, types)
        options[t.name] = [Option(q, nbytes(t.shape, q), errors[q]) for q in types]
    return options


def allocate(options: dict[str, list[Option]], budget_bytes: int) -> dict[str, str]:
    """name -> type: least total error with total bytes <= budget_bytes."""
    smallest = sum(min(o.nbytes for o in opts) for opts in options.values())
    if smallest > budget_bytes:
        raise UsageError(f"the target leaves {budget_bytes / 1e6:.2f} MB for the tensors l4q chooses types for, "
                         f"which need at least {smallest / 1e6:.2f} MB at {CANDIDATES[0]}")

    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts, key=lambda o: (o.error + lam * o.nbytes, o.nbytes)) for n, opts in options.items()}

    def size(choice: dict[str, Option]) -> int:
        return sum(o.nbytes for o in choice.values())

    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget_bytes:
        hi *= 4
    if size(pick(lo)) <= budget_bytes:
        hi = lo
    for _ in range(100):  # bisection on the price of a byte
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(pick(mid)) <= budget_bytes else (mid, hi)
    choice = pick(hi)
    left = budget_bytes - size(choice)
    while True:  # spend what is left on the upgrades that save the most error per byte
        best = None
        for n, opts in options.items():
            cur = choice[n]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                if 0 < extra <= left and o.error < cur.error:
                    gain = (cur.error - o.error) / extra
                    if best is None or gain > best[0]:
                        best = (gain, n, o)
        if best is None:
            return {n: o.qtype for n, o in choice.items()}
        _, n, o = best
        left -= o.nbytes - choice[n].nbytes
        choice[n] = o


def apply(model: Model, tensors, budget: Budget, header_bytes: int, stats, pinned: set[str]) -> None:
    """Set the block type of every tensor l4q may choose for, within `budget`, by the calibration
    statistics `stats` (calibrate.stats.Stats)."""
    options = estimate(model, tensors, stats.importance, stats.routing_shares, pinned)
    fixed = sum(t.nbytes for t in tensors if t.name not in options)
    types = allocate(options, budget.tensor_bytes(tensors, header_bytes) - fixed)
    for t in tensors:
        if t.name in types:
            t.qtype = types[t.name]
