"""One process against a torchrun job of N ranks (gloo on the CPU), on a Scout-shaped synthetic layer.

On the synthetic checkpoint of `quantize_memory.py` with one decoder layer (Scout's real shapes: 16
fused experts of [5120, 16384] + [8192, 5120], attention, shared expert, [202048, 5120] embeddings),
it times, for each rank count:

- the calibration pass (`calibrate()` over random token ids: the synthetic checkpoint has no tokenizer),
- `l4q quantize --to int4 --method gptq` on those statistics (the GPTQ pass over the layer, then the
  compressed-tensors output written),

and prints wall time, cores busy ((user + sys) / wall over the launcher and every rank), the largest
peak RSS of one process, and whether the output has the one-process run's bytes. The ranks of a machine
share its cores (each rank's kernels use cores / ranks threads), so on one machine the gain comes only
from what one process leaves idle; across machines each rank brings its own. On CPUs the BLAS splits
large matmuls by thread count, so a job's statistics equal those of one process run with the same
threads per process (`--threads`), which the calibration rows also check.

    python benchmarks/distributed.py --ranks 1 2 --samples 4 --seq-len 512 --workdir /tmp/l4q-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import calibrate_memory  # noqa: E402
from benchmarks.multi_target import digest  # noqa: E402
from benchmarks.quantize_memory import ensure_checkpoint  # noqa: E402


def calibrate_child(model: Path, out: Path, samples: int, seq_len: int, threads: int | None) -> None:
    from llama4_quant import distributed, parallel

    distributed.init()
    parallel.set_threads(threads)
    calibrate_memory.child(model, out, samples, seq_len)


def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(port)]


def timed(args: list[str]) -> dict:
    """Wall seconds, CPU seconds of the process and every process it waited for, largest peak RSS."""
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(args[:8])}... failed:\n{stderr[-4000:]}")
    return {"wall": time.time() - t0, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}


def tree_digest(path: Path) -> str:
    """Every file of an output directory, by name."""
    return " ".join(f"{p.name}:{digest(p)}" for p in sorted(path.iterdir()) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        calibrate_child(args.child[0], args.child[1], args.samples, args.seq_len, args.threads)
        return
    model = ensure_checkpoint(args.workdir, 1)
    cores = os.cpu_count()
    print(f"Scout-shaped synthetic, 1 layer, {args.samples} x {args.seq_len} tokens, {cores} cores, gloo on 127.0.0.1")
    print("| job | ranks x threads | wall s | vs one process | cores busy | peak RSS of one process GB |"
          " bytes |")
    print("|---|---|---:|---:|---:|---:|---|", flush=True)
    walls, digests = {}, {}

    def run(job: str, ranks: int, threads: int, command: list[str], out: Path, same_as: str) -> None:
        m = timed(command)
        walls.setdefault(job, m["wall"])
        digests[(job, ranks, threads)] = tree_digest(out)
        reference = next(d for key, d in digests.items() if key[0] == job and f"{key[1]} x {key[2]}" == same_as)
        same = "identical to " + same_as if digests[(job, ranks, threads)] == reference else "differ from " + same_as
        print(f"| {job} | {ranks} x {threads} | {m['wall']:.0f} | {walls[job] / m['wall']:.2f}x | "
              f"{m['cpu'] / m['wall']:.2f} | {m['rss'] / 1e9:.2f} | {'(reference)' if ranks == 1 and threads == cores else same} |",
              flush=True)

    def calibration(ranks: int, threads: int, run_dir: Path) -> list[str]:
        return [*launcher(ranks), __file__, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                "--threads", str(threads), "--child", str(model), str(run_dir / "stats")]

    for ranks in args.ranks:
        threads = max(1, cores // ranks)
        run_dir = args.workdir / f"distributed-{ranks}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        run("calibration pass", ranks, threads, calibration(ranks, threads, run_dir), run_dir / "stats", f"1 x {cores}")
        if ranks > 1:  # one process with a rank's threads: the same BLAS splits, so the same bytes
            same_threads = args.workdir / f"distributed-1x{threads}"
            shutil.rmtree(same_threads, ignore_errors=True)
            same_threads.mkdir()
            run("calibration pass", 1, threads, calibration(1, threads, same_threads), same_threads / "stats",
                f"{ranks} x {threads}")
        run("quantize int4 --method gptq", ranks, threads,
            [*launcher(ranks), "-m", "cli.main", "quantize", "--model", str(model), "--to", "int4", "--method", "gptq",
             "--calib", str(run_dir / "stats"), "--out", str(run_dir / "int4"), "--quiet"],
            run_dir / "int4", f"1 x {cores}")
        shutil.rmtree(run_dir / "int4")


if __name__ == "__main__":
    main()
