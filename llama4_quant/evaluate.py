"""`l4q eval`: how far a derivative's next-token distributions and weights moved from its base.

Every model sees the same token ids: the data is tokenized once with the base's tokenizer and cut
into fixed windows fed as ids. The base runs once; what the metrics need of it (its top-K
log-probabilities, the log-probability of each next token, its routing) is stored compactly on disk
and reused for every candidate, so only one model is in memory at a time.

KLD is KL(base || candidate) per predicted token over the base's top-K tokens plus one bucket for
the remaining probability mass: exact when that mass is negligible (its mean is reported), a lower
bound otherwise, and exactly 0 for identical models.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from . import __version__, arch, walk
from .checkpoint import Checkpoint, read_tensor
from .errors import (
    CorruptCheckpointError,
    NonFiniteWeightError,
    ShapeMismatchError,
    SourceNotFoundError,
    UsageError,
)
from .formats import compressed_tensors as ct
from .model import Model, check_gguf, display_name, open_model
from .sources import Source
from .text import load_text, quiet_transformers

TOP_K = 256
LLAMA_CPP_CHUNK = 8192  # llama.cpp's Llama 4 loader hard-codes the attention chunk
HIST_EDGES = np.logspace(-8, 1, 46)


# ---------------------------------------------------------------------------------------------
# Data


def token_windows(tokenizer_dir: Path, text: str, ctx: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n, ctx] token ids: the text tokenized once (no special tokens), cut into whole windows."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // ctx
    if n == 0:
        raise UsageError(f"the data has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    return torch.tensor(ids[: n * ctx], dtype=torch.long).reshape(n, ctx)


def ids_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Models


def load_causal_lm(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The text model of a Llama 4 checkpoint through transformers; compressed-tensors checkpoints
    are decompressed on load (there are no CPU kernels for them)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "quantization_config" in config:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if "quantization_config" in config:
        quantize_inputs_as_served(model, Path(model_dir), config["quantization_config"])
    return model.to(device).eval()


def quantize_inputs_as_served(model, model_dir: Path, qc: dict) -> int:
    """Give the quantized Linears of an FP4 W4A4 checkpoint (nvfp4, mxfp4) the input quantization that
    vLLM's kernels apply: transformers decompresses the weights and drops it, which would measure
    the weights' error alone. Returns the number of Linears hooked."""
    scheme = ct.scheme_for_config(qc)
    if scheme is None:
        return 0
    where = {}  # tensor name -> its shard
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            where.update(dict.fromkeys(f.keys(), shard))
    modules = dict(model.named_modules())
    marker = "." + scheme.scale_suffixes[0]  # a scale: only quantized Linears have one
    hooked = 0
    for name in sorted(n for n in where if n.endswith(marker)):
        prefix = name.removesuffix(marker)
        module = modules.get(prefix.removeprefix("language_model."))
        if module is None:
            raise CorruptCheckpointError(f"{model_dir}: {name} names no Linear of the loaded model")
        stored = {}
        for suffix in scheme.suffixes:
            with safe_open(str(where[f"{prefix}.{suffix}"]), "pt") as f:
                stored[suffix] = f.get_tensor(f"{prefix}.{suffix}")
        quantize = scheme.served_input(stored)
        if quantize is None:  # the scheme's served inputs are 16-bit, or quantized finely enough to leave out
            return 0
        module.register_forward_pre_hook(lambda _m, args, q=quantize: (q(args[0]), *args[1:]))
        hooked += 1
    return hooked


