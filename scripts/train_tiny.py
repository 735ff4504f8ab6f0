#!/usr/bin/env python
"""Train the embedded `tiny` Llama 4 (Scout's structure) on the standard library's documentation.

    python scripts/train_tiny.py --out llama4_quant/assets/tiny

Deterministic (fixed seeds, 2 threads) and about 10-15 minutes on 2 CPU cores. Steps:

1. Corpus: docstrings, comment blocks and pydoc topics of the running Python's standard library,
   split by a hash of each source's path (`llama4_quant.tiny_models.split_of`); the held-out split is
   never used for the tokenizer or for training and is written to `heldout.txt`.
2. Tokenizer: byte-level BPE (Llama 4's own split regex, then ByteLevel) with Llama 4's special tokens
   at the top of a 2048-entry vocabulary, as Llama 4 places them.
3. Model: trained with a sparse forward that is mathematically the one transformers runs (top-1 routing,
   sigmoid of the chosen router logit scaling the expert input, shared expert added; chunked attention,
   RoPE in the interleaved complex form and weightless qk-norm after RoPE on RoPE layers; the NoPE layer
   with temperature tuning), but sends each token through its own expert only, not through all 16.
4. Checkpoint: `Llama4ForConditionalGeneration` layout in BF16 (text weights trained, a small vision
   tower from a fixed seed), sharded with an index, tensors in module order.
5. Checks: the saved checkpoint, loaded by `transformers.AutoModelForCausalLM`, gives the same loss as
   the training forward; held-out perplexity in BF16 against a unigram baseline; all in `TRAINING.md`.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama4_quant import tiny_models as tm  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# Llama 4's pre-tokenizer split pattern (its tokenizer.json; llama.cpp's `llama4` pre-tokenizer, which
# llama.cpp handles as its GPT-4o pattern).
LLAMA4_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 4's special tokens in Llama 4's order (ids 200000.. there; the top 32 ids here).
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    *[f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)],
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|vision_reserved_special_token_0|>",
    "<|vision_reserved_special_token_1|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    *[f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)],
    "<|image|>",
    "<|vision_reserved_special_token_6|>",
    "<|patch|>",
]
VOCAB_SIZE = 2048

CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}\n"
    "    {%- if message['content'] is string %}\n"
    "        {{- message['content'] | trim }}\n"
    "    {%- else %}\n"
    "        {%- for content in message['content'] %}\n"
    "            {%- if content['type'] == 'image' %}\n"
    "                {{- '<|image|>' }}\n"
    "            {%- elif content['type'] == 'text' %}\n"
    "                {{- content['text'] | trim }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|eot|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|header_start|>assistant<|header_end|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def train_tokenizer(train_docs: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA4_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(train_docs, trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE - len(SPECIAL_TOKENS), tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True) for t in SPECIAL_TOKENS]
    )
    assert tok.get_vocab_size() == VOCAB_SIZE
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def special_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_tokenizer_files(out: Path, tok, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    ids = special_ids(tok)

    def added(t: str) -> dict:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}

    tm.write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {str(ids[t]): added(t) for t in SPECIAL_TOKENS},
            "bos_token": "<|begin_of_text|>",
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|eot|>",
            "extra_special_tokens": {},
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": max_len,
            "pad_token": "<|finetune_right_pad|>",
            "processor_class": "Llama4Processor",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    strip = lambda t: {k: v for k, v in added(t).items() if k != "special"}  # noqa: E731
    tm.write_json(
        out / "special_tokens_map.json",
        {"bos_token": strip("<|begin_of_text|>"), "eos_token": strip("<|eot|>"), "pad_token": strip("<|finetune_right_pad|>")},
    )


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

TEXT = dict(
    hidden_size=256,
    intermediate_size=256,
    intermediate_size_mlp=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    moe_layers=[0, 1, 2, 3],
    use_qk_norm=True,
    no_rope_layers=[1, 1, 1, 0],
    attention_chunk_size=128,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    rope_theta=500000.0,
    # Scout-Instruct's rope scaling.
    rope_scaling=dict(factor=16.0, high_freq_factor=1.0, low_freq_factor=1.0, original_max_position_embeddings=8192, rope_type="llama3"),
    # Above original_max_position_embeddings, or transformers warns about the rope scaling.
    max_position_embeddings=16384,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB_SIZE,
)

VISION = dict(
    attention_dropout=0.0,
    hidden_act="gelu",
    hidden_size=32,
    image_size=56,
    initializer_range=0.02,
    intermediate_size=128,  # = 4 * hidden_size: the pixel-shuffle adapter needs it
    model_type="llama4_vision_model",
    multi_modal_projector_bias=False,
    norm_eps=1e-05,
    num_attention_heads=2,
    num_channels=3,
    num_hidden_layers=2,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_dropout=0.0,
    projector_input_dim=64,
    projector_output_dim=64,
    rope_theta=10000,
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    vision_output_dim=64,
)


def build_config(ids: dict[str, int]) -> dict:
    """config.json as the released Scout config is written (transformers 4.x spelling)."""
    text = dict(
        TEXT,
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        for_llm_compressor=False,
        hidden_act="silu",
        initializer_range=0.02,
        model_type="llama4_text",
        output_router_logits=False,
        pad_token_id=ids["<|finetune_right_pad|>"],
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
        torch_dtype="bfloat16",
        use_cache=True,
    )
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "boi_token_index": ids["<|image_start|>"],
        "eoi_token_index": ids["<|image_end|>"],
        "image_token_index": ids["<|patch|>"],
        "model_type": "llama4",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "vision_config": dict(VISION),
    }
    return copy.deepcopy(config)  # nothing shared with TEXT / VISION


def write_other_files(out: Path, ids: dict[str, int]) -> None:
    tm.write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|begin_of_text|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
            "pad_token_id": ids["<|finetune_right_pad|>"],
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": "4.51.0",
        },
    )
    # Scout's image processor settings, scaled to the tiny vision tower (56x56 tiles of 14x14 patches).
    tm.write_json(
        out / "preprocessor_config.json",
        {
            "crop_size": None,
            "data_format": "channels_first",
            "default_to_square": True,
            "device": None,
            "do_center_crop": None,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Llama4ImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5],
            "input_data_format": None,
            "max_patches": 4,
            "processor_class": "Llama4Processor",
            "resample": 2,
            "rescale_factor": 0.00392156862745098,
            "resize_to_max_canvas": False,
            "return_tensors": None,
            "size": {"height": VISION["image_size"], "width": VISION["image_size"]},
        },
    )
    tm.write_json(
        out / "processor_config.json",
        {"fake_image_token": "<|image|>", "image_token": "<|image|>", "patch_size": VISION["patch_size"], "processor_class": "Llama4Processor"},
    )


# --------------------------------------------------------------------------------------------------
# Training model: transformers' Llama 4 text forward, with sparse expert dispatch.
# Parameter names are those of `Llama4ForCausalLM`, so the state dict saves as is.
# --------------------------------------------------------------------------------------------------


def llama3_inv_freq(cfg: dict) -> torch.Tensor:
    """RoPE inverse frequencies with llama3 scaling, as transformers computes them."""
    dim, base = cfg["head_dim"], cfg["rope_theta"]
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg["rope_scaling"]
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    scaled = torch.where(wl > low_wl, inv / factor, inv)
    if hi != lo:
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) * ~(wl > low_wl)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class Linear(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(o, i))

    def forward(self, x):
        return F.linear(x, self.weight)


class Norm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class MLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = Linear(h, i), Linear(h, i), Linear(i, h)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, e: int, h: int, i: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))


ROUTER_MARGIN = 1.0


class Moe(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
        self.experts = Experts(e, h, i)
        self.router = Linear(h, e)
        self.shared_expert = MLP(h, i)
        self.n = e

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        top, idx = logits.max(dim=-1)
        routed_in = x * torch.sigmoid(top)[:, None]
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=self.n).tolist()
        xs = routed_in[order]
        # unbind once: per-expert indexing would make autograd build a full-size gradient per expert.
        gate_up, down = self.experts.gate_up_proj.unbind(0), self.experts.down_proj.unbind(0)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                seg = xs[start : start + c]
                gate, up = (seg @ gate_up[e]).chunk(2, dim=-1)
                outs.append((up * F.silu(gate)) @ down[e])
            start += c
        routed = torch.empty_like(x).index_copy(0, order, torch.cat(outs))
        out = self.shared_expert(x) + routed
        # Switch-style load balancing: fraction routed x mean router probability, per expert.
        frac = torch.bincount(idx, minlength=self.n).float() / idx.numel()
        prob = torch.softmax(logits.float(), dim=-1).mean(0)
        balance = self.n * (frac * prob).sum()
        # Decisiveness: a hinge on the top-1 minus top-2 logit gap, so that rounding rarely flips a route.
        top2 = logits.topk(2, dim=-1).values
        margin = F.relu(ROUTER_MARGIN - (top2[:, 0] - top2[:, 1])).mean()
        return out.reshape(shape), torch.stack([balance, margin]), logits


class Attention(nn.Module):
    def __init__(self, cfg: dict, layer: int):
        super().__init__()
        h, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = Linear(h, nh * hd), Linear(h, nkv * hd), Linear(h, nkv * hd), Linear(nh * hd, h)
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.use_rope = bool(cfg["no_rope_layers"][layer])
        self.qk_norm = cfg["use_qk_norm"] and self.use_rope
        self.chunk = cfg["attention_chunk_size"] if self.use_rope else None
        self.eps = cfg["rms_norm_eps"]
        self.temp = cfg["attn_temperature_tuning"] and not self.use_rope
        self.floor_scale, self.attn_scale = cfg["floor_scale"], cfg["attn_scale"]

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd)
        if self.use_rope:
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.qk_norm:
            q, k = rms(q, self.eps), rms(k, self.eps)
        if self.temp:
            pos = torch.arange(t, dtype=torch.float32)
            scale = torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = q * scale.view(1, t, 1, 1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rep = self.nh // self.nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.chunk and t > self.chunk:
            c = self.chunk
            pad = (-t) % c
            if pad:
                q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
            n = (t + pad) // c
            qs, ks, vs = (z.reshape(b, self.nh, n, c, self.hd).transpose(1, 2).reshape(b * n, self.nh, c, self.hd) for z in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            o = o.reshape(b, n, self.nh, c, self.hd).transpose(1, 2).reshape(b, self.nh, n * c, self.hd)[:, :, :t]
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.nh * self.hd))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (complex) RoPE: pairs (x[2i], x[2i+1]) rotate by angle pos * inv_freq[i]."""
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)


