"""Peak memory and throughput of `l4q quantize` on synthetic checkpoints with Scout's real shapes.

For each layer count it writes (once, then reuses) a random BF16 checkpoint with Scout's tensor
shapes (embeddings and lm_head [202048, 5120], per layer 16 fused experts of [5120, 16384] and
[8192, 5120], attention, shared expert), runs `l4q quantize` on it in a child process and prints the
child's peak resident set size as the kernel reports it (ru_maxrss, which counts mapped file pages)
and the GB/s of BF16 read. Doubling the layer count must not raise the peak.

    python benchmarks/quantize_memory.py --layers 2 4 --scheme int4 --workdir /tmp/l4q-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama4_quant import synthetic  # noqa: E402
from llama4_quant.checkpoint import Checkpoint  # noqa: E402

SCOUT_VOCAB = synthetic.SCOUT_TEXT_CONFIG["vocab_size"]


def ensure_checkpoint(workdir: Path, layers: int, vocab_size: int = SCOUT_VOCAB) -> Path:
    """The Scout-shaped synthetic checkpoint with `layers` MoE layers and `vocab_size` tokens (Scout's
    by default), generated once under `workdir`."""
    name = f"scout-synthetic-{layers}L" + (f"-vocab{vocab_size}" if vocab_size != SCOUT_VOCAB else "")
    path = workdir / name
    if (path / "config.json").is_file():
        return path
    tmp = workdir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    synthetic.write_synthetic_checkpoint(tmp, synthetic.scout_config(layers, vocab_size), max_shard_size=4 * 1000**3)
    os.replace(tmp, path)
    print(f"# generated {path} in {time.time() - t0:.0f} s", flush=True)
    return path


def run_child(args: list[str]) -> tuple[int, float, int]:
    """Run a command; return (exit status, wall seconds, peak RSS in bytes of that child)."""
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--scheme", default="int4", choices=["int4", "int8", "fp8"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    rows = []
    for layers in args.layers:
        src = ensure_checkpoint(args.workdir, layers)
        ckpt = Checkpoint(src)
        out = args.workdir / f"out-{layers}L-{args.scheme}"
        cmd = [sys.executable, "-m", "cli.main", "quantize", "--model", str(src), "--to", args.scheme,
               "--out", str(out), "--overwrite", "--quiet", "--device", "cpu"]
        code, wall, peak = run_child(cmd)
        if code != 0:
            sys.exit(f"quantize failed with exit status {code}")
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({
            "layers": layers, "bf16_gb": ckpt.total_bytes / 1e9, "shards": len({t.file for t in ckpt.tensors}),
            "out_gb": out_bytes / 1e9, "seconds": wall, "gb_per_s": ckpt.total_bytes / 1e9 / wall,
            "peak_rss_mb": peak / 2**20,
        })
        if not args.keep_outputs:
            shutil.rmtree(out)

    print(f"\nl4q quantize --to {args.scheme}, synthetic Scout-shaped checkpoints, {os.cpu_count()} CPU cores")
    print(f"{'layers':>6} {'BF16 GB':>8} {'shards':>6} {'out GB':>7} {'time s':>7} {'GB/s read':>9} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['layers']:>6} {r['bf16_gb']:>8.2f} {r['shards']:>6} {r['out_gb']:>7.2f} {r['seconds']:>7.1f} "
              f"{r['gb_per_s']:>9.3f} {r['peak_rss_mb']:>11.0f}")
    if len(rows) > 1:
        print(f"peak RSS ratio, most layers / fewest: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
