"""Float32 weights of a Llama 4 text model, read one module at a time from BF16 or compressed-tensors.

The layer-streaming engine asks for one module (or one expert) at a time, so what is resident is
what the current step needs. BF16 checkpoints store each MoE layer's experts fused
(`experts.gate_up_proj` [E, in, 2*inter], `experts.down_proj` [E, inter, hidden]); compressed-tensors
derivatives store them unfused (`experts.{e}.gate_proj` ...), quantized or BF16. Both read the same here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import read_rows, read_slice, read_tensor
from ..errors import CorruptCheckpointError
from ..formats import compressed_tensors as ct
from ..model import Model, open_model, unfuse_gate_up
from ..schemes import check_finite
from ..sources import Source


class WeightSource:
    """Reads weights by HF name from one model (BF16 or a derivative) onto `device`, as float32.

    Every weight is checked for NaN/Inf as it is loaded, so a bad one stops the run at its layer."""

    def __init__(self, model: Model | Path, device: torch.device | str = "cpu"):
        if not isinstance(model, Model):
            model = open_model(Source(Path(model), Path(model).name), allow_quantized=True)
        self.model = model
        self.dir, self.config, self.spec, self.ckpt = model.dir, model.config, model.spec, model.ckpt
        self.device = torch.device(device)
        qc = self.config.get("quantization_config") or {}
        self.scheme = ct.scheme_for_config(qc)

    def _info(self, name: str):
        try:
            return self.ckpt.by_name[name]
        except KeyError:
            raise CorruptCheckpointError(f"{self.dir}: tensor {name} is missing") from None

    def _to_device(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = t.to(self.device).float()
        check_finite(t, name)
        return t

    def tensor(self, name: str) -> torch.Tensor:
        """A whole unquantized tensor (norm weights, router) as float32."""
        return self._to_device(read_tensor(self._info(name)), name)

    def linear(self, module: str) -> torch.Tensor:
        """[out, in] float32 weight of one Linear, decoded if it is stored quantized."""
        if self.scheme is not None and f"{module}.weight_scale" in self.ckpt.by_name:
            parts = {s: read_tensor(self._info(f"{module}.{s}")).to(self.device) for s in self.scheme.suffixes}
            weight = self.scheme.decode_as_loaded(parts)
            check_finite(weight, module)
            return weight
        return self._to_device(read_tensor(self._info(f"{module}.weight")), f"{module}.weight")

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert `e` of MoE layer `layer` as (gate [inter, in], up [inter, in], down [hidden, inter]) float32."""
        base = f"{self.spec.layer_prefix}{layer}.feed_forward.experts"
        fused = self.ckpt.by_name.get(f"{base}.gate_up_proj")
        if fused is None:
            return tuple(self.linear(f"{base}.{e}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
        gate, up = unfuse_gate_up(self._to_device(read_slice(fused, e), f"{fused.name}[{e}]"))
        down = self._to_device(read_slice(self._info(f"{base}.down_proj"), e), f"{base}.down_proj[{e}]")
        return gate.contiguous(), up.contiguous(), down.T.contiguous()

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [*ids.shape, hidden]: only the rows of the token ids used are read."""
        info = self._info(f"{self.spec.text_prefix}model.embed_tokens.weight")
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.stack([read_rows(info, int(i), int(i) + 1)[0] for i in unique.tolist()])
        return self._to_device(rows, info.name)[inverse.to(self.device)]

    def lm_head_info(self):
        name = f"{self.spec.text_prefix}lm_head.weight"
        if name not in self.ckpt.by_name and self.spec.tie_word_embeddings:
            name = f"{self.spec.text_prefix}model.embed_tokens.weight"
        return self._info(name)

