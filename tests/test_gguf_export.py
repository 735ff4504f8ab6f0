"""`l4q export gguf`: parity with llama.cpp's own converter, llama.cpp runs every type, type rules."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import llama_cpp_reference
from gguf import GGUFReader

from cli.main import main
from llama4_quant import arch, evaluate, sources
from llama4_quant.calibrate.stats import Stats
from llama4_quant.formats import gguf as l4q_gguf
from llama4_quant.formats import gguf_types
from llama4_quant.formats.gguf_types import FILE_TYPES

STATS = Path(__file__).parent / "data" / "stats"
L4Q_ONLY_KEYS = {"general.base_model.count", "general.base_model.0.name", "general.quantized_by"}
CTX, TOKENS = 256, 4 * 256


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), t.data.tobytes()) for t in reader.tensors}
    return kv, tensors


@pytest.fixture(scope="module")
def tiny():
    return sources.resolve("tiny")


def test_f16_matches_llama_cpp_converter(tiny, tmp_path):
    theirs = llama_cpp_reference().convert(tiny.path, tmp_path / "theirs.gguf", "f16")
    ours = l4q_gguf.export_gguf(tiny, tmp_path / "ours.gguf", "F16", show_progress=False).out
    their_kv, their_t = read_gguf(theirs)
    our_kv, our_t = read_gguf(ours)
    assert set(our_kv) - set(their_kv) == L4Q_ONLY_KEYS
    assert set(their_kv) <= set(our_kv)
    for key, value in their_kv.items():
        assert our_kv[key] == value, key
    assert set(our_t) == set(their_t)
    for name, (qtype, shape, data) in their_t.items():
        assert our_t[name][:2] == (qtype, shape), name
        assert our_t[name][2] == data, name  # same F16 (and F32) bytes
    assert "rope_freqs.weight" in our_t  # llama3 rope scaling


# tiny-maverick runs one file type per block type (tiny runs them all)
EVERY_BLOCK_TYPE = ["F16", "Q8_0", "Q6_K", "Q5_K_S", "Q4_K_M", "Q4_0", "Q3_K_S", "Q2_K", "Q2_K_MOE", "IQ4_XS", "IQ4_NL"]


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_llama_cpp_runs_every_type_close_to_bf16(model, tmp_path):
    """Each exported type loads in llama.cpp and agrees with BF16 transformers on the same ids."""
    src = sources.resolve(model)
    types = list(l4q_gguf.FILE_TYPES) if model == "tiny" else EVERY_BLOCK_TYPE
    stats = Stats(STATS / model)  # for the types llama.cpp makes only with an importance matrix
    files = [l4q_gguf.export_gguf(src, tmp_path / f"{model}-{t}.gguf", t, show_progress=False,
                                  importance=stats.importance if FILE_TYPES[t].needs_imatrix else None).out
             for t in types]
    report = evaluate.evaluate(src, files, ctx=CTX, max_tokens=TOKENS, progress=False)
    results = {t: c for t, c in zip(types, report["candidates"])}
    for t, c in results.items():
        assert c["kind"] == "gguf" and c["windows"]["scored_positions_per_window"] == 128
    ceiling = {"F32": 1e-3, "F16": 1e-3, "BF16": 1e-3, "Q8_0": 1e-2, "Q2_K": 0.3, "Q2_K_S": 0.3}
    for t, c in results.items():
        assert c["kld"]["mean"] < ceiling.get(t, 0.1), (t, c["kld"])
        assert c["top1_agreement"] > (0.6 if t.startswith("Q2_K") and "MOE" not in t else 0.75), t
    kld = {t: results[t]["kld"]["mean"] for t in results}
    # more bits, less divergence, along each chain (over the types this model exports)
    for chain in (("Q6_K", "Q5_K_M", "Q4_K_M"), ("Q6_K", "Q5_K_S", "Q4_K_S", "Q3_K_S", "Q2_K"),
                  ("Q3_K_L", "Q3_K_S"), ("IQ4_XS", "Q3_K_S"), ("IQ4_NL", "Q3_K_S")):
        present = [t for t in chain if t in kld]
        assert present == sorted(present, key=kld.get), {t: kld[t] for t in present}
    # the MoE mix: smaller than the plain type above it, and closer to BF16
    size = {t: results[t]["size_bytes"] for t in results}
    assert size["Q2_K_MOE"] < size["Q3_K_S"] and kld["Q2_K_MOE"] < kld["Q3_K_S"] / 1.5


def test_q4_k_m_type_rules(tiny, tmp_path):
    out = l4q_gguf.export_gguf(tiny, tmp_path / "m.gguf", "Q4_K_M", show_progress=False).out
    _, tensors = read_gguf(out)
    types = {name: t[0] for name, t in tensors.items()}
    n = 4  # use_more_bits picks layers 2 and 3 of 4 (i < n/8, i >= 7n/8 or (i - n/8) % 3 == 2)
    assert [gguf_types.use_more_bits(i, n) for i in range(n)] == [False, False, True, True]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    for i in range(n):
        more = gguf_types.use_more_bits(i, n)
        for name in (f"blk.{i}.attn_v.weight", f"blk.{i}.ffn_down_exps.weight", f"blk.{i}.ffn_down_shexp.weight"):
            assert types[name] == ("Q6_K" if more else "Q4_K"), name
        for name in (f"blk.{i}.attn_q.weight", f"blk.{i}.ffn_gate_exps.weight", f"blk.{i}.ffn_up_shexp.weight"):
            assert types[name] == "Q4_K", name
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"


OVERRIDES = ("--tensor-type", "ffn_(gate|up)_exps=q2_K", "--tensor-type", "blk\\.[01]\\.attn_q=Q8_0",
             "--tensor-type", "ffn_down_shexp=bf16", "--output-tensor-type", "q5_K", "--token-embedding-type", "Q3_K")


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_overrides_match_llama_quantize(model, f16_references, tmp_path):
    """--tensor-type / --output-tensor-type / --token-embedding-type give llama-quantize's types."""
    theirs = llama_cpp_reference().llama_quantize(f16_references[model], tmp_path / "theirs.gguf", "Q4_K_M",
                                                  options=OVERRIDES)
    out = tmp_path / "ours.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", model, "--type", "Q4_K_M", "--out", str(out), "--quiet", *OVERRIDES])
    assert result.exit_code == 0, result.stderr
    their_types = {n: t[:2] for n, t in read_gguf(theirs)[1].items()}
    our_types = {n: t[:2] for n, t in read_gguf(out)[1].items()}
    assert our_types == their_types
    assert our_types["output.weight"][0] == "Q5_K" and our_types["token_embd.weight"][0] == "Q3_K"
    assert our_types["blk.1.attn_q.weight"][0] == "Q8_0" and our_types["blk.2.attn_q.weight"][0] == "Q4_K"
    gates = [t for n, (t, _) in our_types.items() if n.endswith("ffn_gate_exps.weight")]
    assert gates and set(gates) == {"Q2_K"}


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
@pytest.mark.parametrize("mix, experts", [("Q2_K_MOE", ("q2_K", "q3_K")), ("Q3_K_MOE", ("q3_K", "q4_K"))])
def test_moe_mixes_are_q4_k_m_with_low_bit_experts(model, mix, experts, f16_references, tmp_path):
    """A MoE mix is llama-quantize's Q4_K_M with the routed experts overridden to low bits."""
    gate_up, down = experts
    options = ("--tensor-type", f"ffn_(gate|up)_exps={gate_up}", "--tensor-type", f"ffn_down_exps={down}")
    theirs = llama_cpp_reference().llama_quantize(f16_references[model], tmp_path / "theirs.gguf", "Q4_K_M",
                                                  options=options)
    assert planned_types(model, mix) == {n: t[:2] for n, t in read_gguf(theirs)[1].items()}


