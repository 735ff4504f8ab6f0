"""The one front end: every weight of an opened BF16 model, in storage order, experts unfused, read
once and handed to every target that wants it; and `run`, which writes any number of targets from
that one walk.

A MoE layer stores its routed experts fused (`experts.gate_up_proj` [E, hidden, 2 * inter],
`experts.down_proj` [E, inter, hidden]). The walk visits them at the first of the two, expert by
expert: one read of `gate_up_proj[e]` yields that expert's gate and up projections, one read of
`down_proj[e]` its down projection, each as an [out, in] view. Other tensors are read whole when a
target needs the whole matrix (quantizing a Linear), else in bounded blocks of rows; nothing is read
that no target wants. So memory is bounded by one expert slice or one Linear, and with several
targets every source byte is still read once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import arch, distributed, outputs
from .checkpoint import MAPPED, STREAMED, TensorInfo, iter_row_blocks, read_slice, read_tensor
from .model import EXPERT_PROJECTIONS, Model, unfuse_gate_up

WHOLE, ROWS = "whole", "rows"  # how a target wants a weight's data


@dataclass(frozen=True)
class Weight:
    """One weight as its consumers name it: the stored tensor, or one routed expert's projection."""

    name: str  # `...experts.{e}.gate_proj.weight` for a routed expert, else the stored name
    role: str
    layer: int | None
    info: TensorInfo  # the stored tensor it is read from
    expert: int | None = None
    shape: tuple[int, ...] = ()  # [out, in] for an expert projection; the stored shape otherwise

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def stats_key(self) -> str:
        """The key of its calibration statistics: the module, or `...experts.gate` for every expert's
        gate projection (whose statistics are [experts, in])."""
        if self.expert is None:
            return self.module
        base, proj = self.module.rsplit(".", 2)[0], self.module.rsplit(".", 1)[1]
        return f"{base}.{proj.removesuffix('_proj')}"

    @property
    def source_bytes(self) -> int:
        if self.expert is None:
            return self.info.nbytes
        per_expert = self.info.nbytes // self.info.shape[0]
        return per_expert // 2 if self.role == arch.EXPERTS_GATE_UP else per_expert


@dataclass(frozen=True)
class Read:
    """One read of the source: a whole tensor (expert None), or one expert's slice of a fused tensor,
    which yields `weights` (gate and up from gate_up_proj, down from down_proj)."""

    info: TensorInfo
    expert: int | None
    weights: tuple[Weight, ...]


def reads(model: Model) -> Iterator[Read]:
    """The walk's reads in order: storage order, a MoE layer's experts at its first fused tensor."""
    spec = model.spec
    experts_done: set[int] = set()
    for info in model.ckpt.tensors:
        role = arch.classify(info.name, spec)
        if role.role not in arch.EXPERT_ROLES:
            yield Read(info, None, (Weight(info.name, role.role, role.layer, info, shape=info.shape),))
            continue
        if role.layer in experts_done:
            continue
        experts_done.add(role.layer)
        base = f"{spec.layer_prefix}{role.layer}.feed_forward.experts"
        gate_up, down = model.ckpt.by_name[f"{base}.gate_up_proj"], model.ckpt.by_name[f"{base}.down_proj"]
        h, inter = spec.hidden_size, spec.intermediate_size
        for e in range(spec.num_experts):
            gate, up = (Weight(f"{base}.{e}.{p}.weight", arch.EXPERTS_GATE_UP, role.layer, gate_up, e, (inter, h))
                        for p in EXPERT_PROJECTIONS[:2])
            yield Read(gate_up, e, (gate, up))
            yield Read(down, e, (Weight(f"{base}.{e}.down_proj.weight", arch.EXPERTS_DOWN, role.layer, down, e, (h, inter)),))


def weights(model: Model) -> Iterator[Weight]:
    """Every weight in the order the walk visits it (headers only: nothing is read)."""
    for r in reads(model):
        yield from r.weights