class TransformersRunner:
    """Log-probabilities and top-1 routes of a safetensors checkpoint, window by window."""

    kind = "safetensors"

    def __init__(self, model_dir: Path, device: str):
        self.model = load_causal_lm(model_dir, device)
        self.device = device
        self._routes: dict[int, torch.Tensor] = {}
        self.moe_layers = []
        for i, layer in enumerate(self.model.model.layers):
            router = getattr(layer.feed_forward, "router", None)
            if router is not None:
                self.moe_layers.append(i)
                router.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            _scores, logits = output
            self._routes[layer] = logits.argmax(-1).cpu()

        return hook

    @torch.no_grad()
    def __call__(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.received = window
        logits = self.model(window[None].to(self.device)).logits[0].float()
        routes = torch.stack([self._routes[i] for i in self.moe_layers], dim=1) if self.moe_layers else None
        return torch.log_softmax(logits, -1).cpu(), routes


class LlamaCppRunner:
    """Log-probabilities of a GGUF file through llama.cpp (llama-cpp-python), fed the same token ids."""

    kind = "gguf"

    def __init__(self, path: Path, n_ctx: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UsageError("GGUF candidates need llama-cpp-python: pip install llama-cpp-python") from None
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False)
        self.moe_layers = []

    def __call__(self, window: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.llm.reset()
        self.llm.eval(window.tolist())
        self.received = torch.from_numpy(np.array(self.llm.input_ids[: self.llm.n_tokens], dtype=np.int64))
        logits = torch.from_numpy(np.array(self.llm.scores[: len(window)], dtype=np.float32))
        return torch.log_softmax(logits, -1), None


class StreamingRunner:
    """Log-probabilities and routes through the layer-streaming engine: for models that do not fit in
    memory. Windows go through in batches; each batch reads every layer once."""

    kind = "safetensors"

    def __init__(self, model_dir: Path, device: str, batch_size: int = 8):
        from .calibrate.weights import WeightSource

        self.src = WeightSource(model_dir, device)
        self.moe_layers = list(self.src.spec.moe_layers)
        self.batch_size = batch_size

    @torch.no_grad()
    def run(self, windows: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(log-probs [T, vocab], routes [T, MoE layers]) per window, one window's log-probs in memory at a time."""
        from .calibrate.engine import Engine

        engine = Engine(self.src, record_routes=True)
        h = engine.run_layers(engine.embed(windows.to(self.src.device)))
        routes = None
        if self.moe_layers:
            routes = torch.stack([engine.routes[i].view(windows.shape) for i in self.moe_layers], dim=-1)
        for w, lp in enumerate(engine.log_probs(h)):
            yield lp, routes[w] if routes is not None else None


def run_windows(runner, windows: torch.Tensor, progress: bool, desc: str):
    """(log-probs, routes, ids as received) per window, batch by batch for the streaming runner."""
    step = getattr(runner, "batch_size", 1)
    with tqdm(total=len(windows), desc=desc, disable=not progress, unit="window") as bar:
        for start in range(0, len(windows), step):
            batch = windows[start : start + step]
            if isinstance(runner, StreamingRunner):
                for w, (lp, routes) in enumerate(runner.run(batch)):
                    yield _finite(lp, desc), routes, batch[w]
            else:
                lp, routes = runner(batch[0])
                yield _finite(lp, desc), routes, runner.received
            bar.update(len(batch))


def _finite(logp: torch.Tensor, desc: str) -> torch.Tensor:
    if not bool(torch.isfinite(logp).all()):
        raise NonFiniteWeightError(f"{desc}: the model produced NaN/Inf log-probabilities; its weights are broken")
    return logp


def fits_in_memory(model_dir: Path, device: str) -> bool:
    """Whether transformers can hold the model as float32 on `device` (with room to spare)."""
    ckpt = Checkpoint(model_dir)
    # Logical weights: int4 is stored as eight values per int32 word.
    params = sum(math.prod(t.shape) * (8 if t.name.endswith(".weight_packed") else 1) for t in ckpt.tensors)
    if str(device).startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    else:
        import psutil

        free = psutil.virtual_memory().available
    return 4 * params < 0.6 * free


def make_runner(model_dir: Path, device: str, engine: str, batch_size: int):
    if engine == "auto":
        engine = "transformers" if fits_in_memory(model_dir, device) else "streaming"
    if engine == "streaming":
        return StreamingRunner(model_dir, device, batch_size)
    return TransformersRunner(model_dir, device)


# ---------------------------------------------------------------------------------------------
# The base, once


@dataclass
class BaseReference:
    """What the metrics need of the base, per window position."""

    topk_ids: np.ndarray  # int32 [n, ctx, K], by descending probability
    topk_logp: np.ndarray  # float32 [n, ctx, K]
    target_logp: np.ndarray  # float32 [n, ctx - 1], log p(next token)
    routes: np.ndarray | None  # int16 [n, ctx, moe layers]: chosen expert
    moe_layers: list[int]

    def save(self, path: Path, key: str) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = dict(topk_ids=self.topk_ids, topk_logp=self.topk_logp, target_logp=self.target_logp,
                      moe_layers=np.array(self.moe_layers, dtype=np.int32), key=np.array(key))
        if self.routes is not None:
            arrays["routes"] = self.routes
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, key: str) -> BaseReference | None:
        try:
            with np.load(path) as f:
                if str(f["key"]) != key:
                    return None
                return cls(f["topk_ids"], f["topk_logp"], f["target_logp"],
                           f["routes"] if "routes" in f else None, [int(x) for x in f["moe_layers"]])
        except (OSError, KeyError, ValueError):
            return None


def compute_base_reference(runner, windows: torch.Tensor, k: int, vocab_size: int, progress: bool) -> BaseReference:
    n, ctx = windows.shape
    k = min(k, vocab_size)
    ids = np.zeros((n, ctx, k), np.int32)
    logp = np.zeros((n, ctx, k), np.float32)
    target = np.zeros((n, ctx - 1), np.float32)
    routes = np.zeros((n, ctx, len(runner.moe_layers)), np.int16) if runner.moe_layers else None
    for w, (lp, r, _ids) in enumerate(run_windows(runner, windows, progress, "base")):
        top = torch.topk(lp, k, dim=-1)
        ids[w], logp[w] = top.indices.numpy(), top.values.numpy()
        target[w] = lp[:-1].gather(1, windows[w, 1:, None]).squeeze(1).numpy()
        if routes is not None:
            routes[w] = r.numpy()
    return BaseReference(ids, logp, target, routes, runner.moe_layers)


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclass
class WindowScores:
    kld: torch.Tensor  # float64 per scored position
    top1: torch.Tensor  # bool
    top_prob_change: torch.Tensor
    base_nll: torch.Tensor
    cand_nll: torch.Tensor
    rest_mass: torch.Tensor
    route_match: torch.Tensor | None  # bool [positions, moe layers]


def score_window(base: BaseReference, w: int, window: torch.Tensor, cand_logp: torch.Tensor,
                 cand_routes: torch.Tensor | None, positions: int) -> WindowScores:
    """Metrics of one window's first `positions` predictions (position t predicts token t + 1)."""
    p_ids = torch.from_numpy(base.topk_ids[w, :positions]).long()
    lp = torch.from_numpy(base.topk_logp[w, :positions]).double()
    lq_all = cand_logp[:positions].double()
    lq = lq_all.gather(1, p_ids)
    p = lp.exp()
    # The rest bucket: base and candidate mass outside the base's top-K.
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - lq.exp().sum(-1)).clamp_min(0)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.clamp_min(1e-300).log()), 0.0)
    kld = ((p * (lp - lq)).sum(-1) + rest).clamp_min(0)
    targets = window[1 : positions + 1, None]
    scored = min(positions, len(window) - 1)
    base_nll = -torch.from_numpy(base.target_logp[w, :scored]).double()
    cand_nll = -lq_all[:scored].gather(1, targets[:scored]).squeeze(1)
    route_match = None
    if cand_routes is not None and base.routes is not None:
        route_match = cand_routes[:positions].numpy() == base.routes[w, :positions]
        route_match = torch.from_numpy(route_match)
    return WindowScores(
        kld=kld, top1=lq_all.argmax(-1) == p_ids[:, 0], top_prob_change=lq[:, 0].exp() - p[:, 0],
        base_nll=base_nll, cand_nll=cand_nll, rest_mass=p_rest, route_match=route_match,
    )