def test_q2_k_attn_v_follows_grouped_query_attention():
    """Q2_K gives attn_v Q4_K where 4 or more query heads share a KV head (Scout: 40 / 8), else Q3_K
    (both tiny models: 4 / 2, which the llama-quantize comparison covers)."""
    args = ("blk.0.attn_v.weight", 2, 5120, "Q2_K", 0, 48, 0)
    assert gguf_types.tensor_type(*args, n_gqa=5) == "Q4_K" and gguf_types.tensor_type(*args, n_gqa=2) == "Q3_K"
    assert gguf_types.tensor_type("blk.3.ffn_down_exps.weight", 3, 8192, "Q2_K", 3, 48, 0, n_gqa=5) == "Q3_K"
    assert gguf_types.tensor_type("blk.3.ffn_gate_exps.weight", 3, 5120, "Q2_K", 3, 48, 0, n_gqa=5) == "Q2_K"


def test_iq4_ffn_down_rule_depends_on_the_imatrix():
    """IQ4_XS / IQ4_NL put the first eighth of the layers' ffn_down in Q5_K only without an imatrix."""
    for ftype in ("IQ4_XS", "IQ4_NL"):
        args = ("blk.3.ffn_down_exps.weight", 3, 8192, ftype, 3, 48, 0)
        assert gguf_types.tensor_type(*args, n_gqa=5) == "Q5_K"
        assert gguf_types.tensor_type(*args, n_gqa=5, has_imatrix=True) == ftype
        assert gguf_types.tensor_type("blk.6.ffn_down_exps.weight", 3, 8192, ftype, 6, 48, 0, n_gqa=5) == ftype
        assert gguf_types.tensor_type("blk.9.attn_v.weight", 2, 5120, ftype, 9, 48, 9, n_gqa=5) == "Q5_K"


