"""Per-expert calibration statistics and the reusable STATS directory `l4q calibrate` writes.

Collected on the device, accumulated in float64:
- routing per MoE layer: routed tokens and router-score mass per expert, and which experts took the
  all-token path (`engine.expert_token_threshold`);
- the importance matrix: per weight matrix, the sum over calibration tokens of each input channel's
  x^2 and the token count (llama.cpp's imatrix quantities). Keys are HF module names, and
  `<layer prefix>N.feed_forward.experts.gate|up|down` with one row per expert for fused experts;
- the activation range: per key, the largest |x| of its inputs (per expert for fused experts).

A STATS directory holds `stats.json` (everything above but the sums, plus the data and model it came
from), `imatrix.safetensors` (`<key>.in_sum2`, `<key>.counts`, float32), `imatrix.gguf` (the same
in llama.cpp's format), `activations.safetensors` (`<key>.in_absmax`, float32), `tokens.safetensors`
(the calibration ids, so GPTQ reruns on the same data) and `report.md`. GPTQ Hessians are not stored: one Scout layer's are ~6 GB, and GPTQ must recompute
them anyway from the quantized outputs of the layers before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__, arch, distributed, outputs
from ..errors import CorruptCheckpointError, SourceNotFoundError, UsageError
from ..devices import resolve_device
from ..model import Model, display_name, open_model
from ..sources import Source
from .engine import LinearCall, Routing
from .sequential import (
    PROGRESS,
    LayerHandler,
    atomic_save,
    atomic_write_json,
    discard_hidden,
    run_pass,
)
from .weights import WeightSource

STATS_JSON, IMATRIX, IMATRIX_GGUF, TOKENS, REPORT = "stats.json", "imatrix.safetensors", "imatrix.gguf", "tokens.safetensors", "report.md"
# The largest |x| each Linear's input reached (per expert for routed experts): the static activation
# ranges of schemes that quantize activations (nvfp4). Kept apart from the importance matrix, whose
# file llama.cpp's tools and earlier statistics share.
ACTIVATIONS = "activations.safetensors"
_TOKEN_CHUNK = 8192  # rows squared at a time: bounds the float32 temporary


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """float64 [in]: sum over rows of x^2, in row chunks."""
    acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(_TOKEN_CHUNK):
        acc += chunk.pow(2).sum(0, dtype=torch.float64)
    return acc


def hessian(x: torch.Tensor) -> torch.Tensor:
    """float32 [in, in]: sum over rows of x x^T, in row chunks on x's device."""
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for chunk in x.split(_TOKEN_CHUNK):
        h.addmm_(chunk.T, chunk)
    return h


