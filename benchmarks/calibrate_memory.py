"""Peak memory and time per layer of calibration on the CPU, on synthetic checkpoints with Scout's shapes.

Reuses (or writes once) the random BF16 checkpoints of `quantize_memory.py` (Scout's real tensor
shapes: 16 fused experts of [5120, 16384] + [8192, 5120] per layer, attention, shared expert,
[202048, 5120] embeddings), runs the calibration pass of `l4q calibrate` over random token ids in a
child process, and prints the child's peak RSS next to the BF16 size of one decoder layer. The peak
must stay about one layer (weights are read module by module and expert by expert) and must not
grow with the layer count. Random ids stand in for text: the synthetic checkpoints have no tokenizer.

    python benchmarks/calibrate_memory.py --layers 2 4 --samples 4 --seq-len 512
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quantize_memory import ensure_checkpoint, run_child  # noqa: E402

from llama4_quant import arch  # noqa: E402
from llama4_quant.checkpoint import Checkpoint  # noqa: E402


def child(model: Path, out: Path, samples: int, seq_len: int) -> None:
    import torch

    from llama4_quant.calibrate.stats import calibrate
    from llama4_quant.sources import resolve

    src = resolve(str(model))
    ids = torch.randint(0, 202048, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    calibrate(src, out, ids, "random token ids", device="cpu", show_progress=False)


def layer_bytes(model: Path) -> int:
    spec = arch.spec_from_config(arch.load_config(model))
    prefix = f"{spec.layer_prefix}0."
    return sum(t.nbytes for t in Checkpoint(model).tensors if t.name.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.samples, args.seq_len)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        model = ensure_checkpoint(args.workdir, layers)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            cmd = [sys.executable, __file__, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--child", str(model), str(Path(tmp) / "stats")]
            status, seconds, peak = run_child(cmd)
        if status != 0:
            raise SystemExit(f"calibration of {model} failed with status {status}")
        rows.append((layers, Checkpoint(model).total_bytes, layer_bytes(model), seconds, peak))
    print(f"\ncalibration on the CPU, {args.samples} x {args.seq_len} tokens, Scout-shaped synthetic layers")
    print("| layers | checkpoint GB | one layer GB (BF16) | time s | s per layer | peak RSS GB | peak / layer |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for layers, total, one, seconds, peak in rows:
        print(f"| {layers} | {total / 1e9:.2f} | {one / 1e9:.2f} | {seconds:.0f} | {seconds / layers:.0f} | "
              f"{peak / 1e9:.2f} | {peak / one:.2f} |")


if __name__ == "__main__":
    main()
