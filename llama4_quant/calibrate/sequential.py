"""Layer-sequential passes that survive interruption.

A pass runs the calibration ids through the model one decoder layer at a time (see `engine`). After
each layer the hidden states entering the next one are saved in the work directory, the handler saves
what it produced for that layer, and a progress file records the layer as done; a rerun with the same
fingerprint continues at the first unfinished layer with the same numbers.

In a job of several processes (see `distributed`) every rank runs every layer on its share of the
experts; each saves its own results for the layer, and only when all have does rank 0 save the
hidden states and move the progress on. A rerun starts every rank at rank 0's first unfinished layer,
with the hidden states rank 0 saved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import distributed
from .engine import Engine, Forward
from .weights import WeightSource

PROGRESS = "progress.json"


def _hidden(work_dir: Path, layers_done: int) -> Path:
    return work_dir / f"hidden-after-{layers_done:03d}-layers.safetensors"


class LayerHandler(Forward):
    """A `Forward` that keeps per-layer results on disk, so a pass can resume."""

    def begin_layer(self, layer: int) -> None:
        """Called before layer `layer` runs."""

    def save_layer(self, layer: int, work_dir: Path) -> None:
        """Write what this handler produced for `layer` into `work_dir` (atomically; this rank's share)."""

    def discard_from(self, layer: int, work_dir: Path) -> None:
        """Remove what an interrupted run left for `layer` and later ones (rank 0, before a pass starts)."""


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    except SafetensorError as exc:  # its I/O errors are not OSErrors: make them one, for one-line reporting
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        errno = int(code.group(1))
        raise OSError(errno, os.strerror(errno), str(tmp)) from None
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def layers_done(work_dir: Path, fingerprint: str) -> int:
    """How many layers an earlier pass with this fingerprint finished in `work_dir` (0 if none)."""
    try:
        progress = json.loads((work_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        return 0
    done = int(progress.get("layers_done", 0))
    if progress.get("fingerprint") != fingerprint or not _hidden(work_dir, done).is_file():
        return 0
    return done


def run_pass(source: WeightSource, ids: torch.Tensor, handler: LayerHandler, work_dir: Path, fingerprint: str,
             show_progress: bool = True, desc: str = "calibrate") -> int:
    """Run every decoder layer over `ids` with `handler`; returns how many layers were resumed.

    The hidden states after each layer go to a file named by the layer count; only then does the
    progress file move on (and the previous file go), so an interruption anywhere resumes from a
    consistent pair.
    """
    engine = Engine(source, handler)
    n_layers = source.spec.num_layers
    main = distributed.is_main()
    start = distributed.broadcast_int(layers_done(work_dir, fingerprint) if main else 0)
    if start:
        n, t = ids.shape
        h = (load_file(str(_hidden(work_dir, start)))["hidden"].to(source.device) if main
             else torch.empty(n, t, source.spec.hidden_size, device=source.device))
        distributed.broadcast_(h)
    else:
        if main:
            atomic_write_json({"fingerprint": fingerprint, "layers_done": 0}, work_dir / PROGRESS)
        h = engine.embed(ids.to(source.device))
    if main:
        handler.discard_from(start, work_dir)
    distributed.barrier()
    for layer in tqdm(range(start, n_layers), desc=desc, unit="layer", initial=start, total=n_layers,
                      disable=not show_progress or not main, dynamic_ncols=True):
        handler.begin_layer(layer)
        h = engine.layer(layer, h)
        handler.save_layer(layer, work_dir)
        distributed.barrier()  # every rank's share of the layer is saved
        if main:
            atomic_save({"hidden": h}, _hidden(work_dir, layer + 1))
            atomic_write_json({"fingerprint": fingerprint, "layers_done": layer + 1}, work_dir / PROGRESS)
            _hidden(work_dir, layer).unlink(missing_ok=True)
    return start


def discard_hidden(work_dir: Path) -> None:
    for p in work_dir.glob("hidden-after-*"):
        p.unlink()
