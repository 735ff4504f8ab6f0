"""--threads: the compiled kernels and torch's kernels both keep to it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A fresh process: numba starts its thread pool once per process, at the first compiled kernel.
AFTER_A_COMPILED_KERNEL = """
import sys
import torch
from llama4_quant import cpu_kernels, parallel

parallel.set_threads(int(sys.argv[1]) or None)
torch.ones(1 << 20).sum()  # torch's kernels first, as in a run: they set up torch's threads on this thread
cpu_kernels.group_absmax_in_rows(torch.ones(64, 256, dtype=torch.bfloat16), 128)
print(torch.get_num_threads(), parallel.threads())
"""


@pytest.mark.parametrize("threads, local_world_size", [(1, "1"), (0, "2")])
def test_torch_keeps_its_threads_after_the_first_compiled_kernel(threads, local_world_size) -> None:
    # numba's OpenMP pool of 2 threads, even on one core: starting it used to give torch 2 threads too
    # (--threads 1 ignored by mse and GPTQ; every rank of a 2-rank job on all of the machine's cores).
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "omp", "LOCAL_WORLD_SIZE": local_world_size}
    done = subprocess.run([sys.executable, "-c", AFTER_A_COMPILED_KERNEL, str(threads)], env=env,
                          capture_output=True, text=True, check=True)
    torch_threads, wanted = done.stdout.split()
    assert torch_threads == wanted
