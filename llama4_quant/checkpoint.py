"""Streaming safetensors I/O: a validating reader of sharded checkpoints and a shard writer.

The reader parses headers itself and reads tensors (or one expert's slice of a fused tensor) into
fresh memory with positioned reads, or, for the walk, which drops each slice after use, past the
page cache into recycled buffers, or maps a slice whose pages are in the page cache already (see
FRESH, STREAMED, MAPPED below): resident memory stays what is in flight. The writer knows every
tensor of a shard up front, writes the header first and then appends each tensor's bytes as it
arrives, so a shard is never held in memory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from . import outputs
from .errors import CorruptCheckpointError, NonFiniteWeightError, SourceNotFoundError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> (torch dtype's name, bytes per element). torch itself is imported where
# tensors are made, so that opening and validating a checkpoint stays fast.
DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "I16": ("int16", 2),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
FINGERPRINT_SAMPLE = 64 * 1024  # bytes digested at the start, middle and end of every tensor


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name][0])


@cache
def torch_to_st() -> dict:
    """torch dtype -> safetensors dtype name."""
    return {torch_dtype(name): name for name in DTYPES}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: enough to read it, or any slice along dim 0, later."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset of the first byte in `file`
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (entries, absolute data start).

    Catches truncation (data shorter than the header promises), garbage headers, overlapping or
    gapped tensors and sizes that disagree with shapes, before anything is written anywhere.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            header_len = header_length(head, size, path)
            raw = f.read(header_len)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(raw, size, path)


def header_length(head: bytes, size: int, where) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes (the file being `size` bytes)."""
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CorruptCheckpointError(
            f"{where}: corrupt or truncated safetensors file (header length {header_len}, file {size} bytes)"
        )
    return header_len


def parse_header(raw: bytes, size: int, where) -> tuple[dict, int]:
    """Validate the JSON header `raw` of a `size`-byte safetensors file (read from disk, or fetched
    from the Hub before the file itself); returns (entries, absolute data start)."""
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_start = 8 + len(raw)
    data_len = size - data_start
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            itemsize = DTYPES[dtype][1]
            if not all(_is_count(v) for v in (begin, end, *shape)):
                raise TypeError("offsets and dimensions must be non-negative integers")
            numel = math.prod(shape)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CorruptCheckpointError(f"{where}: corrupt header entry for tensor {name!r}") from None
        if end - begin != numel * itemsize or begin < 0:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}")
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} does not follow the previous one (gap or overlap)")
        expected = end
    if expected > data_len:
        raise CorruptCheckpointError(
            f"{where}: truncated safetensors file (header promises {expected} bytes of data, file holds {data_len})"
        )
    if expected < data_len:
        raise CorruptCheckpointError(f"{where}: {data_len - expected} unexpected trailing bytes after the tensors")
    return header, data_start


def _is_count(v) -> bool:
    return type(v) is int and v >= 0  # not bool, float or str: JSON allows all of them here


