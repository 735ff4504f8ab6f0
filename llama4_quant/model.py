"""Opening a model: source -> config -> spec -> checkpoint -> validation, once, before any heavy work.

Every command that reads a model opens it here, so every command refuses the same bad inputs with
the same one-line errors: missing or non-Llama-4 configs, corrupt or truncated shards, indexes that
point outside the directory, missing tensors, shapes or expert counts that disagree with the config.
NaN/Inf values need the data itself: `Model.check_finite` reads it once, for the commands that read
every byte anyway (eval, dedup, push); the streaming commands check each slice as they load it.
Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import arch
from .arch import Llama4Spec
from .checkpoint import Checkpoint
from .errors import CorruptCheckpointError, NotLlama4Error, ShapeMismatchError, SourceNotFoundError, UsageError
from .sources import PRESETS, Source

# Stored tensors of one compressed-tensors Linear, by format, in write order: the one table of them. The
# scheme classes in formats/compressed_tensors.py read theirs from here; it lives here because model
# validation must not import anything above the foundation (nor torch).
QUANTIZED_SUFFIXES = {
    "pack-quantized": ("weight_packed", "weight_scale", "weight_shape"),
    "int-quantized": ("weight", "weight_scale"),
    "float-quantized": ("weight", "weight_scale"),
    "nvfp4-pack-quantized": ("weight_packed", "weight_scale", "weight_global_scale"),
    "mxfp4-pack-quantized": ("weight_packed", "weight_scale"),
}
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_RE = re.compile(r"(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.")


@dataclass(frozen=True)
class Model:
    source: Source
    config: dict
    spec: Llama4Spec
    ckpt: Checkpoint

    @property
    def dir(self) -> Path:
        return self.source.path

    @property
    def quantization_format(self) -> str | None:
        return (self.config.get("quantization_config") or {}).get("format")

    @cached_property
    def paths(self) -> tuple[Path, ...]:
        """The directory and the files in it (not its subdirectories, where an output may live): what an
        output must never replace."""
        return (self.dir, *sorted(p for p in self.dir.iterdir() if p.is_file()))

    def fingerprint(self) -> str:
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:  # read once however many outputs a run writes
        return self.ckpt.fingerprint()

    def check_finite(self) -> None:
        self.fetch_all()
        self.ckpt.check_finite()

    def fetch_all(self) -> None:
        """Have every shard still on the Hub downloaded, and kept: for work that reads the model in
        another order than the walk, or more than once (calibration, evaluation, GPTQ)."""
        if self.source.remote is not None:
            self.source.remote.fetch_all()


def unfuse_gate_up(gate_up_slice):
    """One expert's gate and up projections as [inter, hidden] views of its slice of the fused
    `experts.gate_up_proj` ([hidden, 2 * inter], gate first): the split every consumer of a BF16
    Llama 4 checkpoint needs. The down projection is `down_proj[e].T`."""
    inter = gate_up_slice.shape[1] // 2
    return gate_up_slice[:, :inter].T, gate_up_slice[:, inter:].T


def open_model(source: Source, *, allow_quantized: bool = False) -> Model:
    """Open and validate `source`: a BF16 model, or with `allow_quantized` also a compressed-tensors derivative."""
    config = arch.load_config(source.path)
    spec = arch.spec_from_config(config, str(source.path / "config.json"))
    qc = config.get("quantization_config")
    if qc and not allow_quantized:
        raise UsageError(f"{source.path} is already quantized ({_format_of(qc)}); use the BF16 model it was made from")
    ckpt = Checkpoint(source.path, source.remote, source.sha256)
    model = Model(source, config, spec, ckpt)
    if qc:
        validate_derivative(model)
    else:
        validate_checkpoint(ckpt, spec)
    return model


def _format_of(qc) -> str:
    return str(qc.get("format", "unknown format")) if isinstance(qc, dict) else "unknown format"


def validate_checkpoint(ckpt: Checkpoint, spec: Llama4Spec) -> None:
    """A BF16 checkpoint: every tensor the config implies is there, with the shape it implies."""
    for name in arch.expected_tensor_names(spec):
        if name not in ckpt.by_name:
            raise CorruptCheckpointError(f"{ckpt.dir}: tensor {name} is missing from the checkpoint")
    for info in ckpt.tensors:
        arch.check_shape(info.name, arch.classify(info.name, spec), info.shape)


def validate_derivative(model: Model) -> None:
    """A compressed-tensors derivative: every Linear the config implies is there, BF16 with the implied
    shape or quantized with its format's tensors; experts unfused, exactly as many as the config says."""
    fmt = model.quantization_format
    if fmt not in QUANTIZED_SUFFIXES:
        raise UsageError(f"{model.dir}: quantization format {fmt!r} is not one l4q reads "
                         f"({', '.join(QUANTIZED_SUFFIXES)})")
    names = model.ckpt.by_name
    spec = model.spec
    expert_ids: dict[str, set[int]] = {}
    for name in names:
        m = _EXPERT_RE.match(name)
        if m:
            expert_ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    for name in arch.expected_tensor_names(spec):
        role = arch.classify(name, spec)
        if role.role in arch.EXPERT_ROLES:
            base = name.rsplit(".", 1)[0]
            if name in names:  # still fused (an ignored layer kept BF16)
                arch.check_shape(name, role, names[name].shape)
                continue
            found = expert_ids.get(base, set())
            if found != set(range(spec.num_experts)):
                raise ShapeMismatchError(f"{model.dir}: {base} holds experts {_ranges(found)}, but config.json says "
                                         f"{spec.num_experts}")
            proj = ("gate_proj", "up_proj") if role.role == arch.EXPERTS_GATE_UP else ("down_proj",)
            for e in range(spec.num_experts):
                for p in proj:
                    _check_linear(model, f"{base}.{e}.{p}", None, fmt)
        elif name.endswith(".weight") and role.role in (*arch.LINEAR_ROLES, arch.LM_HEAD):
            _check_linear(model, name.removesuffix(".weight"), role, fmt)
        elif name not in names:
            raise CorruptCheckpointError(f"{model.dir}: tensor {name} is missing from the checkpoint")
        else:
            arch.check_shape(name, role, names[name].shape)


