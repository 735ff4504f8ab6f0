"""How many CPU cores the kernels use (`--threads`), and the worker processes that share them.

torch kernels (int4 / int8 / fp8, mse, GPTQ on the CPU) use torch's intra-op threads. The GGUF block
quantizers are numpy, which runs one core per call and holds the GIL between its operations, so a
large matrix is cut into row chunks that `map_ordered(..., processes=True)` encodes in worker
processes. Every chunk is encoded on its own, so the bytes never depend on the number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_threads = 0  # 0: not set, use every core this process may run on
_pools: dict[bool, Executor] = {}  # processes? -> pool


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads() -> int:
    return _threads or available_cores()


def set_threads(n: int | None) -> None:
    """Use `n` cores for the kernels (None or 0: every available core)."""
    global _threads
    if n is not None and n < 0:
        raise ValueError(f"--threads must be positive, got {n}")
    _threads = n or 0
    shutdown()
    import torch

    torch.set_num_threads(threads())


def shutdown() -> None:
    """Stop the workers (they start again on demand)."""
    while _pools:
        _pools.popitem()[1].shutdown(cancel_futures=True)


def _pool(processes: bool) -> Executor:
    if processes not in _pools:
        if processes:
            import multiprocessing

            # forkserver: a worker never inherits this process's threads (reader, torch) mid-lock
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["llama4_quant.formats.gguf_quants"])
            _pools[True] = ProcessPoolExecutor(max_workers=threads(), mp_context=ctx)
        else:
            _pools[False] = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="l4q-kernel")
    return _pools[processes]


def map_ordered(fn: Callable[[T], R], items: Iterable[T], processes: bool = False) -> Iterator[R]:
    """fn over items on the worker threads (or processes: fn and items must pickle), results in
    order; in the calling thread when one core is set. At most twice as many items as workers are in
    flight, so memory stays bounded by a few items."""
    if threads() == 1:
        yield from map(fn, items)
        return
    ex, window, pending = _pool(processes), 2 * threads(), []
    for item in items:
        pending.append(ex.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()
