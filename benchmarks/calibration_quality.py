"""What calibration buys on the embedded tiny models, measured with `l4q eval` on the held-out text.

Runs the real commands: `l4q calibrate` on the built-in corpus's training split, `l4q quantize --to SCHEME`
for each of --schemes (default int4) with each method it takes (rtn; mse without statistics; mse
weighted by the importance matrix; gptq) and
`l4q export gguf --type Q4_K_M` without and with `--imatrix`, then one `l4q eval` of all outputs
against the BF16 model on the held-out text (never used in training or calibration).

    python benchmarks/calibration_quality.py [--model tiny] [--schemes int4 nvfp4a16 fp8-block] [--samples 128]
        [--seq-len 512] [--max-tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama4_quant.formats.compressed_tensors import get_scheme  # noqa: E402


def l4q(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--schemes", nargs="+", default=["int4"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32768)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        stats = t / "stats"
        times = {"calibrate": l4q("calibrate", args.model, "--out", str(stats), "--samples", str(args.samples),
                                  "--seq-len", str(args.seq_len), "--device", "cpu", "--quiet")}
        variants = {}  # name -> command args
        for scheme in args.schemes:
            base = ["quantize", "--model", args.model, "--to", scheme]
            if get_scheme(scheme).activations:  # static input scales: every method takes the statistics
                base += ["--calib", str(stats)]
            variants[f"{scheme} rtn"] = base
            if "--calib" not in base:  # with the statistics given, mse weighs by their importance
                variants[f"{scheme} mse"] = [*base, "--method", "mse"]
            calib = [] if "--calib" in base else ["--calib", str(stats)]
            variants[f"{scheme} mse+imatrix"] = [*base, "--method", "mse", *calib]
            variants[f"{scheme} gptq"] = [*base, "--method", "gptq", *calib]
        variants["Q4_K_M"] = ["export", "gguf", args.model, "--type", "Q4_K_M"]
        variants["Q4_K_M imatrix"] = ["export", "gguf", args.model, "--type", "Q4_K_M", "--imatrix", str(stats)]
        outs = {}
        for name, cmd in variants.items():
            out = t / (name.replace(" ", "-").replace("+", "-") + (".gguf" if cmd[0] == "export" else ""))
            times[name] = l4q(*cmd, "--out", str(out), "--device", "cpu", "--quiet") if cmd[0] == "quantize" \
                else l4q(*cmd, "--out", str(out), "--quiet")
            outs[name] = out
        report_dir = t / "report"
        eval_args = ["eval", "--base", args.model, "--max-tokens", str(args.max_tokens), "--report", str(report_dir),
                     "--device", "cpu", "--quiet"]
        for out in outs.values():
            eval_args += ["--candidate", str(out)]
        l4q(*eval_args)
        report = json.loads((report_dir / "report.json").read_text())
        stats_meta = json.loads((stats / "stats.json").read_text())

    by_name = dict(zip(outs, report["candidates"]))
    rtn_of = {name: by_name[f"{name.split()[0]} rtn"]["kld"]["mean"] for name in by_name if not name.startswith("Q")}
    rtn = by_name["int4 rtn"]["kld"]["mean"] if "int4 rtn" in by_name else float("nan")
    gguf_plain = by_name["Q4_K_M"]["kld"]["mean"]
    print(f"\n{args.model}: calibration {stats_meta['data']['samples']} x {stats_meta['data']['seq_len']} tokens "
          f"({stats_meta['data']['description']}); {len(stats_meta['all_token_experts'])} experts on the all-token path; "
          f"eval {report['data']['tokens']} held-out tokens, ctx {report['data']['ctx']}")
    print("| variant | size MB | mean KLD ± SE | median / p99 KLD | vs its rtn | vs Q4_K_M | top-1 agree | PPL ratio | time s | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    targets = {"int4 gptq": ("<= 0.70x rtn", lambda k: k <= 0.7 * rtn), "int4 mse": ("<= 0.90x rtn", lambda k: k <= 0.9 * rtn),
               "Q4_K_M imatrix": ("<= Q4_K_M", lambda k: k <= gguf_plain)}
    for name, c in by_name.items():
        k = c["kld"]["mean"]
        target = ""
        if name in targets:
            label, ok = targets[name]
            target = f"{label}: {'met' if ok(k) else 'NOT met'}"
        gguf = c["kind"] == "gguf"  # llama.cpp scores other positions (see `l4q eval`): compare within a kind
        vs_rtn, vs_gguf = ("", f"{k / gguf_plain:.2f}x") if gguf else (f"{k / rtn_of[name]:.2f}x", "")
        print(f"| {name} | {c['size_bytes'] / 1e6:.1f} | {k:.5f} ± {c['kld']['stderr']:.5f} | "
              f"{c['kld']['median']:.5f} / {c['kld']['p99']:.4f} | {vs_rtn} | {vs_gguf} | "
              f"{c['top1_agreement']:.1%} | {c['perplexity_ratio']:.4f} | {times[name]:.0f} | {target} |")
    print(f"\ncalibrate: {times['calibrate']:.0f} s on the CPU")


if __name__ == "__main__":
    main()
