"""Plan and run a streaming quantization: source checkpoint -> compressed-tensors directory.

The plan is computed from headers alone: every output tensor's name, dtype and shape, grouped into
units of work (one tensor, or one expert's three projections) and units into size-bounded shards.
Running it reads one unit's source bytes at a time, so memory is bounded by the largest expert slice,
and writes each shard header-first. Shards are finished atomically and recorded in a progress file,
so an interrupted run resumes at the first unfinished shard and yields the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__, arch, outputs
from .arch import Llama4Spec
from .checkpoint import (
    Checkpoint,
    ShardWriter,
    TensorEntry,
    TensorInfo,
    check_raw_finite,
    iter_raw_chunks,
    read_slice,
    read_tensor,
    split_in_order,
    write_index,
)
from .errors import UsageError
from .formats import compressed_tensors as ct
from .devices import resolve_device
from .model import EXPERT_PROJECTIONS, Model, display_name, open_model, unfuse_gate_up
from .outputs import RECIPE_NAME
from .scale_search import search_scales
from .schemes import check_finite
from .sources import Source

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
    """One step of streaming work: read `sources`, emit `outputs` in order.

    kind "copy": one tensor copied byte for byte; "linear": one Linear quantized;
    "expert": expert `expert` of a fused MoE layer, read as its slices of gate_up_proj and down_proj
    and written as three unfused modules (quantized, or BF16 when ignored).
    """

    kind: str
    sources: tuple[TensorInfo, ...]
    outputs: tuple[TensorEntry, ...]
    module: str = ""
    expert: int = -1
    quantize: bool = True

    @property
    def source_bytes(self) -> int:
        if self.kind == "expert":
            return sum(s.nbytes // s.shape[0] for s in self.sources)
        return sum(s.nbytes for s in self.sources)

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
        names = []
        for u in self.units:
            if u.kind == "linear" and u.quantize:
                names.append(u.module)
            elif u.kind == "expert" and u.quantize:
                names += [f"{u.module}.{u.expert}.{p}" for p in EXPERT_PROJECTIONS]
        return names

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
    ckpt: Checkpoint,
    spec: Llama4Spec,
    scheme: ct.Scheme,
    ignore: list[str] | tuple[str, ...] = (),
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    config: dict | None = None,
) -> Plan:
    """Decide every output tensor from headers alone, in the source's storage order.

    `ignore` is the full list of the user's patterns (see `ignore_patterns`)."""
    check_ignore_groups(spec, list(ignore))
    ignore = list(ct.ALWAYS_IGNORED) + list(ignore)
    units: list[Unit] = []
    experts_done: set[int] = set()
    for info in ckpt.tensors:
        role = arch.classify(info.name, spec)
        if role.role in arch.EXPERT_ROLES:
            if role.layer not in experts_done:
                experts_done.add(role.layer)
                units += _expert_units(ckpt, spec, scheme, ignore, role.layer)
            continue
        module = info.name.removesuffix(".weight")
        if (
            role.role in arch.LINEAR_ROLES
            and not ct.ignore_matches(ignore, module)
            and ct.can_quantize(scheme, *info.shape)
        ):
            entries = ct.linear_entries(module, info.shape[0], info.shape[1], scheme)
            units.append(Unit("linear", (info,), tuple(entries), module=module))
        else:
            if role.role in arch.LINEAR_ROLES and not ct.ignore_matches(ignore, module):
                ignore.append(re_exact(module))  # cannot take this scheme's layout: keep it BF16
            units.append(Unit("copy", (info,), (TensorEntry(info.name, info.dtype, info.shape),), quantize=False))
    plan = Plan(spec, scheme, ignore, units, config=config or {})
    # Units are never split: one expert's tensors stay together in one shard.
    plan.shards = split_in_order(units, lambda u: u.output_bytes, max_shard_size)
    return plan


def re_exact(module: str) -> str:
    """An ignore pattern for exactly this module, also under the text-only model's names."""
    return ".*" + module.replace("language_model.model.", "").replace("model.layers.", "layers.").replace(".", "\\.") + "$"


