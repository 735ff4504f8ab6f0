"""Where one `l4q` job's CPU time goes, thread by thread, with 1 and with N kernel threads.

Runs `l4q quantize --to int4` (or --to SCHEME) on the Scout-shaped synthetic checkpoint of
speed.py, its source in the page cache, once per run and thread count. The job runs in a child
process that samples every thread's user + sys CPU time from /proc/self/task every 20 ms and names
it from Python's threads: the main thread (kernel thread 0 and the walk), the walk's reader, the
output writers, other Python threads, and native threads (numba's kernel workers). It splits the
job at the reader's start into start-up (interpreter, imports, planning) and the walk. Prints a
table of wall and CPU seconds per run, then the scaling of the job and of the walk, and the walk's
best case on N cores: its one-thread CPU seconds spread evenly over them. Linux only.

    python benchmarks/thread_cpu.py --layers 2 --threads 2 --runs 2 --workdir /tmp/l4q-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROLES = ("main", "native", "reader", "writer", "other")
SAMPLE_S = 0.02


def thread_cpu() -> dict[int, float]:
    """User + sys CPU seconds of every live thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return cpu


def role_of(name: str | None, is_main: bool) -> str:
    if is_main:
        return "main"
    if name is None:
        return "native"
    return {"l4q-reader": "reader", "l4q-writer": "writer"}.get(name, "other")


class Sampler:
    """Samples every thread's CPU time; keeps the last sample of threads that have ended."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}
        self.roles: dict[int, str] = {}
        self.walk_start: float | None = None
        self.at_walk_start: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.own_tid: int | None = None

    def _run(self) -> None:
        self.own_tid = threading.get_native_id()
        while not self.stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        main_tid = threading.main_thread().native_id
        cpu = thread_cpu()
        for tid, seconds in cpu.items():
            if tid == self.own_tid:
                continue
            self.roles.setdefault(tid, role_of(names.get(tid), tid == main_tid))
            self.last[tid] = seconds
        if self.walk_start is None and "reader" in self.roles.values():
            self.walk_start = time.time()
            self.at_walk_start = self.by_role()

    def by_role(self) -> dict[str, float]:
        totals = dict.fromkeys(ROLES, 0.0)
        for tid, seconds in self.last.items():
            totals[self.roles[tid]] += seconds
        return totals


def child(report: Path, l4q_args: list[str]) -> None:
    sampler = Sampler()
    sampler.thread.start()
    code = 0
    try:
        sys.path.insert(0, str(REPO))
        from cli.main import main

        main(l4q_args)
    except SystemExit as exc:
        code = exc.code or 0
    sampler.stop.set()
    sampler.thread.join()
    sampler.sample()
    end = time.time()
    times = os.times()
    report.write_text(json.dumps({
        "code": code, "walk_start": sampler.walk_start, "end": end,
        "at_walk_start": sampler.at_walk_start, "at_end": sampler.by_role(),
        "process_cpu": times.user + times.system,
    }))


def run(src: Path, scheme: str, threads: int, work: Path) -> dict:
    out, report = work / "out", work / "report.json"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", str(report), "--",
           "quantize", "--model", str(src), "--to", scheme, "--out", str(out), "--threads", str(threads)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - start
    shutil.rmtree(out, ignore_errors=True)
    result = json.loads(report.read_text()) if report.exists() else {"code": proc.returncode}
    if proc.returncode or result["code"] or result.get("walk_start") is None:
        sys.exit(f"thread_cpu: the job failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    walk_cpu = {r: result["at_end"][r] - result["at_walk_start"][r] for r in ROLES}
    return {"threads": threads, "wall": wall, "startup": result["walk_start"] - start,
            "walk": result["end"] - result["walk_start"], "walk_cpu": walk_cpu,
            "startup_cpu": sum(result["at_walk_start"].values()), "process_cpu": result["process_cpu"]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--to", default="int4", help="the scheme quantized to (default int4)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from benchmarks.quantize_memory import ensure_checkpoint
    from benchmarks.speed import read_into_page_cache

    src = ensure_checkpoint(args.workdir, args.layers, args.vocab_size)
    counts = sorted({1, args.threads})
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run(src, args.to, 1, Path(tmp))  # untimed: compiles the kernels if this install has not yet
        for _ in range(args.runs):
            for threads in counts:  # alternating, so that drift touches both alike
                read_into_page_cache(src)
                rows.append(run(src, args.to, threads, Path(tmp)))

    print(f"l4q quantize --to {args.to}, {src.name}, source in the page cache; CPU seconds by thread")
    print("| threads | wall s | start-up s | walk s | walk CPU: main | native | reader | writer | other "
          "| walk cores busy | start-up CPU | process CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["walk_cpu"]
        print(f"| {r['threads']} | {r['wall']:.2f} | {r['startup']:.2f} | {r['walk']:.2f} | "
              + " | ".join(f"{c[role]:.2f}" for role in ROLES)
              + f" | {sum(c.values()) / r['walk']:.2f} | {r['startup_cpu']:.2f} | {r['process_cpu']:.2f} |")

    def median(threads: int, key) -> float:
        return statistics.median(key(r) for r in rows if r["threads"] == threads)

    if args.threads > 1:
        n = args.threads
        wall1, walln = median(1, lambda r: r["wall"]), median(n, lambda r: r["wall"])
        walk1, walkn = median(1, lambda r: r["walk"]), median(n, lambda r: r["walk"])
        cpu1 = median(1, lambda r: sum(r["walk_cpu"].values()))
        best_walk = max(cpu1 / n, walk1 / n)
        best_job = wall1 - walk1 + best_walk
        print(f"medians: {n} threads give the job {wall1 / walln:.2f}x the throughput of 1 thread, "
              f"the walk {walk1 / walkn:.2f}x")
        print(f"best case: the 1-thread walk's {cpu1:.2f} CPU s spread over {n} cores take {best_walk:.2f} s, "
              f"the job {best_job:.2f} s: {wall1 / best_job:.2f}x")


if __name__ == "__main__":
    main()
