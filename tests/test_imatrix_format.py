"""llama.cpp imatrix files: the layout llama-imatrix writes, and llama-quantize --imatrix agreeing with l4q's importance."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import llama_cpp_reference
from gguf import GGUFReader, GGUFValueType

from llama4_quant import sources
from llama4_quant.model import open_model
from llama4_quant.formats import gguf as l4q_gguf
from llama4_quant.formats import gguf_quants
from llama4_quant.formats.imatrix import (
    gguf_imatrix_entries,
    mean_importance,
    write_llama_imatrix,
)
from llama4_quant.tiny_models import tiny_heldout_path

IMATRIX_KVS = {"quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
               "quantize.imatrix.chunks_count"}  # what llama-quantize --imatrix adds to its output


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, t.data.tobytes()) for t in reader.tensors}
    return kv, tensors


@pytest.fixture(scope="module")
def tiny():
    return sources.resolve("tiny")


@pytest.fixture(scope="module")
def llama_cpp_bin() -> Path:
    """llama.cpp's build/bin holding llama-quantize and llama-imatrix, built from the reference sources."""
    quantize = llama_cpp_reference().quantize_tool()  # a missing tool fails the test, as in test_gguf_export
    if not (quantize.parent / "llama-imatrix").is_file():  # same build tree, one more target (~15 s)
        subprocess.run(["cmake", "--build", str(quantize.parents[1]), "--target", "llama-imatrix", "-j", "8"],
                       check=True, capture_output=True)
    return quantize.parent


@pytest.fixture(scope="module")
def f32_gguf(tiny, tmp_path_factory) -> Path:
    return l4q_gguf.export_gguf(tiny, tmp_path_factory.mktemp("f32") / "f32.gguf", "F32", show_progress=False).out


@pytest.fixture(scope="module")
def plan(tiny):
    return l4q_gguf.plan(open_model(tiny), "Q4_K_M")


