import errno
import json
import mmap
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llama4_quant import checkpoint, outputs
from llama4_quant.checkpoint import (
    FRESH,
    MAPPED,
    STREAMED,
    Checkpoint,
    ShardWriter,
    TensorEntry,
    iter_row_blocks,
    read_slice,
    read_tensor,
    write_safetensors,
)
from llama4_quant.errors import CorruptCheckpointError


def test_reader_matches_safetensors_library(small_model):
    ckpt = Checkpoint(small_model)
    assert len({t.file for t in ckpt.tensors}) >= 3
    for info in ckpt.tensors:
        with safe_open(info.file, "pt") as f:
            ref = f.get_tensor(info.name)
        assert torch.equal(read_tensor(info), ref)
        if ref.dim() == 3:
            for e in (0, ref.shape[0] - 1):
                assert torch.equal(read_slice(info, e), ref[e])


def _mapped_here(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


def _resident_bytes(path) -> int:
    """The bytes of this process's mappings of `path` that are in its page tables (smaps' Rss)."""
    resident, ours = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's first line: its address range, ..., its file
            ours = line.rstrip().endswith(str(path))
        elif ours and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return resident


def _evict(path, offset: int = 0, length: int = 0) -> None:
    """Drop a file's pages (all, or those in [offset, offset + length)) from the page cache (written
    back first: dirty pages are not dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("read", [STREAMED, MAPPED])
def test_walk_reads_match_the_safetensors_library(small_model, read):
    ckpt = Checkpoint(small_model)
    for info in ckpt.tensors:
        with safe_open(info.file, "pt") as f:
            ref = f.get_tensor(info.name)
        assert torch.equal(read_tensor(info, read), ref)
        assert torch.equal(torch.cat(list(iter_row_blocks(info, read))), ref)
        if ref.dim() == 3:
            for e in (0, ref.shape[0] - 1):
                assert torch.equal(read_slice(info, e, read), ref[e])


def test_mapped_reads_map_cached_pages_only_and_unmap_when_dropped(model_copy):
    info = max(Checkpoint(model_copy).tensors, key=lambda t: t.nbytes)
    read_tensor(info, STREAMED)  # dropped at once: its buffer is idle
    assert checkpoint._read_buffers.idle
    ref = read_tensor(info)  # FRESH reads through the page cache: its pages are cached now
    view = read_tensor(info, MAPPED)[1:]
    assert _mapped_here(info.file)
    assert _resident_bytes(info.file) >= info.nbytes  # faulted in by the read, before any use
    assert not checkpoint._read_buffers.idle  # let go while slices are mapped
    del view  # the last thing made from the mapping: its pages go with it
    assert not _mapped_here(info.file)

    _evict(info.file)
    streamed = read_tensor(info, MAPPED)  # not in the page cache: read past it, not mapped
    assert not _mapped_here(info.file)
    assert torch.equal(streamed, ref)


def _cache_only(path, ranges) -> float:
    """Leave just the byte ranges [(offset, length)] of `path` in the page cache (read with
    readahead off, so nothing around them comes in), and return the fraction of its pages cached."""
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset, length in ranges:
            assert len(os.pread(fd, length, offset)) == length
        pages = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with pages:
        view = np.frombuffer(pages, dtype=np.uint8)
        fraction = checkpoint._cached_fraction(view)
        del view
    return fraction


def test_mapped_reads_map_slices_missing_a_few_pages(model_copy):
    info = max(Checkpoint(model_copy).tensors, key=lambda t: t.nbytes)
    page, size = os.sysconf("SC_PAGE_SIZE"), info.file.stat().st_size
    first = -(-info.offset // page) * page  # the tensor's first whole page
    ref = read_tensor(info)
    pages = size // page
    assert info.nbytes // page >= 40
    # all but one page of the tensor cached: mapped (the mapping reads that page)
    assert _cache_only(info.file, [(0, first + page), (first + 2 * page, size - first - 2 * page)]) < 1
    view = read_tensor(info, MAPPED)
    assert _mapped_here(info.file) and torch.equal(view, ref)
    del view
    # only half of them: streamed
    half = first + info.nbytes // 2 // page * page
    assert _cache_only(info.file, [(0, half)]) < 1 - 1 / pages
    streamed = read_tensor(info, MAPPED)
    assert not _mapped_here(info.file) and torch.equal(streamed, ref)


def test_streamed_reads_reuse_their_buffers_once_dropped(small_model, monkeypatch):
    monkeypatch.setattr(checkpoint, "_read_buffers", checkpoint._ReadBuffers())
    info = max(Checkpoint(small_model).tensors, key=lambda t: t.nbytes)
    first = read_tensor(info, STREAMED)
    second = read_tensor(info, STREAMED)  # the first is still held: another buffer
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, second)
    held = first.data_ptr()
    del first
    again = read_slice(info, 0, STREAMED)[:1]  # smaller reads fit the freed buffer
    assert again.data_ptr() - held < 4096
    del second, again
    buffers = checkpoint._read_buffers
    assert len(buffers.idle) == 2 and all(len(b) == buffers.size for b in buffers.idle)


@pytest.mark.parametrize("refused", ["never", "at open", "at read"])
def test_streamed_reads_of_every_alignment_match_the_file(tmp_path, monkeypatch, refused):
    path = tmp_path / "bytes"
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    real_open, real_preadv, direct_fds, opened_direct = os.open, os.preadv, set(), []

    def open_(p, flags, *args):
        if flags & os.O_DIRECT and refused == "at open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(p, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
            opened_direct.append(fd)
        else:
            direct_fds.discard(fd)  # a closed descriptor's number, used again
        return fd

    def preadv(fd, buffers, at):
        if fd in direct_fds and refused == "at read":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, at)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "preadv", preadv)
    for offset in (0, 1, 4095, 4096, 5000, data.size - 1):
        for nbytes in {0, 1, 4096 - offset % 4096, 4097, data.size - offset}:
            if offset + nbytes <= data.size:
                got = checkpoint._stream_exact(path, offset, nbytes)
                assert np.array_equal(got, data[offset:offset + nbytes]), (offset, nbytes)
    assert bool(opened_direct) == (refused != "at open")


@pytest.mark.parametrize("read", [FRESH, STREAMED, MAPPED])
def test_shard_truncated_after_opening(model_copy, read):
    ckpt = Checkpoint(model_copy)
    info = ckpt.tensors[-1]
    with open(info.file, "r+b") as f:
        f.truncate(info.offset + info.nbytes // 2)
    with pytest.raises(CorruptCheckpointError, match="truncated during the run"):
        read_tensor(info, read)


def test_storage_order_is_file_then_offset(small_model):
    ckpt = Checkpoint(small_model)
    keys = [(t.file.name, t.offset) for t in ckpt.tensors]
    assert keys == sorted(keys)


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {
        "b": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "a": torch.randn(4, 8).to(torch.bfloat16),
        "c": torch.tensor([3.0, -1.0]).to(torch.float8_e4m3fn),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert torch.equal(loaded[name].view(torch.uint8), t.view(torch.uint8))


def test_writer_accepts_chunks_and_rejects_surprises(tmp_path):
    entries = [TensorEntry("w", "BF16", (4, 4))]
    w = ShardWriter(tmp_path / "a.safetensors", entries)
    data = torch.ones(4, 4, dtype=torch.bfloat16)
    raw = bytes(data.view(torch.uint8).numpy())
    w.write("w", raw[:10])
    w.write("w", raw[10:])
    w.close()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["w"], data)
    w = ShardWriter(tmp_path / "b.safetensors", entries)
    with pytest.raises(RuntimeError):
        w.write("other", data)
    with pytest.raises(RuntimeError):
        w.write("w", torch.ones(4, 5, dtype=torch.bfloat16))
    w.abort()
    assert not list(tmp_path.glob("b.safetensors*"))


@pytest.mark.parametrize("copied_by", ["O_DIRECT", "copy_file_range", "pread"])
def test_writer_copies_source_ranges_beside_writes(tmp_path, monkeypatch, copied_by):
    if copied_by != "O_DIRECT":  # a file system without it
        monkeypatch.setattr(outputs.DirectWrites, "open", classmethod(lambda cls, path, fd: None))
    if copied_by == "pread":  # as between file systems that copy_file_range does not join
        def cross_device(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", cross_device)
    source = tmp_path / "source.bin"
    raw = torch.randn(3, 1000).to(torch.bfloat16)
    source.write_bytes(b"junk" + bytes(raw.view(torch.uint8).numpy()))
    entries = [TensorEntry("a", "BF16", (3, 1000)), TensorEntry("b", "I32", (2,)), TensorEntry("c", "BF16", (3, 1000)),
               TensorEntry("d", "I32", (1,)), TensorEntry("e", "BF16", (2, 1000))]
    w = ShardWriter(tmp_path / "x.safetensors", entries)
    w.copy("e", source, 2004)  # ahead of everything, and of the tensors between
    w.copy("a", source, 4)
    assert w.copied("e") and w.copied("a") and not w.copied("c")
    w.write("b", torch.tensor([7, 8], dtype=torch.int32))
    w.copy("c", source, 4)
    with pytest.raises(RuntimeError, match="not a tensor still to come"):
        w.copy("a", source, 4)  # twice
    w.write("d", torch.tensor([9], dtype=torch.int32))
    w.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert torch.equal(loaded["a"], raw) and torch.equal(loaded["c"], raw) and torch.equal(loaded["e"], raw[1:])
    assert loaded["b"].tolist() == [7, 8] and loaded["d"].tolist() == [9]


def test_writer_copy_is_refused_for_a_tensor_passed_or_begun(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(100))
    w = ShardWriter(tmp_path / "x.safetensors", [TensorEntry("a", "U8", (4,)), TensorEntry("b", "U8", (4,))])
    w.write("a", b"ab")
    for name in ("a", "z"):  # begun, unknown
        with pytest.raises(RuntimeError, match="not a tensor still to come"):
            w.copy(name, source, 0)
    w.write("a", b"cd")
    with pytest.raises(RuntimeError, match="not a tensor still to come"):
        w.copy("a", source, 0)  # passed
    with pytest.raises(RuntimeError, match="closed after 1 of 2"):
        w.close()
    w.abort()


def test_writer_copy_from_a_truncated_source_fails_and_leaves_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(1000))
    w = ShardWriter(tmp_path / "x.safetensors", [TensorEntry("a", "U8", (2000,))])
    w.copy("a", source, 0)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        w.close()
    w.abort()
    assert not list(tmp_path.glob("x.safetensors*"))


def _first_shard(path):
    return sorted(path.glob("*.safetensors"))[0]


def test_truncated_shard(model_copy):
    shard = _first_shard(model_copy)
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        Checkpoint(model_copy)


def test_garbage_header(model_copy):
    shard = _first_shard(model_copy)
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        Checkpoint(model_copy)


def test_absurd_header_length(model_copy):
    shard = _first_shard(model_copy)
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", 1 << 60)
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(model_copy)


def test_index_names_missing_shard(model_copy):
    _first_shard(model_copy).unlink()
    with pytest.raises(CorruptCheckpointError, match="does not exist"):
        Checkpoint(model_copy)


def test_index_names_tensor_not_in_shard(model_copy):
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["language_model.model.layers.0.ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="ghost"):
        Checkpoint(model_copy)