def _expert_units(ckpt: Checkpoint, spec: Llama4Spec, scheme: ct.Scheme, ignore: list[str], layer: int) -> list[Unit]:
    base = f"{spec.layer_prefix}{layer}.feed_forward.experts"
    gate_up, down = ckpt.by_name[f"{base}.gate_up_proj"], ckpt.by_name[f"{base}.down_proj"]
    h, inter = spec.hidden_size, spec.intermediate_size
    units = []
    for i in range(spec.num_experts):
        mods = [(f"{base}.{i}.gate_proj", inter, h), (f"{base}.{i}.up_proj", inter, h), (f"{base}.{i}.down_proj", h, inter)]
        ignored = [ct.ignore_matches(ignore, m) for m, _, _ in mods]  # all or none: see check_ignore_groups
        quantize = not ignored[0] and all(ct.can_quantize(scheme, o, n) for _, o, n in mods)
        entries = []
        for module, o, n in mods:
            entries += ct.linear_entries(module, o, n, scheme) if quantize else [TensorEntry(f"{module}.weight", gate_up.dtype, (o, n))]
            if not quantize and not ignored[0]:
                ignore.append(re_exact(module))
        units.append(Unit("expert", (gate_up, down), tuple(entries), module=base, expert=i, quantize=quantize))
    return units


# ---------------------------------------------------------------------------------------------
# Running


class Encoder:
    """Turns one planned Linear into its stored tensors with the chosen method (see calibrate.methods)."""

    def __init__(self, scheme: ct.Scheme, method: str = "rtn", stats=None, gptq=None):
        self.scheme, self.method, self.stats, self.gptq = scheme, method, stats, gptq

    def precomputed(self, unit: Unit) -> bool:
        return self.gptq is not None and unit.quantize and unit.kind in ("linear", "expert")

    def encode(self, module: str, weight: torch.Tensor, key: str, expert: int | None):
        if self.method != "mse":
            return ct.encode_linear(module, weight, self.scheme)
        importance = None
        if self.stats is not None:
            found = self.stats.importance(key)
            if found is not None:
                importance = torch.from_numpy(found[expert] if expert is not None else found).to(weight.device)
        return ct.encode_linear(module, weight, self.scheme, scale=search_scales(weight, self.scheme.name, importance))


def _produce(unit: Unit, encoder: Encoder, device: torch.device):
    """Yield (name, tensor-or-bytes) for the unit's outputs, in planned order."""
    if unit.kind == "copy":
        (info,) = unit.sources
        for chunk in iter_raw_chunks(info):
            check_raw_finite(chunk, info.dtype, info.name)
            yield info.name, chunk
        return
    if encoder.precomputed(unit):
        for entry in unit.outputs:
            yield entry.name, encoder.gptq.get(entry.name)
        return
    if unit.kind == "linear":
        (info,) = unit.sources
        weight = read_tensor(info).to(device)
        check_finite(weight, info.name)
        yield from encoder.encode(unit.module, weight, unit.module, None)
        return
    gate_up_info, down_info = unit.sources
    i = unit.expert
    gate_up = read_slice(gate_up_info, i).to(device)
    check_finite(gate_up, f"{gate_up_info.name}[{i}]")
    gate, up = unfuse_gate_up(gate_up)
    yield from _expert_projection(unit, "gate_proj", gate, encoder)
    yield from _expert_projection(unit, "up_proj", up, encoder)
    del gate_up, gate, up
    down = read_slice(down_info, i).to(device)  # [inter, hidden]
    check_finite(down, f"{down_info.name}[{i}]")
    yield from _expert_projection(unit, "down_proj", down.T, encoder)


def _expert_projection(unit: Unit, proj: str, weight: torch.Tensor, encoder: Encoder):
    module = f"{unit.module}.{unit.expert}.{proj}"
    weight = weight.contiguous()  # the kernels run about twice as fast on rows as on a transposed view
    if unit.quantize:
        yield from encoder.encode(module, weight, f"{unit.module}.{proj.removesuffix('_proj')}", unit.expert)
    else:
        yield f"{module}.weight", weight.cpu()


