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
from typing import Protocol

from . import arch
from .checkpoint import TensorInfo, iter_row_blocks, read_slice, read_tensor
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

    def check(self) -> None:
        """Refuse a bad output early, before anything is written."""

    def start(self) -> None:
        """Create (or reopen for --resume) the partial output."""

    def prepare(self, show_progress: bool) -> None:
        """Work before the walk (GPTQ's calibrated pass)."""

    def wants(self, w: Weight) -> str | None:
        """WHOLE, ROWS, or None when this target needs no data of `w` (not in it, or already written)."""

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

    def take(self, w: Weight, start_row: int, data) -> None:
        self.visit(w, data)

    def weight_done(self, w: Weight) -> None:
        pass


def walk(model: Model, targets: list, progress: Callable[[int], None] = lambda n: None) -> int:
    """Read the source once, handing each weight to the targets that want it; returns bytes read."""
    from .schemes import check_finite

    read_bytes = 0
    for r in reads(model):
        wanted = [[t for t in targets if t.wants(w)] for w in r.weights]
        if any(wanted):
            if r.expert is not None:
                data = read_slice(r.info, r.expert)
                check_finite(data, f"{r.info.name}[{r.expert}]")
                parts = unfuse_gate_up(data) if len(r.weights) == 2 else (data.T,)
                for w, part, ts in zip(r.weights, parts, wanted):
                    for t in ts:
                        t.take(w, 0, part)
                nbytes = data.numel() * data.element_size()
            else:
                nbytes = _read_tensor(r.weights[0], wanted[0])
            read_bytes += nbytes
            progress(nbytes)
        for w in r.weights:
            for t in targets:
                t.weight_done(w)
    return read_bytes


def _read_tensor(w: Weight, targets: list) -> int:
    from .schemes import check_finite

    whole = any(t.wants(w) == WHOLE for t in targets)
    start = 0
    for block in [read_tensor(w.info)] if whole else iter_row_blocks(w.info):
        check_finite(block, w.info.name)
        for t in targets:
            t.take(w, start, block)
        start += block.shape[0]
    return w.info.nbytes


def run(model: Model, targets: list, show_progress: bool = True, desc: str = "") -> int:
    """Write every target from one walk of `model`: each output is checked before any is started,
    and each appears only when complete. Returns the source bytes read."""
    from tqdm import tqdm

    for t in targets:
        t.check()
    started = []
    try:
        for t in targets:
            started.append(t)
            t.start()
        for t in targets:
            t.prepare(show_progress)
        total = sum(w.source_bytes for w in weights(model) if any(t.wants(w) for t in targets))
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress, desc=desc,
                  dynamic_ncols=True) as bar:
            read_bytes = walk(model, targets, bar.update)
        for t in targets:
            t.finish()
    except BaseException as exc:
        for t in started:
            t.fail(exc)
        raise
    for i, t in enumerate(targets):
        try:
            t.commit()
        except BaseException:
            for rest in targets[i + 1:]:  # complete, kept in their partials for a rerun with --resume
                rest.partial.release()
            raise
    return read_bytes
