"""Models straight from the Hugging Face Hub, with bounded disk.

A repo that is complete in the local Hugging Face cache is used in place, with no network. Any other
is opened from the Hub: the revision is resolved to a commit, the small files (config, tokenizer,
index, processor files) are downloaded into the cache, and each shard's safetensors header is read
with a range request, so the model validates and plans exactly as a local one does. The walk then has
the shards downloaded (`hf_hub_download`, which goes through hf_xet for Xet-backed repos) in the order
it reads them, ahead of the reader within a budget of (prefetch + 1) x the largest shard, checks each
against the sha256 the Hub publishes, and deletes each after its last read unless `keep_source`.

The shards l4q downloaded to delete are recorded (under l4q's cache), so a run killed between a
download and its deletion leaves them to the rerun to verify, use and delete; shards that were in the
cache before are never deleted. Nothing here prints or logs the token.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from .errors import CorruptCheckpointError, DiskSpaceError, HubError

# Top-level files a model needs besides its weights (never `original/`, Meta's consolidated .pth copy).
SMALL_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "LICENSE*", "USE_POLICY*")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HEADER_PROBE = 1 << 20  # bytes asked for first: most safetensors headers fit


@dataclass(frozen=True)
class HubOptions:
    """How a Hub model is fetched: `prefetch` shards download ahead of the one being read; with
    `keep_source` they stay in the Hugging Face cache afterwards."""

    prefetch: int = 1
    keep_source: bool = False
    revision: str | None = None
    show_progress: bool = True


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The repo's snapshot in the local cache when it holds the config and every shard, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=list(SMALL_FILES)))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return path if (path / "config.json").is_file() and all((path / f).is_file() for f in _shard_names(path)) else None


def _shard_names(snapshot: Path) -> list[str]:
    """The shard files the snapshot's index names (or the single file), [] when it names none."""
    try:
        return sorted(set(json.loads((snapshot / INDEX_NAME).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [SINGLE_NAME] if (snapshot / SINGLE_NAME).exists() else []


def blob_digests(snapshot: Path) -> dict[str, str]:
    """sha256 by file name for the snapshot's LFS files: the cache names their blobs by it."""
    digests = {}
    for link in snapshot.glob("*.safetensors"):
        blob = os.path.basename(os.readlink(link)) if link.is_symlink() else ""
        if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
            digests[link.name] = blob
    return digests


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, file: str | None = None) -> Iterator[None]:
    """huggingface_hub's and the network's exceptions as one line that says what to do (never the token)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, *_network_errors()) as exc:
        raise _one_line(exc, repo_id, revision, file) from None
    except OSError as exc:
        what = f"{repo_id}/{file}" if file else repo_id
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(f"disk full while downloading {what}; free some space, then rerun with --resume") from None
        if exc.errno is None:  # huggingface_hub's size consistency check, after its own retries
            raise HubError(f"download of {what} failed ({str(exc).splitlines()[0]}); rerun with --resume") from None
        raise


def _network_errors() -> tuple[type, ...]:
    try:
        import httpx2 as httpx  # what huggingface_hub 2 uses
    except ImportError:
        import httpx
    return httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError, httpx.NetworkError


def _one_line(exc: BaseException, repo_id: str, revision: str | None, file: str | None) -> HubError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}/{file}" if file else repo_id
    if isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, HfHubHTTPError):
        exc = exc.__cause__  # a refused HEAD request that huggingface_hub reports as "not in the cache"
    if isinstance(exc, GatedRepoError):
        return HubError(f"{repo_id} is gated and this account has no access: accept its license on "
                        f"{constants.ENDPOINT}/{repo_id}, then log in with `hf auth login`")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{repo_id}: no such model repo on the Hub (a private one needs `hf auth login` with access)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id}: no revision {revision!r} (give a branch, tag or commit of the repo)")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"{what}: not in the repo at this revision, though the repo's index names it")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return HubError("the Hub rejected the Hugging Face token (invalid or expired): log in again with "
                            "`hf auth login`, or fix HF_TOKEN")
        if status == 403:
            return HubError(f"{repo_id}: this token may not read the repo (a fine-grained token needs read access "
                            "to it); create one that has, then `hf auth login`")
        return HubError(f"{what}: the Hub answered HTTP {status}; try again later (rerun with --resume)")
    return HubError(f"cannot reach the Hub at {constants.ENDPOINT} for {what}; check the network (or set "
                    "HF_ENDPOINT), then rerun with --resume")


def open_repo(repo_id: str, options: HubOptions) -> tuple[Path, RemoteShards | None, dict[str, str]]:
    """(snapshot directory, the shards still to fetch or None, sha256 by shard name) for a Hub repo:
    from the cache when it is complete there, else from the Hub (small files downloaded first)."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    snapshot = cached_snapshot(repo_id, options.revision)
    # Complete in the cache: used in place, without network; unless it holds shards that an interrupted
    # run downloaded to delete, which the Hub path verifies, uses and deletes.
    offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if snapshot is not None and (offline or not OwnedRecord(snapshot).names):
        return snapshot, None, blob_digests(snapshot)
    if offline:
        raise HubError(f"{repo_id} is not completely in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                       f"unset it to have l4q download the model, or download it first with `hf download {repo_id}`")
    with hub_errors(repo_id, options.revision):
        info = HfApi().model_info(repo_id, revision=options.revision, files_metadata=True)
        top = {s.rfilename: s for s in info.siblings or [] if "/" not in s.rfilename}
        small = sorted(n for n in top if any(fnmatch(n, p) for p in SMALL_FILES))
        if "config.json" not in small:
            raise HubError(f"{repo_id}: the repo has no config.json; is it a transformers model?")
        for name in small:
            snapshot = Path(hf_hub_download(repo_id, name, revision=info.sha, tqdm_class=_Silent)).parent
    _record_ref(snapshot, options.revision or "main", info.sha)
    shards = {}
    for name in _shard_names(snapshot):
        sibling = top.get(name)
        if sibling is None:
            raise CorruptCheckpointError(f"{repo_id}: the index names shard {name}, which the repo does not hold")
        if sibling.lfs is None or not getattr(sibling.lfs, "sha256", None):
            raise HubError(f"{repo_id}/{name}: the Hub publishes no sha256 for it, so its download cannot be checked")
        shards[name] = RemoteFile(name, int(sibling.size), sibling.lfs.sha256)
    remote = RemoteShards(repo_id, info.sha, snapshot, shards, options)
    return snapshot, remote, {n: f.sha256 for n, f in shards.items()}


def _record_ref(snapshot: Path, revision: str, commit: str) -> None:
    """Point the cache's ref for `revision` at `commit`, as a download by revision name would: the
    files were fetched by commit (one consistent revision), and a later run finds them by name."""
    if revision != commit:
        ref = snapshot.parent.parent / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


class _Silent:
    """A progress bar class for huggingface_hub that shows nothing (and, with `sink`, counts bytes)."""

    sink = None

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        if self.sink is not None:
            self.sink(n)

    def close(self) -> None:
        pass


class RemoteShards:
    """The safetensors shards of one Hub commit that this run fetches (those not already in the cache).

    `header(name)` and `size(name)` describe a shard before it is downloaded; `stream(uses)` fetches
    them for a reader that takes them in the order `uses`; `fetch_all()` downloads and keeps all of
    them (for the commands that read the model more than once)."""

    def __init__(self, repo_id: str, commit: str, snapshot: Path, shards: dict[str, RemoteFile], options: HubOptions):
        self.repo_id, self.commit, self.snapshot, self.shards, self.options = repo_id, commit, snapshot, shards, options
        self.owned = OwnedRecord(snapshot)
        self._pending = {n for n in shards if n in self.owned.names or not (snapshot / n).is_file()}
        self.downloaded_bytes = 0  # received over the network by this run
        self.peak_bytes = 0  # most bytes of fetched shards on disk at once
        self.kept = options.keep_source

    def pending(self, name: str) -> bool:
        return name in self._pending

    def size(self, name: str) -> int:
        return self.shards[name].size

    def header(self, name: str) -> bytes:
        """The shard's first bytes, through its header (two range requests at most)."""
        from .checkpoint import header_length

        head = self._range(name, 0, min(HEADER_PROBE, self.size(name)))
        need = 8 + header_length(head, self.size(name), f"{self.repo_id}/{name}")
        if need > len(head):
            head += self._range(name, len(head), need)
        return head[:need]

    def _range(self, name: str, start: int, stop: int) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        with hub_errors(self.repo_id, self.commit, name):
            response = get_session().get(hf_hub_url(self.repo_id, name, revision=self.commit),
                                         headers={**build_hf_headers(), "Range": f"bytes={start}-{stop - 1}"},
                                         follow_redirects=True)
            hf_raise_for_status(response)
        data = response.content
        if response.status_code == 200:  # the server ignored the range
            data = data[start:stop]
        if len(data) != stop - start:
            raise HubError(f"{self.repo_id}/{name}: the Hub sent {len(data)} bytes for a {stop - start}-byte range; "
                           "try again (rerun with --resume)")
        return data

    def fetch(self, name: str, progress=None) -> Path:
        """Download one shard into the cache (not yet checked: see `verify`)."""
        from huggingface_hub import hf_hub_download

        counter = type("_Counting", (_Silent,), {"sink": staticmethod(self._received(progress))})
        with hub_errors(self.repo_id, self.commit, name):
            return Path(hf_hub_download(self.repo_id, name, revision=self.commit, tqdm_class=counter))

    def _received(self, progress):
        def sink(n: int) -> None:
            self.downloaded_bytes += n
            if progress is not None:
                progress(n)
        return sink

    def verify(self, name: str, path: Path) -> None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != self.shards[name].sha256:
            self.remove(name)
            raise HubError(f"{self.repo_id}/{name}: the download does not match the sha256 the Hub publishes for "
                           "it; removed it, rerun with --resume to fetch it again")

    def remove(self, name: str) -> None:
        """Delete a fetched shard: the cache's link and the blob it points to."""
        link = self.snapshot / name
        blob = link.resolve() if link.is_symlink() else None
        link.unlink(missing_ok=True)
        if blob is not None:
            blob.unlink(missing_ok=True)
        self.owned.discard(name)

    def remove_stale_partials(self, name: str) -> None:
        """Delete what a killed run left of a download (huggingface_hub downloads into a file unique to
        the process, which a later process never resumes)."""
        for partial in (self.snapshot.parent.parent / "blobs").glob(f"{self.shards[name].sha256}.*.incomplete"):
            partial.unlink(missing_ok=True)

    def stream(self, uses: list[str]) -> ShardStream:
        return ShardStream(self, uses)

    def fetch_all(self) -> None:
        """Download every pending shard and keep it: for work that reads the model more than once."""
        self.kept = True
        need_free_space([(self.snapshot, sum(self.size(n) for n in self._pending) - self._present_bytes())])
        with _download_bar(self.options.show_progress, sum(self.size(n) for n in self._pending)) as bar:
            for name in sorted(self._pending):
                self.owned.discard(name)
                self.verify(name, self.fetch(name, bar.update))
                self._pending.discard(name)

    def budget(self, uses: list[str]) -> tuple[int, int]:
        """(the download budget, the most bytes one point of the reading needs at once) for a reader
        taking shards in the order `uses`: source on disk stays within the larger of the two."""
        sizes = {n: self.size(n) for n in uses if n in self._pending}
        return (self.options.prefetch + 1) * max(sizes.values(), default=0), needed_at_once(uses, sizes)

    def check_space(self, uses: list[str], outputs: list[tuple[Path, int]]) -> None:
        """Refuse to start without free disk for the source in flight (in the cache) plus the outputs."""
        need_free_space([(self.snapshot, max(self.budget(uses)) - self._present_bytes()), *outputs])

    def _present_bytes(self) -> int:
        """Bytes of the pending shards already on disk (left by an interrupted run)."""
        return sum(self.size(n) for n in self._pending if (self.snapshot / n).is_file())


def needed_at_once(uses: list[str], sizes: dict[str, int]) -> int:
    """The most bytes of shards (those in `sizes`) a reader taking them in the order `uses` needs on
    disk together: a shard is needed from its first read to its last, so a MoE layer whose two fused
    expert tensors lie in two shards needs both at once."""
    first, last = {}, {}
    for i, name in enumerate(uses):
        if name in sizes:
            first.setdefault(name, i)
            last[name] = i
    points = sorted(set(first.values()))
    return max((sum(sizes[n] for n in first if first[n] <= i <= last[n]) for i in points), default=0)


def need_free_space(needs: list[tuple[Path, int]]) -> None:
    """Each (path, bytes) asks for that much free space on path's file system, summed per file system."""
    by_device: dict[int, tuple[Path, int]] = {}
    for path, nbytes in needs:
        where = Path(path).absolute()
        while not where.exists():
            where = where.parent
        dev = where.stat().st_dev
        by_device[dev] = (by_device.get(dev, (where, 0))[0], by_device.get(dev, (where, 0))[1] + max(nbytes, 0))
    for where, nbytes in by_device.values():
        free = shutil.disk_usage(where).free
        if free < nbytes:
            raise DiskSpaceError(f"{where}: {free / 1e9:.2f} GB free, this run needs {nbytes / 1e9:.2f} GB there "
                                 "(source shards in flight plus the output); free some space, lower --prefetch "
                                 "or point HF_HUB_CACHE / --out elsewhere")


@contextmanager
def _download_bar(show: bool, total: int):
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="download", disable=not show,
              dynamic_ncols=True, position=1, leave=False) as bar:
        yield bar


class ShardStream:
    """Shards fetched on a thread for a reader that takes them in the order `uses` (one entry per
    read): `acquire(name)` waits for a shard, `release(name)` follows each read of it; after its last
    read a shard l4q downloaded is deleted (unless kept). A download starts when it fits the budget
    with the shards on disk, or when the reader waits for it; its sha256 is checked on a second
    thread while the next one downloads."""

    def __init__(self, remote: RemoteShards, uses: list[str]):
        self.remote = remote
        pending = remote._pending
        self.left = Counter(n for n in uses if n in pending)
        self.order = list(dict.fromkeys(n for n in uses if n in pending))
        self.budget, _ = remote.budget(uses)
        self.cond = threading.Condition()
        self.ready: dict[str, BaseException | None] = {}
        self.waiting_for: str | None = None
        self.stop = False
        self.on_disk = 0
        for name in list(remote.owned.names):
            remote.remove_stale_partials(name)
            if name not in self.left and name in pending:  # fetched by an earlier run that no longer needs it
                remote.remove(name)
        self.threads = [threading.Thread(target=self._download, name="l4q-download", daemon=True),
                        threading.Thread(target=self._verify, name="l4q-verify", daemon=True)]
        self.downloaded: list[str | None] = []  # handed from the download thread to the verifier

    def __enter__(self) -> ShardStream:
        total = sum(self.remote.size(n) for n in self.order)
        self._bar_cm = _download_bar(self.remote.options.show_progress and total > 0, total)
        self.bar = self._bar_cm.__enter__()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self._bar_cm.__exit__(None, None, None)

    def _fits(self, name: str) -> bool:
        size = self.remote.size(name)
        return self.stop or self.on_disk == 0 or self.on_disk + size <= self.budget or self.waiting_for == name

    def _download(self) -> None:
        remote = self.remote
        for name in self.order:
            with self.cond:
                self.cond.wait_for(lambda: self._fits(name))
                if self.stop:
                    return
                self.on_disk += remote.size(name)
                remote.peak_bytes = max(remote.peak_bytes, self.on_disk)
            if not remote.kept:
                remote.owned.add(name)
            elif name in remote.owned.names:
                remote.owned.discard(name)
            try:
                remote.fetch(name, self.bar.update)
            except BaseException as exc:  # handed to the reader, which raises it
                self._done(name, exc)
                return
            with self.cond:
                self.downloaded.append(name)
                self.cond.notify_all()
        with self.cond:
            self.downloaded.append(None)
            self.cond.notify_all()

    def _verify(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stop or self.downloaded)
                if self.stop:
                    return
                name = self.downloaded.pop(0)
            if name is None:
                return
            try:
                self.remote.verify(name, self.remote.snapshot / name)
                self._done(name, None)
            except BaseException as exc:
                self._done(name, exc)
                return

    def _done(self, name: str, error: BaseException | None) -> None:
        with self.cond:
            self.ready[name] = error
            self.cond.notify_all()

    def acquire(self, name: str) -> None:
        if name not in self.left:
            return  # in the cache before this run
        with self.cond:
            self.waiting_for = name
            self.cond.notify_all()
            self.cond.wait_for(lambda: name in self.ready)
            self.waiting_for = None
            error = self.ready[name]
        if error is not None:
            raise error

    def release(self, name: str) -> None:
        if name not in self.left:
            return
        self.left[name] -= 1
        if self.left[name]:
            return
        remote = self.remote
        remote._pending.discard(name)
        if not remote.kept:
            remote.remove(name)
        with self.cond:
            if not remote.kept:
                self.on_disk -= remote.size(name)
            self.cond.notify_all()


class OwnedRecord:
    """The shards of one cached snapshot that l4q downloaded to delete after use, kept in a small
    JSON file under l4q's cache: a rerun after a kill knows they are its own to use and delete."""

    def __init__(self, snapshot: Path):
        from .tiny_models import default_cache_root

        key = hashlib.sha256(str(snapshot.absolute()).encode()).hexdigest()[:24]
        self.path = default_cache_root() / "hub-downloads" / f"{key}.json"
        try:
            self.names = set(json.loads(self.path.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            self.names = set()
        self.snapshot = snapshot
        self.lock = threading.Lock()  # the download thread adds, the reader discards

    def add(self, name: str) -> None:
        with self.lock:
            self.names.add(name)
            self._save()

    def discard(self, name: str) -> None:
        with self.lock:
            if name in self.names:
                self.names.discard(name)
                self._save()

    def _save(self) -> None:
        if not self.names:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"snapshot": str(self.snapshot), "files": sorted(self.names)}))
        os.replace(tmp, self.path)
