"""The layer-streaming Llama 4 forward: one decoder layer's weights resident at a time.

Hidden states for every calibration (or evaluation) sequence are carried from layer to layer; each
layer's weights are read from the checkpoint when that layer runs, module by module and expert by
expert, and dropped afterwards. Memory is one layer's largest module plus the activations, whatever
the model's size. The math is transformers' `Llama4ForCausalLM` (checked by tests on both tiny models):

- RMSNorm before attention and before the feed-forward, residual adds after each.
- RoPE layers: rotary embedding in complex (interleaved-pair) form, llama3 frequency scaling where the
  config asks, then L2 qk-norm when `use_qk_norm`; chunked causal attention (`attention_chunk_size`).
- NoPE layers: no rotation, full causal attention, queries scaled by temperature tuning
  `1 + attn_scale * log1p(floor((pos + 1) / floor_scale))`.
- MoE layers: top-1 on the router logits, sigmoid of the chosen logit multiplies the expert's INPUT,
  the shared expert's output is added. Only routed tokens go through an expert (no E^2 work).
- Dense layers (Maverick's): a SwiGLU MLP.

Every Linear application goes through a `Forward` handler, which supplies the weights to use and sees
the inputs: plain evaluation, statistics collection and GPTQ differ only in their handler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..checkpoint import iter_row_blocks
from ..errors import UsageError
from .weights import WeightSource

# An expert routed fewer tokens than this, per calibration pass, is calibrated on all tokens instead
# (see `expert_token_threshold`).
MIN_EXPERT_TOKENS = 64
FAIR_SHARE_FRACTION = 0.1
DEFAULT_ATTENTION_CHUNK = 8192


def expert_token_threshold(tokens: int, num_experts: int) -> int:
    """Routed tokens an expert needs for its own statistics: a tenth of its fair share, at least 64.

    Below it, an expert's Hessian and importance come from every token of the layer, each scaled by
    that expert's own router score (what the expert would see if chosen): a well-conditioned estimate
    of the inputs it gets in use, instead of a few tokens or none (NaN scales, skipped experts).
    """
    return max(MIN_EXPERT_TOKENS, math.ceil(FAIR_SHARE_FRACTION * tokens / num_experts))


@dataclass(frozen=True)
class LinearCall:
    """One input shared by one or more Linears (q/k/v share one; an expert's gate and up share one)."""

    layer: int
    modules: tuple[str, ...]  # compressed-tensors module names (experts unfused: experts.{e}.gate_proj)
    stat_keys: tuple[str, ...]  # importance keys, one per module (experts: `...experts.gate|up|down`)
    expert: int | None
    load: Callable[[], tuple[Tensor, ...]]  # the modules' [out, in] float32 weights


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing of the current batch."""

    layer: int
    tokens: int
    counts: list[int]  # routed tokens per expert
    score_mass: list[float]  # sum of the router scores of the routed tokens, per expert
    all_token_stats: list[bool]  # experts whose statistics came from all tokens (too few routed)
    threshold: int


class Forward:
    """Plain forward: the checkpoint's own weights. Subclasses collect statistics or quantize."""

    # Whether experts with few routed tokens should see all tokens for statistics (costs one extra
    # expert pass over the batch per such expert; plain evaluation does not need it).
    all_token_fallback = False

    def weights(self, call: LinearCall, x: Tensor) -> tuple[Tensor, ...]:
        """The weights to run `call.modules` with, given their input rows `x` [tokens, in]."""
        return call.load()

    def routing(self, routing: Routing) -> None:
        """Called once per MoE layer per batch, before its experts run."""


class Engine:
    """Runs token ids through the text model one decoder layer at a time."""

    def __init__(self, source: WeightSource, handler: Forward | None = None, record_routes: bool = False):
        self.src = source
        self.spec = source.spec
        self.device = source.device
        self.handler = handler or Forward()
        self.record_routes = record_routes
        if self.spec.experts_per_token != 1:
            raise UsageError(f"{source.dir}: num_experts_per_tok is {self.spec.experts_per_token}; "
                             "Llama 4 routes each token to one expert, and so does this engine")
        # transformers' Llama4TextConfig default when a config leaves the chunk out
        self.attention_chunk = self.spec.attention_chunk_size or DEFAULT_ATTENTION_CHUNK
        self.routes: dict[int, Tensor] = {}  # MoE layer -> top-1 expert per token [n, T] (when recording)
        self._rope_cache: dict[int, Tensor] = {}

    # ------------------------------------------------------------------------------ whole passes

    @torch.no_grad()
    def embed(self, ids: Tensor) -> Tensor:
        """[n, T] ids -> float32 [n, T, hidden] hidden states."""
        return self.src.embedding_rows(ids)

    @torch.no_grad()
    def run_layers(self, h: Tensor) -> Tensor:
        for layer in range(self.spec.num_layers):
            h = self.layer(layer, h)
        return h

    @torch.no_grad()
    def log_probs(self, h: Tensor) -> Iterator[Tensor]:
        """Final norm and lm_head: float32 log-probabilities [T, vocab] per sequence, on the CPU, one at a time.

        lm_head is read once, kept in its stored dtype, and applied in float32 blocks of vocab rows
        into one preallocated [T, vocab] tensor, normalized in place.
        """
        x = self._norm(h, f"{self.spec.text_prefix}model.norm.weight")
        blocks = [b.to(self.device) for b in iter_row_blocks(self.src.lm_head_info())]
        vocab = sum(len(b) for b in blocks)
        for seq in x:
            logits = torch.empty(len(seq), vocab, device=self.device)
            start = 0
            for b in blocks:
                torch.matmul(seq, b.float().T, out=logits[:, start : start + len(b)])
                start += len(b)
            logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
            yield logits.cpu()
            del logits

    # ------------------------------------------------------------------------------ one layer

    def layer(self, layer: int, h: Tensor) -> Tensor:
        p = f"{self.spec.layer_prefix}{layer}."
        h = h + self._attention(layer, p, self._norm(h, p + "input_layernorm.weight"))
        x = self._norm(h, p + "post_attention_layernorm.weight")
        n, t, d = x.shape
        flat = x.reshape(n * t, d)
        ff = self._moe(layer, p, flat) if self.spec.is_moe(layer) else self._mlp(layer, p + "feed_forward.", flat)
        return h + ff.reshape(n, t, d)

    def _norm(self, h: Tensor, weight_name: str) -> Tensor:
        w = self.src.tensor(weight_name)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps) * w

    def _call(self, layer: int, modules: list[str], keys: list[str] | None = None, expert: int | None = None,
              load: Callable[[], tuple[Tensor, ...]] | None = None) -> LinearCall:
        load = load or (lambda: tuple(self.src.linear(m) for m in modules))
        return LinearCall(layer, tuple(modules), tuple(keys or modules), expert, load)

    # ------------------------------------------------------------------------------ attention

    def _attention(self, layer: int, p: str, x: Tensor) -> Tensor:
        spec = self.spec
        n, t, d = x.shape
        a = p + "self_attn."
        flat = x.reshape(n * t, d)
        wq, wk, wv = self.handler.weights(self._call(layer, [a + "q_proj", a + "k_proj", a + "v_proj"]), flat)
        q = (flat @ wq.T).view(n, t, spec.num_heads, spec.head_dim)
        k = (flat @ wk.T).view(n, t, spec.num_kv_heads, spec.head_dim)
        v = (flat @ wv.T).view(n, t, spec.num_kv_heads, spec.head_dim)
        del wq, wk, wv
        rope = layer in spec.rope_layers
        if rope:
            freqs = self._rope(t)
            q, k = _rotate(q, freqs), _rotate(k, freqs)
            if spec.use_qk_norm:
                q, k = _l2_norm(q, spec.rms_norm_eps), _l2_norm(k, spec.rms_norm_eps)
        elif spec.attn_temperature_tuning:
            pos = torch.arange(t, device=x.device, dtype=torch.float32)
            scale = torch.log1p(torch.floor((pos + 1.0) / spec.floor_scale)) * spec.attn_scale + 1.0
            q = q * scale.view(1, t, 1, 1)
        mask = _attention_mask(t, self.attention_chunk if rope else None, x.device)
        groups = spec.num_heads // spec.num_kv_heads
        out = torch.empty(n, t, spec.num_heads * spec.head_dim, device=x.device)
        for i in range(n):  # one sequence at a time bounds the [heads, T, T] scores
            qi = q[i].transpose(0, 1)
            ki = k[i].transpose(0, 1).repeat_interleave(groups, dim=0)
            vi = v[i].transpose(0, 1).repeat_interleave(groups, dim=0)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=spec.head_dim**-0.5)
            out[i] = o.transpose(0, 1).reshape(t, -1)
        del q, k, v
        flat_o = out.reshape(n * t, -1)
        (wo,) = self.handler.weights(self._call(layer, [a + "o_proj"]), flat_o)
        return (flat_o @ wo.T).view(n, t, d)

    def _rope(self, t: int) -> Tensor:
        if t not in self._rope_cache:
            inv_freq = rope_inv_freq(self.spec).to(self.device)
            angles = torch.arange(t, device=self.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            self._rope_cache[t] = torch.polar(torch.ones_like(angles), angles)  # [T, head_dim / 2]
        return self._rope_cache[t]

    # ------------------------------------------------------------------------------ feed-forward

    def _mlp(self, layer: int, prefix: str, x: Tensor) -> Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x)), for the shared expert and dense layers."""
        gate, up = self.handler.weights(self._call(layer, [prefix + "gate_proj", prefix + "up_proj"]), x)
        a = F.silu(x @ gate.T) * (x @ up.T)
        del gate, up
        (down,) = self.handler.weights(self._call(layer, [prefix + "down_proj"]), a)
        return a @ down.T

    def _moe(self, layer: int, p: str, x: Tensor) -> Tensor:
        spec = self.spec
        ff = p + "feed_forward."
        logits = x @ self.src.tensor(ff + "router.weight").T  # [N, E]
        top = logits.argmax(-1)
        score = torch.sigmoid(logits.gather(1, top[:, None]))  # [N, 1]
        if self.record_routes:
            self.routes[layer] = top.view(-1).cpu()
        counts = torch.bincount(top, minlength=spec.num_experts)
        # summed on the CPU, in token order: CUDA's index_add_ adds in a varying order
        mass = torch.zeros(spec.num_experts, dtype=torch.float64).index_add_(0, top.cpu(), score[:, 0].double().cpu())
        threshold = expert_token_threshold(len(x), spec.num_experts)
        fallback = [self.handler.all_token_fallback and int(c) < threshold for c in counts.tolist()]
        self.handler.routing(Routing(layer, len(x), counts.tolist(), mass.tolist(), fallback, threshold))

        out = self._mlp(layer, ff + "shared_expert.", x)
        experts = ff + "experts"
        rows_of = [(top == e).nonzero().squeeze(1) for e in range(spec.num_experts)]
        mine = []  # this rank's experts' outputs for their routed rows, in expert order
        for e in distributed.owned_range(spec.num_experts):
            rows = rows_of[e]
            if len(rows) == 0 and not fallback[e]:
                continue
            if fallback[e]:  # statistics from every token, scaled by this expert's own score
                xe = x * torch.sigmoid(logits[:, e : e + 1])
            else:
                xe = x[rows] * score[rows]
            names = [f"{experts}.{e}.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")]
            loaded: dict[str, Tensor] = {}

            def load_gate_up(e=e, loaded=loaded):
                loaded["gate"], loaded["up"], loaded["down"] = self.src.expert(layer, e)
                return loaded.pop("gate"), loaded.pop("up")

            def load_down(e=e, loaded=loaded):
                return (loaded.pop("down") if "down" in loaded else self.src.expert(layer, e)[2],)

            gate, up = self.handler.weights(
                LinearCall(layer, tuple(names[:2]), (f"{experts}.gate", f"{experts}.up"), e, load_gate_up), xe)
            a = F.silu(xe @ gate.T) * (xe @ up.T)
            del gate, up
            (down,) = self.handler.weights(LinearCall(layer, (names[2],), (f"{experts}.down",), e, load_down), a)
            if len(rows):
                mine.append((a[rows] if fallback[e] else a) @ down.T)
            del a, down, xe
        routed = _exchange(mine, [len(r) for r in rows_of], x.shape[1], x.device)
        for e, rows in enumerate(rows_of):  # each token gets its one expert's output, added as one process adds it
            if len(rows):
                out.index_add_(0, rows, routed[e])
        return out


def _exchange(mine: list[Tensor], counts: list[int], width: int, device) -> list[Tensor | None]:
    """Every expert's output for its routed rows ([count, width]; None for an expert without tokens),
    by expert, on every rank: `mine` holds this rank's, for its owned experts with routed tokens in
    order; each rank sends its own to the others in one piece (sizes known to all from the routing)."""
    by_expert: list[Tensor | None] = [None] * len(counts)
    for r in range(distributed.world_size()):
        owned = [e for e in distributed.owned_range(len(counts), r) if counts[e]]
        if r == distributed.rank():
            parts = mine
            if distributed.is_distributed() and mine:
                distributed.broadcast_(torch.cat(mine), r)
        else:
            buffer = torch.empty(sum(counts[e] for e in owned), width, device=device)
            if len(buffer):
                distributed.broadcast_(buffer, r)
            parts = buffer.split([counts[e] for e in owned])
        for e, part in zip(owned, parts, strict=True):
            by_expert[e] = part
    return by_expert


# ------------------------------------------------------------------------------------------ math


def rope_inv_freq(spec) -> Tensor:
    """float32 [head_dim / 2] inverse frequencies, llama3-scaled when the config says so (as transformers)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = spec.rope_scaling or {}
    if str(rs.get("rope_type", rs.get("type", ""))).lower() != "llama3":
        return inv_freq
    factor = rs["factor"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_len = rs.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    if high != low:
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def _rotate(x: Tensor, freqs: Tensor) -> Tensor:
    """RoPE on [n, T, heads, head_dim], consecutive pairs (2i, 2i+1) as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)


def _l2_norm(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _attention_mask(t: int, chunk: int | None, device) -> Tensor:
    """Boolean [T, T], True where query i may attend key j: causal, and within i's chunk when chunked."""
    i = torch.arange(t, device=device)
    allowed = i[None, :] <= i[:, None]
    if chunk:
        allowed &= (i[None, :] // chunk) == (i[:, None] // chunk)
    return allowed