class Target(Protocol):
    """One output written from the walk (see `run`)."""

    out: Path
    expected_bytes: int  # the output's size, known after `check`

    def check(self) -> None:
        """Refuse a bad output early, before anything is written."""

    def start(self) -> None:
        """Create (or reopen for --resume) the partial output."""

    def prepare(self, show_progress: bool) -> None:
        """Work before the walk (GPTQ's calibrated pass)."""

    def wants(self, w: Weight) -> str | None:
        """WHOLE, ROWS, or None when this target needs no data of `w` (not in it, or already written)."""

    def finds_non_finite(self, w: Weight) -> bool:
        """Whether `take` raises NonFiniteWeightError, naming `w`, for any NaN/Inf in its data: then
        the reader need not pass over it to look first (when no other target needs that)."""

    def take(self, w: Weight, start_row: int, data) -> None:
        """Rows [start_row, start_row + len(data)) of `w` (all of them for WHOLE)."""

    def weight_done(self, w: Weight) -> None:
        """Called for every weight, wanted or not, once the walk is past it."""

    def finish(self) -> None:
        """Write what follows the data (index, config, recipe)."""

    def commit(self) -> None:
        """Move the finished output into place."""

    def fail(self, exc: BaseException) -> None:
        """Clean up the partial after an error (kept for --resume where that can continue)."""


class Visitor:
    """A read-only consumer of the walk: `visit(w, data)` with the whole of each weight `select` picks."""

    def __init__(self, select: Callable[[Weight], bool], visit: Callable):
        self.select, self.visit = select, visit

    def wants(self, w: Weight) -> str | None:
        return WHOLE if self.select(w) else None

    def finds_non_finite(self, w: Weight) -> bool:
        return False

    def take(self, w: Weight, start_row: int, data) -> None:
        self.visit(w, data)

    def weight_done(self, w: Weight) -> None:
        pass


# Slices read ahead of the one being quantized: reading (the disk, or a copy from the page cache) then
# runs beside the kernels, at the cost of this many more slices in memory.
READ_AHEAD = 1


@dataclass(frozen=True)
class _Piece:
    """What the reader hands on: rows of one read's weights (data None: nothing of it is wanted)."""

    read: Read
    wanted: list  # per weight of the read: the targets that want it
    start_row: int = 0
    data: object = None
    nbytes: int = 0
    last: bool = True  # the read's last piece: its weights are done after it


def walk(model: Model, targets: list, progress: Callable[[int], None] = lambda n: None) -> int:
    """Read the source once, handing each weight to the targets that want it; returns bytes read.

    A reader thread reads up to READ_AHEAD slices ahead while the targets quantize and write the
    current one. So a target's `wants(w)` is asked before the walk reaches `w`: its answer must not
    change while earlier weights are handed out (it depends on what --resume found, not on the walk).
    """
    read_bytes = 0
    with _Reader(model, targets) as pieces:
        for p in pieces:
            _hand_over(p, targets)
            if p.data is not None:
                read_bytes += p.nbytes
                progress(p.nbytes)
            del p  # the slice's buffer goes back to the reader before the next slice is waited for
    return read_bytes


def _hand_over(p: _Piece, targets: list) -> None:
    """Give a piece's rows to the targets that want them; then, after a read's last piece, tell
    every target its weights are done."""
    if p.data is not None:
        if p.read.expert is not None:
            parts = unfuse_gate_up(p.data) if len(p.read.weights) == 2 else (p.data.T,)
            for w, part, ts in zip(p.read.weights, parts, p.wanted):
                for t in ts:
                    t.take(w, 0, part)
        else:
            for t in p.wanted[0]:
                t.take(p.read.weights[0], p.start_row, p.data)
    if p.last:
        for w in p.read.weights:
            for t in targets:
                t.weight_done(w)


