"""Size-targeted GGUF against the plain llama-quantize types at the same size, on the embedded models.

For each model: `l4q calibrate` (built-in corpus, training split), then with that `--imatrix` each
plain file type of --types (llama-quantize's per-tensor rules; the tests check l4q writes
llama-quantize's types and bytes) and, for each, `--target-size` set to that file's size; the MoE
mixes for reference. llama.cpp runs every file; KLD, top-1 against the BF16 model in transformers on
the held-out text (llama.cpp scores positions 0-127 of each window).

    python benchmarks/gguf_target_size.py [--models tiny tiny-maverick] [--types Q2_K Q3_K_S Q3_K_M Q4_K_S]
        [--samples 32] [--seq-len 256] [--windows 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama4_quant import evaluate, sources  # noqa: E402


def l4q(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli.main", *args, "--quiet"], cwd=REPO, check=True)


def one_model(model: str, types: list[str], args, work: Path) -> None:
    stats = work / "stats"
    l4q("calibrate", model, "--out", str(stats), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
        "--device", "cpu")
    files = {}  # label -> file
    for t in [*types, "Q2_K_MOE", "Q3_K_MOE"]:
        files[t] = work / f"{t}.gguf"
        l4q("export", "gguf", model, "--type", t, "--imatrix", str(stats), "--out", str(files[t]))
    for t in types:
        label = f"--target-size {t}"
        files[label] = work / f"target-{t}.gguf"
        l4q("export", "gguf", model, "--target-size", str(files[t].stat().st_size), "--imatrix", str(stats),
            "--out", str(files[label]))
    report = evaluate.evaluate(sources.resolve(model), list(files.values()), ctx=256, max_tokens=args.windows * 256,
                               progress=False)
    rows = sorted(zip(files, report["candidates"]), key=lambda r: r[1]["size_bytes"])
    print(f"\n{model}: {args.samples} x {args.seq_len} calibration tokens, {args.windows} held-out windows")
    print("| file | size MB | mean KLD | median KLD | p99 KLD | top-1 agree |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, c in rows:
        k = c["kld"]
        print(f"| {label} | {c['size_bytes'] / 1e6:.2f} | {k['mean']:.5f} | {k['median']:.6f} | {k['p99']:.4f} "
              f"| {100 * c['top1_agreement']:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-maverick"])
    parser.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            one_model(model, args.types, args, Path(tmp))


if __name__ == "__main__":
    main()
