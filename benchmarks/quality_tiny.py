"""Quality of l4q's compressed-tensors outputs on the embedded tiny models, through transformers.

Quantizes `tiny` and `tiny-maverick` to each scheme, loads every output with transformers and
compressed-tensors on the CPU, and compares next-token distributions with the BF16 model's on the
held-out text (never used in training), fed as the same token ids.

    python benchmarks/quality_tiny.py [--windows 16] [--ctx 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama4_quant import evaluate, pipeline, sources, tiny_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-maverick"])
    parser.add_argument("--schemes", nargs="+", default=["int4", "int8", "fp8"])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=256)
    args = parser.parse_args()

    text = tiny_models.tiny_heldout_path().read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = sources.resolve(name)
            windows = evaluate.token_windows(src.path, text, args.ctx)[: args.windows]
            base = evaluate.window_logits(evaluate.load_causal_lm(src.path), windows)
            for scheme in args.schemes:
                out = Path(tmp) / f"{name}-{scheme}"
                result = pipeline.quantize(src, out, scheme, show_progress=False)
                cand = evaluate.window_logits(evaluate.load_causal_lm(out), windows)
                a = evaluate.compare(base, cand, windows)
                rows.append((name, scheme, result.source_bytes, result.output_bytes, a))
                print(f"# {name} {scheme}: mean KLD {a.mean_kld:.5f}", flush=True)

    print(f"\nheld-out text, {args.windows} windows x {args.ctx} tokens per model, transformers on the CPU")
    print("| model | scheme | size | mean KLD | median KLD | p99 KLD | top-1 agree | PPL base | PPL quant |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scheme, src_bytes, out_bytes, a in rows:
        print(
            f"| {name} | {scheme} | {out_bytes / src_bytes:.0%} | {a.mean_kld:.5f} | {a.median_kld:.6f} | "
            f"{a.p99_kld:.4f} | {a.top1:.2%} | {a.ppl_base:.3f} | {a.ppl_candidate:.3f} |"
        )


if __name__ == "__main__":
    main()
