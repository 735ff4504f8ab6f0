"""llama.cpp's importance-matrix file (the GGUF imatrix that `llama-imatrix` writes and `llama-quantize --imatrix` reads).

The file is a GGUF with no architecture and these KVs, as llama.cpp's tools/imatrix/imatrix.cpp writes them:
`general.type = "imatrix"`, `imatrix.datasets` (array of strings), `imatrix.chunk_count` and
`imatrix.chunk_size` (uint32). llama-quantize refuses a GGUF imatrix that lacks any of the last three.
For each weight, by its GGUF tensor name `W` (e.g. `blk.0.attn_q.weight`), two F32 tensors:
`W.in_sum2`, the sum of x_j^2 over calibration tokens per input channel, ggml shape [in, n_mat]
(numpy [n_mat, in]), and `W.counts`, the number of tokens summed, ggml shape [1, n_mat]; n_mat is
the number of experts for 3-D expert tensors (ffn_*_exps), else 1, and trailing 1-dims are dropped
as ggml's GGUF writer does. llama-quantize rounds each count to an integer, divides each expert's
row of sums by its count in float32 (a zero count gives all ones), and hands expert e's row to the
quantizer for the rows of expert e; `mean_importance` does the same arithmetic.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

Stats = tuple[np.ndarray, np.ndarray]  # (in_sum2 [in] or [n_experts, in], counts [1] or [n_experts])


class PlannedTensor(Protocol):
    """What `gguf_imatrix_entries` needs of a `gguf.GGUFTensor`."""

    name: str
    shape: tuple[int, ...]
    importance_key: str | None


def _checked(name: str, in_sum2: np.ndarray, counts: np.ndarray) -> Stats:
    """(in_sum2 as float32 [n_mat, in], counts as float32 [n_mat]); raises ValueError when malformed."""
    sums = np.asarray(in_sum2, dtype=np.float32)
    cnt = np.asarray(counts, dtype=np.float32).reshape(-1)
    if sums.ndim not in (1, 2) or sums.size == 0:
        raise ValueError(f"{name}: in_sum2 must be [in] or [n_experts, in], got shape {sums.shape}")
    sums = sums.reshape(-1, sums.shape[-1])
    if cnt.size != sums.shape[0]:
        raise ValueError(f"{name}: {cnt.size} counts for {sums.shape[0]} rows of in_sum2")
    if not (np.isfinite(sums).all() and (sums >= 0).all()):
        raise ValueError(f"{name}: in_sum2 must be finite and non-negative")
    if not (np.isfinite(cnt).all() and (cnt >= 0).all() and (cnt == np.round(cnt)).all()):
        raise ValueError(f"{name}: counts must be non-negative whole numbers (llama.cpp rounds them)")
    return sums, cnt


def mean_importance(in_sum2: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """in_sum2 / counts per expert in float32, exactly as llama-quantize computes its quant weights.

    Returns the shape of `in_sum2`; a row whose count is 0 becomes all ones (llama.cpp's rule)."""
    sums, cnt = _checked("importance", in_sum2, counts)
    safe = np.where(cnt > 0, cnt, np.float32(1))[:, None]
    mean = np.where(cnt[:, None] > 0, sums / safe, np.float32(1)).astype(np.float32)
    return mean.reshape(np.shape(in_sum2))


def gguf_imatrix_entries(
    plan_tensors: Iterable[PlannedTensor], stats: Callable[[str], Stats | None]
) -> dict[str, Stats]:
    """{GGUF tensor name: (in_sum2, counts)} for every planned matrix whose importance key has statistics.

    `stats(key)` takes an l4q importance key (HF module name, or `...experts.gate|up|down`) and returns
    (in_sum2, counts) or None. Shapes are checked against the tensor: [in] and [1] for a matrix,
    [n_experts, in] and [n_experts] for an expert tensor. 1-D tensors (norms) are never quantized and skipped."""
    out: dict[str, Stats] = {}
    for t in plan_tensors:
        if not t.importance_key or len(t.shape) < 2:
            continue
        found = stats(t.importance_key)
        if found is None:
            continue
        sums, cnt = _checked(t.importance_key, *found)
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        if sums.shape != (n_mat, t.shape[-1]) or (len(t.shape) == 3) != (np.ndim(found[0]) == 2):
            raise ValueError(f"{t.importance_key}: in_sum2 shape {np.shape(found[0])} does not fit {t.name} {t.shape}")
        out[t.name] = (np.asarray(found[0], dtype=np.float32), cnt)
    return out


def write_llama_imatrix(
    path: Path, in_sum2_counts: dict[str, Stats], *, datasets: list[str], chunk_size: int, chunk_count: int
) -> None:
    """Write a GGUF imatrix that llama-quantize's `--imatrix` reads; `path` appears only when complete.

    `in_sum2_counts` is keyed by GGUF tensor name; `datasets` names the calibration data (at least
    one: llama-quantize rejects a file without the key), `chunk_size` tokens per chunk and
    `chunk_count` chunks processed are stored as llama-imatrix would."""
    import gguf

    if not datasets:
        raise ValueError("datasets must name at least one calibration source")
    if not in_sum2_counts:
        raise ValueError("no imatrix entries to write")
    for value, what in ((chunk_size, "chunk_size"), (chunk_count, "chunk_count")):
        if not 0 <= value < 2**32:
            raise ValueError(f"{what} must fit a uint32, got {value}")
    path = Path(path).absolute()
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "")  # an empty arch adds no general.architecture, as llama-imatrix writes none
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [str(d) for d in datasets])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(in_sum2_counts):  # llama-imatrix sorts by name too
        sums, cnt = _checked(name, *in_sum2_counts[name])
        n_mat = sums.shape[0]
        # ggml's writer drops trailing 1-dims: dense [in] and [1]; experts [E, in] and [E, 1] (numpy order)
        writer.add_tensor(f"{name}.in_sum2", sums if n_mat > 1 else sums[0])
        writer.add_tensor(f"{name}.counts", cnt[:, None] if n_mat > 1 else cnt)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
