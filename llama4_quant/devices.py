"""Where kernels run: --device auto, cpu, cuda or cuda:N, checked against what torch sees."""

from __future__ import annotations

import re

import torch

from .errors import UsageError


def resolve_device(device: str) -> torch.device:
    """auto, cpu, cuda or cuda:N, checked against what torch sees. auto and cuda name the current GPU
    (in a torchrun job, the one of the rank's local rank) by its number."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if not m:
        raise UsageError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)
