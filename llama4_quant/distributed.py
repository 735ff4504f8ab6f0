"""One job in several processes (torchrun): which rank this is, what it owns, and the few collectives l4q uses.

Launched by torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK` and the rendezvous in the environment), every
rank runs the same command. The work is split so that every output byte is computed exactly as in one
process with the same threads (on CPUs, BLAS results depend on the thread count), whatever the number
of ranks:

- the layer-streaming passes (calibrate, GPTQ) divide each MoE layer's routed experts among the ranks in
  contiguous ranges; every rank runs attention, the shared expert and dense layers itself (the same
  arithmetic, so the same hidden states), and the routed experts' outputs are exchanged and added row by
  row in expert order, as one process adds them. Expert statistics are summed across ranks, each
  expert's by the one rank that saw it, so no sum changes order;
- the streaming exports divide their output (GGUF tensors, compressed-tensors shards) among the ranks,
  and each rank reads only what its share needs;
- rank 0 owns the output's life cycle (checks, lock, metadata, the final move into place); the other
  ranks write their shares into rank 0's partial output, so the output and work directories must be on
  a file system every rank sees (one machine's disk, or a shared file system across machines).

Nothing here imports torch until a collective is needed; one process (no torchrun) never initializes
torch.distributed and every collective is a no-op.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_initialized = False


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process owns the output's life cycle and prints (rank 0, or the only process)."""
    return rank() == 0


def init() -> None:
    """Join the torchrun job once (gloo for CPU tensors, NCCL for CUDA ones when there are GPUs). Each rank
    on a machine with GPUs uses the GPU of its local rank."""
    global _initialized
    if _initialized or not is_distributed():
        return
    import datetime

    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    # A rank that dies is noticed by torchrun, which stops the others; the timeout covers a hung peer.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    _initialized = True
    atexit.register(_leave)


def _leave() -> None:
    """Leave the job cleanly at exit: a process group left to the interpreter's teardown can abort it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def require_on_disk(model) -> None:
    """A job of several ranks reads a model that is on disk: streamed from the Hub, every rank would
    download (and delete) the shards on its own."""
    if is_distributed() and model.source.remote is not None:
        from .errors import UsageError

        raise UsageError(f"{model.source.label} would stream from the Hub into every rank: download it first "
                         "(hf download), then run the job on the local copy")


def owned_range(count: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous share of `count` items (a MoE layer's experts) that rank `rank_` owns; the first
    `count % world` ranks take one more."""
    r, w = rank() if rank_ is None else rank_, world_size() if world is None else world
    base, extra = divmod(count, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def assign(sizes: list[int], world: int | None = None) -> list[int]:
    """The rank that owns each item: largest first to the least-loaded rank (ties: lowest index, lowest
    rank), so every rank computes the same, balanced assignment."""
    w = world_size() if world is None else world
    load = [0] * w
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(w), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks once rank 0's has returned: for what rank 0 creates and
    the others open (a partial output, its files)."""
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


def barrier() -> None:
    if is_distributed():
        init()
        import torch.distributed as dist

        dist.barrier()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank `src`'s `value` on every rank."""
    if not is_distributed():
        return value
    init()
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src)
    return int(t.item())


def broadcast_(tensor, src: int = 0) -> None:
    """Overwrite `tensor` on every rank with rank `src`'s (same shape and dtype everywhere)."""
    if is_distributed():
        init()
        import torch.distributed as dist

        dist.broadcast(tensor, src)


def sum_(tensor) -> None:
    """Sum `tensor` over the ranks, in place. Exact where at most one rank holds a non-zero value of
    each element and values are not negative zeros (per-expert sums and counts)."""
    if is_distributed():
        init()
        import torch.distributed as dist

        dist.all_reduce(tensor, dist.ReduceOp.SUM)


def max_(tensor) -> None:
    if is_distributed():
        init()
        import torch.distributed as dist

        dist.all_reduce(tensor, dist.ReduceOp.MAX)
