"""The embedded tiny Llama 4 models that tests, examples and `--model tiny` run on.

- `tiny`: Scout's structure (16 experts, MoE in every layer, qk-norm, chunked attention, a NoPE layer),
  trained on the standard library's documentation and shipped in `llama4_quant/assets/tiny/`
  (`scripts/train_tiny.py` rebuilds it). Its held-out text, `heldout.txt`, is the default evaluation data.
- `tiny-maverick`: Maverick's structure (128 experts, MoE every other layer, dense MLP in between, no
  qk-norm), generated deterministically from `tiny` and a fixed seed on first use and cached.

Both are `Llama4ForConditionalGeneration` checkpoints laid out exactly as Hugging Face ships Llama 4:
BF16 safetensors shards with an index, tensors in module order, a small vision tower.

The corpus helpers live here too, so the training script and the tests split the text the same way.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import split_in_order, write_index, write_safetensors

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
HELDOUT_FILE = "heldout.txt"
MAVERICK_VERSION = "v1"
MAVERICK_SEED = 20250405

# Files of a model directory that hold no weights; the quantizer copies them through.
NON_WEIGHT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def tiny_model_dir() -> Path:
    """The packaged `tiny` checkpoint (Scout's structure, trained)."""
    return TINY_DIR


def tiny_heldout_path() -> Path:
    """Held-out standard-library documentation never seen in training: the default eval text."""
    return TINY_DIR / HELDOUT_FILE


def default_cache_root() -> Path:
    """`$L4Q_CACHE`, else `~/.cache/l4q`."""
    env = os.environ.get("L4Q_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "l4q"


# --------------------------------------------------------------------------------------------------
# Corpus: docstrings, comments and pydoc topics of the running Python's standard library.
# --------------------------------------------------------------------------------------------------

HELDOUT_PER_MILLE = 50  # 5% of sources, ~9% of the text (~100k tokens): large modules happen to land there
DOC_SEPARATOR = "\n\n"
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "venv",
        "__phello__",
    }
)
_MIN_COMMENT_CHARS = 40


@dataclass(frozen=True)
class CorpusDoc:
    """One piece of text and the source it came from (`json/decoder.py`, `pydoc_data/topics.py:if`)."""

    source: str
    text: str


def split_of(source: str) -> str:
    """'heldout' or 'train' for a source id: a pure function of the id (SHA-256 of it), never of the text.

    The split is by whole source (module or pydoc topic), so held-out text shares no module with training.
    """
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE else "train"


def _skip_dir(name: str) -> bool:
    return name in _SKIP_DIRS or name.startswith(("test", "config-")) or name.endswith("tests")