class StatsCollector(LayerHandler):
    """Collects routing and importance statistics while the model runs unchanged."""

    all_token_fallback = True

    def __init__(self, spec: arch.Llama4Spec):
        self.spec = spec
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.routing_log: list[Routing] = []

    def begin_layer(self, layer: int) -> None:
        self.sums, self.counts, self.absmax = {}, {}, {}

    def record(self, call: LinearCall, x: torch.Tensor) -> None:
        sq = sum_of_squares(x)
        top = x.abs().amax().float().cpu() if x.numel() else torch.zeros((), dtype=torch.float32)
        for key in call.stat_keys:
            if call.expert is None:
                self.sums[key] = self.sums.get(key, 0) + sq
                self.counts[key] = self.counts.get(key, 0) + torch.tensor([float(len(x))], dtype=torch.float64)
                self.absmax[key] = torch.maximum(self.absmax.get(key, torch.zeros(1)), top.reshape(1))
            else:
                if key not in self.sums:
                    self.sums[key] = torch.zeros(self.spec.num_experts, len(sq), dtype=torch.float64, device=sq.device)
                    self.counts[key] = torch.zeros(self.spec.num_experts, dtype=torch.float64)
                    self.absmax[key] = torch.zeros(self.spec.num_experts, dtype=torch.float32)
                self.sums[key][call.expert] += sq
                self.counts[key][call.expert] += len(x)
                self.absmax[key][call.expert] = torch.maximum(self.absmax[key][call.expert], top)

    def weights(self, call: LinearCall, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.record(call, x)
        return call.load()

    def routing(self, routing: Routing) -> None:
        self.routing_log.append(routing)

    def save_layer(self, layer: int, work_dir: Path) -> None:
        self.share_expert_stats(layer)
        if distributed.is_main():
            self.save_imatrix(layer, work_dir)
            self.save_routing(layer, work_dir)

    def share_expert_stats(self, layer: int) -> None:
        """In a job of several ranks: every expert's statistics on every rank. Each rank holds its own
        experts' rows and zeros elsewhere, so the sums across ranks are exact."""
        if not distributed.is_distributed() or not self.spec.is_moe(layer):
            return
        base = f"{self.spec.layer_prefix}{layer}.feed_forward.experts"
        device = next((s.device for s in self.sums.values()), None)
        for key, width in ((f"{base}.gate", self.spec.hidden_size), (f"{base}.up", self.spec.hidden_size),
                           (f"{base}.down", self.spec.intermediate_size)):
            if key not in self.sums:  # a rank that owns no expert of the layer
                self.sums[key] = torch.zeros(self.spec.num_experts, width, dtype=torch.float64, device=device)
                self.counts[key] = torch.zeros(self.spec.num_experts, dtype=torch.float64)
                self.absmax[key] = torch.zeros(self.spec.num_experts, dtype=torch.float32)
            distributed.sum_(self.sums[key])
            distributed.sum_(self.counts[key])
            distributed.max_(self.absmax[key])

    def save_imatrix(self, layer: int, work_dir: Path) -> None:
        tensors = {}
        for key, s in self.sums.items():
            tensors[f"{key}.in_sum2"] = s.float()
            tensors[f"{key}.counts"] = self.counts[key].float()
            tensors[f"{key}.in_absmax"] = self.absmax[key]
        atomic_save(tensors, work_dir / f"imatrix-layer-{layer:03d}.safetensors")

    def save_routing(self, layer: int, work_dir: Path) -> None:
        routes = [r.__dict__ for r in self.routing_log if r.layer == layer]
        atomic_write_json(routes, work_dir / f"routing-layer-{layer:03d}.json")


def source_digest(source_dir: Path) -> str:
    """Identifies a model's architecture (text config), for checking STATS against a model."""
    spec = arch.spec_from_config(arch.load_config(source_dir))
    fields = {k: v for k, v in spec.__dict__.items() if k != "has_vision"}  # text_prefix: the keys' names
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(model: Model, ids: torch.Tensor, kind: str) -> str:
    h = hashlib.sha256(f"{__version__}:{kind}:{model.fingerprint()}".encode())
    h.update(ids.cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CalibrateResult:
    out: Path
    layers_resumed: int
    stats: dict


def calibrate(source: Source | Model, out: Path, ids: torch.Tensor, data_description: str, *, device: str = "auto",
              resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> CalibrateResult:
    """Run the calibration ids through `source` layer by layer and write a STATS directory at `out`."""
    model = source if isinstance(source, Model) else open_model(source)
    distributed.require_on_disk(model)
    # The layers' weights are checked as they load; the embedding (of which only the calibration ids'
    # rows are read) and lm_head (never read) are checked whole, so no broken weight goes unnoticed.
    p = model.spec.text_prefix
    model.ckpt.check_finite([f"{p}model.embed_tokens.weight", f"{p}lm_head.weight"])
    src = WeightSource(model, resolve_device(device))
    fingerprint = _fingerprint(model, ids, f"calibrate on {src.device.type}")  # cuda:N of any rank: one job
    partial = distributed.main_first(
        lambda: outputs.start(out, model.paths, fingerprint, resume=resume, overwrite=overwrite))
    stats = {}
    try:
        with outputs.writing(partial.dir, resume_hint=True):
            resumed = run_pass(src, ids, StatsCollector(src.spec), partial.dir, fingerprint, show_progress,
                               desc="calibrate")
            if distributed.is_main():
                stats = _finish(src, model, partial.dir, ids, data_description, str(src.device))
    except BaseException as exc:
        partial.fail(exc)
        raise
    if distributed.is_main():
        with outputs.writing(partial.out, resume_hint=True):
            partial.commit()
    distributed.barrier()  # the output is in place
    return CalibrateResult(partial.out, resumed, stats)


def _finish(src: WeightSource, model: Model, work: Path, ids: torch.Tensor, description: str, device: str) -> dict:
    spec = src.spec
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for layer in range(spec.num_layers):
        tensors.update(load_file(str(work / f"imatrix-layer-{layer:03d}.safetensors")))
        for r in json.loads((work / f"routing-layer-{layer:03d}.json").read_text()):
            layers.append({
                "layer": r["layer"], "tokens": r["tokens"], "threshold": r["threshold"],
                "experts": [{"expert": e, "tokens": c, "score_mass": m, "path": "all tokens" if f else "routed"}
                            for e, (c, m, f) in enumerate(zip(r["counts"], r["score_mass"], r["all_token_stats"]))],
            })
    for key, value in tensors.items():  # no expert may be left without statistics
        if key.endswith(".counts") and not bool((value > 0).all()):
            raise RuntimeError(f"calibration left {key.removesuffix('.counts')} without statistics")
    ranges = {k: tensors.pop(k) for k in [k for k in tensors if k.endswith(".in_absmax")]}
    atomic_save(ranges, work / ACTIVATIONS)
    atomic_save(tensors, work / IMATRIX)
    atomic_save({"input_ids": ids}, work / TOKENS)
    stats = {
        "l4q_version": __version__,
        "created_by": "l4q calibrate",
        "source": {"label": display_name(model.source), "architecture_digest": source_digest(model.dir)},
        "data": {"description": description, "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                 "tokens": int(ids.numel())},
        "device": device,
        "expert_threshold_rule": ("an expert routed fewer than max(64, ceil(0.1 * tokens / experts)) tokens is "
                                  "calibrated on all tokens, each scaled by its own router score"),
        "moe_layers": layers,
        "all_token_experts": [f"layer {x['layer']} expert {e['expert']}" for x in layers for e in x["experts"]
                              if e["path"] == "all tokens"],
    }
    _write_llama_imatrix(work / IMATRIX_GGUF, src, tensors, description, ids)
    atomic_write_json(stats, work / STATS_JSON)
    (work / REPORT).write_text(report_markdown(stats))
    for p in list(work.glob("imatrix-layer-*")) + list(work.glob("routing-layer-*")) + [work / PROGRESS]:
        p.unlink(missing_ok=True)
    discard_hidden(work)
    return stats


def _write_llama_imatrix(path: Path, src: WeightSource, tensors: dict[str, torch.Tensor], description: str,
                         ids: torch.Tensor) -> None:
    """The same statistics in llama.cpp's imatrix format, under the GGUF tensor names l4q's export uses."""
    from ..formats import gguf, imatrix

    def lookup(key: str):
        if f"{key}.in_sum2" not in tensors:
            return None
        return tensors[f"{key}.in_sum2"].numpy(), tensors[f"{key}.counts"].numpy()

    entries = imatrix.gguf_imatrix_entries(gguf.plan(src.model, "F16"), lookup)
    imatrix.write_llama_imatrix(path, entries, datasets=[description], chunk_size=int(ids.shape[1]),
                                chunk_count=int(ids.shape[0]))


def report_markdown(stats: dict) -> str:
    d = stats["data"]
    lines = [
        "# l4q calibration statistics", "",
        f"Model: {stats['source']['label']}. Data: {d['description']}; {d['samples']} samples x {d['seq_len']} tokens "
        f"= {d['tokens']} tokens. Device: {stats['device']}.", "",
        f"Rule: {stats['expert_threshold_rule']}.", "",
        "Routed tokens per expert (`*` = too few, calibrated on all tokens):", "",
        "| layer | tokens | threshold | min | median | max | experts on the all-token path | routed tokens per expert |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in stats["moe_layers"]:
        counts = [e["tokens"] for e in layer["experts"]]
        fallback = [str(e["expert"]) for e in layer["experts"] if e["path"] == "all tokens"]
        cells = " ".join(f"{e['expert']}:{e['tokens']}{'*' if e['path'] == 'all tokens' else ''}" for e in layer["experts"])
        lines.append(f"| {layer['layer']} | {layer['tokens']} | {layer['threshold']} | {min(counts)} | "
                     f"{int(np.median(counts))} | {max(counts)} | {', '.join(fallback) or 'none'} | {cells} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading STATS back


class Stats:
    """A STATS directory: the calibration ids, routing report and importance matrix."""

    def __init__(self, path: Path):
        from ..checkpoint import read_header

        self.dir = Path(path).expanduser()
        if not all((self.dir / n).is_file() for n in (STATS_JSON, IMATRIX, TOKENS)):
            raise SourceNotFoundError(f"{self.dir}: not an l4q calibration statistics directory (run l4q calibrate)")
        try:
            self.meta = json.loads((self.dir / STATS_JSON).read_text())
            self.meta["source"]["architecture_digest"], self.meta["data"]["description"]  # noqa: B018 - must exist
        except (OSError, ValueError, KeyError, TypeError):
            raise CorruptCheckpointError(f"{self.dir / STATS_JSON}: corrupt calibration statistics; rerun l4q calibrate") from None
        for name in (IMATRIX, TOKENS):
            read_header(self.dir / name)  # refuses truncated or corrupt files with one line
        self._imatrix: dict[str, torch.Tensor] | None = None
        self._ranges: dict[str, torch.Tensor] | None = None

    def check_model(self, model_dir: Path) -> None:
        if self.meta["source"]["architecture_digest"] != source_digest(model_dir):
            raise UsageError(f"{self.dir} was calibrated on {self.meta['source']['label']}, "
                             f"whose architecture differs from {model_dir}'s")

    def digest(self) -> str:
        """Identifies these statistics (their report, token ids and importance matrix)."""
        h = hashlib.sha256()
        for name in (STATS_JSON, TOKENS, IMATRIX, ACTIVATIONS):
            if name == ACTIVATIONS and not (self.dir / name).is_file():
                continue  # statistics from before activation ranges were recorded
            h.update(hashlib.sha256((self.dir / name).read_bytes()).digest())
        return h.hexdigest()

    @property
    def ids(self) -> torch.Tensor:
        return load_file(str(self.dir / TOKENS))["input_ids"]

    def importance(self, key: str) -> np.ndarray | None:
        """Mean x^2 per input channel ([in], or [experts, in] for fused expert keys), float32, with
        llama-quantize's arithmetic so that `--imatrix` here and there give the same bytes."""
        from ..formats.imatrix import mean_importance

        if self._imatrix is None:
            self._imatrix = load_file(str(self.dir / IMATRIX))
        s, c = self._imatrix.get(f"{key}.in_sum2"), self._imatrix.get(f"{key}.counts")
        return None if s is None else mean_importance(s.numpy(), c.numpy())

    def routing_shares(self, layer: int) -> np.ndarray | None:
        """Each routed expert's share of the calibration tokens in MoE layer `layer` (None for a dense
        layer): how much of the model's work an expert's weights do."""
        for entry in self.meta.get("moe_layers", []):
            if entry["layer"] == layer:
                counts = np.array([e["tokens"] for e in sorted(entry["experts"], key=lambda e: e["expert"])], float)
                return counts / max(counts.sum(), 1.0)
        return None

    def require_activation_ranges(self) -> None:
        if not (self.dir / ACTIVATIONS).is_file():
            raise UsageError(f"{self.dir} holds no activation ranges (made by an older l4q); rerun l4q calibrate")

    def input_absmax(self, key: str) -> torch.Tensor:
        """The largest |x| the inputs of `key`'s Linears reached: float32 [1], or [experts]."""
        self.require_activation_ranges()
        if self._ranges is None:
            self._ranges = load_file(str(self.dir / ACTIVATIONS))
        found = self._ranges.get(f"{key}.in_absmax")
        if found is None:
            raise UsageError(f"{self.dir} has no activation range for {key}; rerun l4q calibrate on this model")
        return found