def summarize(scores: list[WindowScores], moe_layers: list[int]) -> dict:
    kld = torch.cat([s.kld for s in scores])
    k = kld.numpy()
    base_nll = torch.cat([s.base_nll for s in scores])
    cand_nll = torch.cat([s.cand_nll for s in scores])
    change = torch.cat([s.top_prob_change for s in scores])
    ppl_b, ppl_c = math.exp(base_nll.mean().item()), math.exp(cand_nll.mean().item())
    counts, _ = np.histogram(np.clip(k, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)
    out = {
        "base_perplexity": ppl_b,
        "perplexity": ppl_c,
        "perplexity_ratio": ppl_c / ppl_b,
        "perplexity_diff": ppl_c - ppl_b,
        "kld": {
            "mean": float(k.mean()),
            "stderr": float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else 0.0,
            "median": float(np.median(k)),
            "p90": float(np.quantile(k, 0.9)),
            "p99": float(np.quantile(k, 0.99)),
            "p999": float(np.quantile(k, 0.999)),
            "max": float(k.max()),
            "histogram": {"edges": HIST_EDGES.tolist(), "counts": counts.tolist()},
        },
        "top1_agreement": torch.cat([s.top1 for s in scores]).double().mean().item(),
        "top_prob_change": {"mean": change.mean().item(), "rms": change.pow(2).mean().sqrt().item()},
        "rest_mass_mean": torch.cat([s.rest_mass for s in scores]).mean().item(),
        "routing_agreement": None,
    }
    if scores and scores[0].route_match is not None:
        match = torch.cat([s.route_match for s in scores]).double().mean(0)
        out["routing_agreement"] = {
            "mean": match.mean().item(),
            "per_layer": [{"layer": layer, "agreement": match[i].item()} for i, layer in enumerate(moe_layers)],
        }
    return out


# ---------------------------------------------------------------------------------------------
# Weight error, from the weights alone


def weight_errors(base: Model, cand_dir: Path) -> dict | None:
    """Relative Frobenius error per layer component and per (layer, expert) of a compressed-tensors
    candidate against its base, streaming one module at a time."""
    config = json.loads((cand_dir / "config.json").read_text())
    qc = config.get("quantization_config")
    scheme = ct.scheme_for_config(qc)
    if scheme is None:
        return None
    spec, cand = base.spec, Checkpoint(cand_dir)
    err2: dict[tuple[int, str], float] = {}
    ref2: dict[tuple[int, str], float] = {}
    exp_err2: dict[tuple[int, int], float] = {}
    exp_ref2: dict[tuple[int, int], float] = {}

    def candidate_weight(module: str) -> torch.Tensor | None:
        if f"{module}.weight_scale" in cand.by_name:
            return scheme.decode({s: read_tensor(cand.by_name[f"{module}.{s}"]) for s in scheme.suffixes}).double()
        if f"{module}.weight" in cand.by_name:
            return read_tensor(cand.by_name[f"{module}.weight"]).double()
        return None

    def compare(w: walk.Weight, base_weight: torch.Tensor) -> None:
        wq = candidate_weight(w.module)
        if wq is None:
            return
        base_weight = base_weight.double()
        e2, r2 = (wq - base_weight).pow(2).sum().item(), base_weight.pow(2).sum().item()
        component = w.role if w.expert is None else "experts"
        err2[(w.layer, component)] = err2.get((w.layer, component), 0.0) + e2
        ref2[(w.layer, component)] = ref2.get((w.layer, component), 0.0) + r2
        if w.expert is not None:
            exp_err2[(w.layer, w.expert)] = exp_err2.get((w.layer, w.expert), 0.0) + e2
            exp_ref2[(w.layer, w.expert)] = exp_ref2.get((w.layer, w.expert), 0.0) + r2

    walk.walk(base, [walk.Visitor(lambda w: w.role in arch.LINEAR_ROLES or w.expert is not None, compare)])

    def rel(e, r):
        return math.sqrt(e / r) if r > 0 else 0.0

    per_layer = []
    for layer in range(spec.num_layers):
        row = {"layer": layer}
        for component in (arch.ATTN, arch.SHARED_EXPERT, arch.DENSE_MLP, "experts"):
            key = (layer, component)
            row[component] = rel(err2[key], ref2[key]) if key in err2 else None
        per_layer.append(row)
    expert_layers = list(spec.moe_layers)
    experts = [[rel(exp_err2.get((l, e), 0.0), exp_ref2.get((l, e), 0.0)) for e in range(spec.num_experts)] for l in expert_layers]
    return {"metric": "relative Frobenius error ||W_q - W|| / ||W||", "per_layer": per_layer,
            "expert_layers": expert_layers, "experts": experts}


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def candidate_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def evaluate(
    base: Source | Model,
    candidates: list[Path],
    *,
    data: list[Path] | None = None,
    ctx: int | None = None,
    max_tokens: int | None = 32768,
    device: str = "cpu",
    engine: str = "auto",
    batch_windows: int = 8,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Compare each candidate with the base; returns the report dict (see llama4_quant/report.py).

    Safetensors models run through transformers when they fit in memory as float32 and through the
    layer-streaming engine otherwise (`engine` auto), or as `engine` says.
    """
    if engine not in ("auto", "transformers", "streaming"):
        raise UsageError(f"unknown engine {engine!r}; choose auto, transformers or streaming")
    if ctx is not None and ctx < 2:
        raise UsageError(f"--ctx {ctx}: a window needs at least 2 tokens")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens}: must be positive")
    base_model = open_model(base) if not isinstance(base, Model) else base
    candidates = [Path(c) for c in candidates]
    opened = [check_candidate(c, base_model) for c in candidates]
    spec = base_model.spec
    base = base_model.source
    chunk = spec.attention_chunk_size
    ctx = ctx or (2 * chunk if chunk else 2048)
    text, description = load_text(data)
    windows = token_windows(base.path, text, ctx, max_tokens)
    digest = ids_digest(windows)
    # NaN/Inf anywhere would only show up as a report full of nan: refuse it before running anything.
    for model in (base_model, *opened):
        if model is not None:
            model.check_finite()

    reference = _base_reference(base_model, windows, digest, cache_dir, device, engine, batch_windows, progress)
    base_ppl = math.exp(-float(reference.target_logp.mean()))
    report = {
        "l4q_version": __version__,
        "created_by": "l4q eval",
        "base": {"source": display_name(base), "path": base.path.name, "size_bytes": candidate_size(base.path),
                 "perplexity": base_ppl},
        "data": {"description": description, "tokens": int(windows.numel()), "ctx": ctx, "windows": len(windows),
                 "token_ids_sha256": digest},
        "kld_method": f"KL(base || candidate) per predicted token over the base's top-{reference.topk_ids.shape[-1]} "
                      "tokens plus one bucket for the remaining probability mass",
        "candidates": [],
    }
    for path in candidates:
        report["candidates"].append(_score_candidate(path, base_model, reference, windows, ctx, device, engine,
                                                     batch_windows, progress))
    return report


def _base_reference(base_model: Model, windows: torch.Tensor, digest: str, cache_dir: Path | None, device: str,
                    engine: str, batch_windows: int, progress: bool) -> BaseReference:
    """The base's top-k log-probabilities on `windows`, from the cache when it holds them: a cached
    reference is valid for these ids, this l4q and the base's content."""
    key = hashlib.sha256(f"{__version__}:{base_model.fingerprint()}:{digest}:{TOP_K}".encode()).hexdigest()
    cache_path = (cache_dir / f"base-{key[:16]}.npz") if cache_dir else None
    reference = BaseReference.load(cache_path, key) if cache_path and cache_path.is_file() else None
    if reference is None:
        runner = make_runner(base_model.dir, device, engine, batch_windows)
        reference = compute_base_reference(runner, windows, TOP_K, base_model.spec.vocab_size, progress)
        del runner
        if cache_path:
            from .outputs import writing

            with writing(cache_path):
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                reference.save(cache_path, key)
    return reference


def _score_candidate(path: Path, base_model: Model, reference: BaseReference, windows: torch.Tensor, ctx: int,
                     device: str, engine: str, batch_windows: int, progress: bool) -> dict:
    """One candidate's entry of the report: its drift from the base on the same windows."""
    chunk = base_model.spec.attention_chunk_size
    gguf = path.is_file() and path.suffix == ".gguf"
    positions, note = ctx - 1, None
    if gguf and chunk and chunk != LLAMA_CPP_CHUNK and ctx > chunk:
        positions = chunk
        note = (f"llama.cpp fixes the Llama 4 attention chunk at {LLAMA_CPP_CHUNK}; this model's chunk is {chunk}, "
                f"so only positions 0-{chunk - 1} of each window are scored (same token ids, shorter context)")
    runner = LlamaCppRunner(path, n_ctx=min(ctx, positions + 1)) if gguf else make_runner(path, device, engine, batch_windows)
    feed = windows[:, : positions + 1] if gguf else windows
    scores, fed = [], []
    for w, (logp, routes, received) in enumerate(run_windows(runner, feed, progress, path.name)):
        fed.append(received)  # the ids as the model received them, for the report's digest
        scores.append(score_window(reference, w, windows[w], logp, routes, positions))
    del runner
    entry = {
        "name": path.name.removesuffix(".gguf"),
        "path": path.name,  # never a local path: reports get published beside derivatives
        "kind": "gguf" if gguf else "safetensors",
        "scheme": _scheme_name(path),
        "size_bytes": candidate_size(path),
        "windows": {"count": len(windows), "length": len(fed[0]), "scored_positions_per_window": positions,
                    "tokens_scored": positions * len(windows), "note": note},
        "token_ids_sha256": ids_digest(torch.stack(fed)),
    }
    entry.update(summarize(scores, reference.moe_layers))
    entry["weight_error"] = None if gguf else weight_errors(base_model, path)
    return entry


def check_candidate(path: Path, base: Model) -> Model | None:
    """A candidate is a derivative directory of the base's architecture (returned, opened), or a
    readable llama4 GGUF file (None)."""
    if not path.exists():
        raise SourceNotFoundError(f"{path}: no such candidate (a compressed-tensors directory or a .gguf file)")
    if path.is_dir():
        cand = open_model(Source(path, path.name), allow_quantized=True)
        if cand.spec != base.spec:
            raise ShapeMismatchError(f"{path}: its config.json describes another architecture than the base's "
                                     f"({cand.spec.num_layers} layers, {cand.spec.num_experts} experts, hidden "
                                     f"{cand.spec.hidden_size} vs {base.spec.num_layers}, {base.spec.num_experts}, "
                                     f"{base.spec.hidden_size})")
        return cand
    check_gguf(path, base.spec)
    return None


def _scheme_name(path: Path) -> str:
    if path.is_file():
        try:
            from gguf import GGUFReader

            file_type = GGUFReader(str(path)).get_field("general.file_type")
            if file_type is not None:
                from gguf import LlamaFileType

                return LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_")
        except (ValueError, KeyError, OSError):  # an unreadable or unknown file type only loses the label
            pass
        return "gguf"
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    scheme = ct.scheme_for_config(qc)
    return scheme.name if scheme else "bf16"
