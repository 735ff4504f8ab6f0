"""Next-token agreement of a derivative with its base: windows of token ids, logits, KLD, top-1.

Every model sees the same token ids: text is tokenized once with the base's tokenizer and cut into
fixed windows, which are fed to each model as ids.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


def load_causal_lm(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The text model of a Llama 4 checkpoint through transformers; compressed-tensors checkpoints
    are decompressed on load (the CPU has no kernels for them)."""
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "quantization_config" in config:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # transformers warns that the checkpoint's own quantization_config wins; only `dequantize` is ours.
            warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.to(device).eval()


def token_windows(tokenizer_dir: Path, text: str, ctx: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n, ctx] token ids: the text tokenized once (no special tokens), cut into whole windows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // ctx
    if n == 0:
        raise ValueError(f"need at least {ctx} tokens, the text has {len(ids)}")
    return torch.tensor(ids[: n * ctx], dtype=torch.long).reshape(n, ctx)


@torch.no_grad()
def window_logits(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """float32 log-probabilities [n, ctx, vocab] for each window."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        logits = model(windows[start : start + batch_size].to(device)).logits.float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


@dataclass
class Agreement:
    tokens: int
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    top1: float
    ppl_base: float
    ppl_candidate: float


def compare(base_logprobs: torch.Tensor, cand_logprobs: torch.Tensor, windows: torch.Tensor) -> Agreement:
    """KLD(base || candidate) per predicted token, top-1 agreement, and both perplexities."""
    b = base_logprobs[:, :-1].reshape(-1, base_logprobs.shape[-1]).double()
    c = cand_logprobs[:, :-1].reshape(-1, cand_logprobs.shape[-1]).double()
    kld = (b.exp() * (b - c)).sum(-1).clamp_min(0)
    targets = windows[:, 1:].reshape(-1, 1)
    nll_b = -b.gather(1, targets).mean()
    nll_c = -c.gather(1, targets).mean()
    return Agreement(
        tokens=len(kld),
        mean_kld=kld.mean().item(),
        median_kld=kld.median().item(),
        p99_kld=torch.quantile(kld, 0.99).item(),
        max_kld=kld.max().item(),
        top1=(b.argmax(-1) == c.argmax(-1)).double().mean().item(),
        ppl_base=nll_b.exp().item(),
        ppl_candidate=nll_c.exp().item(),
    )