def _copy_extra_files(src: Path, dst: Path) -> list[str]:
    copied = [name for name in CARRIED_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


@dataclass
class QuantizeResult:
    out: Path
    plan: Plan
    shards_written: int
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
    from .calibrate.methods import METHODS

    model = source if isinstance(source, Model) else open_model(source)
    scheme = ct.get_scheme(scheme_name)
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    if calib is not None and method == "rtn":
        raise UsageError("--calib is used by --method mse or gptq; rtn takes no calibration")
    if calib is None and method == "gptq":
        raise UsageError("--method gptq needs --calib STATS: run `l4q calibrate` on this model first")
    plan = build_plan(model.ckpt, model.spec, scheme, ignore_patterns(ignore, quantize_attention), max_shard_size,
                      model.config)
    outputs.check_output(out, model.paths, resume=resume, overwrite=overwrite)
    stats = None
    if calib is not None:
        from .calibrate.stats import Stats

        stats = Stats(calib)
        stats.check_model(model.dir)
    dev = resolve_device(device)
    plan.method, plan.calib_digest = method, stats.digest() if stats else ""
    if method == "gptq":  # GPTQ's values depend on the device's arithmetic: resume only on the same kind
        plan.calib_digest += f" on {dev.type}"
    fingerprint = plan.fingerprint(model.fingerprint())
    partial = outputs.start(out, model.paths, fingerprint, resume=resume, overwrite=overwrite)
    done = set(partial.done)
    try:
        with outputs.writing(partial.dir, resume_hint=True):
            encoder = Encoder(scheme, method, stats)
            if method == "gptq":
                encoder.gptq = _gptq_pass(plan, model, stats, partial.dir, fingerprint, dev, show_progress)
            written = _write_shards(plan, partial, encoder, dev, show_progress)
            _finish(plan, model.dir, partial.dir, _recipe(plan, model.source, stats, partial.dir, quantize_attention))
    except BaseException as exc:
        partial.fail(exc)
        raise
    with outputs.writing(partial.out, resume_hint=True):
        partial.commit()
    return QuantizeResult(partial.out, plan, written, len(done), plan.source_bytes, plan.output_bytes)


def _gptq_pass(plan: Plan, model: Model, stats, partial: Path, fingerprint: str, device: torch.device,
               show_progress: bool):
    """Run (or resume) the layer-sequential GPTQ pass into `partial/gptq`; returns its results."""
    from .calibrate.methods import GPTQPass, GPTQResults
    from .calibrate.sequential import run_pass
    from .calibrate.weights import WeightSource

    work = partial / GPTQ_DIR
    work.mkdir(exist_ok=True)
    handler = GPTQPass(plan.spec, plan.scheme, set(plan.quantized_modules()))
    run_pass(WeightSource(model, device), stats.ids, handler, work, fingerprint, show_progress, desc="gptq")
    return GPTQResults(work, plan.spec.num_layers)


def _write_shards(plan: Plan, partial: outputs.Partial, encoder: Encoder, device: torch.device,
                  show_progress: bool) -> int:
    done = set(partial.done)
    written = 0
    with tqdm(
        total=plan.source_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress,
        desc="quantize", dynamic_ncols=True,
    ) as bar:
        for name, shard in zip(plan.shard_names, plan.shards):
            entries = [e for u in shard for e in u.outputs]
            if name in done and partial.path(name).is_file():
                bar.update(sum(u.source_bytes for u in shard))
                continue
            writer = ShardWriter(partial.path(name), entries)
            try:
                for unit in shard:
                    for tensor_name, data in _produce(unit, encoder, device):
                        writer.write(tensor_name, data)
                    bar.update(unit.source_bytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            partial.mark_done(name)
            written += 1
    return written


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
        from .calibrate.methods import GPTQ_BLOCK, GPTQ_DAMP

        logs = [e for p in sorted((partial / GPTQ_DIR).glob("gptq-layer-*.json")) for e in json.loads(p.read_text())]
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
    shutil.rmtree(partial / GPTQ_DIR, ignore_errors=True)
