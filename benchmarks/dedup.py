"""Xet dedup of l4q's outputs, measured with hf_xet's real chunker and dedup engine (`l4q dedup`).

On a synthetic checkpoint with Scout's real shapes (default 1 decoder layer: 16 experts whose int4
slices are ~50 MB, far larger than Xet's 64 KiB chunks) and a synthetic fine-tune of it in which
`--changed` experts of layer 0 have new weights and nothing else changed:

1. the same source quantized to int4 twice: new bytes of the second upload;
2. the fine-tune's int4 pushed after the base's int4: new bytes against the changed experts' share
   of the file (target: within 1.5x);
3. int4, int8, fp8 and GGUF Q4_K_M against the BF16 base: dedup of the parts that did not change
   (tensors l4q keeps BF16, byte-identical to the base);
4. rows 1-3 for a naive layout as other tools write it: tensors in sorted name order, each MoE
   layer's experts fused into one tensor per projection, one int4 scale per row and group shared by
   all experts (so one changed expert can move every expert's scales).

    python benchmarks/dedup.py [--layers 1] [--changed 2] [--workdir /tmp/l4q-bench]

Each output is deleted once measured (only the synthetic checkpoints and the base's store stay), so
one layer needs ~40 GB of free disk at most rather than the ~75 GB all outputs together take.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llama4_quant import arch, schemes, synthetic  # noqa: E402
from llama4_quant.checkpoint import Checkpoint, read_slice, read_tensor  # noqa: E402
from llama4_quant.tiny_models import tiny_model_dir  # noqa: E402
from llama4_quant.xet.dedup import ensure_stored, measure, scratch_copy, upload_files  # noqa: E402


def l4q(*args: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, check=True)
    return time.time() - t0


def synthetic_checkpoint(path: Path, layers: int, expert_seeds: dict | None = None) -> Path:
    """A Scout-shaped random checkpoint, with tiny's tokenizer files (GGUF export needs a tokenizer)."""
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.write_synthetic_checkpoint(tmp, synthetic.scout_config(layers), expert_seeds=expert_seeds)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copyfile(tiny_model_dir() / name, tmp / name)
        tmp.rename(path)
    return path


def quantized(src: Path, out: Path, scheme: str) -> Path:
    if not (out / "config.json").is_file():
        l4q("quantize", "--model", str(src), "--to", scheme, "--out", str(out), "--overwrite", "--quiet")
    return out


def naive_int4(src: Path, out: Path) -> Path:
    """What a naive tool writes: sorted tensor order, fused experts, one scale per (row, group) for all experts."""
    if (out / "model.safetensors").is_file():
        return out
    ckpt = Checkpoint(src)
    spec = arch.spec_from_config(arch.load_config(src))
    tensors: dict[str, torch.Tensor] = {}
    for info in ckpt.tensors:
        role = arch.classify(info.name, spec).role
        if role == arch.EXPERTS_GATE_UP:
            inter = info.shape[2] // 2
            base = info.name.removesuffix(".gate_up_proj")
            for proj, cols in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
                experts = [read_slice(info, e)[:, cols].T.contiguous() for e in range(info.shape[0])]
                _fused_int4(tensors, f"{base}.{proj}", experts)
        elif role == arch.EXPERTS_DOWN:
            base = info.name.removesuffix(".down_proj")
            _fused_int4(tensors, f"{base}.down_proj", [read_slice(info, e).T.contiguous() for e in range(info.shape[0])])
        elif role in arch.LINEAR_ROLES:
            w = read_tensor(info)
            scale = schemes.int4_scales(w)
            module = info.name.removesuffix(".weight")
            tensors[f"{module}.weight_packed"] = schemes.pack_int4(schemes.int4_quantize(w, scale))
            tensors[f"{module}.weight_scale"] = scale
        else:
            tensors[info.name] = read_tensor(info)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"))
    return out


def _fused_int4(tensors: dict, name: str, experts: list[torch.Tensor]) -> None:
    absmax = torch.stack([schemes._group_absmax(w, schemes.INT4_GROUP_SIZE) for w in experts]).amax(0)
    scale = schemes._symmetric_scale(absmax, 7.5, torch.bfloat16)
    tensors[f"{name}.weight_packed"] = torch.stack([schemes.pack_int4(schemes.int4_quantize(w, scale)) for w in experts])
    tensors[f"{name}.weight_scale"] = scale


def unchanged_bytes(base: Path, out: Path) -> int:
    """Bytes of `out`'s tensors that are byte-for-byte tensors of the base (same name, dtype and shape)."""
    if out.is_file():
        return 0  # GGUF: every tensor changes type (F32 norms, K-quant or Q8_0 weights)
    b = Checkpoint(base).by_name
    return sum(t.nbytes for t in Checkpoint(out).tensors
               if t.name in b and (b[t.name].dtype, b[t.name].shape) == (t.dtype, t.shape))


def expert_bytes(out: Path, layer: int, experts: list[int], num_experts: int) -> int:
    """Bytes of the given experts' tensors in `out` (l4q: their own modules; naive: their share of fused tensors)."""
    total = 0
    for t in Checkpoint(out).tensors:
        prefix = f".layers.{layer}.feed_forward.experts."
        if prefix not in t.name:
            continue
        index = t.name.split(prefix)[1].split(".")[0]
        if index.isdigit():
            total += t.nbytes if int(index) in experts else 0
        elif len(t.shape) == 3 and t.shape[0] == num_experts:  # fused [E, ...]
            total += t.nbytes * len(experts) // num_experts
    return total


