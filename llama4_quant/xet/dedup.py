"""How much of an upload Xet storage would deduplicate, measured with hf_xet's own engine.

hf_xet's `local://DIR` endpoint is a real on-disk Xet store: the same content-defined chunker, chunk
hashes, xorb packing and dedup (shard) lookups as an upload to the Hub, with no network. l4q keeps
one such store (by default under the user cache), uploads the BASE into it once (recorded, so a
218 GB base is chunked only the first time), and measures OUT by uploading it into a scratch copy of
the store: the store's small index files are copied, its xorbs (immutable, content-addressed) are
hard-linked, and the copy is deleted afterwards, so a measurement never changes the store.

Per file, dedup is 1 - new_bytes / file size (hf_xet's new_bytes: chunk bytes not already stored),
computed from the real file size rather than hf_xet's totals.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import L4QError, SourceNotFoundError, UsageError
from ..outputs import PARTIAL_SUFFIX, writing

STORED_MANIFEST = "l4q-stored.json"  # files already uploaded into the store, by path, size and mtime
_XORB_DIR = Path("xet") / "xorbs" / "xorbs"
_SCRATCH = ".l4q-scratch"  # inside the store, so hard links never cross file systems
_LOCK = ".l4q-lock"


class XetStoreError(L4QError):
    """The on-disk Xet store could not be used."""


@contextmanager
def locked(store: Path):
    """One l4q process at a time per store (hf_xet's own database refuses a second opener)."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / _LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise XetStoreError(f"{store} is in use by another l4q dedup or push; wait for it or pass another --store") from None
        yield


def default_store() -> Path:
    from ..tiny_models import default_cache_root

    return default_cache_root() / "xet-store"


def upload_files(path: Path) -> list[Path]:
    """The files an upload of `path` sends: the file itself, or a directory's regular files (sorted,
    l4q's own scratch files and hidden caches skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and PARTIAL_SUFFIX not in str(p.relative_to(path)))
    root = path.resolve()
    for f in files:
        if f.is_symlink() and root not in f.resolve().parents:
            raise UsageError(f"{f} is a symlink to {f.resolve()}, outside {path}; copy the file in or remove the link")
    if not files:
        raise UsageError(f"{path}: nothing to upload (no files)")
    return files


@dataclass(frozen=True)
class FileDedup:
    name: str  # path relative to what was measured
    size: int
    new_bytes: int

    @property
    def deduped_bytes(self) -> int:
        return self.size - self.new_bytes

    @property
    def dedup(self) -> float:
        return 1 - self.new_bytes / self.size if self.size else 1.0


@dataclass
class DedupReport:
    target: str
    against: list[str]
    store: str
    files: list[FileDedup]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def new_bytes(self) -> int:
        return sum(f.new_bytes for f in self.files)

    @property
    def dedup(self) -> float:
        return 1 - self.new_bytes / self.size if self.size else 1.0

    def to_json(self) -> dict:
        return {
            "target": self.target, "against": self.against, "store": self.store,
            "files": [{"name": f.name, "size": f.size, "new_bytes": f.new_bytes, "deduped_bytes": f.deduped_bytes,
                       "dedup": f.dedup} for f in self.files],
            "total": {"size": self.size, "new_bytes": self.new_bytes, "deduped_bytes": self.size - self.new_bytes,
                      "dedup": self.dedup},
        }


def _xet_upload(store: Path, files: list[Path], desc: str, show_progress: bool) -> list[int]:
    """Upload `files` into the store at `store` in one commit; new bytes per file."""
    import hf_xet
    from tqdm import tqdm

    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              disable=not show_progress, dynamic_ncols=True) as bar:

        def on_progress(group, _items) -> None:
            bar.update(group.total_bytes_completed - bar.n)

        try:
            session = hf_xet.XetSession()
            commit = session.new_upload_commit(endpoint=f"local://{store}", progress_callback=on_progress)
            handles = [commit.start_upload_file(str(f), sha256=hf_xet.SKIP_SHA256) for f in files]
            commit.wait_to_finish()
            new = [int(h.result().dedup_metrics.new_bytes) for h in handles]
        except (OSError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise XetStoreError(f"Xet store {store}: {first}") from None
        bar.update(bar.total - bar.n)
    return new


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def ensure_stored(store: Path, files: Iterable[Path], show_progress: bool = False) -> int:
    """Upload those of `files` the store has not recorded yet (one commit); returns how many were uploaded."""
    store.mkdir(parents=True, exist_ok=True)
    manifest_path = store / STORED_MANIFEST
    try:
        stored = set(json.loads(manifest_path.read_text()))
    except (OSError, ValueError):
        stored = set()
    missing = [f for f in files if _stamp(f) not in stored]
    if missing:
        _xet_upload(store, missing, "store base", show_progress)
        stored |= {_stamp(f) for f in missing}
        tmp = manifest_path.with_name(manifest_path.name + ".tmp")
        tmp.write_text(json.dumps(sorted(stored), indent=1))
        os.replace(tmp, manifest_path)
    return len(missing)


def scratch_copy(store: Path, dst: Path) -> None:
    """A copy of the store that uploads may change: index files copied, xorbs hard-linked.

    hf_xet writes every file to a temporary name and renames it into place, and never rewrites a
    stored xorb, so the links cannot change the original store."""
    for root, dirs, names in os.walk(store):
        dirs[:] = [d for d in dirs if d != _SCRATCH]
        rel = Path(root).relative_to(store)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == _LOCK:
                continue
            src = Path(root) / name
            if rel == _XORB_DIR and not name.endswith(".tagset"):
                try:
                    os.link(src, dst / rel / name)
                except OSError as exc:
                    raise XetStoreError(f"cannot hard-link {src} into {dst} ({exc.strerror}); "
                                        "the store's file system must support hard links") from None
            else:
                shutil.copy2(src, dst / rel / name)


def measure(target: Path, against: list[Path], store: Path | None = None, show_progress: bool = False) -> DedupReport:
    """What uploading `target` would store once everything in `against` (and the store) is stored."""
    store = Path(store or default_store()).absolute()
    target = Path(target)
    target_files = upload_files(target)
    base_files = [upload_files(base) for base in against]
    root = target if target.is_dir() else target.parent
    with writing(store), locked(store):
        for files in base_files:
            ensure_stored(store, files, show_progress)
        (store / _SCRATCH).mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=store / _SCRATCH) as tmp:
            scratch = Path(tmp) / "store"
            scratch_copy(store, scratch)
            new = _xet_upload(scratch, target_files, "measure", show_progress)
    files = [FileDedup(str(f.relative_to(root)), f.stat().st_size, n) for f, n in zip(target_files, new)]
    return DedupReport(str(target), [str(b) for b in against], str(store), files)
