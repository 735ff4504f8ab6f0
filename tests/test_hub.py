"""Quantizing straight from the Hub: through huggingface_hub against a local Hub (tests/fake_hub.py)
serving `tiny` re-cut into 9 shards. Every run is the real CLI in a subprocess with HF_ENDPOINT,
HF_HUB_CACHE and l4q's cache pointed at the test's own directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_hub import FakeHub
from llama4_quant.checkpoint import Checkpoint, read_tensor, split_in_order, write_index, write_safetensors
from llama4_quant.hub import needed_at_once
from llama4_quant.tiny_models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "meta-test/tiny-l4"
TOKEN = "hf_testtoken_do_not_print_0123456789"
SHARD_BYTES = 4_000_000


def reshard(src: Path, dst: Path, max_bytes: int) -> Path:
    """A copy of `src` with its tensors, in order, cut into shards of at most `max_bytes`."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    ckpt = Checkpoint(src)
    groups = split_in_order(ckpt.tensors, lambda t: t.nbytes, max_bytes)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(dst / name, {t.name: read_tensor(t) for t in group})
        weight_map.update(dict.fromkeys((t.name for t in group), name))
    write_index(dst, weight_map, ckpt.total_bytes)
    return dst


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    repo = reshard(tiny_model_dir(), tmp_path_factory.mktemp("hub") / "tiny-l4", SHARD_BYTES)
    assert len(list(repo.glob("*.safetensors"))) >= 6
    return repo


@pytest.fixture
def hub(hub_repo):
    with FakeHub({REPO_ID: hub_repo, "meta-test/gated": hub_repo}, tokens=(TOKEN,)) as server:
        server.gated.add("meta-test/gated")
        yield server


def l4q(args: list[str], hub: FakeHub | None, tmp: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=hub_env(hub, tmp, **env),
                          capture_output=True, text=True, timeout=600)


