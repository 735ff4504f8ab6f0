"""One read, many derivatives: a multi-target `l4q quantize` against the single runs it replaces.

On a synthetic checkpoint with Scout's real shapes (generated once into --workdir), it times `cp -r`
of the source, one `l4q` run per target, and one run writing every target from a single read. Each
row reports wall time, cores busy ((user + sys) / wall), the child's peak RSS, and the source bytes
the run read (the reader's own counter, `checkpoint.bytes_read()`, against the source size), and
checks that the multi-target outputs are byte-identical to the single runs'.

    python benchmarks/multi_target.py --layers 2 --targets int4 fp8 Q8_0 --workdir /tmp/l4q-bench
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gguf_export import borrow_tiny_tokenizer  # noqa: E402
from benchmarks.quantize_memory import ensure_checkpoint  # noqa: E402
from llama4_quant.checkpoint import Checkpoint  # noqa: E402
from llama4_quant.formats.gguf_types import FILE_TYPES  # noqa: E402

# Runs the l4q command and reports, at exit, how many checkpoint bytes the process read.
COUNTING_CHILD = (
    "import atexit, sys\n"
    "from llama4_quant import checkpoint\n"
    "atexit.register(lambda: print('l4q-bytes-read', checkpoint.bytes_read(), file=sys.stderr))\n"
    "from cli.main import main\n"
    "sys.argv = ['l4q', *sys.argv[1:]]\n"
    "main()\n"
)


def run_child(args: list[str]) -> dict:
    """Run a command; return its wall seconds, CPU seconds, peak RSS and (for l4q) bytes read."""
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(args[:6])}... failed:\n{stderr}")
    read = [int(line.split()[1]) for line in stderr.splitlines() if line.startswith("l4q-bytes-read")]
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024,
            "read": read[0] if read else None}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix == ".safetensors"):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def target_args(target: str) -> list[str]:
    return ["--gguf", target] if target in FILE_TYPES else ["--to", target]


def output_name(src: Path, target: str) -> str:
    return f"{src.name}-{target}.gguf" if target in FILE_TYPES else f"{src.name}-{target}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["int4", "fp8", "Q8_0"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = ensure_checkpoint(args.workdir, args.layers)
    borrow_tiny_tokenizer(src)
    size = Checkpoint(src).total_bytes
    l4q = [sys.executable, "-c", COUNTING_CHILD, "quantize", "--model", str(src), "--device", "cpu", "--quiet",
           "--overwrite"]
    rows = []

    copy = args.workdir / "cp-copy"
    shutil.rmtree(copy, ignore_errors=True)
    rows.append(("cp -r", run_child(["cp", "-r", str(src), str(copy)])))
    shutil.rmtree(copy)

    singles, single_digests = args.workdir / "single", {}
    for target in args.targets:
        out = singles / output_name(src, target)
        rows.append((f"l4q {target}", run_child([*l4q, *target_args(target), "--out", str(out)])))
        single_digests[target] = digest(out)
        out.unlink() if out.is_file() else shutil.rmtree(out)
    total = {k: sum(r[k] for _, r in rows[1:]) for k in ("wall", "cpu", "read")}
    rows.append(("sum of the single runs", {**total, "rss": max(r["rss"] for _, r in rows[1:])}))

    multi = args.workdir / "multi"
    every = [a for t in args.targets for a in target_args(t)]
    rows.append((f"l4q {' + '.join(args.targets)}, one read", run_child([*l4q, *every, "--out-dir", str(multi)])))
    identical = all(digest(multi / output_name(src, t)) == single_digests[t] for t in args.targets)
    shutil.rmtree(multi)

    cp_wall = rows[0][1]["wall"]
    print(f"\nScout-shaped synthetic, {args.layers} MoE layers, {size / 1e9:.2f} GB BF16; {os.cpu_count()} CPU cores")
    print("| job | wall s | vs cp -r | cores busy | peak RSS GB | source read | read / source size |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        read = f"{r['read'] / 1e9:.2f} GB | {r['read'] / size:.2f}x" if r["read"] is not None else "- | -"
        print(f"| {name} | {r['wall']:.1f} | {r['wall'] / cp_wall:.1f}x | {r['cpu'] / r['wall']:.2f} | "
              f"{r['rss'] / 1e9:.2f} | {read} |")
    print(f"one read vs the single runs: wall {rows[-1][1]['wall'] / total['wall']:.2f}x, "
          f"outputs byte-identical: {'yes' if identical else 'NO'}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