def shard_path(model_dir: Path, name, index_path: Path, must_exist: bool = True) -> Path:
    """`model_dir / name` for a shard named by an index, refusing names that leave the directory.

    Checked on the name itself, before anything is opened: shards may be symlinks (the Hugging Face
    cache links every file to a blob elsewhere), so the target's location proves nothing."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CorruptCheckpointError(f"{index_path}: a weight_map entry names no file")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or len(parts) != 1:
        raise CorruptCheckpointError(f"{index_path}: names shard {name!r}, outside the model directory; refusing to read it")
    path = model_dir / name
    if not must_exist:
        return path
    if path.is_symlink() and not path.exists():
        raise CorruptCheckpointError(f"{index_path}: shard {name} is a dangling or looping symlink")
    if not path.is_file():
        raise CorruptCheckpointError(f"{index_path}: names shard {name}, which does not exist in {model_dir}")
    return path


class Checkpoint:
    """A sharded (or single-file) safetensors checkpoint, validated and listed in storage order.

    Storage order is shard by shard as the index names them (sorted by file name), and within a shard
    by data offset: the order the base's bytes lie on disk, which derivatives keep.

    `remote` (a `hub.RemoteShards`) stands in for shards still on the Hub: their headers come from it,
    and their files appear in `model_dir` when the walk has them downloaded. `sha256` (file name ->
    digest, where the Hub publishes one for every shard) makes the fingerprint content-addressed.
    """

    def __init__(self, model_dir: Path, remote=None, sha256: dict[str, str] | None = None):
        self.dir, self.remote = Path(model_dir), remote
        index_path = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
                raise CorruptCheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        elif single.exists() or single.is_symlink() or self._pending(SINGLE_NAME):
            shard_path(self.dir, SINGLE_NAME, single, must_exist=not self._pending(SINGLE_NAME))
            header, _, _ = self._header(single)
            weight_map = {name: SINGLE_NAME for name in header}
        else:
            raise SourceNotFoundError(f"{self.dir}: no {INDEX_NAME} or {SINGLE_NAME} (no safetensors weights)")

        if not all(isinstance(f, str) for f in weight_map.values()):
            raise CorruptCheckpointError(f"{index_path}: a weight_map entry names no file")
        files = sorted(set(weight_map.values()))
        paths = {file: shard_path(self.dir, file, index_path, must_exist=not self._pending(file)) for file in files}
        self.files = [paths[f] for f in files]
        self.header_bytes: dict[Path, int] = {}  # length prefix plus JSON header, per shard
        self.sizes: dict[Path, int] = {}
        self.sha256 = sha256 if sha256 and all(f in sha256 for f in files) else None
        self.tensors: list[TensorInfo] = []
        for file in files:
            path = paths[file]
            header, data_start, self.sizes[path] = self._header(path)
            self.header_bytes[path] = data_start
            wanted = {n for n, f in weight_map.items() if f == file}
            missing = wanted - header.keys()
            if missing:
                raise CorruptCheckpointError(f"{index_path}: tensor {sorted(missing)[0]} is not in {file}")
            entries = sorted((header[n]["data_offsets"][0], n) for n in wanted)
            for _, name in entries:
                e = header[name]
                begin, end = e["data_offsets"]
                self.tensors.append(
                    TensorInfo(name, e["dtype"], tuple(int(d) for d in e["shape"]), path, data_start + begin, end - begin)
                )
        self.by_name = {t.name: t for t in self.tensors}

    def _pending(self, file: str) -> bool:
        return self.remote is not None and self.remote.pending(file)

    def _header(self, path: Path) -> tuple[dict, int, int]:
        """(entries, data start, file size) of a shard, from the file or, while it is on the Hub, from `remote`."""
        if self._pending(path.name):
            size = self.remote.size(path.name)
            raw = self.remote.header(path.name)
            return (*parse_header(raw[8:8 + header_length(raw, size, path.name)], size, path.name), size)
        return (*read_header(path), path.stat().st_size)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def fingerprint(self) -> str:
        """A cheap content digest, for --resume and caches. With every shard's sha256 known (a Hub
        source) it digests those; otherwise every shard's name, size and header bytes, and 64 KiB at
        the start, middle and end of every tensor's data. A change to a tensor's values outside those
        samples is not seen; a re-saved checkpoint (new values everywhere) always is."""
        h = hashlib.sha256()
        if self.sha256 is not None:
            for path in self.files:
                h.update(f"{path.name}:{self.sizes[path]}:{self.sha256[path.name]}\n".encode())
            return h.hexdigest()
        for path in self.files:
            h.update(f"{path.name}:{path.stat().st_size}\n".encode())
            h.update(_pread_exact(path, 0, self.header_bytes[path]))
        for t in self.tensors:
            n = min(FINGERPRINT_SAMPLE, t.nbytes)
            for at in sorted({0, (t.nbytes - n) // 2, t.nbytes - n}):
                h.update(_pread_exact(t.file, t.offset + at, n))
        return h.hexdigest()

    def check_finite(self, names: list[str] | None = None) -> None:
        """Read every floating-point tensor (or those named) once and refuse NaN/Inf, naming the first bad one."""
        for info in self.tensors if names is None else [self.by_name[n] for n in names if n in self.by_name]:
            for chunk in iter_raw_chunks(info):
                check_raw_finite(chunk, info.dtype, info.name)


_bytes_read = 0


def bytes_read() -> int:
    """Bytes of checkpoint data this process has read so far (how the read-once claim is checked)."""
    return _bytes_read


def _pread_exact(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes of `path` at `offset`, as a fresh uint8 array (not zero-filled first: at
    Scout's sizes clearing the buffer cost a third as much as reading it)."""
    global _bytes_read
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise _file_ended(path)
            done += n
    finally:
        os.close(fd)
    _bytes_read += nbytes
    return buf


