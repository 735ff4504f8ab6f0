"""`l4q inspect`: what a checkpoint holds and what each scheme would make of it, from headers alone."""

from __future__ import annotations

from collections import defaultdict

from . import arch
from .formats import compressed_tensors as ct
from .model import Model, open_model
from .pipeline import build_plan, ignore_patterns
from .sources import Source


def inspect(source: Source | Model) -> dict:
    model = source if isinstance(source, Model) else open_model(source)
    spec, ckpt = model.spec, model.ckpt
    roles: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for info in ckpt.tensors:
        r = roles[arch.classify(info.name, spec).role]
        r["tensors"] += 1
        r["bytes"] += info.nbytes
    predicted = {}
    for name, scheme in ct.SCHEMES.items():
        plan = build_plan(model, scheme, ignore_patterns())
        predicted[name] = {"bytes": plan.output_bytes, "quantized_modules": len(plan.quantized_modules())}
    return {
        "source": model.source.label,
        "path": str(model.dir),
        "architecture": {
            "kind": spec.kind,
            "layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "experts": spec.num_experts,
            "experts_per_token": spec.experts_per_token,
            "expert_intermediate_size": spec.intermediate_size,
            "dense_intermediate_size": spec.intermediate_size_mlp,
            "moe_layers": list(spec.moe_layers),
            "nope_layers": [i for i in range(spec.num_layers) if i not in spec.rope_layers],
            "attention_heads": spec.num_heads,
            "kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "attention_chunk_size": spec.attention_chunk_size,
            "qk_norm": spec.use_qk_norm,
            "vocab_size": spec.vocab_size,
            "vision": spec.has_vision,
        },
        "shards": len({t.file for t in ckpt.tensors}),
        "tensors": len(ckpt.tensors),
        "bytes": ckpt.total_bytes,
        "by_role": dict(sorted(roles.items())),
        "predicted_output": predicted,
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_report(r: dict) -> str:
    a = r["architecture"]
    lines = [
        f"{r['source']} ({r['path']})",
        f"  {a['kind']} Llama 4: {a['layers']} layers, hidden {a['hidden_size']}, "
        f"{a['experts']} experts (top-{a['experts_per_token']}, expert intermediate {a['expert_intermediate_size']})",
        f"  MoE layers {a['moe_layers']}, NoPE layers {a['nope_layers']}, dense intermediate {a['dense_intermediate_size']}",
        f"  attention: {a['attention_heads']} heads / {a['kv_heads']} kv heads x {a['head_dim']}, "
        f"chunk {a['attention_chunk_size']}, qk-norm {'on' if a['qk_norm'] else 'off'}; vocab {a['vocab_size']}; "
        f"vision tower {'yes' if a['vision'] else 'no'}",
        f"  {r['tensors']} tensors in {r['shards']} shards, {_gb(r['bytes'])}",
        "",
        f"  {'role':<16}{'tensors':>8}{'size':>14}",
    ]
    for role, v in r["by_role"].items():
        lines.append(f"  {role:<16}{v['tensors']:>8}{_gb(v['bytes']):>14}")
    lines += ["", f"  {'scheme':<10}{'predicted size':>16}{'of BF16':>9}{'quantized modules':>19}"]
    for name, v in r["predicted_output"].items():
        lines.append(
            f"  {name:<10}{_gb(v['bytes']):>16}{v['bytes'] / r['bytes']:>8.0%}{v['quantized_modules']:>19}"
        )
    return "\n".join(lines)