def _check_linear(model: Model, module: str, role: arch.TensorRole | None, fmt: str) -> None:
    names = model.ckpt.by_name
    if f"{module}.weight_scale" in names:
        for suffix in QUANTIZED_SUFFIXES[fmt]:
            if f"{module}.{suffix}" not in names:
                raise CorruptCheckpointError(f"{model.dir}: tensor {module}.{suffix} is missing from the checkpoint")
        return
    weight = names.get(f"{module}.weight")
    if weight is None:
        raise CorruptCheckpointError(f"{model.dir}: tensor {module}.weight is missing from the checkpoint")
    if role is not None:
        arch.check_shape(weight.name, role, weight.shape)


def _ranges(ids: set[int]) -> str:
    return f"{min(ids)}-{max(ids)} ({len(ids)})" if ids else "none"


def display_name(source: Source) -> str:
    """How published files name a source: its hub repo id or preset, else only the directory's name
    (never a local path)."""
    if source.repo_id:
        return source.repo_id
    return source.label if source.label in PRESETS else source.path.name


def check_gguf(path: Path, spec: Llama4Spec | None = None) -> None:
    """A complete, readable llama.cpp GGUF file of arch llama4 (with `spec`'s depth, if given)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch_field = reader.get_field("general.architecture")
        arch_name = str(arch_field.contents()) if arch_field is not None else None
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, KeyError, IndexError... on bad files
        detail = (str(exc).splitlines() or ["corrupt"])[0]
        raise CorruptCheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {detail})") from None
    if arch_name != "llama4":
        raise NotLlama4Error(f"{path}: GGUF architecture is {arch_name!r}, not llama4")
    if end > path.stat().st_size:
        raise CorruptCheckpointError(f"{path}: truncated GGUF file ({path.stat().st_size} bytes, its tensors need {end})")
    if spec is not None:
        blocks = reader.get_field("llama4.block_count")
        if blocks is not None and int(blocks.contents()) != spec.num_layers:
            raise ShapeMismatchError(f"{path}: {int(blocks.contents())} layers, the base has {spec.num_layers}")


def check_derivative(path: Path) -> None:
    """What `l4q push` and `l4q dedup` accept: a complete, finite Llama 4 model directory or GGUF file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path)
    elif path.is_dir():
        open_model(Source(path, path.name), allow_quantized=True).check_finite()
    elif path.exists():
        raise UsageError(f"{path}: not a model directory or a .gguf file")
    else:
        raise SourceNotFoundError(f"{path}: no such file or directory")
