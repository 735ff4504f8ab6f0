"""`l4q export gguf` against llama.cpp's own pipeline, and at Scout's real shapes.

0. Every type of `tiny` and `tiny-maverick`, run by llama.cpp, against the BF16 model in transformers.
1. On `tiny`: l4q's one-pass Q4_K_M versus llama.cpp's two programs (its converter to F16, then its
   `llama-quantize` built from the llama-cpp-python source distribution): wall time, and mean KLD of
   each against the BF16 model measured by `l4q eval` (llama.cpp runs both files).
2. On the synthetic Scout-shaped checkpoint of benchmarks/quantize_memory.py: time, GB/s of BF16 read
   and peak resident memory (ru_maxrss of the child process) of `--type Q8_0` and `--type Q4_K_M`.

    python benchmarks/gguf_export.py [--skip-scout] [--layers 2] [--workdir /tmp/l4q-bench]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quantize_memory import ensure_checkpoint, run_child  # noqa: E402

from llama4_quant import evaluate, sources  # noqa: E402
from llama4_quant.calibrate.stats import Stats  # noqa: E402
from llama4_quant.checkpoint import Checkpoint  # noqa: E402
from llama4_quant.formats import gguf as l4q_gguf  # noqa: E402
from llama4_quant.formats.gguf_types import FILE_TYPES  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def llama_cpp_reference():
    spec = importlib.util.spec_from_file_location("llama_cpp_reference", REPO / "scripts" / "llama_cpp_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versus_llama_cpp(windows: int) -> None:
    ref = llama_cpp_reference()
    ref.quantize_tool()  # build outside the timing
    tiny = sources.resolve("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        ours = l4q_gguf.export_gguf(tiny, tmp / "l4q-Q4_K_M.gguf", "Q4_K_M", show_progress=False).out
        t_ours = time.time() - t0
        t0 = time.time()
        f16 = ref.convert(tiny.path, tmp / "f16.gguf", "f16")
        theirs = ref.llama_quantize(f16, tmp / "llama.cpp-Q4_K_M.gguf", "Q4_K_M")
        t_theirs = time.time() - t0
        report = evaluate.evaluate(tiny, [ours, theirs], ctx=256, max_tokens=windows * 256, progress=False)
    print(f"\ntiny, Q4_K_M, {windows} held-out windows (llama.cpp scores positions 0-127 of each), 2 CPU cores")
    print("| pipeline | time s | size MB | mean KLD ± SE | median KLD | p99 KLD | top-1 agree |")
    print("|---|---|---|---|---|---|---|")
    for label, seconds, c in (("l4q export gguf (one pass)", t_ours, report["candidates"][0]),
                              ("llama.cpp convert + llama-quantize", t_theirs, report["candidates"][1])):
        k = c["kld"]
        print(f"| {label} | {seconds:.1f} | {c['size_bytes'] / 1e6:.2f} | {k['mean']:.5f} ± {k['stderr']:.5f} | "
              f"{k['median']:.6f} | {k['p99']:.4f} | {c['top1_agreement']:.2%} |")


def quality(models: list[str], windows: int) -> None:
    """Every exported type of each tiny model, run by llama.cpp, against BF16 transformers."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            src = sources.resolve(model)
            types = list(l4q_gguf.FILE_TYPES)
            stats = Stats(REPO / "tests" / "data" / "stats" / model)  # for the types that need an imatrix
            files = [l4q_gguf.export_gguf(src, Path(tmp) / f"{model}-{t}.gguf", t, show_progress=False,
                                          importance=stats.importance if FILE_TYPES[t].needs_imatrix else None).out
                     for t in types]
            report = evaluate.evaluate(src, files, ctx=256, max_tokens=windows * 256, progress=False)
            rows += [(model, t, report["base"]["size_bytes"], c) for t, c in zip(types, report["candidates"])]
    print(f"\nl4q GGUF exports in llama.cpp vs BF16 transformers, {windows} held-out windows, positions 0-127 scored"
          " (Q2_K_S, which needs an imatrix, with the tests' statistics: tests/data/stats)")
    print("| model | type | size | mean KLD | median KLD | p99 KLD | top-1 agree |")
    print("|---|---|---|---|---|---|---|")
    for model, t, base_size, c in rows:
        k = c["kld"]
        print(f"| {model} | {t} | {c['size_bytes'] / 1e6:.2f} MB ({c['size_bytes'] / base_size:.0%}) | {k['mean']:.5f} | {k['median']:.6f} | "
              f"{k['p99']:.4f} | {c['top1_agreement']:.2%} |")


def borrow_tiny_tokenizer(src: Path) -> None:
    """A GGUF carries the tokenizer, and the synthetic checkpoint has none: borrow tiny's."""
    tiny = sources.resolve("tiny").path
    for name in TOKENIZER_FILES:
        if not (src / name).exists():
            shutil.copyfile(tiny / name, src / name)


def scout_shapes(workdir: Path, layers: int, types: list[str]) -> None:
    src = ensure_checkpoint(workdir, layers)
    borrow_tiny_tokenizer(src)
    bf16 = Checkpoint(src).total_bytes
    rows = []
    for t in types:
        out = workdir / f"scout-{layers}L-{t}.gguf"
        code, wall, peak = run_child([sys.executable, "-m", "cli.main", "export", "gguf", str(src), "--type", t,
                                      "--out", str(out), "--overwrite", "--quiet"])
        if code != 0:
            sys.exit(f"export failed with exit status {code}")
        rows.append((t, out.stat().st_size, wall, peak))
        out.unlink()
    print(f"\nl4q export gguf, synthetic Scout-shaped checkpoint ({layers} layers, {bf16 / 1e9:.2f} GB BF16), 2 CPU cores")
    print("| type | out GB | time s | GB/s read | peak RSS MB |")
    print("|---|---|---|---|---|")
    for t, size, wall, peak in rows:
        print(f"| {t} | {size / 1e9:.2f} | {wall:.0f} | {bf16 / 1e9 / wall:.3f} | {peak / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    parser.add_argument("--skip-scout", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if not args.skip_quality:
        quality(["tiny", "tiny-maverick"], args.windows)
    if not args.skip_tiny:
        versus_llama_cpp(args.windows)
    if not args.skip_scout:
        args.workdir.mkdir(parents=True, exist_ok=True)
        scout_shapes(args.workdir, args.layers, args.types)


if __name__ == "__main__":
    main()
