"""Calibration token ids: the built-in corpus's training split, or the user's text / jsonl files.

The held-out text that `l4q eval` scores on is never used: the built-in corpus is the training split
of the tiny models' corpus (`tiny_models.split_corpus`), disjoint from it by whole source module.
Samples are spread evenly over the text: the text is cut into `samples` equal segments and each
sample is the first `seq_len` tokens of its own segment, so samples never overlap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..text import load_text, quiet_transformers

CHARS_PER_TOKEN_GUESS = 6  # the first tokenization attempt per segment; doubled until enough tokens


def builtin_text() -> tuple[str, str]:
    from ..tiny_models import join_docs, split_corpus, stdlib_corpus

    train, _heldout = split_corpus(stdlib_corpus())
    return join_docs(train), "built-in corpus, training split (Python standard library documentation)"


def calibration_ids(tokenizer_dir: Path, data: list[Path] | None, samples: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """([samples, seq_len] int64 token ids, description of the data)."""
    if samples < 1 or seq_len < 2:
        raise UsageError(f"--samples must be >= 1 and --seq-len >= 2 (got {samples}, {seq_len})")
    text, description = load_text(data) if data else builtin_text()
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    segment = len(text) // samples
    rows = []
    for i in range(samples):
        start, stop = i * segment, (i + 1) * segment
        width = seq_len * CHARS_PER_TOKEN_GUESS
        while True:
            ids = tokenizer(text[start : min(start + width, stop)], add_special_tokens=False)["input_ids"]
            if len(ids) >= seq_len or start + width >= stop:
                break
            width *= 2
        if len(ids) < seq_len:
            raise UsageError(
                f"the calibration data ({description}) is too short for --samples {samples} x --seq-len {seq_len}: "
                f"each sample needs {seq_len} tokens of its own 1/{samples} of the text; lower either or add data"
            )
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long), description
