"""Quantizing straight from the Hub: does the download overlap the quantization, and does the source
on disk stay within (prefetch + 1) shards?

A local Hub (tests/fake_hub.py, the same server the tests use) serves the Scout-shaped synthetic
checkpoint at a paced rate standing for the network. Rows, in one run on the same input: the
download alone (`hf_hub_download` of each shard into an empty cache), `l4q quantize --to int4` from the local
directory, and `l4q quantize --to int4` from the Hub for each --prefetch, with wall time, cores busy,
bytes downloaded and the peak of shard bytes in the Hugging Face cache (sampled every 10 ms). Without
overlap the Hub run would take download + quantize; with it, about the longer of the two plus one
shard. The Hub outputs are checked byte-identical to the local one's model shards.

    python benchmarks/hub_stream.py --layers 2 --rate 250MB --workdir /tmp/l4q-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.quantize_memory import ensure_checkpoint  # noqa: E402
from benchmarks.speed import run_job  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from llama4_quant.hub import needed_at_once  # noqa: E402
from llama4_quant.model import open_model  # noqa: E402
from llama4_quant.sources import Source  # noqa: E402
from llama4_quant.walk import reads  # noqa: E402

REPO_ID = "bench/scout-synthetic"


def blob_bytes(cache: Path) -> int:
    total = 0
    for p in cache.rglob("blobs/*"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def sampled(job, cache: Path) -> tuple[dict, int]:
    """Run `job()` while sampling the bytes in the cache's blobs; (its result, the peak)."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], blob_bytes(cache))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = job()
    finally:
        stop.set()
        thread.join()
    return result, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rate", default="250MB", help="the paced download rate, bytes per second (e.g. 250MB)")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/l4q-bench"))
    args = parser.parse_args()
    from cli.main import parse_size

    rate = parse_size(args.rate)
    source = ensure_checkpoint(args.workdir, args.layers)
    shards = sorted(source.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    work = args.workdir / "hub-stream"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    with FakeHub({REPO_ID: source}) as hub:
        hub.repo_info(REPO_ID)  # the server hashes the shards once, before any timing
        hub.bytes_per_second = rate
        env = {**os.environ, "HF_ENDPOINT": hub.url, "L4Q_CACHE": str(work / "l4q")}

        def run(name: str, cmd: list[str], cache: Path, out: Path | None = None) -> None:
            os.environ.update({**env, "HF_HUB_CACHE": str(cache)})
            result, peak = sampled(lambda: run_job(cmd), cache)
            rows.append((name, result, peak))
            print(f"# {name}: {result['wall']:.1f} s", flush=True)

        py = sys.executable
        names = [p.name for p in shards]
        run("download only (hf_hub_download, shard by shard)", [py, "-c", "from huggingface_hub import hf_hub_download; "
            f"[hf_hub_download({REPO_ID!r}, name) for name in {names!r}]"], work / "hf-download")
        shutil.rmtree(work / "hf-download")
        run("l4q quantize int4, local directory", [py, "-m", "cli.main", "quantize", "--model", str(source), "--to",
            "int4", "--out", str(work / "local-int4"), "--quiet"], work / "hf-none")
        for prefetch in args.prefetch:
            out = work / f"hub-int4-p{prefetch}"
            run(f"l4q quantize int4 from the Hub, --prefetch {prefetch}", [py, "-m", "cli.main", "quantize", "--model",
                REPO_ID, "--to", "int4", "--out", str(out), "--prefetch", str(prefetch), "--quiet"],
                work / f"hf-p{prefetch}")
            for f in (work / "local-int4").glob("model*.safetensors"):
                assert (out / f.name).read_bytes() == f.read_bytes(), f"{out / f.name} differs from the local run's"
    uses = [r.info.file.name for r in reads(open_model(Source(source, source.name)))]
    at_once = needed_at_once(uses, {p.name: p.stat().st_size for p in shards})
    print_table(rows, source, shards, largest, at_once, rate)


def print_table(rows, source: Path, shards: list[Path], largest: int, at_once: int, rate: int) -> None:
    total = sum(p.stat().st_size for p in shards)
    print(f"\nsource: {source.name}, {len(shards)} shards, {total / 1e9:.2f} GB (largest {largest / 1e9:.2f} GB, "
          f"{at_once / 1e9:.2f} GB needed at once by one MoE layer); Hub paced at {rate / 1e6:.0f} MB/s; "
          f"{psutil.cpu_count()} cores\n")
    print("| job | wall s | cores busy | peak shard bytes in the cache | bound: max((prefetch + 1) x largest, needed at once) |")
    print("|---|---:|---:|---:|---:|")
    for name, r, peak in rows:
        bound = ""
        if "--prefetch" in name:
            bound = f"{max((int(name.rsplit(' ', 1)[1]) + 1) * largest, at_once) / 1e9:.2f} GB"
        print(f"| {name} | {r['wall']:.1f} | {r['cpu'] / r['wall']:.2f} | {peak / 1e9:.2f} GB | {bound} |")
    download, local = rows[0][1]["wall"], rows[1][1]["wall"]
    for name, r, _ in rows[2:]:
        print(f"\n{name}: {r['wall'] / (download + local):.2f}x of download + quantize "
              f"({download + local:.1f} s), {r['wall'] / max(download, local):.2f}x of the longer of the two")


if __name__ == "__main__":
    main()