_MADV_POPULATE_READ = 22  # Linux 5.14+; Python 3.11's mmap module lacks the name

# How a read lands in memory. FRESH: positioned reads into fresh memory, for what the caller keeps.
# The walk's reads are used once and dropped: STREAMED reads them past the page cache (O_DIRECT) into
# recycled buffers; MAPPED maps a local file's slice where at least MAP_MIN_CACHED of its pages are
# in the page cache already (no copy; the rest are read by the mapping), and streams it otherwise.
# (A Hub source is STREAMED: a mapping would keep the blocks of a shard deleted after use.) On one
# of this project's VMs, reading the 12.95 GB 2-layer checkpoint cold took 24.3 s and 16.5 s of CPU
# by mapping, 4.2 s and 2.6 s of CPU past the page cache; cached, mapping took 1.2 s. Mapping then
# wins while under 13% of a slice is missing. Requiring every page cached instead streamed whole
# 160 MiB slices from the disk for a few evicted pages: int4 on a cached 8.85 GB source took
# 8.7-9.3 s, not 6.1-6.5 s, once 0.03% of its pages had been dropped.
FRESH, STREAMED, MAPPED = "fresh", "streamed", "mapped"
MAP_MIN_CACHED = 0.9


def _file_ended(path: Path) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: file ended while reading (was it truncated during the run?)")


def _map_exact(path: Path, offset: int, nbytes: int, only_if_cached: bool = False) -> np.ndarray | None:
    """`nbytes` bytes of `path` at `offset` as a uint8 view of a copy-on-write mapping of just those
    pages, unmapped once the view and everything made from it are gone (None, with `only_if_cached`,
    where under MAP_MIN_CACHED of those pages are in the page cache). The pages are faulted in here
    (on the reader's thread), and a file that is now too short is refused here too, not left to end
    the process with SIGBUS at the first touch of a missing page."""
    global _bytes_read
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < offset + nbytes:
            raise _file_ended(path)
        pages = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    finally:
        os.close(fd)
    view = np.frombuffer(pages, dtype=np.uint8)
    if only_if_cached and _cached_fraction(view) < MAP_MIN_CACHED:
        return None
    failed = _populate(view)
    if failed == errno.EFAULT:  # a page past the file's end: it shrank since the check above
        raise _file_ended(path)
    # otherwise (EINVAL: an older kernel, or no madvise) the pages are faulted in where first read
    _bytes_read += nbytes
    return view[offset - start:offset - start + nbytes]


@cache
def _memory_call(name: str):
    """libc's madvise or mincore (address, length, advice or result vector) -> int, called through
    ctypes, which releases the interpreter's lock for the call; None where this libc lacks it."""
    import ctypes

    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    last = ctypes.c_int if name == "madvise" else ctypes.c_void_p
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, last], ctypes.c_int
    return f


def _populate(view: np.ndarray) -> int:
    """Fault in every page of file mapping `view` (page-aligned) now, on the calling thread: 0, or
    the errno of the failure. Other threads run Python meanwhile, where mmap.madvise holds the
    interpreter's lock for the whole call (11 ms for a Scout expert's 168 MB gate_up_proj slice):
    through mmap.madvise, int4's walk of the 8.85 GB synthetic checkpoint took 3.96-4.61 s against
    3.51-3.85, and waited 0.23-0.89 s on its writer against 0.13-0.23."""
    import ctypes

    madvise = _memory_call("madvise")
    if madvise is None:
        return errno.ENOSYS
    return 0 if madvise(view.ctypes.data, view.size, _MADV_POPULATE_READ) == 0 else ctypes.get_errno()


