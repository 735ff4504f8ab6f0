"""Quantization methods beyond absmax RTN: how a planned Linear's stored values are chosen.

- `rtn`:  absmax scales, round to nearest (`schemes`).
- `mse`:  scales searched per group / row for the least squared error (`scale_search`), weighted by
          the calibration importance E[x^2] when STATS are given; calibration-free otherwise.
- `gptq`: a layer-sequential pass over the calibration ids (`sequential.run_pass`): per layer,
          attention first, then each expert, each Linear group's Hessian H = sum x x^T is taken from
          its real inputs (the quantized outputs of everything before it), scales are searched with
          diag(H) as importance, GPTQ (static act-order, block 128, 1% dampening) picks the values,
          and the dequantized weights carry the activations on. Experts with too few routed tokens
          take the all-token statistics (`engine.expert_token_threshold`); none is skipped.

The GPTQ pass writes each layer's encoded tensors to the quantizer's work directory, one file per
rank of the job (rank 0: attention, shared expert, dense layers and its experts; the others: their
experts); the streaming writer then copies them into the planned shards in the base's order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .. import arch, distributed
from ..formats import compressed_tensors as ct
from ..scale_search import search_scales
from ..schemes import check_finite
from .engine import LinearCall
from .gptq import gptq_quantize
from .sequential import atomic_save, atomic_write_json
from .stats import StatsCollector, hessian

METHODS = ("rtn", "mse", "gptq")
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


def decode(parts: list[tuple[str, torch.Tensor]], module: str, scheme: ct.Scheme, device) -> torch.Tensor:
    """The float32 weight a loader will see for these stored tensors."""
    return scheme.decode_as_loaded({name.removeprefix(module + "."): t.to(device) for name, t in parts})


class GPTQPass(StatsCollector):
    """Quantizes each planned Linear with GPTQ as the layer runs, and continues with the result."""

    def __init__(self, spec: arch.Llama4Spec, scheme: ct.Scheme, modules: set[str], stats=None):
        super().__init__(spec)  # for the routing log; the importance sums are not needed here
        self.scheme, self.stats = scheme, stats  # stats: the activation ranges of a scheme that needs them
        self.modules = modules  # the Linears the plan quantizes (compressed-tensors names)
        self.encoded: dict[str, torch.Tensor] = {}
        self.log: list[dict] = []

    def begin_layer(self, layer: int) -> None:
        super().begin_layer(layer)
        self.encoded, self.log = {}, []

    def weights(self, call: LinearCall, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ws = call.load()
        if not any(m in self.modules for m in call.modules):
            return ws
        h = hessian(x)
        bound = self._bound_schemes(call, ws)
        out = []
        for module, w in zip(call.modules, ws):
            if module not in self.modules:
                out.append(w)
                continue
            check_finite(w, module)
            scheme = bound.get(module, self.scheme)
            diag = h.diagonal()
            # A non-finite Hessian: absmax-grid scales without weights, and gptq_quantize falls back to RTN.
            scale = search_scales(w, scheme, importance=diag if bool(torch.isfinite(diag).all()) else None)
            result = gptq_quantize(w, h, scheme, scale, block_size=GPTQ_BLOCK, damp=GPTQ_DAMP, act_order=True)
            parts = scheme.encode(module, result.q, scheme.scales_with(w, result.scale))
            self.encoded.update(parts)
            self.log.append({"module": module, "tokens": len(x), "fell_back_to_rtn": result.fell_back,
                             "reason": result.reason})
            out.append(decode(parts, module, self.scheme, w.device))
        return tuple(out)

    def _bound_schemes(self, call: LinearCall, ws: tuple[torch.Tensor, ...]) -> dict[str, ct.Scheme]:
        """module -> the scheme bound to its fused group's global scale (from the group's weights
        before GPTQ changes them: a call loads whole fused groups) and to its input's calibrated
        range, for the schemes that have them."""
        bound: dict[str, ct.Scheme] = {}
        if self.scheme.shares_global:
            groups: dict[tuple[str, ...], list[torch.Tensor]] = {}
            for module, w in zip(call.modules, ws):
                if module in self.modules:
                    groups.setdefault(ct.fused_group(module), []).append(w)
            for members, group_ws in groups.items():
                if len(group_ws) != len(members):
                    raise RuntimeError(f"{members[0]}: its fused group is split across Linear calls")
                bound.update(dict.fromkeys(members, self.scheme.for_group(group_ws)))
        if self.scheme.activations:
            for module, key in zip(call.modules, call.stat_keys):
                if module in self.modules:
                    ranges = self.stats.input_absmax(key)
                    row = ranges[call.expert if call.expert is not None else 0]
                    bound[module] = bound.get(module, self.scheme).with_inputs(row)
        return bound

    def save_layer(self, layer: int, work_dir: Path) -> None:
        """This rank's share: every rank quantized the modules outside the routed experts the same way,
        and rank 0 keeps them."""
        if distributed.is_main():
            self.save_routing(layer, work_dir)
        else:
            kept = {log["module"] for log in self.log if ".experts." in log["module"]}
            self.encoded = {k: v for k, v in self.encoded.items() if k.rsplit(".", 1)[0] in kept}
            self.log = [log for log in self.log if log["module"] in kept]
        name = f"gptq-layer-{layer:03d}-rank-{distributed.rank():04d}"
        atomic_save(self.encoded, work_dir / f"{name}.safetensors")
        atomic_write_json(self.log, work_dir / f"{name}.json")

    def discard_from(self, layer: int, work_dir: Path) -> None:
        for path in work_dir.glob("gptq-layer-*-rank-*"):
            if int(path.name.split("-")[2]) >= layer:
                path.unlink()


def gptq_logs(work_dir: Path) -> list[dict]:
    """What the pass logged per quantized module, in the order one process quantizes them (by layer,
    then by rank: ranks own contiguous ranges of experts)."""
    return [e for p in sorted(work_dir.glob("gptq-layer-*-rank-*.json")) for e in json.loads(p.read_text())]


class GPTQResults:
    """Reads the encoded tensors a finished GPTQ pass left in its work directory, by name."""

    def __init__(self, work_dir: Path):
        self.files = sorted(work_dir.glob("gptq-layer-*-rank-*.safetensors"))
        self._where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(str(path), "pt") as f:
                self._where.update({k: path for k in f.keys()})

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), "pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self._where