def test_export_warns_about_settings_llama_cpp_ignores(small_model):
    spec = arch.spec_from_config(arch.load_config(small_model))  # 4 experts with qk-norm, chunk 64
    assert len(l4q_gguf.llama_cpp_warnings(spec)) == 1
    no_qk_norm = arch.Llama4Spec(**{**spec.__dict__, "use_qk_norm": False, "attention_chunk_size": 8192})
    (warning,) = l4q_gguf.llama_cpp_warnings(no_qk_norm)
    assert "qk-norm" in warning and "4 experts" in warning


def test_cli_export_and_existing_output(tmp_path, monkeypatch):
    # Nothing goes through the temp dir (a missing one here), so a killed run leaves nothing there.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-temp-dir"))
    out = tmp_path / "t.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", "tiny", "--type", "Q8_0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "8192" in result.stderr  # the chunk warning
    assert out.is_file() and not list(tmp_path.glob("*.l4q-partial"))
    result = CliRunner().invoke(main, ["export", "gguf", "tiny", "--type", "Q8_0", "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "already exists" in result.stderr


def test_source_without_tokenizer_is_one_line(tiny, tmp_path):
    src = tmp_path / "no-tokenizer"
    src.mkdir()
    for f in tiny.path.iterdir():
        if f.name != "tokenizer.json":
            (src / f.name).symlink_to(f)
    result = CliRunner().invoke(main, ["export", "gguf", str(src), "--out", str(tmp_path / "x.gguf"), "--quiet"])
    assert result.exit_code == 1 and "no tokenizer.json" in result.stderr and result.stderr.count("\n") == 1
    assert not list(tmp_path.glob("x.gguf*"))


@pytest.fixture(scope="module")
def f16_references(tmp_path_factory):
    """llama.cpp's own converter's F16 GGUF of each tiny model, the input llama-quantize takes."""
    ref, work = llama_cpp_reference(), tmp_path_factory.mktemp("f16")
    return {m: ref.convert(sources.resolve(m).path, work / f"{m}.gguf", "f16") for m in ("tiny", "tiny-maverick")}


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
@pytest.mark.parametrize("ftype", ["Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S",
                                   "Q2_K", "Q2_K_S", "IQ4_XS", "IQ4_NL"])
def test_types_match_llama_quantize(model, ftype, f16_references, tmp_path):
    """Per-tensor types (and shapes) that l4q plans for its file types equal llama-quantize's output
    for the same model (the plan is what the export writes: test_overrides_match_llama_quantize and
    the runs below check written files); with the tests' importance matrix where the type needs one."""
    imatrix = llama_imatrix(model, tmp_path / "imatrix.gguf") if FILE_TYPES[ftype].needs_imatrix else None
    theirs = llama_cpp_reference().llama_quantize(f16_references[model], tmp_path / "theirs.gguf", ftype, imatrix)
    assert planned_types(model, ftype, imatrix is not None) == {n: t[:2] for n, t in read_gguf(theirs)[1].items()}


def llama_imatrix(model: str, out: Path) -> Path:
    """The tests' calibration statistics of `model` as llama.cpp's imatrix file."""
    from safetensors.numpy import load_file

    from llama4_quant.formats import imatrix
    from llama4_quant.model import open_model

    sums = load_file(str(STATS / model / "imatrix.safetensors"))
    entries = imatrix.gguf_imatrix_entries(
        l4q_gguf.plan(open_model(sources.resolve(model)), "F16"),
        lambda key: (sums[f"{key}.in_sum2"], sums[f"{key}.counts"]) if f"{key}.in_sum2" in sums else None)
    imatrix.write_llama_imatrix(out, entries, datasets=["tests"], chunk_size=64, chunk_count=8)
    return out


def planned_types(model: str, ftype: str, has_imatrix: bool = False) -> dict:
    """name -> (block type, GGUF-order shape) of every tensor l4q plans for `model` at `ftype`."""
    from llama4_quant.model import open_model

    plan = l4q_gguf.plan(open_model(sources.resolve(model)), ftype, has_imatrix=has_imatrix)
    return {t.name: (t.qtype, tuple(reversed(t.shape))) for t in plan}


@pytest.mark.parametrize("ftype, qtype", [("Q8_0", "Q8_0"), ("Q4_0", "Q4_0")])
def test_exported_blocks_equal_gguf_py_quantize(tiny, tmp_path, ftype, qtype):
    """Whole exported tensors (an expert tensor included) equal gguf-py's reference quantizer's bytes."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from llama4_quant.checkpoint import Checkpoint, read_tensor

    out = l4q_gguf.export_gguf(tiny, tmp_path / "x.gguf", ftype, show_progress=False).out
    ours = read_gguf(out)[1]
    ckpt = Checkpoint(tiny.path)
    q = read_tensor(ckpt.by_name["language_model.model.layers.1.self_attn.q_proj.weight"]).float().numpy()
    gate_up = read_tensor(ckpt.by_name["language_model.model.layers.2.feed_forward.experts.gate_up_proj"]).float()
    up = gate_up[:, :, gate_up.shape[2] // 2 :].transpose(1, 2).contiguous().numpy()  # [E, inter, hidden]
    for name, src in (("blk.1.attn_q.weight", q), ("blk.2.ffn_up_exps.weight", up)):
        assert ours[name][0] == qtype
        reference = quants.quantize(src, GGMLQuantizationType[qtype])
        assert ours[name][2] == np.ascontiguousarray(reference).tobytes(), name


def test_types_that_need_an_imatrix_refuse_to_run_without(tmp_path):
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", "tiny", "--type", "Q2_K_S", "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "Q2_K_S needs an importance matrix" in result.stderr
    assert result.stderr.count("\n") == 1 and not list(tmp_path.iterdir())
