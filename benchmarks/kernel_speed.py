"""Kernel speed per core and with N threads, in M values/s (best of --repeat runs).

GGUF: l4q's compiled block encoders (1 thread, N threads), its torch reference encoders, and ggml's
own quantize_<type> (llama-cpp-python's libggml-base, one thread), on the same bf16-exact matrix of
Scout's row length, with and without an importance vector; every l4q output is checked
byte-identical to ggml's. Then int4 (scales, values and packing), int8, FP8, Q8_0 and Q4_K of one
routed expert's projection as the walk hands it over (a transposed view of the stored bf16 slice),
against the same on a contiguous copy; the two outputs are checked identical. Freed memory is kept
for the next call, as `l4q` keeps it (`parallel.keep_freed_memory`): otherwise each call's output
is fresh pages, and the table would time the kernel's page faults.

    python benchmarks/kernel_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from libggml import GGML, TYPES, ggml_quantize  # noqa: E402
from llama4_quant import parallel  # noqa: E402
from llama4_quant.formats.compressed_tensors import get_scheme  # noqa: E402
from llama4_quant.formats import gguf_quants as gq  # noqa: E402


def best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=5120, help="Scout's hidden size: the expert rows' length")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--experts-out", type=int, default=8192, help="an expert projection's output rows (Scout: 8192)")
    args = ap.parse_args()
    if GGML is None:
        sys.exit("llama-cpp-python's libggml-base is missing: bash scripts/setup.sh test")
    parallel.keep_freed_memory()

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02)
    x = x.bfloat16().float().numpy()  # values a BF16 checkpoint holds
    importance = rng.random(args.cols, dtype=np.float32)
    sample = x[: max(1, args.rows // 8)]  # the torch reference is slow: time an eighth, scale up

    print(f"{args.rows} x {args.cols} float32 (bf16 values), M values/s, best of {args.repeat}; "
          f"{args.threads} threads on {os.cpu_count()} cores")
    print("| type | importance | l4q 1 thread | l4q N threads | scaling | l4q torch reference 1 thread | ggml 1 thread "
          "| l4q / ggml per core | bytes == ggml |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for qtype in TYPES:
        for qw in (None, importance) if gq.block_type(qtype).uses_importance else (None,):
            rates = []
            for n in (1, args.threads):
                parallel.set_threads(n)
                gq.quantize(x[:2], qtype, qw)  # compile or load the kernel first
                rates.append(x.size / best_seconds(lambda: gq.quantize(x, qtype, qw), args.repeat) / 1e6)
            parallel.set_threads(1)
            reference_rate = sample.size / best_seconds(lambda: gq.quantize_reference(sample, qtype, qw), 1) / 1e6
            ggml_rate = x.size / best_seconds(lambda: ggml_quantize(x, qtype, qw), args.repeat) / 1e6
            same = np.array_equal(gq.quantize(x, qtype, qw), ggml_quantize(x, qtype, qw))
            print(f"| {qtype} | {'yes' if qw is not None else 'no'} | {rates[0]:.1f} | {rates[1]:.1f} "
                  f"| {rates[1] / rates[0]:.2f}x | {reference_rate:.1f} | {ggml_rate:.1f} | {rates[0] / ggml_rate:.2f}x "
                  f"| {'yes' if same else 'NO'} |")
            if not same:
                sys.exit(f"{qtype}: l4q's bytes differ from ggml's")
    expert_table(args)


def stored_tensors(scheme: str):
    """The tensors `l4q quantize --to scheme` stores for a weight (for a transposed bf16 view: the
    compiled one-pass kernels)."""
    return lambda w: [t for _, t in get_scheme(scheme).encode_weight("m", w)]


def expert_table(args) -> None:
    """An expert's gate projection as the walk hands it over (Scout's [8192, 5120] transposed view
    of half a stored [5120, 16384] slice), through the kernels of the stored layout, and as a
    contiguous copy, through the row kernels: int4, int8, FP8, Q8_0 and Q4_K."""
    stored = (torch.randn(5120, 2 * args.experts_out, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    view, copy = stored[:, : args.experts_out].T, stored[:, : args.experts_out].T.contiguous()
    print(f"\nA [{view.shape[0]}, {view.shape[1]}] bf16 expert projection, M values/s, best of {args.repeat}")
    print("| format | input | 1 thread | N threads | scaling |")
    print("|---|---|---:|---:|---:|")
    encoders = {"int4 g128": stored_tensors("int4"), "int8": stored_tensors("int8"), "FP8": stored_tensors("fp8"),
                "Q8_0": lambda w: [torch.from_numpy(gq.quantize(w, "Q8_0"))],
                "Q4_K": lambda w: [torch.from_numpy(gq.quantize(w, "Q4_K"))]}
    for fmt, encode in encoders.items():
        for name, w in (("transposed view", view), ("contiguous copy", copy)):
            rates = []
            for n in (1, args.threads):
                parallel.set_threads(n)
                encode(w[:256])
                rates.append(w.numel() / best_seconds(lambda: encode(w), args.repeat) / 1e6)
            print(f"| {fmt} | {name} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |")
        if not all(map(torch.equal, encode(view), encode(copy))):
            sys.exit(f"{fmt}: the transposed view's bytes differ from the copy's")


if __name__ == "__main__":
    main()
