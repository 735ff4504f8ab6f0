"""The model card (`README.md`) `l4q push` publishes with a derivative.

Hub metadata (YAML front matter) says what the repo derives from and how: `base_model`,
`base_model_relation: quantized`, tags for the format and scheme. The body records the scheme and
options l4q used, its version, the `l4q eval` table when a report lies in the derivative, and the
Xet dedup figures when they were measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import __version__
from ..errors import UsageError
from ..sources import HUB_PRESETS

CARD_MARKER = "<!-- written by l4q push; edit freely, l4q will not overwrite a card without this line -->"


@dataclass
class Derivative:
    """What l4q knows of an output it is about to publish."""

    path: Path
    kind: str  # "compressed-tensors" or "gguf"
    scheme: str  # int4, int8, fp8, or a GGUF file type such as Q4_K_M
    base_model: str | None  # hub repo id of the base, where known
    options: dict = field(default_factory=dict)
    eval_report: dict | None = None
    architecture: str | None = None


def _base_repo(label: str | None) -> str | None:
    """A hub repo id from a source label: presets map to Meta's repos; local paths have none."""
    if not label:
        return None
    if label in HUB_PRESETS:
        return HUB_PRESETS[label]
    if label.count("/") == 1 and not label.startswith((".", "/", "~")) and not Path(label).exists():
        return label
    return None


def _find_report(path: Path) -> dict | None:
    if not path.is_dir():
        return None
    for candidate in [path / "report.json", *sorted(path.glob("*/report.json"))]:
        try:
            report = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if report.get("created_by") == "l4q eval":
            return report
    return None


def describe(path: Path, base_model: str | None = None) -> Derivative:
    """Read a derivative's scheme, options and base from its own files (config, l4q_recipe.json, GGUF keys)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError) as exc:
            raise UsageError(f"{path}: not a readable GGUF file ({exc})") from None

        def field_text(key: str) -> str | None:
            f = reader.get_field(key)
            return str(f.contents()) if f is not None else None

        file_type = reader.get_field("general.file_type")
        scheme = gguf.LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_") if file_type else "gguf"
        repo_url = field_text("general.base_model.0.repo_url") or ""
        base = base_model or (repo_url.removeprefix("https://huggingface.co/") if repo_url else None)
        imatrix = field_text("quantize.imatrix.dataset")
        options = {"quantized_by": field_text("general.quantized_by"), "imatrix": imatrix and Path(imatrix).name}
        return Derivative(path, "gguf", scheme, base, {k: v for k, v in options.items() if v})
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a model directory (no config.json) or a .gguf file")
    config = json.loads((path / "config.json").read_text())
    recipe_path = path / "l4q_recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    qc = config.get("quantization_config") or {}
    scheme = recipe.get("scheme") or qc.get("format") or "bf16"
    options = {k: recipe[k] for k in ("method", "ignore", "calibration", "minimum_vllm") if k in recipe}
    base = base_model or recipe.get("base_model") or _base_repo(recipe.get("source"))
    return Derivative(path, "compressed-tensors", scheme, base, options, _find_report(path),
                      (config.get("architectures") or [None])[0])


def metadata(d: Derivative) -> dict:
    tags = ["llama4", "l4q", d.kind, d.scheme.lower()]
    if d.options.get("method") and d.options["method"] != "rtn":
        tags.append(d.options["method"])
    meta: dict = {}
    if d.base_model:
        meta["base_model"] = d.base_model
        meta["base_model_relation"] = "quantized"
    if d.kind == "compressed-tensors":
        meta["library_name"] = "transformers"
        meta["pipeline_tag"] = "image-text-to-text" if d.architecture == "Llama4ForConditionalGeneration" else "text-generation"
    meta["tags"] = tags
    return meta


def _option_text(key: str, value) -> str:
    if key == "calibration" and isinstance(value, dict) and "data" in value:
        data = value["data"]
        return f"{data['samples']} x {data['seq_len']} tokens of {data['description']}"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def _scheme_text(d: Derivative) -> str:
    """The scheme's name, with what it stores for a compressed-tensors scheme l4q writes."""
    from ..formats import compressed_tensors as ct

    if d.kind == "compressed-tensors" and d.scheme in ct.SCHEMES:
        return f"{d.scheme}: {ct.get_scheme(d.scheme).description}"
    return d.scheme


def render(d: Derivative, dedup: dict | None = None) -> str:
    """The whole README.md: YAML front matter, then the card text."""
    from ..report import fmt_size, summary_table_markdown

    lines = ["---", yaml.safe_dump(metadata(d), sort_keys=False).strip(), "---", CARD_MARKER, ""]
    title = f"{d.base_model or d.path.name} — {d.scheme}"
    lines += [f"# {title}", ""]
    made = f"Quantized with l4q {__version__}"
    lines += [f"{made} from `{d.base_model}`." if d.base_model else f"{made}.", ""]
    lines += ["| | |", "|---|---|", f"| format | {d.kind} |", f"| scheme | {_scheme_text(d)} |"]
    lines += [f"| {key} | {_option_text(key, value)} |" for key, value in d.options.items()]
    lines.append("")
    if d.kind == "compressed-tensors":
        lines += ["Load it with vLLM (`vllm serve <this repo>`) or transformers (compressed-tensors).", ""]
        if d.options.get("minimum_vllm"):
            lines += [f"**Attention is quantized in this checkpoint: it needs {d.options['minimum_vllm']}.** Older "
                      "vLLM builds load it without an error and produce garbage.", ""]
    else:
        lines += ["Run it with llama.cpp (`llama-cli -m <file>`).", ""]
    if d.eval_report:
        lines += ["## Evaluation (`l4q eval` against the base)", "", summary_table_markdown(d.eval_report).strip(), ""]
    if dedup:
        total = dedup["total"]
        measured = (f"Measured with Xet's chunker against the base and what was already stored: "
                    f"{fmt_size(total['deduped_bytes'])} of {fmt_size(total['size'])} ({total['dedup']:.1%}) "
                    "deduplicated.")
        lines += ["## Storage", "", measured, ""]
    return "\n".join(lines)
