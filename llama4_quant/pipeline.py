"""The compressed-tensors target: source checkpoint -> compressed-tensors directory, from the walk.

The plan is computed from headers alone: every output tensor's name, dtype and shape, grouped into
units of work (one tensor, or one expert's three projections, as the walk yields them) and units
into size-bounded shards. The target takes one weight at a time from the walk (`walk.py`), so memory
is bounded by the largest expert slice or Linear, and writes each shard header-first. Shards are
finished atomically and recorded in a progress file, so an interrupted run resumes at the first
unfinished shard and yields the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, arch, distributed, outputs, walk
from .arch import Llama4Spec
from .checkpoint import ShardWriter, TensorEntry, split_in_order, tensor_bytes, write_index
from .errors import NonFiniteWeightError, UsageError
from .formats import compressed_tensors as ct
from .devices import resolve_device
from .model import EXPERT_PROJECTIONS, Model, display_name, open_model
from .outputs import RECIPE_NAME
from .scale_search import search_scales
from .schemes import check_finite
from .sources import Source
from .walk import Weight

# Attention stays BF16 unless --quantize-attention: vLLM permutes Llama 4's q/k rows for its rotary
# kernels, and until its fixes of February 2026 (PRs #34243, and #34471 re-landed as #35033; first
# released in v0.17.0) it left int8/FP8 scales and int4 packed weights unpermuted, so such checkpoints
# load and output garbage.
ATTENTION_IGNORE = ".*self_attn\\..*"
QUANTIZED_ATTENTION_VLLM = "vLLM 0.17.0 or newer (PRs #34243 and #35033 permute quantized q/k for Llama 4)"
GPTQ_DIR = "gptq"  # inside the partial output: the GPTQ pass's per-layer results
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3
# Non-weight files a derivative needs or must carry: tokenizer, chat template, generation and processor
# configs, licence terms. The base's README is not among them: a derivative gets its own model card.
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json", "processor_config.json", "LICENSE", "USE_POLICY.md",
)


@dataclass(frozen=True)
class Unit:
    """One step of streaming work: the walk's `weights` in, `outputs` written in order.

    kind "copy": one tensor copied byte for byte; "linear": one Linear quantized; "expert": one expert
    of a fused MoE layer, its three projections written as unfused modules (quantized, or
    BF16 when ignored).
    """

    kind: str
    weights: tuple[Weight, ...]
    outputs: tuple[TensorEntry, ...]
    quantize: bool = True

    @property
    def source_bytes(self) -> int:
        return sum(w.source_bytes for w in self.weights)

    @property
    def output_bytes(self) -> int:
        return sum(e.nbytes for e in self.outputs)


@dataclass
class Plan:
    spec: Llama4Spec
    scheme: ct.Scheme
    ignore: list[str]
    units: list[Unit]
    shards: list[list[Unit]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    method: str = "rtn"
    calib_digest: str = ""  # identifies the calibration statistics used, if any

    @property
    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def source_bytes(self) -> int:
        return sum(u.source_bytes for u in self.units)

    @property
    def output_bytes(self) -> int:
        return sum(u.output_bytes for u in self.units)

    def quantized_modules(self) -> list[str]:
        """Names of the Linears this plan quantizes (experts unfused)."""
        return [w.module for u in self.units if u.quantize and u.kind != "copy" for w in u.weights]

    def fingerprint(self, source_fingerprint: str) -> str:
        """Identifies the source's content (see `Checkpoint.fingerprint`), the options and the output
        layout, for --resume."""
        h = hashlib.sha256()
        options = [__version__, self.scheme.name, self.ignore, self.config, self.method, self.calib_digest]
        h.update(json.dumps(options, sort_keys=True).encode())
        h.update(source_fingerprint.encode())
        for name, shard in zip(self.shard_names, self.shards):
            for u in shard:
                for e in u.outputs:
                    h.update(f"{name}:{e.name}:{e.dtype}:{e.shape}\n".encode())
        return h.hexdigest()


def ignore_patterns(ignore: list[str] | tuple[str, ...] = (), quantize_attention: bool = False) -> list[str]:
    """The user's --ignore regexes (compiled once to refuse bad ones), plus attention unless asked for."""
    patterns = [p.removeprefix("re:") for p in ignore]
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise UsageError(f"--ignore {p!r} is not a valid regular expression ({exc})") from None
    return patterns if quantize_attention else [ATTENTION_IGNORE, *patterns]