def synthetic_stats(plan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Positive in_sum2 with spread-out means and varied whole counts, per expert for expert keys."""
    rng = np.random.default_rng(1234)
    stats = {}
    for t in plan:
        if t.importance_key is None:
            continue
        experts = t.shape[0] if len(t.shape) == 3 else 1
        counts = rng.integers(1, 20_000, size=experts).astype(np.float32)
        sums = (rng.lognormal(0.0, 1.5, size=(experts, t.shape[-1])) * counts[:, None]).astype(np.float32)
        stats[t.importance_key] = (sums if experts > 1 else sums[0], counts)
    return stats


def test_file_layout_matches_llama_imatrix(plan, tmp_path):
    entries = gguf_imatrix_entries(plan, synthetic_stats(plan).get)
    assert "blk.0.ffn_gate_exps.weight" in entries and "blk.0.attn_q.weight" in entries
    assert "blk.0.attn_norm.weight" not in entries  # 1-D tensors are never quantized
    out = tmp_path / "imatrix.gguf"
    write_llama_imatrix(out, entries, datasets=["calib.txt", "more.txt"], chunk_size=512, chunk_count=7)
    assert [p.name for p in tmp_path.iterdir()] == ["imatrix.gguf"]
    reader = GGUFReader(str(out))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert {k: f.contents() for k, f in fields.items()} == {
        "general.type": "imatrix", "imatrix.datasets": ["calib.txt", "more.txt"],
        "imatrix.chunk_count": 7, "imatrix.chunk_size": 512}
    assert fields["imatrix.chunk_count"].types == [GGUFValueType.UINT32]
    assert fields["imatrix.chunk_size"].types == [GGUFValueType.UINT32]
    names = [t.name for t in reader.tensors]
    assert names == [f"{n}.{s}" for n in sorted(entries) for s in ("in_sum2", "counts")]
    tensors = {t.name: t for t in reader.tensors}
    for name, ggml_shapes in (("blk.1.attn_q.weight", ([256], [1])),
                              ("blk.1.ffn_down_exps.weight", ([256, 16], [1, 16]))):
        sums, counts = tensors[f"{name}.in_sum2"], tensors[f"{name}.counts"]
        assert (sums.shape.tolist(), counts.shape.tolist()) == ggml_shapes
        assert sums.tensor_type.name == counts.tensor_type.name == "F32"
        np.testing.assert_array_equal(sums.data.reshape(-1), entries[name][0].reshape(-1))
        np.testing.assert_array_equal(counts.data.reshape(-1), entries[name][1])


def test_bad_statistics_are_refused(plan, tmp_path):
    q = next(t for t in plan if t.name == "blk.0.attn_q.weight")
    exps = next(t for t in plan if t.name == "blk.0.ffn_up_exps.weight")
    one = np.ones(256, np.float32)
    assert gguf_imatrix_entries([q], lambda key: None) == {}
    with pytest.raises(ValueError, match="does not fit"):
        gguf_imatrix_entries([q], lambda key: (np.ones((2, 256), np.float32), np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="does not fit"):
        gguf_imatrix_entries([exps], lambda key: (one, np.ones(1, np.float32)))
    with pytest.raises(ValueError, match="counts"):
        gguf_imatrix_entries([exps], lambda key: (np.ones((16, 256), np.float32), np.ones(3, np.float32)))
    entries = {q.name: (one, np.array([2.5], np.float32))}
    with pytest.raises(ValueError, match="whole numbers"):
        write_llama_imatrix(tmp_path / "x.gguf", entries, datasets=["d"], chunk_size=1, chunk_count=1)
    with pytest.raises(ValueError, match="datasets"):
        write_llama_imatrix(tmp_path / "x.gguf", {q.name: (one, one[:1])}, datasets=[], chunk_size=1, chunk_count=1)
    assert not list(tmp_path.iterdir())
    np.testing.assert_array_equal(mean_importance(np.full((2, 3), 6, np.float32), np.array([3, 0], np.float32)),
                                  [[2, 2, 2], [1, 1, 1]])  # a zero count means "no data": ones, as llama.cpp


def test_rewriting_llama_imatrix_output_is_byte_identical(llama_cpp_bin, f32_gguf, plan, tmp_path):
    """llama-imatrix's own file, its statistics passed through write_llama_imatrix, comes out byte for byte."""
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([str(llama_cpp_bin / "llama-imatrix"), "-m", str(f32_gguf), "-f", str(tiny_heldout_path()),
                    "-o", str(theirs), "-c", "128", "-b", "128", "-ub", "128", "--chunks", "4"],
                   check=True, capture_output=True)
    reader = GGUFReader(str(theirs))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    data = {t.name: np.array(t.data) for t in reader.tensors}
    entries = {n.removesuffix(".in_sum2"): (data[n], data[n.replace(".in_sum2", ".counts")].reshape(-1))
               for n in data if n.endswith(".in_sum2")}
    assert kv["imatrix.chunk_count"] == 4 and kv["imatrix.chunk_size"] == 128
    assert entries["blk.0.ffn_up_exps.weight"][0].shape == (16, 256)  # per expert: [n_experts, in]
    assert set(entries) <= {t.name for t in plan if t.importance_key}  # every weight llama.cpp records has a key
    ours = tmp_path / "ours.gguf"
    write_llama_imatrix(ours, entries, datasets=kv["imatrix.datasets"], chunk_size=128, chunk_count=4)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q2_K_S", "IQ4_XS", "IQ4_NL"])
def test_llama_quantize_with_our_imatrix_equals_l4q_importance(ftype, llama_cpp_bin, f32_gguf, tiny, plan, tmp_path):
    """llama-quantize --imatrix (our file) writes the same tensors as l4q's export of that type with the
    same importance, for every block type that takes importance.

    The source is an F32 GGUF: F16 cannot hold the tiny model's smallest bf16 weights (f16 subnormals),
    and with importance a few super-blocks then quantize differently for that reason alone."""
    tool = llama_cpp_bin / "llama-quantize"
    stats = synthetic_stats(plan)
    entries = gguf_imatrix_entries(plan, stats.get)
    imatrix = tmp_path / "imatrix.gguf"
    write_llama_imatrix(imatrix, entries, datasets=["synthetic"], chunk_size=512, chunk_count=3)

    run = subprocess.run([str(tool), "--imatrix", str(imatrix), str(f32_gguf), str(tmp_path / "theirs.gguf"), ftype],
                         check=True, capture_output=True, text=True)
    assert f"loaded {len(entries)} importance matrix entries" in run.stdout
    assert "did not find weights" not in run.stdout + run.stderr
    plain = tmp_path / "plain.gguf"
    refused = subprocess.run([str(tool), str(f32_gguf), str(plain), ftype], capture_output=True).returncode
    assert refused == (ftype == "Q2_K_S")  # Q2_K_S needs an imatrix there, as in l4q
    ours = l4q_gguf.export_gguf(tiny, tmp_path / "ours.gguf", ftype, show_progress=False,
                                importance=lambda key: mean_importance(*stats[key]) if key in stats else None).out

    their_kv, their_t = read_gguf(tmp_path / "theirs.gguf")
    our_kv, our_t = read_gguf(ours)
    assert set(their_kv) - set(our_kv) == IMATRIX_KVS and set(our_kv) <= set(their_kv)
    assert their_kv["quantize.imatrix.entries_count"] == len(entries)
    assert their_kv["quantize.imatrix.chunks_count"] == 3 and their_kv["quantize.imatrix.dataset"] == "synthetic"
    for key, value in our_kv.items():
        assert their_kv[key] == value, key
    assert set(our_t) == set(their_t)
    for name, (qtype, data) in their_t.items():
        assert our_t[name][0] == qtype, name
        assert our_t[name][1] == data, name  # byte for byte

    if refused:
        return
    plain_t = read_gguf(plain)[1]
    steered = [q for q, bt in gguf_quants.BLOCK_TYPES.items() if bt.uses_importance]
    k_quant = [n for n, (qtype, _) in their_t.items() if qtype in steered and n in entries]
    assert len(k_quant) >= 40 and any("_exps." in n for n in k_quant)
    changed = [n for n in k_quant if plain_t[n][1] != their_t[n][1]]
    assert changed == k_quant  # the imatrix steered every K-quant tensor it covers
