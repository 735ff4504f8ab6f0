"""Quality of l4q's compressed-tensors outputs on the embedded tiny models, through transformers.

Quantizes `tiny` and `tiny-maverick` to each scheme and runs `l4q eval`'s comparison of every output
(loaded by transformers with compressed-tensors on the CPU) against the BF16 model on the held-out
text (never used in training), fed as the same token ids.

    python benchmarks/quality_tiny.py [--windows 32] [--ctx 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama4_quant import evaluate, pipeline, sources  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-maverick"])
    parser.add_argument("--schemes", nargs="+", default=["int4", "int8", "fp8"])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=256)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = sources.resolve(name)
            outs = []
            for scheme in args.schemes:
                outs.append(Path(tmp) / f"{name}-{scheme}")
                pipeline.quantize(src, outs[-1], scheme, show_progress=False)
            report = evaluate.evaluate(src, outs, ctx=args.ctx, max_tokens=args.windows * args.ctx, progress=False)
            rows += [(name, report["base"]["size_bytes"], c) for c in report["candidates"]]

    print(f"\nheld-out text, {args.windows} windows x {args.ctx} tokens per model, transformers on the CPU")
    print("| model | scheme | size | mean KLD | median KLD | p99 KLD | top-1 agree | routing agree | PPL base | PPL quant |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, base_size, c in rows:
        k = c["kld"]
        print(
            f"| {name} | {c['scheme']} | {c['size_bytes'] / base_size:.0%} | {k['mean']:.5f} | {k['median']:.6f} | "
            f"{k['p99']:.4f} | {c['top1_agreement']:.2%} | {c['routing_agreement']['mean']:.2%} | "
            f"{c['base_perplexity']:.3f} | {c['perplexity']:.3f} |"
        )


if __name__ == "__main__":
    main()