def check_ignore_groups(spec: Llama4Spec, ignore: list[str]) -> None:
    """Refuse ignore patterns that split what vLLM loads as one: every expert of a MoE layer (it picks
    the layer's MoE method from expert 0), q/k/v (fused qkv_proj), gate/up (fused gate_up_proj)."""
    for layer in range(spec.num_layers):
        lp = f"{spec.layer_prefix}{layer}."
        groups = [("q/k/v", [f"{lp}self_attn.{x}_proj" for x in "qkv"])]
        if spec.is_moe(layer):
            base = f"{lp}feed_forward.experts"
            groups.append(("the routed experts", [f"{base}.{e}.{p}" for e in range(spec.num_experts)
                                                   for p in EXPERT_PROJECTIONS]))
            groups.append(("the shared expert's gate/up", [f"{lp}feed_forward.shared_expert.{x}_proj" for x in ("gate", "up")]))
        else:
            groups.append(("the MLP's gate/up", [f"{lp}feed_forward.{x}_proj" for x in ("gate", "up")]))
        for what, modules in groups:
            matched = [m for m in modules if ct.ignore_matches(ignore, m)]
            if matched and len(matched) != len(modules):
                kept = next(m for m in modules if m not in matched)
                raise UsageError(f"--ignore keeps {matched[0]} BF16 but quantizes {kept}: vLLM loads {what} of layer "
                                 f"{layer} in one scheme; widen or narrow the pattern")