def hub_env(hub: FakeHub | None, tmp: Path, **env) -> dict:
    """The environment of a run against `hub`, with the test's own caches."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")}
    return {**base, "HF_HUB_CACHE": str(tmp / "hf"), "L4Q_CACHE": str(tmp / "l4q"), "HF_TOKEN": TOKEN,
            **({"HF_ENDPOINT": hub.url} if hub else {}), **env}


def start_l4q(args: list[str], hub: FakeHub, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=hub_env(hub, tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("l4q: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    return errors[0]


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def blob_sizes(tmp: Path) -> dict[str, int]:
    """Size by name of the shard-sized blobs (complete or being downloaded) in the test's Hugging Face
    cache; a blob deleted while it is listed is skipped."""
    sizes = {}
    for p in (tmp / "hf" / f"models--{REPO_ID.replace('/', '--')}" / "blobs").glob("*"):
        try:
            sizes[p.name] = p.stat().st_size
        except FileNotFoundError:
            continue
    return {name: size for name, size in sizes.items() if size > 1_000_000}


def shard_blobs(tmp: Path) -> list[str]:
    return sorted(blob_sizes(tmp))


class DiskSampler:
    """Samples the bytes of shard blobs on disk every few milliseconds while a run goes on."""

    def __init__(self, tmp: Path):
        self.tmp, self.peak, self.samples, self.stop = tmp, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, sum(blob_sizes(self.tmp).values()))
            self.samples += 1
            time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


QUANTIZE = ["quantize", "--model", REPO_ID, "--to", "int4", "--gguf", "Q4_K_M", "--max-shard-size", "3MB"]


@pytest.fixture(scope="module")
def local_outputs(hub_repo, tmp_path_factory) -> Path:
    """The same targets from the local directory: the reference bytes."""
    out = tmp_path_factory.mktemp("local")
    result = l4q([*QUANTIZE[:2], str(hub_repo), *QUANTIZE[3:], "--out-dir", str(out), "--quiet"], None, out)
    assert result.returncode == 0, result.stderr
    return out


def hub_outputs_match_local(out: Path, local: Path) -> None:
    """Tensor shards, index and configs equal the local run's; the recipe and GGUF metadata name the
    source (the repo id here, the directory there), so those are compared to a cache run instead."""
    for name in sorted(p.name for p in (local / "tiny-l4-int4").iterdir()):
        if name != "l4q_recipe.json":
            assert (out / "tiny-l4-int4" / name).read_bytes() == (local / "tiny-l4-int4" / name).read_bytes(), name
    from gguf import GGUFReader

    ours, theirs = GGUFReader(out / "tiny-l4-Q4_K_M.gguf"), GGUFReader(local / "tiny-l4-Q4_K_M.gguf")
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data), a.name


def test_shards_needed_at_once():
    sizes = {"a": 4, "b": 3, "c": 2}
    assert needed_at_once(["a", "a", "b", "b", "c"], sizes) == 4
    assert needed_at_once(["a", "b", "a", "b", "c"], sizes) == 7  # a MoE layer's experts across two shards
    assert needed_at_once(["a", "b", "c", "a"], sizes) == 7  # b is done before c is needed
    assert needed_at_once(["a", "b", "c", "b", "a"], sizes) == 9
    assert needed_at_once(["a", "b", "a"], {"b": 3}) == 3  # shards already cached take no disk


def test_hub_run_is_byte_identical_and_the_kept_cache_serves_a_second_run(hub, hub_repo, local_outputs, tmp_path):
    out = tmp_path / "out"
    result = l4q([*QUANTIZE, "--out-dir", str(out), "--keep-source"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "downloaded" in result.stdout and "kept in the Hugging Face cache" in result.stdout
    assert sorted(hub.downloads()) == sorted(p.name for p in hub_repo.glob("*.safetensors"))
    hub_outputs_match_local(out, local_outputs)

    hub.log.clear()
    again = tmp_path / "again"
    result = l4q([*QUANTIZE, "--out-dir", str(again)], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert hub.log == [] and "downloaded" not in result.stdout  # the complete cache, used in place
    for name in ("tiny-l4-int4", "tiny-l4-Q4_K_M.gguf"):
        if (out / name).is_dir():
            same_files(out / name, again / name)
        else:
            assert (out / name).read_bytes() == (again / name).read_bytes()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_source_on_disk_stays_within_prefetch_plus_one_shards(hub, hub_repo, local_outputs, tmp_path, prefetch):
    hub.bytes_per_second = 20e6  # slow enough for the sampler to see every shard on disk
    out = tmp_path / "out"
    with DiskSampler(tmp_path) as disk:
        result = l4q([*QUANTIZE, "--out-dir", str(out), "--prefetch", str(prefetch)], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert disk.samples > 100 and not disk.thread.is_alive()
    largest = max(p.stat().st_size for p in hub_repo.glob("*.safetensors"))
    print(f"prefetch {prefetch}: peak {disk.peak} bytes of shards on disk, bound {(prefetch + 1) * largest}")
    assert largest < disk.peak <= (prefetch + 1) * largest
    assert shard_blobs(tmp_path) == []  # each deleted after its last read
    assert not list((tmp_path / "l4q" / "hub-downloads").glob("*.json"))
    hub_outputs_match_local(out, local_outputs)


def test_a_corrupt_shard_is_refused_and_removed(hub, hub_repo, local_outputs, tmp_path):
    bad = sorted(p.name for p in hub_repo.glob("*.safetensors"))[3]
    hub.corrupt.add(bad)
    out = tmp_path / "out"
    line = one_line_failure(l4q([*QUANTIZE, "--out-dir", str(out)], hub, tmp_path))
    assert bad in line and "sha256" in line and "--resume" in line
    assert not (out / "tiny-l4-int4").exists() and not (out / "tiny-l4-Q4_K_M.gguf").exists()
    snapshot = next((tmp_path / "hf" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots").iterdir())
    assert not (snapshot / bad).exists() and len(shard_blobs(tmp_path)) <= 2
    hub.corrupt.clear()
    result = l4q([*QUANTIZE, "--out-dir", str(out), "--resume"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    hub_outputs_match_local(out, local_outputs)


def test_a_dropped_connection_resumes_where_it_stopped(hub, hub_repo, local_outputs, tmp_path):
    shards = sorted(p.name for p in hub_repo.glob("*.safetensors"))
    hub.cut_after[shards[5]] = 1 << 20  # the network goes down 1 MiB into the sixth shard
    out = tmp_path / "out"
    line = one_line_failure(l4q([*QUANTIZE, "--out-dir", str(out)], hub, tmp_path))
    assert "--resume" in line, line
    assert not (out / "tiny-l4-int4").exists() and not (out / "tiny-l4-Q4_K_M.gguf").exists()
    first = hub.downloads()
    hub.cut_after.clear()
    hub.down = False
    hub.log.clear()
    result = l4q([*QUANTIZE, "--out-dir", str(out), "--resume"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    again = hub.downloads()
    assert shards[5] in again and len(again) < len(shards), (first, again)  # finished output is not redone
    # huggingface_hub resumes a dropped transfer only within one process (to a process-unique file):
    # the rerun fetches the shard again, and no stale partial download stays in the cache
    assert not list((tmp_path / "hf").rglob("*.incomplete"))
    hub_outputs_match_local(out, local_outputs)


def test_kill_9_mid_run_then_resume(hub, hub_repo, local_outputs, tmp_path):
    hub.bytes_per_second = 10e6
    out = tmp_path / "out"
    proc = start_l4q([*QUANTIZE, "--out-dir", str(out), "--quiet"], hub, tmp_path)
    deadline = time.monotonic() + 120
    while not (len(hub.downloads()) >= 4 and list((tmp_path / "hf").rglob("*.incomplete"))) \
            and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # killed mid-shard: one download half done
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "tiny-l4-int4").exists() and not (out / "tiny-l4-Q4_K_M.gguf").exists()
    hub.bytes_per_second = None
    result = l4q([*QUANTIZE, "--out-dir", str(out), "--resume"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    hub_outputs_match_local(out, local_outputs)
    assert shard_blobs(tmp_path) == []  # what the killed run downloaded was deleted by the rerun
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


def test_inspect_reads_only_headers_until_asked_for_values(hub, hub_repo, tmp_path):
    result = l4q(["inspect", REPO_ID, "--json"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert hub.downloads() == [] and shard_blobs(tmp_path) == []
    # --check-values reads every byte, as calibrate and eval do: the whole repo is downloaded and kept
    result = l4q(["inspect", REPO_ID, "--check-values"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(hub.downloads()) == sorted(p.name for p in hub_repo.glob("*.safetensors"))
    assert len(shard_blobs(tmp_path)) == len(hub.downloads())
    hub.log.clear()
    assert l4q(["inspect", REPO_ID, "--check-values"], hub, tmp_path).returncode == 0 and hub.log == []


ERRORS = {
    "gated": (["quantize", "--model", "meta-test/gated", "--to", "int4"], {}, ("gated", "hf auth login")),
    "bad token": (QUANTIZE, {"HF_TOKEN": "hf_expired_token_abcdef0123456789"}, ("token", "hf auth login")),
    "no such repo": (["quantize", "--model", "meta-test/nope", "--to", "int4"], {}, ("no such model repo",)),
    "no such revision": ([*QUANTIZE, "--revision", "v9"], {}, ("no revision 'v9'",)),
    "offline": (QUANTIZE, {"HF_HUB_OFFLINE": "1"}, ("HF_HUB_OFFLINE=1",)),
    "no network": (QUANTIZE, {"HF_ENDPOINT": "http://127.0.0.1:9"}, ("cannot reach the Hub",)),
}


@pytest.mark.parametrize("case", ERRORS)
def test_hub_errors_are_one_line(case, hub, tmp_path):
    args, env, words = ERRORS[case]
    out = tmp_path / "out"
    line = one_line_failure(l4q([*args, "--out-dir", str(out)], hub, tmp_path, **env))
    assert all(w in line for w in words), line
    assert not out.exists() or not any(out.iterdir())
    assert shard_blobs(tmp_path) == []


def test_not_enough_disk_is_refused_before_starting(hub, tmp_path):
    """The cache on an 6 MB file system cannot hold 2 shards of 4 MB: refused before any download."""
    cache = tmp_path / "hf"
    cache.mkdir()
    env = " ".join(f"{k}='{v}'" for k, v in {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": cache, "HF_TOKEN": TOKEN,
                                             "L4Q_CACHE": tmp_path / "l4q"}.items())
    script = (f"mount -t tmpfs -o size=6m tmpfs {cache} || exit 99; env {env} {sys.executable} -m cli.main "
              f"{' '.join(QUANTIZE)} --out-dir {tmp_path / 'out'}")
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    line = one_line_failure(result)
    assert "GB free" in line and "--prefetch" in line, line
    assert hub.downloads() == [] and not (tmp_path / "out").exists()