class Layer(nn.Module):
    def __init__(self, cfg: dict, i: int):
        super().__init__()
        self.self_attn = Attention(cfg, i)
        self.feed_forward = Moe(cfg)
        self.input_layernorm = Norm(cfg["hidden_size"])
        self.post_attention_layernorm = Norm(cfg["hidden_size"])
        self.eps = cfg["rms_norm_eps"]

    def forward(self, x, cos, sin):
        x = x + self.self_attn(rms(x, self.eps) * self.input_layernorm.weight, cos, sin)
        ff, aux, logits = self.feed_forward(rms(x, self.eps) * self.post_attention_layernorm.weight)
        return x + ff, aux, logits


class Body(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm = Norm(cfg["hidden_size"])


class TinyLlama4(nn.Module):
    """Llama4ForCausalLM's math and parameter names, sparse experts."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = Linear(cfg["hidden_size"], cfg["vocab_size"])
        self.register_buffer("inv_freq", llama3_inv_freq(cfg), persistent=False)

    def init_weights(self, gen: torch.Generator, std: float = 0.02) -> None:
        n_layers = self.cfg["num_hidden_layers"]
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(self, ids: torch.Tensor):
        t = ids.shape[1]
        ang = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = ang.cos(), ang.sin()
        x = self.model.embed_tokens(ids)
        auxes, router_logits = [], []
        for layer in self.model.layers:
            x, aux, logits = layer(x, cos, sin)
            auxes.append(aux)
            router_logits.append(logits)
        x = rms(x, self.cfg["rms_norm_eps"]) * self.model.norm.weight
        return self.lm_head(x), torch.stack(auxes).mean(0), router_logits


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)


def sample_batch(stream: torch.Tensor, batch: int, seq: int, bos: int, gen: torch.Generator):
    """Random windows of the token stream; half of them start with BOS, as an eval window may or may not."""
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    with_bos = torch.rand(batch, generator=gen) < 0.5
    rows = []
    for s, b in zip(starts.tolist(), with_bos.tolist()):
        w = stream[s : s + seq + 1]
        if b:
            w = torch.cat([torch.tensor([bos]), w[:-1]])
        rows.append(w)
    x = torch.stack(rows)
    return x[:, :-1], x[:, 1:]


def eval_windows(stream: torch.Tensor, seq: int, limit: int | None = None) -> torch.Tensor:
    n = len(stream) // seq
    if limit:
        n = min(n, limit)
    return stream[: n * seq].view(n, seq)


def unigram_ppl(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout].mean().item())


@torch.no_grad()
def model_nll(fwd, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token NLL over all windows (position 0 is context only)."""
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = fwd(w).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        n += w[:, 1:].numel()
    return tot / n


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------


def full_state_dict(model: TinyLlama4, config: dict, seed: int) -> list[tuple[str, torch.Tensor]]:
    """All tensors of Llama4ForConditionalGeneration in its module order, BF16: the vision tower and
    projector from transformers' own init under a fixed seed, the language model trained."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    # A deep copy: transformers normalises the rope dicts it is given in place.
    kwargs = copy.deepcopy({k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
    hf = Llama4ForConditionalGeneration(Llama4Config(**kwargs))
    trained = {f"language_model.{k}": v for k, v in model.state_dict().items()}
    out = []
    for name, t in hf.state_dict().items():
        if name.startswith("language_model."):
            t = trained.pop(name)
        out.append((name, t.detach().to(torch.bfloat16).contiguous()))
    assert not trained, f"trained tensors with no place in the HF model: {sorted(trained)}"
    return out


def save_checkpoint(out: Path, tensors, config, tok, ids) -> dict:
    index = tm.write_sharded(out, tensors, max_shard_bytes=12 * 2**20, min_shards=3)
    tm.write_json(out / "config.json", config)
    write_tokenizer_files(out, tok, TEXT["max_position_embeddings"])
    write_other_files(out, ids)
    return index


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "llama4_quant" / "assets" / "tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.02, help="load-balancing loss weight")
    ap.add_argument("--margin-loss", type=float, default=0.05, help=f"weight of the router gap hinge (margin {ROUTER_MARGIN})")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows for the final BF16 eval (0 = all)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    print("corpus ...", flush=True)
    docs = tm.stdlib_corpus()
    train_docs, heldout_docs = tm.split_corpus(docs)
    train_text, heldout_text = tm.join_docs(train_docs), tm.join_docs(heldout_docs)

    print("tokenizer ...", flush=True)
    tok = train_tokenizer([d.text for d in train_docs])
    ids = special_ids(tok)
    train_ids, heldout_ids = encode(tok, train_text), encode(tok, heldout_text)
    uni = unigram_ppl(train_ids, heldout_ids, VOCAB_SIZE)
    print(f"  train {len(train_ids)} tokens, held-out {len(heldout_ids)} tokens, unigram ppl {uni:.1f}", flush=True)

    config = build_config(ids)
    cfg = dict(config["text_config"])
    model = TinyLlama4(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    model.init_weights(gen)
    n_params = sum(p.numel() for p in model.parameters())
    decays = lambda n, p: p.dim() >= 2 and "embed" not in n and "router" not in n  # noqa: E731
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8
    )
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    def margin_weight(step: int) -> float:
        # Off until the experts have specialised (early on, the cheapest way to widen the gap is to send
        # every token to one expert), then ramped in.
        return args.margin_loss * min(1.0, max(0.0, (step / args.steps - 0.4) / 0.3))

    heldout_windows = eval_windows(heldout_ids, args.seq)
    probe = heldout_windows[:: max(1, len(heldout_windows) // 16)][:16]
    print(f"training {n_params / 1e6:.2f}M params, {args.steps} steps x {args.batch} x {args.seq} ...", flush=True)
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = sample_batch(train_ids, args.batch, args.seq, ids["<|begin_of_text|>"], gen)
        logits, aux, _ = model(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce + args.aux * aux[0] + margin_weight(step) * aux[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            msg = f"  step {step:4d}  ce {ce.item():.3f}  balance {aux[0].item():.3f}  margin {aux[1].item():.3f}  lr {lr_at(step):.2e}  {el:.0f}s"
            if step % 100 == 0 or step == args.steps - 1:
                model.eval()
                msg += f"  held-out ppl {math.exp(model_nll(lambda w: model(w)[0], probe)):.1f}"
                rs = routing_stats(model, probe[:4])
                msg += "  max share/median gap " + " ".join(f"{v['max_share']:.2f}/{v['median_gap']:.2f}" for v in rs.values())
                model.train()
            print(msg, flush=True)
    train_seconds = time.time() - t_train
    model.eval()

    # Round to BF16 exactly as saved, then measure with the training forward.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    routing = routing_stats(model, heldout_windows[:64])
    print(f"  routing on held-out: {routing}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.", dir=args.out.parent))
    os.chmod(tmp, 0o755)
    try:
        tensors = full_state_dict(model, config, args.seed)
        index = save_checkpoint(tmp, tensors, config, tok, ids)
        (tmp / tm.HELDOUT_FILE).write_text(heldout_text, encoding="utf-8")

        print("verifying against transformers ...", flush=True)
        check = verify_and_eval(tmp, model, heldout_windows, args.eval_windows)
        print(f"  {check}", flush=True)
        assert check["fp32_loss_diff"] < 1e-3, check
        assert check["bf16_loss_diff"] < 5e-2, check

        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        write_training_md(
            tmp,
            dict(
                python=platform.python_version(),
                torch=torch.__version__,
                n_params=n_params,
                n_train_docs=len(train_docs),
                n_heldout_docs=len(heldout_docs),
                n_heldout_sources=len({d.source for d in heldout_docs}),
                n_sources=len({d.source for d in docs}),
                train_tokens=len(train_ids),
                heldout_tokens=len(heldout_ids),
                train_chars=len(train_text),
                heldout_chars=len(heldout_text),
                unigram=uni,
                args=vars(args),
                train_seconds=train_seconds,
                total_seconds=time.time() - t_start,
                routing=routing,
                check=check,
                shards=sorted(set(index["weight_map"].values())),
                weight_bytes=index["metadata"]["total_size"],
                disk_bytes=sum(sizes.values()),
            ),
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        os.rename(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out} in {time.time() - t_start:.0f}s", flush=True)


@torch.no_grad()
def routing_stats(model: TinyLlama4, windows: torch.Tensor) -> dict:
    _, _, logits = model(windows)
    per_layer = []
    for lg in logits:
        top2 = lg.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        counts = torch.bincount(lg.argmax(-1), minlength=lg.shape[-1]).float()
        share = counts / counts.sum()
        per_layer.append(
            dict(
                median_gap=round(gap.median().item(), 3),
                gap_below_0_05=round((gap < 0.05).float().mean().item(), 4),
                max_share=round(share.max().item(), 3),
                min_share=round(share.min().item(), 4),
                experts_used=int((counts > 0).sum()),
            )
        )
    return {f"layer{i}": d for i, d in enumerate(per_layer)}


@torch.no_grad()
def verify_and_eval(ckpt: Path, model: TinyLlama4, heldout_windows: torch.Tensor, n_eval: int) -> dict:
    """Load the checkpoint with transformers: same loss as the training forward (FP32 and BF16), and the
    held-out perplexity of the BF16 model on 256-token windows."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the text-only load drops the vision keys, and says so at length
    w = heldout_windows[:8]
    ours = model_nll(lambda x: model(x)[0], w)
    out = {"ours_loss": round(ours, 5)}
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
        hf.eval()
        assert type(hf).__name__ == "Llama4ForCausalLM", type(hf)
        theirs = model_nll(lambda x: hf(input_ids=x).logits, w)
        diff = (hf(input_ids=w[:2]).logits.float() - model(w[:2])[0]).abs().max().item()
        out[f"{key}_max_logit_diff"] = round(diff, 5)
        out[f"{key}_loss"] = round(theirs, 5)
        out[f"{key}_loss_diff"] = abs(theirs - ours)
        if key == "bf16":
            ev = heldout_windows if not n_eval else heldout_windows[:n_eval]
            t = time.time()
            nll = model_nll(lambda x: hf(input_ids=x).logits, ev)
            out["bf16_heldout_ppl"] = math.exp(nll)
            out["bf16_eval_windows"] = len(ev)
            out["bf16_eval_seconds"] = round(time.time() - t, 1)
            out["fp32_train_forward_heldout_ppl"] = math.exp(model_nll(lambda x: model(x)[0], ev))
        del hf
    return out


def write_training_md(out: Path, r: dict) -> None:
    c, a = r["check"], r["args"]
    routing = "\n".join(
        f"| {k} | {v['median_gap']} | {v['gap_below_0_05']:.2%} | {v['experts_used']}/16 | {v['min_share']:.1%} - {v['max_share']:.1%} |"
        for k, v in r["routing"].items()
    )
    text = f"""# tiny: how it was made

Rebuild with `python scripts/train_tiny.py --out DIR` (deterministic seeds, {a['threads']} threads).

- Structure: Llama 4 Scout's, scaled down: hidden 256, 4 layers, 4 heads / 2 KV heads, head_dim 64,
  16 experts (top-1, intermediate 256) plus a shared expert in every layer, qk-norm, NoPE on layer 3,
  attention chunk 128, Scout-Instruct's llama3 rope scaling.
- Tokenizer: byte-level BPE, vocabulary 2048, Llama 4's split regex, Llama 4's special tokens at ids
  2016-2047 in Llama 4's order. Trained on the training split only.
- Vision tower and projector: transformers' random init under seed {a['seed']}, never trained.
- Size: {r['n_params'] / 1e6:.2f}M trained parameters (text); {r['weight_bytes'] / 1e6:.1f} MB of BF16 weights in
  {len(r['shards'])} shards; {r['disk_bytes'] / 1e6:.1f} MB on disk with the other files.
- Corpus: docstrings, comment blocks and pydoc topics of the Python {r['python']} standard library,
  {r['n_sources']} sources. Held out by SHA-256 of the source path (5% of the sources):
  - held-out (`heldout.txt`): {r['n_heldout_sources']} sources, {r['n_heldout_docs']} texts, {r['heldout_chars']:,} characters,
    **{r['heldout_tokens']:,} tokens**;
  - training: {r['n_sources'] - r['n_heldout_sources']} sources, {r['n_train_docs']} texts, {r['train_chars']:,} characters, **{r['train_tokens']:,} tokens**.
- Training: {a['steps']} steps of {a['batch']} windows x {a['seq']} tokens ({a['steps'] * a['batch'] * a['seq'] / 1e6:.2f}M tokens,
  {a['steps'] * a['batch'] * a['seq'] / r['train_tokens']:.1f} epochs); AdamW, lr {a['lr']}, warmup then cosine decay to 10%; weight decay
  0.1 (not on embeddings, norms, routers); Switch load-balancing loss {a['aux']}; router-gap hinge loss
  {a['margin_loss']} (margin {ROUTER_MARGIN}), off for the first 40% of steps, ramped in until 70%; float32;
  torch {r['torch']}; {a['threads']} CPU threads.
- Time: **{r['train_seconds'] / 60:.1f} minutes** of training, {r['total_seconds'] / 60:.1f} minutes for the whole script
  (on a shared 2-core VM; about 1.05 s per step when the cores are not contended).

## Quality (held-out, 256-token windows, longer than the 128-token attention chunk)

| model | perplexity |
|---|---|
| tiny, BF16, transformers `AutoModelForCausalLM` ({c['bf16_eval_windows']} windows) | **{c['bf16_heldout_ppl']:.2f}** |
| tiny, FP32 (BF16 weights), training forward | {c['fp32_train_forward_heldout_ppl']:.2f} |
| unigram, add-one smoothing, estimated on the training split | {r['unigram']:.1f} |

The training forward and transformers agree: mean NLL on 8 held-out windows {c['ours_loss']} (training
forward) vs {c['fp32_loss']} (transformers FP32) and {c['bf16_loss']} (transformers BF16).

## Routing (64 held-out windows, BF16 weights)

| layer | median top1-top2 logit gap | gap < 0.05 | experts used | token share min - max |
|---|---|---|---|---|
{routing}
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
