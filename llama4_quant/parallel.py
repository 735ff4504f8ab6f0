"""How many CPU cores the kernels use (`--threads`).

torch kernels (mse, GPTQ, the int / fp8 schemes on contiguous weights and on CUDA) use torch's
intra-op threads; the compiled loops (numba) of the GGUF block encoders (`formats.gguf_kernels`) and
of the int schemes on routed experts (`cpu_kernels`) spread rows over numba's threads. Each row is
computed on its own, so the bytes never depend on the number of threads.
"""

from __future__ import annotations

import os

_threads = 0  # 0: not set, use every core this process may run on (its share, with other ranks beside it)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads() -> int:
    from .distributed import local_world_size

    return _threads or max(1, available_cores() // local_world_size())


def set_threads(n: int | None) -> None:
    """Use `n` cores for the kernels (None or 0: every available core, divided among the ranks of a job
    that run on this machine)."""
    global _threads
    if n is not None and n < 0:
        raise ValueError(f"--threads must be positive, got {n}")
    _threads = n or 0
    import torch

    torch.set_num_threads(threads())


def keep_freed_memory() -> None:
    """Have glibc's malloc serve every allocation from the heap and keep what is freed, so the next
    slice's buffers reuse those pages. By default a block over 32 MB is a fresh mapping whose every
    page the kernel faults in and zeroes: at Scout's slice sizes that was 40% of an int4 run's time
    (44 of 75 s in the kernel). Peak memory stays the largest working set; nothing on other libcs."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def use_kernel_threads() -> None:
    """Give numba's parallel loops `threads()` threads (numba keeps the setting per calling thread)."""
    import numba
    import torch

    torch_threads = torch.get_num_threads()
    numba.set_num_threads(min(threads(), numba.config.NUMBA_NUM_THREADS))
    # numba's OpenMP layer, when it starts, sets this thread's OpenMP team to every core, and torch's
    # kernels on this thread use that team: without this, `--threads 1` ran mse and GPTQ on all cores
    # after the first compiled kernel, and each rank of a torchrun job on all of its machine's cores.
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