def _stdlib_files(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                yield path.relative_to(root).as_posix(), path


def _docstrings(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append((getattr(node, "lineno", 0), doc.strip()))
    return out


def _comment_blocks(source: str) -> list[tuple[int, str]]:
    """Runs of consecutive comment lines, joined into one paragraph each (short ones dropped)."""
    blocks: list[tuple[int, str]] = []
    current: list[str] = []
    start = last = -2

    def flush() -> None:
        text = " ".join(t for t in current if t).strip()
        if len(text) >= _MIN_COMMENT_CHARS:
            blocks.append((start, text))

    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if text.startswith("!") or "coding" in text[:20] and line <= 2:
                continue
            if line == last + 1 and current:
                current.append(text)
            else:
                if current:
                    flush()
                current, start = [text], line
            last = line
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    if current:
        flush()
    return blocks


def stdlib_corpus(stdlib: Path | None = None) -> list[CorpusDoc]:
    """Every documentation text of the standard library, in a fixed order, exact duplicates removed.

    Per module (test packages, site-packages, idlelib, tkinter and a few others skipped): module, class
    and function docstrings and comment blocks, in source order; plus each topic of `pydoc_data.topics`
    as its own source. A text that occurs more than once is kept only at its first occurrence, so no
    text can be both in training and held out.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs: list[CorpusDoc] = []
    seen: set[str] = set()

    def add(source: str, text: str) -> None:
        key = text.strip()
        if key and key not in seen:
            seen.add(key)
            docs.append(CorpusDoc(source, key))

    for rel, path in _stdlib_files(root):
        if rel == "pydoc_data/topics.py":
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for _, text in sorted(_docstrings(tree) + _comment_blocks(source), key=lambda p: p[0]):
            add(rel, text)

    topics_path = root / "pydoc_data" / "topics.py"
    if topics_path.is_file():
        tree = ast.parse(topics_path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        add(f"pydoc_data/topics.py:{k.value}", v.value)
    return docs


def split_corpus(docs: Iterable[CorpusDoc]) -> tuple[list[CorpusDoc], list[CorpusDoc]]:
    """(train, heldout) by `split_of` on each document's source."""
    train, heldout = [], []
    for doc in docs:
        (heldout if split_of(doc.source) == "heldout" else train).append(doc)
    return train, heldout


def join_docs(docs: Iterable[CorpusDoc]) -> str:
    """The text stream the model sees: documents separated by a blank line."""
    return DOC_SEPARATOR.join(d.text for d in docs) + "\n"


# --------------------------------------------------------------------------------------------------
# Writing checkpoints: safetensors shards in the order given, HF index, temp dir renamed into place.
# --------------------------------------------------------------------------------------------------

def write_sharded(
    out_dir: Path, tensors: Sequence[tuple[str, torch.Tensor]], max_shard_bytes: int, min_shards: int = 3
) -> dict:
    """Split tensors (in order) into `model-0000k-of-0000n.safetensors` shards plus the HF index.

    Greedy by size: a shard closes when the next tensor would push it past `max_shard_bytes`. Returns
    the index dict that was written.
    """
    sizes = [t.numel() * t.element_size() for _, t in tensors]
    total = sum(sizes)
    limit = min(max_shard_bytes, max(1, total // min_shards))
    groups = split_in_order(list(range(len(tensors))), lambda i: sizes[i], limit)
    n = len(groups)
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_safetensors(out_dir / fname, dict(tensors[i] for i in group))
        for i in group:
            weight_map[tensors[i][0]] = fname
    write_index(out_dir, weight_map, total)
    return read_index(out_dir)


def write_json(path: Path, obj: object) -> None:
    """JSON the way Hugging Face writes config files: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_index(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a small sharded checkpoint, in index order (tests and generation only)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    weight_map = read_index(model_dir)["weight_map"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, fname in weight_map.items():
        if fname not in loaded:
            loaded[fname] = load_file(model_dir / fname)
        out[name] = loaded[fname][name]
    return out


# --------------------------------------------------------------------------------------------------
# tiny-maverick: Maverick's structure, generated from tiny and a fixed seed, cached.
# --------------------------------------------------------------------------------------------------

MAVERICK_EXPERTS = 128
MAVERICK_MOE_LAYERS = (1, 3)
MAVERICK_SHARD_BYTES = 40 * 2**20


def _tiny_fingerprint(tiny_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(MAVERICK_VERSION.encode())
    for name in sorted(set(read_index(tiny_dir)["weight_map"].values())) + ["config.json", "tokenizer.json"]:
        h.update(name.encode())
        h.update((tiny_dir / name).read_bytes())
    return h.hexdigest()[:12]


def maverick_config(tiny_config: dict) -> dict:
    """Tiny's config.json turned into Maverick's structure (same width, heads, vocab and rope)."""
    cfg = json.loads(json.dumps(tiny_config))
    text = cfg["text_config"]
    n = text["num_hidden_layers"]
    text.update(
        num_local_experts=MAVERICK_EXPERTS,
        interleave_moe_layer_step=2,
        moe_layers=list(MAVERICK_MOE_LAYERS),
        use_qk_norm=False,
        no_rope_layers=[int((i + 1) % 4 != 0) for i in range(n)],
    )
    return cfg


@torch.no_grad()
def _maverick_tensors(tiny_dir: Path, config: dict) -> list[tuple[str, torch.Tensor]]:
    """Maverick-structured weights: tiny's trained embeddings, attention, norms, lm_head and shared
    experts; dense MLPs and routed experts drawn from a fixed seed around tiny's, so the network stays
    smooth (a routing flip changes little). Routers are set afterwards by `_balance_routers`."""
    tiny = load_tensors(tiny_dir)
    text = config["text_config"]
    hidden, inter, inter_mlp = text["hidden_size"], text["intermediate_size"], text["intermediate_size_mlp"]
    n_layers, n_exp = text["num_hidden_layers"], text["num_local_experts"]
    gen = torch.Generator().manual_seed(MAVERICK_SEED)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    out: list[tuple[str, torch.Tensor]] = []
    for name, t in tiny.items():
        if not name.startswith("language_model."):
            out.append((name, t))
    lm = "language_model.model."
    out.append((lm + "embed_tokens.weight", tiny[lm + "embed_tokens.weight"]))
    for i in range(n_layers):
        p = f"{lm}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{p}self_attn.{proj}.weight", tiny[f"{p}self_attn.{proj}.weight"]))
        ff = p + "feed_forward."
        if i in MAVERICK_MOE_LAYERS:
            # Routed experts: a small perturbation around tiny's mean expert, so every expert is a
            # plausible MLP and a routing flip changes the output only a little.
            t_gu = tiny[ff + "experts.gate_up_proj"].float()
            t_dn = tiny[ff + "experts.down_proj"].float()
            base_gu, base_dn = t_gu.mean(0, keepdim=True), t_dn.mean(0, keepdim=True)
            gu = base_gu + randn(n_exp, hidden, 2 * inter, std=float(t_gu.std()) * 0.5)
            dn = base_dn + randn(n_exp, inter, hidden, std=float(t_dn.std()) * 0.5)
            out.append((ff + "experts.gate_up_proj", gu.to(torch.bfloat16)))
            out.append((ff + "experts.down_proj", dn.to(torch.bfloat16)))
            # Random directions for now; `_balance_routers` shapes them on calibration text.
            out.append((ff + "router.weight", randn(n_exp, hidden, std=hidden**-0.5).to(torch.bfloat16)))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out.append((f"{ff}shared_expert.{proj}.weight", tiny[f"{ff}shared_expert.{proj}.weight"]))
        else:
            # Dense MLP of width intermediate_size_mlp: tiny's shared expert in the first half, a
            # random expert-sized block in the second.
            sg = tiny[ff + "shared_expert.gate_proj.weight"].float()
            su = tiny[ff + "shared_expert.up_proj.weight"].float()
            sd = tiny[ff + "shared_expert.down_proj.weight"].float()
            extra = inter_mlp - sg.shape[0]
            g = torch.cat([sg, randn(extra, hidden, std=float(sg.std()))])
            u = torch.cat([su, randn(extra, hidden, std=float(su.std()))])
            d = torch.cat([sd, randn(hidden, extra, std=float(sd.std()) * 0.5)], dim=1)
            out.append((ff + "gate_proj.weight", g.to(torch.bfloat16)))
            out.append((ff + "up_proj.weight", u.to(torch.bfloat16)))
            out.append((ff + "down_proj.weight", d.to(torch.bfloat16)))
        out.append((p + "input_layernorm.weight", tiny[p + "input_layernorm.weight"]))
        out.append((p + "post_attention_layernorm.weight", tiny[p + "post_attention_layernorm.weight"]))
    out.append((lm + "norm.weight", tiny[lm + "norm.weight"]))
    out.append(("language_model.lm_head.weight", tiny["language_model.lm_head.weight"]))
    return out


ROUTER_LOGIT_STD = 5.0


def sparse_moe_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Llama4TextMoe.forward` with each token sent through its own expert only.

    Same function as transformers' dense version (which runs every expert on every token, the
    unchosen ones on zeros); bind it to a module instance to make 128-expert forwards cheap.
    """
    x = hidden_states.reshape(-1, self.hidden_dim)
    scores, logits = self.router(x)
    top = logits.argmax(-1)
    scale = scores.gather(1, top[:, None])
    out = self.shared_expert(x)
    for e in top.unique().tolist():
        rows = (top == e).nonzero().squeeze(1)
        xe = x[rows] * scale[rows]
        gate, up = (xe @ self.experts.gate_up_proj[e]).chunk(2, dim=-1)
        out[rows] += (up * self.experts.act_fn(gate)) @ self.experts.down_proj[e]
    return out, logits


@torch.no_grad()
def _balance_routers(config: dict, tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Make each MoE router decisive and balanced, layer by layer.

    Runs the model (BF16 weights in float32, sparse experts) on calibration text made of every regular
    token of the vocabulary in id order (no corpus needed), whitens the router input there, removes its
    mean, and rescales each router row so its logit has standard deviation `ROUTER_LOGIT_STD`: logits
    become zero-mean, equal-variance and weakly correlated, so every expert wins some tokens and the
    top-1 / top-2 gap is large. Later layers are calibrated after earlier routers are set.
    """
    import types

    from transformers import Llama4ForCausalLM, Llama4TextConfig

    # A deep copy: transformers normalises the rope dicts it is given in place.
    text = json.loads(json.dumps(config["text_config"]))
    model = Llama4ForCausalLM(Llama4TextConfig(**text)).float().eval()
    prefix = "language_model."
    index = {name: i for i, (name, _) in enumerate(tensors)}
    model.load_state_dict({n[len(prefix) :]: t.float() for n, t in tensors if n.startswith(prefix)}, strict=True)
    n_regular = min(t for t in (text.get("bos_token_id"), text["vocab_size"]) if isinstance(t, int))
    calib = torch.arange(n_regular)[: n_regular // 252 * 252].view(-1, 252)
    captured: list[torch.Tensor] = []
    for layer_idx in text["moe_layers"]:
        moe = model.model.layers[layer_idx].feed_forward
        moe.forward = types.MethodType(sparse_moe_forward, moe)
    for layer_idx in text["moe_layers"]:
        moe = model.model.layers[layer_idx].feed_forward
        hook = moe.router.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().double()))
        model(input_ids=calib)
        hook.remove()
        h = captured.pop()
        mu = h.mean(0)
        hc = h - mu
        cov = hc.T @ hc / len(hc)
        cov += 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(cov)
        whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        w = moe.router.weight.double() @ whiten
        w = w - (w @ mu)[:, None] * mu[None, :] / (mu @ mu)  # zero-mean logits
        w = w * (ROUTER_LOGIT_STD / (hc @ w.T).std(0))[:, None]
        w = w.to(torch.bfloat16)
        moe.router.weight.copy_(w.float())
        name = f"{prefix}model.layers.{layer_idx}.feed_forward.router.weight"
        tensors[index[name]] = (name, w)
    return tensors


def generate_maverick(out_dir: Path, tiny_dir: Path | None = None) -> Path:
    """Write a tiny-maverick checkpoint into `out_dir` (which must not exist yet)."""
    tiny_dir = Path(tiny_dir or tiny_model_dir())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    config = maverick_config(json.loads((tiny_dir / "config.json").read_text()))
    tensors = _balance_routers(config, _maverick_tensors(tiny_dir, config))
    write_sharded(out_dir, tensors, MAVERICK_SHARD_BYTES)
    write_json(out_dir / "config.json", config)
    for name in NON_WEIGHT_FILES:
        if name != "config.json" and (tiny_dir / name).is_file():
            shutil.copyfile(tiny_dir / name, out_dir / name)
    return out_dir


def tiny_maverick_dir(cache_root: Path | None = None) -> Path:
    """The tiny-maverick checkpoint, generated under the cache on first use (a few seconds).

    Generated into a temporary sibling and renamed into place, so concurrent or interrupted runs never
    leave a half-written model where a complete one is expected. The directory name carries a
    fingerprint of the generator version and of tiny's weights, so a retrained tiny regenerates it.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    tiny_dir = tiny_model_dir()
    final = root / f"tiny-maverick-{MAVERICK_VERSION}-{_tiny_fingerprint(tiny_dir)}"
    if (final / "model.safetensors.index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        generate_maverick(tmp / "model", tiny_dir)
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / "model.safetensors.index.json").is_file():  # lost a race to a complete one?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