class _Reader:
    """The walk's reads as `_Piece`s, read on a thread up to READ_AHEAD pieces ahead (a context
    manager: leaving it stops the thread, whether the walk finished or failed)."""

    def __init__(self, model: Model, targets: list):
        import queue
        import threading

        self.model, self.targets = model, targets
        self.queue: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="l4q-reader", daemon=True)

    def __enter__(self) -> Iterator[_Piece]:
        self.thread.start()
        return self._pieces()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a reader waiting on a full queue
            self._drain()
            self.thread.join(timeout=0.05)
        self._drain()

    def _drain(self) -> None:
        import queue

        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass

    def _pieces(self) -> Iterator[_Piece]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            item = None  # not held while the next piece is waited for

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            plan = [(r, [[t for t in self.targets if t.wants(w)] for w in r.weights]) for r in reads(self.model)]
            # a Hub source's shards are deleted after use, and a mapping would keep a deleted
            # shard's blocks on disk past the --prefetch bound
            read = MAPPED if self.model.source.remote is None else STREAMED
            with _shards(self.model, [r.info.file.name for r, wanted in plan if any(wanted)]) as shards:
                for r, wanted in plan:
                    if not any(wanted):
                        if not self._put(_Piece(r, wanted)):
                            return
                        continue
                    shards.acquire(r.info.file.name)
                    for piece in _read(r, wanted, read):
                        if not self._put(piece):
                            return
                    shards.release(r.info.file.name)
            self._put(None)
        except BaseException as exc:  # handed to the walk, which raises it
            self._put(exc)


class _LocalShards:
    """A local source's shards: all there already."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def acquire(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass


def _shards(model: Model, uses: list[str]):
    """What has the source's shards on disk while the reader takes them in the order `uses`: nothing
    to do for a local source; a Hub source downloads them ahead and deletes them after use."""
    remote = model.source.remote
    return remote.stream(uses) if remote is not None else _LocalShards()


def _read(r: Read, wanted: list, read: str) -> Iterator[_Piece]:
    """The pieces of one wanted read: an expert slice, a whole tensor, or its blocks of rows (`read`
    STREAMED or MAPPED: see `checkpoint.FRESH`), each checked for NaN/Inf here unless every target
    that takes it finds them itself (a pass over the data fewer, beside the kernels)."""
    from .schemes import check_finite

    check = not all(t.finds_non_finite(w) for w, ts in zip(r.weights, wanted) for t in ts)
    if r.expert is not None:
        data = read_slice(r.info, r.expert, read)
        if check:
            check_finite(data, f"{r.info.name}[{r.expert}]")
        yield _Piece(r, wanted, 0, data, data.numel() * data.element_size())
        return
    info = r.info
    whole = any(t.wants(r.weights[0]) == WHOLE for t in wanted[0])
    blocks = [read_tensor(info, read)] if whole else iter_row_blocks(info, read)
    start = 0
    for block in blocks:
        if check:
            check_finite(block, info.name)
        end = start + block.shape[0]
        yield _Piece(r, wanted, start, block, block.numel() * block.element_size(), last=end == info.shape[0])
        start = end
    if start == 0:  # no rows at all: nothing to hand on, but the weight is still done
        yield _Piece(r, wanted)


def run(model: Model, targets: list, show_progress: bool = True, desc: str = "") -> int:
    """Write every target from one walk of `model`: each output is checked before any is started,
    and each appears only when complete. Returns the source bytes read (by this rank, in a job of
    several: each reads what its share of the outputs needs, and rank 0 moves them into place)."""
    from tqdm import tqdm

    for t in targets:
        t.check()
    distributed.require_on_disk(model)
    if model.source.remote is not None:  # before anything is written or downloaded
        model.source.remote.check_space([r.info.file.name for r in reads(model)],
                                        [(t.out, t.expected_bytes - outputs.bytes_under(outputs.partial_path(t.out)))
                                         for t in targets])
    started = []
    try:
        def start_all() -> None:  # rank 0 first: it creates the partials and their files
            for t in targets:
                started.append(t)
                t.start()

        distributed.main_first(start_all)
        for t in targets:
            t.prepare(show_progress)
        total = sum(w.source_bytes for w in weights(model) if any(t.wants(w) for t in targets))
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress, desc=desc,
                  dynamic_ncols=True) as bar:
            read_bytes = walk(model, targets, bar.update)
        for t in targets:
            t.finish()
        distributed.barrier()  # every rank's share is written
    except BaseException as exc:
        for t in started:
            t.fail(exc)
        raise
    if distributed.is_main():
        for i, t in enumerate(targets):
            try:
                t.commit()
            except BaseException:
                for rest in targets[i + 1:]:  # complete, kept in their partials for a rerun with --resume
                    rest.partial.release()
                raise
    distributed.barrier()  # the outputs are in place
    return read_bytes
