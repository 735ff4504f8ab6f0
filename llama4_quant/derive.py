"""Several derivatives from one read: compressed-tensors checkpoints and GGUF files written from a
single walk of the source (`walk.run`), each with its own atomic output, resume and metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import distributed, walk
from .devices import resolve_device
from .errors import UsageError
from .formats import compressed_tensors as ct
from .formats.gguf import GGUFTarget, llama_cpp_warnings
from .formats.gguf_budget import Budget
from .formats.gguf_mmproj import MmprojTarget
from .model import Model
from .pipeline import DEFAULT_MAX_SHARD_SIZE, CompressedTensorsTarget, check_scheme_method, ignore_patterns, load_stats


@dataclass
class Derived:
    """What one target wrote."""

    out: Path
    what: str  # e.g. "42 modules quantized to int4 in 1 shards", "97 tensors of Q4_K_M"
    source_bytes: int
    output_bytes: int


def derive(
    model: Model,
    schemes: list[tuple[str, Path]],
    gguf_types: list[tuple[str, Path]],
    *,
    method: str = "rtn",
    calib: Path | None = None,
    ignore: tuple[str, ...] = (),
    quantize_attention: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    gguf_overrides=None,
    mmproj: tuple[str, Path] | None = None,
    gguf_budget: Budget | None = None,
    show_progress: bool = True,
) -> tuple[list[Derived], int, list[str]]:
    """Write every (scheme, out) and (GGUF type, out) from one walk of `model`.

    `calib` (the STATS directory of `l4q calibrate`) feeds --method mse / gptq for the schemes and is
    the importance matrix of the GGUF types. Returns what each target wrote, the source bytes read and
    llama.cpp's warnings for this model (when a GGUF is among the targets). `gguf_overrides`
    (gguf_types.Overrides) applies to every GGUF type. `mmproj` (type, out): also the vision tower and
    projector as llama.cpp's mmproj file. `gguf_budget`: the GGUF types' per-tensor block types are
    chosen to fit it (needs `calib`).
    """
    distributed.require_on_disk(model)
    if not schemes and not gguf_types and not mmproj:
        raise UsageError("nothing to write: give at least one --to SCHEME, --gguf TYPE or --mmproj")
    outs = [out for _, out in schemes + gguf_types + ([mmproj] if mmproj else [])]
    if len(set(outs)) != len(outs):
        raise UsageError("two targets would write the same output; give each its own name")
    static_inputs = [name for name, _ in schemes if ct.get_scheme(name).activations]
    if schemes:
        for name, _ in schemes:
            check_scheme_method(ct.get_scheme(name), method, calib, with_gguf=bool(gguf_types) or bool(static_inputs))
        if max_shard_size <= 0:
            raise UsageError("--max-shard-size must be positive")
    elif method != "rtn":
        raise UsageError("--method applies to --to targets; GGUF types choose their own rounding")
    if gguf_budget is not None:
        if calib is None:
            raise UsageError(f"{gguf_budget.option} chooses types by importance-weighted error: "
                             "give --imatrix STATS from l4q calibrate")
        model.fetch_all()  # the error estimates read samples from every shard before the walk
    stats = load_stats(model, calib) if calib is not None else None
    dev = resolve_device(device)
    ignore_list = ignore_patterns(ignore, quantize_attention)
    targets = [CompressedTensorsTarget(model, out, ct.get_scheme(name), method=method,
                                       stats=stats if method != "rtn" or name in static_inputs else None,
                                       ignore=ignore_list,
                                       quantize_attention=quantize_attention, max_shard_size=max_shard_size,
                                       resume=resume, overwrite=overwrite, device=dev)
               for name, out in schemes]
    targets += [GGUFTarget(model, out, ftype, importance=stats.importance if stats else None,
                           importance_digest=stats.digest() if stats else "", resume=resume, overwrite=overwrite,
                           device=dev, overrides=gguf_overrides, budget=gguf_budget,
                           stats=stats)
                for ftype, out in gguf_types]
    if mmproj:
        targets.append(MmprojTarget(model, mmproj[1], mmproj[0], resume=resume, overwrite=overwrite, device=dev))
    read = walk.run(model, targets, show_progress, desc="read once" if len(targets) > 1 else "quantize")
    done = [_derived(t) for t in targets]
    return done, read, llama_cpp_warnings(model.spec) if gguf_types else []


def _derived(t) -> Derived:
    if isinstance(t, GGUFTarget):
        what = f"{len(t.tensors)} tensors" + (" of the vision tower and projector" if isinstance(t, MmprojTarget) else "")
        return Derived(t.out, what, t.source_bytes, t.out.stat().st_size)
    plan = t.plan
    resumed = t.shards_resumed
    what = (f"{len(plan.quantized_modules())} modules quantized to {plan.scheme.name} in {len(plan.shards)} shards"
            + (f" ({resumed} resumed)" if resumed else ""))
    return Derived(t.out, what, plan.source_bytes, plan.output_bytes)