def gguf(src: Path, out: Path) -> Path:
    if not out.is_file():
        l4q("export", "gguf", str(src), "--type", "Q4_K_M", "--out", str(out), "--quiet")
    return out


def gguf_expert_bytes(path: Path, layer: int, experts: list[int], num_experts: int) -> int:
    """The given experts' share of layer `layer`'s fused expert tensors in a GGUF file."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) * len(experts) // num_experts for t in GGUFReader(str(path)).tensors
               if t.name.startswith(f"blk.{layer}.ffn_") and "_exps" in t.name)


def discard(path: Path) -> None:
    """Delete an output once measured: all of them together would not fit a 64 GB disk."""
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--changed", type=int, default=2, help="experts of layer 0 the fine-tune changes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    parser.add_argument("--skip-gguf", action="store_true")
    args = parser.parse_args()
    w = args.workdir / f"dedup-{args.layers}L"
    w.mkdir(parents=True, exist_ok=True)
    changed = list(range(args.changed))
    base = synthetic_checkpoint(w / "base", args.layers)
    tuned = synthetic_checkpoint(w / "finetune", args.layers, {(0, e): 1000 + e for e in changed})
    num_experts = arch.spec_from_config(arch.load_config(base)).num_experts

    store_base = w / "store-base"  # holds the BF16 base only
    for old in w.glob("store-*"):  # stores share xorbs by hard links: drop them all, or the disk fills
        shutil.rmtree(old)
    t0 = time.time()
    ensure_stored(store_base, upload_files(base))
    print(f"# base stored in {time.time() - t0:.0f} s", flush=True)

    rows = []

    def row(layout: str, case: str, target: Path, store: Path, reference: int | None = None, label: str = ""):
        """Measure `target` against `store`; the ratio is new / reference for fine-tunes, deduped / reference else."""
        t = time.time()
        r = measure(target, [], store)
        ratio = None
        if reference:
            ratio = (r.new_bytes if label.startswith("new") else r.size - r.new_bytes) / reference
        rows.append((layout, case, r.size, r.new_bytes, r.dedup, reference, label, ratio, time.time() - t))
        print(f"# {layout} / {case}: {r.new_bytes / 1e9:.3f} GB new of {r.size / 1e9:.3f} GB", flush=True)

    for layout in ("l4q", "naive"):
        make = (lambda src, out: quantized(src, out, "int4")) if layout == "l4q" else naive_int4
        first, second = make(base, w / f"{layout}-int4-a"), make(base, w / f"{layout}-int4-b")
        store = w / f"store-{layout}"  # the base and this layout's int4 of the base
        shutil.rmtree(store, ignore_errors=True)
        scratch_copy(store_base, store)
        ensure_stored(store, upload_files(first))
        row(layout, "1. int4 of the same source again", second, store)
        discard(second)
        tuned_out = make(tuned, w / f"{layout}-int4-finetune")
        row(layout, f"2. fine-tune ({args.changed} of {num_experts} experts of layer 0 changed), int4", tuned_out, store,
            expert_bytes(tuned_out, 0, changed, num_experts), "new / changed experts' bytes")
        discard(tuned_out)
        discard(store)
        if layout == "l4q" and not args.skip_gguf:
            base_gguf, tuned_gguf = gguf(base, w / "l4q-Q4_K_M.gguf"), gguf(tuned, w / "l4q-finetune-Q4_K_M.gguf")
            gguf_store = w / "store-gguf"  # the base and its GGUF
            shutil.rmtree(gguf_store, ignore_errors=True)
            scratch_copy(store_base, gguf_store)
            ensure_stored(gguf_store, [base_gguf])
            row(layout, "2. the fine-tune's GGUF Q4_K_M after the base's", tuned_gguf, gguf_store,
                gguf_expert_bytes(tuned_gguf, 0, changed, num_experts), "new / changed experts' bytes")
            discard(tuned_gguf)
            discard(gguf_store)
            row(layout, "3. GGUF Q4_K_M against the BF16 base", base_gguf, store_base, unchanged_bytes(base, base_gguf),
                "deduped / unchanged bytes")
            discard(base_gguf)
        row(layout, "3. int4 against the BF16 base", first, store_base, unchanged_bytes(base, first),
            "deduped / unchanged bytes")
        discard(first)
        for scheme in ("int8", "fp8") if layout == "l4q" else ():
            target = quantized(base, w / f"l4q-{scheme}", scheme)
            row(layout, f"3. {scheme} against the BF16 base", target, store_base, unchanged_bytes(base, target),
                "deduped / unchanged bytes")
            discard(target)

    print(f"\nXet dedup (hf_xet local store), synthetic Scout-shaped checkpoint with {args.layers} layer(s)")
    print("| layout | case | size GB | new GB | dedup | reference GB | ratio | measured in s |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for layout, case, size, new, dedup, ref, label, ratio, seconds in rows:
        ref_text = f"{ref / 1e9:.3f} ({label})" if label else ""
        ratio_text = f"{ratio:.2f}" if ratio is not None else ""
        print(f"| {layout} | {case} | {size / 1e9:.3f} | {new / 1e9:.4f} | {dedup:.2%} | {ref_text} | {ratio_text} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
