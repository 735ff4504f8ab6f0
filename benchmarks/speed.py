"""Speed against `cp -r` and llama.cpp, on one Scout-shaped synthetic checkpoint, in one run.

Rows: `cp -r` of the source, and `cp -r` then `sync` (l4q fsyncs every output before it counts as
complete, `cp` leaves its bytes to the page cache); `l4q quantize` to int4, int8, fp8 and `l4q
export gguf` Q8_0 and Q4_K_M (or --gguf-type) with --threads N, and `dd` writing as many bytes as
int4 past the page cache, as l4q does, with an fsync (the disk's floor for int4); llama.cpp's own
route to that GGUF type (its converter to a BF16 GGUF, then `llama-quantize` with N threads, built
from the llama-cpp-python source distribution) and the two together; then int4 and that type with
one thread, and with one thread and the whole process on one core (`taskset`: the one-thread job
still reads and writes on other cores), for the scaling. Each row: wall time, the ratio to `cp -r`,
cores busy (user + sys CPU time of the whole machine over the row's wall time: worker processes
included, and anything else running then), the peak RSS of the job's process tree, and bytes
written. Every l4q job runs once on the tiny model first, untimed, so that no row pays for
compiling kernels (once per install). Every row starts after a `sync`, so none pays for the
writeback of an earlier row's or the checkpoint's bytes. The one-thread outputs are checked
byte-identical to the N-thread ones. Every row starts with the whole source read once into the page
cache, untimed: the rows before it wrote up to 11.5 GB on a 23 GiB machine, and a row that read part
of the source from the disk would not compare with one that did not (the one-thread rows, after
llama.cpp's, did). With --cold (root, Linux), each row instead starts with the page cache dropped,
as a real Scout or Maverick checkpoint, larger than memory, is read: from the disk. With --runs N
each row runs N times and the table shows its median run: on a shared machine one run's wall time
can be far off (cp -r took 6.6 to 23.8 s here).

The default input is issue #12's: Scout's layer shapes, 2 MoE layers, a vocabulary of 2048 (the
tiny model's tokenizer, which the GGUF rows carry), 8.85 GB of BF16. Like a real Scout checkpoint
(48 layers, 2% of its bytes in the embeddings), it is nearly all layers; with Scout's own vocabulary
(--vocab-size 202048) a 1- or 2-layer checkpoint is a third to a half embedding and output copies.

    python benchmarks/speed.py --layers 2 --workdir /tmp/l4q-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gguf_export import borrow_tiny_tokenizer, llama_cpp_reference  # noqa: E402
from benchmarks.multi_target import digest  # noqa: E402
from benchmarks.quantize_memory import ensure_checkpoint  # noqa: E402
from llama4_quant.checkpoint import Checkpoint  # noqa: E402


def run_job(args: list[str]) -> dict:
    """Run a command; its wall seconds, the machine's busy CPU seconds meanwhile, and the peak RSS
    of its process tree (sampled every 0.1 s)."""
    cpu0, t0 = psutil.cpu_times(), time.time()
    proc = psutil.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall, cpu1 = time.time() - t0, psutil.cpu_times()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:6]))}... failed:\n{proc.stderr.read().decode()[-2000:]}")
    busy = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"wall": wall, "cpu": busy, "rss": peak}


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_into_page_cache(path: Path) -> None:
    """Read every file under `path` once, so that its pages are in the page cache."""
    buffer = bytearray(64 * 2**20)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as stream:
            while stream.readinto(buffer):
                pass


def remove(path: Path) -> None:
    path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokens (default 2048; Scout has 202048)")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count())
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each row (root)")
    parser.add_argument("--runs", type=int, default=1, help="run each row this many times; the table shows the median run")
    parser.add_argument("--gguf-type", default="Q4_K_M", help="the GGUF type raced against llama.cpp (default Q4_K_M)")
    args = parser.parse_args()
    if args.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        sys.exit("--cold drops the page cache through /proc/sys/vm/drop_caches: run it as root on Linux")
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = ensure_checkpoint(args.workdir, args.layers, args.vocab_size)
    borrow_tiny_tokenizer(src)
    source_size = Checkpoint(src).total_bytes
    work = args.workdir / "speed"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    py, n = sys.executable, str(args.threads)
    rows, digests = [], {}

    def job(name: str, cmd: list, out: Path, keep: str | None = None) -> dict:
        runs = []
        for _ in range(args.runs):
            remove(out)
            os.sync()  # no row pays for the writeback of what came before it (the checkpoint's generation included)
            if args.cold:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            else:
                read_into_page_cache(src)
            runs.append(run_job(cmd) | {"written": size_of(out)})
        r = sorted(runs, key=lambda run: run["wall"])[(len(runs) - 1) // 2]  # the median run (the lower of two)
        r["walls"] = [run["wall"] for run in runs]
        if keep:
            digests[keep] = digest(out)
        rows.append((name, r))
        return r

    job("cp -r", ["cp", "-r", str(src), str(work / "copy")], work / "copy")
    remove(work / "copy")
    # l4q fsyncs each output before it counts as complete; `cp -r` leaves its bytes in the page cache
    job("cp -r, then sync", ["sh", "-c", f"cp -r '{src}' '{work / 'copy'}' && sync"], work / "copy")
    remove(work / "copy")
    l4q = [py, "-m", "cli.main"]
    gguf_type = args.gguf_type
    warm_up(l4q, work, gguf_type)
    for scheme in ("int4", "int8", "fp8"):
        out = work / f"l4q-{scheme}"
        r = job(f"l4q quantize {scheme}", [*l4q, "quantize", "--model", str(src), "--to", scheme, "--out", str(out),
                                           "--device", "cpu", "--threads", n, "--quiet"], out, keep=scheme)
        remove(out)
        if scheme == "int4":  # what the disk allows: as many bytes, written and fsynced with no compute
            zeros = work / "zeros"
            job("dd: int4's bytes, O_DIRECT, fsynced", ["dd", "if=/dev/zero", f"of={zeros}", "bs=64M", "oflag=direct",
                                                        f"count={-(-r['written'] // 2**26)}", "conv=fsync", "status=none"],
                zeros)
            remove(zeros)
    for ftype in dict.fromkeys(("Q8_0", gguf_type)):
        out = work / f"l4q-{ftype}.gguf"
        job(f"l4q export gguf {ftype}", [*l4q, "export", "gguf", str(src), "--type", ftype, "--out", str(out),
                                         "--threads", n, "--quiet"], out, keep=ftype)
        remove(out)
    if not args.skip_llama_cpp:
        ref = llama_cpp_reference()
        bf16, quantized = work / "llama.cpp-BF16.gguf", work / f"llama.cpp-{gguf_type}.gguf"
        a = job("llama.cpp converter to BF16 GGUF",
                [py, "-c", ref.RUN_CONVERTER, str(ref.converter_dir()), str(src), "--outfile", str(bf16),
                 "--outtype", "bf16"], bf16)
        b = job(f"then llama-quantize {gguf_type}, {n} threads",
                [str(ref.quantize_tool()), str(bf16), str(quantized), gguf_type, n], quantized)
        rows.append(("llama.cpp's two programs together", {k: a[k] + b[k] for k in ("wall", "cpu", "written")}
                     | {"rss": max(a["rss"], b["rss"])}))
        remove(bf16), remove(quantized)
    scaling = {}
    for scheme, cmd_of in (("int4", lambda out: [*l4q, "quantize", "--model", str(src), "--to", "int4", "--out", str(out),
                                                 "--device", "cpu"]),
                           (gguf_type, lambda out: [*l4q, "export", "gguf", str(src), "--type", gguf_type, "--out", str(out)])):
        out = work / f"one-thread-{scheme}"
        r = job(f"l4q {scheme}, 1 thread", [*cmd_of(out), "--threads", "1", "--quiet"], out)
        scaling[scheme] = [r["wall"], digest(out) == digests[scheme]]
        remove(out)
        # --threads 1 still reads, checks and writes on other cores: the whole job on one core too
        r = job(f"l4q {scheme}, 1 thread, on one core", ["taskset", "-c", "0", *cmd_of(out), "--threads", "1", "--quiet"], out)
        scaling[scheme] += [r["wall"], digest(out) == digests[scheme]]
        remove(out)
    print_table(rows, source_size, args, scaling)
    if not all(r[1] and r[3] for r in scaling.values()):
        sys.exit("the one-thread outputs differ from the N-thread ones")


def warm_up(l4q: list, work: Path, gguf_type: str) -> None:
    """Run every l4q job once on the tiny model, untimed: numba compiles a kernel for each new
    argument type and keeps it on disk, which a user pays once per install, not per run."""
    out = work / "warm-up"
    jobs = [["quantize", "--model", "tiny", "--to", scheme, "--device", "cpu"] for scheme in ("int4", "int8", "fp8")]
    jobs += [["export", "gguf", "tiny", "--type", ftype] for ftype in dict.fromkeys(("Q8_0", gguf_type))]
    for cmd in jobs:
        done = subprocess.run([*l4q, *cmd, "--out", str(out), "--quiet"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"warm-up {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        remove(out)


def print_table(rows: list, source_size: int, args, scaling: dict) -> None:
    cp = rows[0][1]["wall"]
    cold = "; page cache dropped before each row" if args.cold else ""
    print(f"\nScout-shaped synthetic, {args.layers} MoE layers, vocabulary {args.vocab_size}, "
          f"{source_size / 1e9:.2f} GB BF16; "
          f"{psutil.cpu_count()} CPU cores, --threads {args.threads}{cold}")
    runs = f"; each row the median of {args.runs} runs (all runs' wall s in the last column)" if args.runs > 1 else ""
    print(f"| job | wall s | vs cp -r | cores busy | peak RSS GB | written GB |{' runs |' if runs else ''}")
    print(f"|---|---:|---:|---:|---:|---:|{'---|' if runs else ''}")
    for name, r in rows:
        walls = f" {' '.join(f'{w:.1f}' for w in r.get('walls', []))} |" if runs else ""  # none for a sum row
        print(f"| {name} | {r['wall']:.1f} | {r['wall'] / cp:.2f}x | {r['cpu'] / r['wall']:.2f} | "
              f"{r['rss'] / 1e9:.2f} | {r['written'] / 1e9:.2f} |{walls}")
    if runs:
        print(runs[2:])
    walls = {name: r["wall"] for name, r in rows}
    theirs = walls.get("llama.cpp's two programs together")
    if theirs:
        ours = walls[f"l4q export gguf {args.gguf_type}"]
        print(f"l4q {args.gguf_type} / llama.cpp's two programs: {ours / theirs:.2f}x")
    for scheme, (one, same, one_core, same_on_one_core) in scaling.items():
        many = walls[f"l4q quantize {scheme}" if scheme == "int4" else f"l4q export gguf {scheme}"]
        print(f"{scheme}: {args.threads} threads give {one / many:.2f}x the throughput of 1 thread and "
              f"{one_core / many:.2f}x that of the whole job on one core; bytes identical: "
              f"{'yes' if same and same_on_one_core else 'NO'}")


if __name__ == "__main__":
    main()