def build_plan(
    model: Model,
    scheme: ct.Scheme,
    ignore: list[str] | tuple[str, ...] = (),
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Plan:
    """Decide every output tensor from headers alone, in the walk's order.

    `ignore` is the full list of the user's patterns (see `ignore_patterns`)."""
    check_ignore_groups(model.spec, list(ignore))
    ignore = list(ct.ALWAYS_IGNORED) + list(ignore)
    units: list[Unit] = []
    expert: list[Weight] = []
    fused: list[Weight] = []  # the members so far of a fused group that shares a global scale
    for w in walk.weights(model):
        if fused and w.module != ct.fused_group(fused[0].module)[len(fused)]:
            raise UsageError(f"{scheme.name} gives {', '.join(ct.fused_group(fused[0].module))} one global scale, "
                             f"so they must follow each other in the checkpoint; {w.name} comes between them")
        if w.expert is not None:
            expert.append(w)
            if len(expert) == len(EXPERT_PROJECTIONS):
                units.append(_expert_unit(tuple(expert), scheme, ignore))
                expert = []
            continue
        if (w.role in arch.LINEAR_ROLES and not ct.ignore_matches(ignore, w.module)
                and scheme.can_quantize(*w.shape)):
            group = ct.fused_group(w.module) if scheme.shares_global else (w.module,)
            fused.append(w)
            if len(fused) == len(group):  # one unit: the members' scales are set together
                entries = [e for x in fused for e in scheme.entries(x.module, *x.shape)]
                units.append(Unit("linear", tuple(fused), tuple(entries)))
                fused = []
        else:
            if w.role in arch.LINEAR_ROLES and not ct.ignore_matches(ignore, w.module):
                ignore.append(re_exact(w.module))  # cannot take this scheme's layout: keep it BF16
            units.append(Unit("copy", (w,), (TensorEntry(w.name, w.info.dtype, w.shape),), quantize=False))
    plan = Plan(model.spec, scheme, ignore, units, config=model.config)
    # Units are never split: one expert's tensors stay together in one shard.
    plan.shards = split_in_order(units, lambda u: u.output_bytes, max_shard_size)
    return plan


def re_exact(module: str) -> str:
    """An ignore pattern for exactly this module, also under the text-only model's names."""
    return ".*" + module.replace("language_model.model.", "").replace("model.layers.", "layers.").replace(".", "\\.") + "$"


def _expert_unit(weights: tuple[Weight, ...], scheme: ct.Scheme, ignore: list[str]) -> Unit:
    """One expert's gate, up and down projections: all quantized or all BF16 (see check_ignore_groups).
    Routed experts that the scheme's layout cannot hold are refused: they are most of the model, and
    a derivative that keeps them BF16 is not the one asked for."""
    quantize = not ct.ignore_matches(ignore, weights[0].module)
    for w in weights if quantize else ():
        if not scheme.can_quantize(*w.shape):
            out_features, in_features = w.shape
            blocks = f" and {scheme.rows_per_scale}-row blocks" if scheme.rows_per_scale > 1 else ""
            raise UsageError(f"--to {scheme.name} cannot hold the routed experts' {w.module.rsplit('.', 1)[1]} "
                             f"({out_features} x {in_features}): its groups of {scheme.group_size(in_features)} "
                             f"input columns{blocks} do not divide it; int8 and fp8 take any shape")
    entries = []
    for w in weights:
        entries += scheme.entries(w.module, *w.shape) if quantize else [TensorEntry(w.name, w.info.dtype, w.shape)]
    return Unit("expert", weights, tuple(entries), quantize=quantize)


# ---------------------------------------------------------------------------------------------
# Running


class Encoder:
    """Turns one planned Linear into its stored tensors with the chosen method (see calibrate.methods)."""

    def __init__(self, scheme: ct.Scheme, method: str = "rtn", stats=None, gptq=None):
        self.scheme, self.method, self.stats, self.gptq = scheme, method, stats, gptq

    def precomputed(self, unit: Unit) -> bool:
        return self.gptq is not None and unit.quantize and unit.kind in ("linear", "expert")

    def encode(self, w: Weight, weight: torch.Tensor, scheme: ct.Scheme | None = None):
        """The stored tensors of Linear `w` from its [out, in] values `weight` (with `scheme`: the
        scheme bound to the global scale of w's fused group)."""
        scheme = scheme or self.scheme
        if scheme.activations:  # the static input scale of this Linear (of this expert)
            ranges = self.stats.input_absmax(w.stats_key)
            scheme = scheme.with_inputs(ranges[w.expert if w.expert is not None else 0])
        if self.method != "mse":
            return scheme.encode_weight(w.module, weight)
        weight = weight.contiguous()  # the scale search runs on rows
        importance = None
        if self.stats is not None:
            found = self.stats.importance(w.stats_key)
            if found is not None:
                importance = torch.from_numpy(found[w.expert] if w.expert is not None else found).to(weight.device)
        return scheme.encode_weight(w.module, weight, search_scales(weight, scheme, importance))


def _copy_extra_files(src: Path, dst: Path) -> list[str]:
    copied = [name for name in CARRIED_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


class CompressedTensorsTarget:
    """A compressed-tensors checkpoint at `out`, written from the walk (see `walk.Target`).

    Shards are written in the walk's order, header first, and each finished shard is recorded in the
    partial's progress, so --resume skips it (and the walk skips reading what no target still needs).
    In a job of several ranks each rank writes the shards `distributed.assign` gives it, and rank 0
    the index, config and recipe.
    """

    def __init__(self, model: Model, out: Path, scheme: ct.Scheme, *, method: str = "rtn", stats=None,
                 ignore: list[str] | None = None, quantize_attention: bool = False,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, resume: bool = False, overwrite: bool = False,
                 device: torch.device = torch.device("cpu")):
        self.model, self.out, self.stats, self.device = model, out, stats, device
        self.resume, self.overwrite, self.quantize_attention = resume, overwrite, quantize_attention
        self.plan = build_plan(model, scheme, ignore_patterns() if ignore is None else ignore, max_shard_size)
        self.plan.method, self.plan.calib_digest = method, stats.digest() if stats else ""
        if method == "gptq":  # GPTQ's values depend on the device's arithmetic: resume only on the same kind
            self.plan.calib_digest += f" on {device.type}"
        if scheme.activations:
            stats.require_activation_ranges()  # before anything is written
        self.encoder = Encoder(scheme, method, stats)
        self._unit_of = {w.name: (i, u) for i, shard in enumerate(self.plan.shards) for u in shard for w in u.weights}
        self._last_of_shard = {shard[-1].weights[-1].name for shard in self.plan.shards}
        self._owner = distributed.assign([sum(u.source_bytes for u in shard) for shard in self.plan.shards])
        self.partial: outputs.Partial | None = None
        self._writer: ShardWriter | None = None
        self._sealed: tuple[int, ShardWriter] | None = None  # the last full shard, finishing on its thread
        self._ahead: tuple[int, ShardWriter] | None = None  # the next shard, opened early for its copies
        self._held: list[tuple[Weight, torch.Tensor]] = []  # fused-group members waiting for the last
        self.shards_resumed = 0

    @property
    def expected_bytes(self) -> int:
        return self.plan.output_bytes

    def check(self) -> None:
        self.fingerprint = self.plan.fingerprint(self.model.fingerprint())
        self.out = outputs.check_output(self.out, self.model.paths, resume=self.resume, overwrite=self.overwrite,
                                        fingerprint=self.fingerprint)

    def start(self) -> None:
        self.partial = outputs.start(self.out, self.model.paths, self.fingerprint, resume=self.resume,
                                     overwrite=self.overwrite)
        self._done = {name for name in self.partial.done if self.partial.path(name).is_file()}
        self.shards_resumed = len(self._done)

    def prepare(self, show_progress: bool) -> None:
        if self.plan.method == "gptq" and not all(map(self._shard_done, range(len(self.plan.shards)))):
            self.model.fetch_all()  # the calibrated pass reads layer by layer, before the walk
            with outputs.writing(self.partial.dir, resume_hint=True):
                self.encoder.gptq = self._gptq_pass(show_progress)

    def _gptq_pass(self, show_progress: bool):
        """Run (or resume) the layer-sequential GPTQ pass into `partial/gptq`; returns its results."""
        from .calibrate.methods import GPTQPass, GPTQResults
        from .calibrate.sequential import run_pass
        from .calibrate.weights import WeightSource

        work = self.partial.path(GPTQ_DIR)
        work.mkdir(exist_ok=True)
        handler = GPTQPass(self.plan.spec, self.plan.scheme, set(self.plan.quantized_modules()), self.stats)
        run_pass(WeightSource(self.model, self.device), self.stats.ids, handler, work, self.fingerprint, show_progress,
                 desc="gptq")
        return GPTQResults(work)

    def _shard_done(self, i: int) -> bool:
        return self.plan.shard_names[i] in self._done

    def _not_mine(self, i: int) -> bool:
        """Shard i is written already, or by another rank."""
        return self._shard_done(i) or self._owner[i] != distributed.rank()

    def wants(self, w: Weight) -> str | None:
        i, unit = self._unit_of[w.name]
        if self._not_mine(i) or self.encoder.precomputed(unit):
            return None
        return walk.WHOLE if unit.kind == "linear" else walk.ROWS

    def finds_non_finite(self, w: Weight) -> bool:
        """A Linear or expert quantized by RTN with a scheme whose scales refuse NaN/Inf (int4, int8):
        `take` then names the weight and counts them (`_encode`)."""
        _, unit = self._unit_of[w.name]
        return (unit.kind != "copy" and unit.quantize and self.encoder.method == "rtn"
                and self.plan.scheme.rtn_refuses_non_finite and not self.plan.scheme.shares_global)

    def take(self, w: Weight, start_row: int, data: torch.Tensor) -> None:
        i, unit = self._unit_of[w.name]
        with outputs.writing(self.partial.dir, resume_hint=True):
            writer = self._shard_writer(i)
            if unit.kind == "copy" and writer.copied(w.name):
                return  # on its way since the shard opened (`_open_shard`); read for the finiteness check
            if unit.kind == "copy":
                writer.write(w.name, tensor_bytes(data))
            elif not unit.quantize:  # an ignored expert: its BF16 projection, unfused
                writer.write(w.name, data.contiguous())
            elif self.plan.scheme.shares_global and len(ct.fused_group(w.module)) > 1:
                self._take_fused(w, data.to(self.device), writer)
            else:  # an expert's transposed view as it is: the rtn kernels work in its stored layout
                for name, tensor in self._encode(w, data):
                    writer.write(name, tensor)

    def _encode(self, w: Weight, data: torch.Tensor):
        """`encoder.encode`, with a refusal of NaN/Inf (`finds_non_finite`) naming `w` and counting them."""
        try:
            return self.encoder.encode(w, data.to(self.device))
        except NonFiniteWeightError:
            check_finite(data, w.name)
            raise

    def _take_fused(self, w: Weight, data: torch.Tensor, writer: ShardWriter) -> None:
        """Hold the members of a fused group (gate/up, q/k/v: one unit, or one expert's read) until the
        last arrives, then encode them all with the global scale of their joint absmax."""
        self._held.append((w, data))
        if w.module != ct.fused_group(w.module)[-1]:
            return
        bound = self.plan.scheme.for_group([d for _, d in self._held])
        for held_w, held_data in self._held:
            for name, tensor in self.encoder.encode(held_w, held_data, bound):
                writer.write(name, tensor)
        self._held = []

    def weight_done(self, w: Weight) -> None:
        i, unit = self._unit_of[w.name]
        if self._not_mine(i):
            return
        with outputs.writing(self.partial.dir, resume_hint=True):
            if self.encoder.precomputed(unit) and w.name == unit.weights[-1].name:
                writer = self._shard_writer(i)
                for entry in unit.outputs:
                    writer.write(entry.name, self.encoder.gptq.get(entry.name))
            if w.name in self._last_of_shard:  # its fsync runs beside the next shard's work
                self._wait_sealed()
                self._shard_writer(i).seal()
                self._sealed, self._writer = (i, self._writer), None

    def _wait_sealed(self) -> None:
        """Wait for the last sealed shard to be in place, and record it as done."""
        if self._sealed is None:
            return
        i, writer = self._sealed
        writer.wait()
        self._sealed = None
        self.partial.mark_done(self.plan.shard_names[i])
        self._done.add(self.plan.shard_names[i])

    def _shard_writer(self, i: int) -> ShardWriter:
        """Shard i's writer; the next shard opens with it when it has copies (`_open_shard`)."""
        if self._writer is None:
            ahead, self._ahead = self._ahead, None
            self._writer = ahead[1] if ahead and ahead[0] == i else self._open_shard(i)
            if i + 1 < len(self.plan.shards) and not self._not_mine(i + 1) and self._copies(i + 1):
                self._ahead = (i + 1, self._open_shard(i + 1))
        return self._writer

    def _open_shard(self, i: int) -> ShardWriter:
        """Shard i's writer, its BF16 copies already handed to its copier thread: they hold no more
        than the writer's stage and run beside the quantizing, where one left to the walk's turn
        (lm_head, stored last) would run alone at the end."""
        writer = ShardWriter(self.partial.path(self.plan.shard_names[i]), [e for u in self.plan.shards[i] for e in u.outputs])
        for w in self._copies(i):
            writer.copy(w.name, w.info.file, w.info.offset)
        return writer

    def _copies(self, i: int) -> list[Weight]:
        """Shard i's tensors copied file to file as stored; none from a Hub source, whose shards
        may be deleted before a copy would get to them (they are written from the walk's reads)."""
        if self.model.source.remote is not None:
            return []
        return [u.weights[0] for u in self.plan.shards[i] if u.kind == "copy"]

    def finish(self) -> None:
        with outputs.writing(self.partial.dir, resume_hint=True):
            if distributed.is_main():  # beside the last shard's fsync
                recipe = _recipe(self.plan, self.model.source, self.stats, self.partial.dir, self.quantize_attention)
                _finish(self.plan, self.model.dir, self.partial.dir, recipe)
            self._wait_sealed()

    def commit(self) -> None:
        with outputs.writing(self.partial.out, resume_hint=True):
            shutil.rmtree(self.partial.path(GPTQ_DIR), ignore_errors=True)  # every rank is past its results
            self.partial.commit()

    def fail(self, exc: BaseException) -> None:
        if self.partial is None:
            return
        try:
            self._wait_sealed()  # a full shard is kept for --resume
        except BaseException:
            pass  # the failure being handled, or one it caused
        for writer in (self._writer, self._sealed[1] if self._sealed else None, self._ahead[1] if self._ahead else None):
            if writer is not None:
                writer.abort()
        self.partial.fail(exc)


def load_stats(model: Model, calib: Path):
    """The statistics directory of `l4q calibrate`, checked to belong to `model`."""
    from .calibrate.stats import Stats

    stats = Stats(calib)
    stats.check_model(model.dir)
    return stats


def check_scheme_method(scheme: ct.Scheme, method: str, calib: Path | None, with_gguf: bool = False) -> None:
    """Refuse what `scheme` cannot do with `method` and `calib` (with_gguf: --calib also feeds GGUF targets)."""
    if scheme.activations and calib is None:
        raise UsageError(f"{scheme.name} quantizes activations with static scales from calibration: run "
                         "`l4q calibrate MODEL --out STATS` and pass --calib STATS (or use nvfp4a16, weights only)")
    check_method(method, None if (with_gguf or scheme.activations) and method == "rtn" else calib)


def check_method(method: str, calib: Path | None) -> None:
    from .calibrate.methods import METHODS

    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if calib is not None and method == "rtn":
        raise UsageError("--calib is used by --method mse or gptq; rtn takes no calibration")
    if calib is None and method == "gptq":
        raise UsageError("--method gptq needs --calib STATS: run `l4q calibrate` on this model first")


@dataclass
class QuantizeResult:
    out: Path
    plan: Plan
    shards_written: int  # by this run (all ranks)
    shards_resumed: int
    source_bytes: int
    output_bytes: int


def quantize(
    source: Source | Model,
    out: Path,
    scheme_name: str,
    *,
    method: str = "rtn",
    calib: Path | None = None,
    ignore: tuple[str, ...] = (),
    quantize_attention: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> QuantizeResult:
    """Stream `source` into a compressed-tensors checkpoint at `out`; `out` appears only when complete.

    `method` is rtn, mse or gptq (see `calibrate.methods`); gptq needs `calib`, the STATS directory
    of `l4q calibrate`, whose token ids it runs; mse uses its importance matrix when given.
    Attention stays BF16 unless `quantize_attention` (see ATTENTION_IGNORE).
    """
    model = source if isinstance(source, Model) else open_model(source)
    scheme = ct.get_scheme(scheme_name)
    check_scheme_method(scheme, method, calib)
    if max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    target = CompressedTensorsTarget(
        model, out, scheme, method=method, ignore=ignore_patterns(ignore, quantize_attention),
        quantize_attention=quantize_attention, max_shard_size=max_shard_size, resume=resume, overwrite=overwrite,
        stats=load_stats(model, calib) if calib is not None else None, device=resolve_device(device))
    walk.run(model, [target], show_progress, desc="quantize")
    plan = target.plan
    return QuantizeResult(target.out, plan, len(plan.shards) - target.shards_resumed, target.shards_resumed,
                          plan.source_bytes, plan.output_bytes)


def _recipe(plan: Plan, source: Source, stats, partial: Path, quantize_attention: bool) -> dict:
    """What `l4q_recipe.json` records: how the values were chosen, and for GPTQ what each expert saw.
    The source is named by its hub id, preset or directory name, never by a local path."""
    recipe = {"l4q_version": __version__, "source": display_name(source), "base_model": source.repo_id,
              "scheme": plan.scheme.name, "method": plan.method, "ignore": plan.ignore,
              "quantized_attention": quantize_attention}
    if quantize_attention:
        recipe["minimum_vllm"] = QUANTIZED_ATTENTION_VLLM
    if stats is not None:
        recipe["calibration"] = {"stats_digest": plan.calib_digest, "source": stats.meta["source"]["label"],
                                 "data": stats.meta["data"]}
    if plan.method == "gptq":
        from .calibrate.methods import GPTQ_BLOCK, GPTQ_DAMP, gptq_logs

        logs = gptq_logs(partial / GPTQ_DIR)
        routing = [r for p in sorted((partial / GPTQ_DIR).glob("routing-layer-*.json")) for r in json.loads(p.read_text())]
        recipe["gptq"] = {
            "damp": GPTQ_DAMP, "block_size": GPTQ_BLOCK, "act_order": "static", "scales": "mse search weighted by diag(H)",
            "modules": len(logs),
            "fell_back_to_rtn": [e for e in logs if e["fell_back_to_rtn"]],
            "all_token_experts": [f"layer {r['layer']} expert {e} ({c} routed < {r['threshold']})"
                                  for r in routing for e, (c, f) in enumerate(zip(r["counts"], r["all_token_stats"])) if f],
        }
    return recipe


def _finish(plan: Plan, source_dir: Path, partial: Path, recipe: dict) -> None:
    weight_map = {e.name: name for name, shard in zip(plan.shard_names, plan.shards) for u in shard for e in u.outputs}
    write_index(partial, weight_map, plan.output_bytes)
    config = dict(plan.config)
    config["quantization_config"] = ct.quantization_config(plan.scheme, plan.ignore)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_extra_files(source_dir, partial)
    (partial / RECIPE_NAME).write_text(json.dumps(recipe, indent=1) + "\n")