def _cached_fraction(view: np.ndarray) -> float:
    """The fraction of a file mapping's pages in the page cache (mincore(2)). 0 where that cannot
    be told: Linux reports the page cache only for files the caller owns or may write, and other
    systems may have no mincore; the slice is then streamed, which is always correct."""
    mincore = _memory_call("mincore")
    if mincore is None:
        return 0.0
    pages = np.empty(-(-view.size // mmap.PAGESIZE), dtype=np.uint8)
    if mincore(view.ctypes.data, view.size, pages.ctypes.data) != 0:
        return 0.0
    return float(np.count_nonzero(pages & 1)) / pages.size


class _ReadBuffers:
    """Page-aligned buffers for streamed reads, each taken back when the array read into it is gone
    and used again: the first touch of fresh memory's pages cost this VM as much as the read. All
    have the size of the largest read so far, so any idle one takes the next read (sized to each
    read, an expert's 160 MiB gate_up_proj and 80 MiB down_proj slices kept replacing each other's
    buffers: 15 of them made and dropped, 728k page faults in an int4 run of the 2-layer Scout
    shape; 4 and 344-370k this way)."""

    KEEP = 3  # idle buffers kept at most: the walk holds one being read, one queued, one quantized

    def __init__(self):
        self.idle: list[mmap.mmap] = []
        self.size = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> mmap.mmap:
        with self.lock:
            if nbytes > self.size:
                self.size, self.idle = nbytes, []
            elif self.idle:
                return self.idle.pop()
            size = self.size
        return mmap.mmap(-1, max(size, 1))

    def give(self, buffer: mmap.mmap) -> None:
        with self.lock:
            if len(buffer) == self.size and len(self.idle) < self.KEEP:
                self.idle.append(buffer)

    def drop_idle(self) -> None:
        """Let the idle buffers go (while slices are mapped they would only add to resident memory)."""
        with self.lock:
            self.idle = []


_read_buffers = _ReadBuffers()


def _stream_exact(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes of `path` at `offset`, read past the page cache where the file system allows
    into a recycled buffer, which is taken back once the returned array and everything made from it
    are gone."""
    global _bytes_read
    block = outputs.DIRECT_BLOCK
    start = offset - offset % block  # O_DIRECT reads whole aligned blocks into aligned memory
    buffer = _read_buffers.take(-(-(offset + nbytes - start) // block) * block)
    try:
        _read_into(buffer, path, start, offset + nbytes - start)
    except BaseException:
        _read_buffers.give(buffer)
        raise
    _bytes_read += nbytes
    data = np.frombuffer(buffer, dtype=np.uint8, count=nbytes, offset=offset - start)
    weakref.finalize(data, _read_buffers.give, buffer)
    return data


def _read_into(buffer: mmap.mmap, path: Path, start: int, need: int) -> None:
    """The `need` bytes of `path` from block-aligned `start` into `buffer`, with O_DIRECT where the
    file system allows it (tmpfs and some FUSE refuse it at open, some at the first read)."""
    direct = hasattr(os, "O_DIRECT")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        direct, fd = False, os.open(path, os.O_RDONLY)
    try:
        with memoryview(buffer) as view:
            done, end = 0, -(-need // outputs.DIRECT_BLOCK) * outputs.DIRECT_BLOCK
            while done < need:
                try:
                    n = os.preadv(fd, [view[done:end]], start + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not direct:
                        raise
                    os.close(fd)
                    direct, fd = False, -1  # closed: not to be closed again if the open below fails
                    fd = os.open(path, os.O_RDONLY)
                    continue
                if n == 0:
                    raise _file_ended(path)
                done += n
    finally:
        if fd >= 0:
            os.close(fd)


def _read_bytes(path: Path, offset: int, nbytes: int, read: str) -> np.ndarray:
    if read == MAPPED:
        mapped = _map_exact(path, offset, nbytes, only_if_cached=True)
        if mapped is not None:
            _read_buffers.drop_idle()
            return mapped
        read = STREAMED
    return _stream_exact(path, offset, nbytes) if read == STREAMED else _pread_exact(path, offset, nbytes)


def read_tensor(info: TensorInfo, read: str = FRESH):
    """The whole tensor, read into fresh memory (or `read` another way: see FRESH above)."""
    import torch

    buf = _read_bytes(info.file, info.offset, info.nbytes, read)
    dtype = torch_dtype(info.dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=dtype)


def read_slice(info: TensorInfo, index: int, read: str = FRESH):
    """`tensor[index]` along dim 0 (one expert of a fused [E, ...] tensor), reading only its bytes."""
    import torch

    per = info.nbytes // info.shape[0]
    buf = _read_bytes(info.file, info.offset + index * per, per, read)
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape[1:])


def read_rows(info: TensorInfo, start: int, stop: int, read: str = FRESH):
    """`tensor[start:stop]` along dim 0, reading only those rows' bytes."""
    import torch

    per = info.nbytes // info.shape[0]
    buf = _read_bytes(info.file, info.offset + start * per, (stop - start) * per, read)
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(stop - start, *info.shape[1:])


def read_expert_rows(info: TensorInfo, expert: int, start: int, stop: int):
    """`tensor[expert, start:stop]` of a fused [E, rows, cols] tensor, reading only those bytes."""
    import torch

    per_row = info.nbytes // (info.shape[0] * info.shape[1])
    offset = info.offset + (expert * info.shape[1] + start) * per_row
    buf = _pread_exact(info.file, offset, (stop - start) * per_row)
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(stop - start, *info.shape[2:])


ROW_BLOCK_BYTES = 64 * 1024 * 1024


def rows_per_block(info: TensorInfo) -> int:
    """Whole rows in about ROW_BLOCK_BYTES of a tensor (at least one)."""
    return max(ROW_BLOCK_BYTES // max(info.nbytes // max(info.shape[0], 1), 1), 1)


def iter_row_blocks(info: TensorInfo, read: str = FRESH) -> Iterator:
    """The tensor in consecutive blocks of whole rows, `rows_per_block` at a time."""
    step = rows_per_block(info)
    for start in range(0, info.shape[0], step):
        yield read_rows(info, start, min(start + step, info.shape[0]), read)


def iter_raw_chunks(info: TensorInfo, chunk_bytes: int = 64 * 1024 * 1024) -> Iterator[np.ndarray]:
    """The tensor's bytes in bounded chunks, for byte-identical copies of unquantized tensors."""
    step = max(chunk_bytes - chunk_bytes % info.itemsize, info.itemsize)
    for start in range(0, info.nbytes, step):
        yield _pread_exact(info.file, info.offset + start, min(step, info.nbytes - start))


def count_non_finite(raw: bytes | bytearray, dtype: str) -> int:
    """NaN/Inf count of a raw little-endian float buffer; 0 for integer dtypes."""
    if dtype not in FLOAT_DTYPES and not dtype.startswith("F8"):
        return 0
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.uint16)
        return int(np.count_nonzero((bits & 0x7F80) == 0x7F80))
    if dtype == "F8_E4M3":  # e4m3fn has no Inf; NaN is S.1111.111
        return int(np.count_nonzero((np.frombuffer(raw, dtype=np.uint8) & 0x7F) == 0x7F))
    if dtype == "F8_E5M2":
        return int(np.count_nonzero((np.frombuffer(raw, dtype=np.uint8) & 0x7C) == 0x7C))
    values = np.frombuffer(raw, dtype={"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def check_raw_finite(raw: bytes | bytearray, dtype: str, name: str) -> None:
    bad = count_non_finite(raw, dtype)
    if bad:
        raise NonFiniteWeightError(f"{name}: {bad} non-finite values (NaN/Inf) in the source weight")


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as it will appear in an output shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def encode_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file with `entries` in this order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t) -> memoryview:
    """A tensor's little-endian bytes without a copy where it is already contiguous on the CPU."""
    import torch

    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


class ShardWriter:
    """Writes one safetensors shard: header first, then each tensor's bytes in the declared order.

    Writes to `<name>.tmp` and renames on `close()`, so a shard that exists is complete.
    """

    def __init__(self, path: Path, entries: list[TensorEntry]):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.entries = entries
        self._next = 0
        self._written = 0  # bytes of the current tensor so far
        self._writer: outputs.FileWriter | None = None
        self._copier: outputs.FileWriter | None = None  # `copy`'s thread, started by the first copy
        self._copied: set[str] = set()
        self._file = open(self.tmp, "wb")
        try:
            header = encode_header(entries)
            self._file.write(header)
            self._file.flush()
        except BaseException:
            self.abort()
            raise
        self._end = len(header)  # where the next bytes go
        self._writer = outputs.FileWriter(self._file.fileno(), self.tmp, path=self.tmp)  # writes while the caller computes

    def write(self, name: str, data) -> None:
        """Append (part of) the next tensor's bytes (a tensor, or raw bytes); a tensor may arrive in several chunks.
        The bytes are written on the writer's thread: neither `data` nor its memory may change afterwards."""
        entry = self._entry(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            if torch_to_st().get(data.dtype) != entry.dtype or tuple(data.shape) != entry.shape:
                raise RuntimeError(
                    f"{name}: produced {data.dtype} {list(data.shape)}, planned {entry.dtype} {list(entry.shape)}"
                )
            data = tensor_bytes(data)
        self._writer.write(data, self._advance(entry, memoryview(data).nbytes))

    def copy(self, name: str, source: Path, offset: int) -> None:
        """Copy all of a tensor still to come, file `source`'s bytes from `offset`, to its place, on a
        thread of its own (`FileWriter.copy`); the order `write` follows then skips it. It holds no
        more memory than its writer's stage, so it may be called before the tensors ahead of it
        arrive and run beside their quantizing."""
        index = next((i for i in range(self._next, len(self.entries)) if self.entries[i].name == name), None)
        if index is None or name in self._copied or (index == self._next and self._written):
            raise RuntimeError(f"{self.path.name}: {name} is not a tensor still to come")
        at = self._end - self._written + sum(e.nbytes for e in self.entries[self._next:index])
        self._copied.add(name)
        if self._copier is None:
            self._copier = outputs.FileWriter(self._file.fileno(), self.tmp, depth=0, path=self.tmp)
        self._copier.copy(source, offset, self.entries[index].nbytes, at)

    def copied(self, name: str) -> bool:
        """Whether tensor `name` was handed to `copy`."""
        return name in self._copied

    def _skip_copied(self) -> None:
        while not self._written and self._next < len(self.entries) and self.entries[self._next].name in self._copied:
            self._end += self.entries[self._next].nbytes
            self._next += 1

    def _entry(self, name: str) -> TensorEntry:
        self._skip_copied()
        if self._next >= len(self.entries):
            raise RuntimeError(f"{self.path.name}: unexpected tensor {name}")
        entry = self.entries[self._next]
        if name != entry.name:
            raise RuntimeError(f"{self.path.name}: got {name}, expected {entry.name}")
        return entry

    def _advance(self, entry: TensorEntry, n: int) -> int:
        """Account for `n` more bytes of `entry`; returns where they go."""
        if self._written + n > entry.nbytes:
            raise RuntimeError(f"{entry.name}: more bytes than planned")
        at = self._end
        self._end += n
        self._written += n
        if self._written == entry.nbytes:
            self._next += 1
            self._written = 0
        return at

    def close(self) -> None:
        self.seal()
        self.wait()

    def seal(self) -> None:
        """After the last tensor: make the shard durable and give it its name (fsync, rename) on the
        writer's thread, while the caller goes on; `wait` for that."""
        self._skip_copied()
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.path.name}: closed after {self._next} of {len(self.entries)} tensors")
        self._writer.then(self._complete)

    def wait(self) -> None:
        """Wait until the sealed shard is in place; raise what failed on the way."""
        self._writer.close()

    def _complete(self) -> None:
        if self._copier is not None:
            self._copier.close()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for writer in (self._writer, self._copier):
            try:
                if writer is not None:
                    writer.cancel()
            except BaseException:
                pass  # the failure being handled, or one it caused
        try:
            self._file.close()
        except OSError:
            pass  # on a full disk the final flush fails too; the half-written file goes all the same
        finally:
            self.tmp.unlink(missing_ok=True)


def write_safetensors(path: Path, tensors: dict) -> None:
    """Write small in-memory tensors as one shard (tests, synthetic checkpoints)."""
    entries = [TensorEntry(n, torch_to_st()[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(path, entries)
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()


def split_in_order(items: list, size_of, max_bytes: int) -> list[list]:
    """Consecutive groups of `items`, each at most `max_bytes` by `size_of` unless one item alone is
    larger: how shards are cut, greedily and in order, never splitting an item."""
    groups: list[list] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + size_of(item) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += size_of(item)
    return groups


def write_index(model_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json` as transformers writes it (keys sorted)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(model_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
