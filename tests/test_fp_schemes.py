"""The FP4 (NVFP4, MXFP4) and block-FP8 schemes: rounding against float64, bytes against compressed-tensors' own
compressors, fused global scales, and the names vLLM's Llama 4 loader maps."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llama4_quant import pipeline, schemes as S, sources
from llama4_quant.formats import compressed_tensors as ct

BF16 = torch.bfloat16


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed BF16 weights, a few groups much smaller than the rest, and exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.distributions.StudentT(3.0).sample((rows, cols))
    w[:, :16] *= 1e-3
    w[1, 16:48] = 0
    w[2, 5] = 0.9  # one outlier sets the global scale
    return (w * (1 + 0.01 * torch.rand(rows, cols, generator=g))).to(BF16)


# -------------------------------------------------------------------------------------------- FP4


def test_fp4_rounding_is_nearest_with_ties_to_the_even_code():
    x = torch.cat([torch.arange(-7 * 64, 7 * 64 + 1) / 64.0, torch.randn(4000) * 3])  # every tie is on 1/64 steps
    got = S.round_fp4_(x.clone())
    grid = torch.tensor(S.FP4_MAGNITUDES, dtype=torch.float64)
    a = x.double().abs().clamp(max=6)
    dist = (a[:, None] - grid[None, :]).abs()
    best = dist.min(1, keepdim=True).values
    # among the nearest magnitudes, the even code (a mantissa bit of 0) wins
    candidates = torch.where(dist == best, torch.arange(8), 99)
    even = torch.where(candidates % 2 == 0, candidates, 99).min(1).values
    code = torch.where(even < 99, even, candidates.min(1).values)
    expected = torch.where(x < 0, -grid[code], grid[code])
    assert torch.equal(got.double().abs(), expected.abs()) and torch.equal(torch.signbit(got), torch.signbit(x))
    assert torch.equal(S.fp4_values(S.fp4_codes(got)), got)
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(S.fp4_codes(S.fp4_values(codes)), codes)  # -0 included
    packed = S.pack_fp4(codes.view(1, 16))
    assert packed.tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    assert torch.equal(S.unpack_fp4(packed), codes.view(1, 16))


def compressed_tensors_nvfp4(w: torch.Tensor):
    """compressed-tensors' own NVFP4 path for one weight: global scale, group scales, packed bytes."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    wf = w.float()
    g = generate_gparam(wf.min(), wf.max())
    groups = wf.unflatten(-1, (-1, 16))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=g)
    state = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, scheme)
    return scheme, g, state["weight_scale"], state["weight_packed"]


@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_bytes_equal_compressed_tensors(seed):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    w = weights(64, 512, seed)
    scheme = ct.get_scheme("nvfp4a16")
    module = "model.layers.0.feed_forward.experts.1.gate_proj"
    ours = {n.removeprefix(module + "."): t for n, t in scheme.encode_weight(module, w)}
    ct_scheme, g, scale, packed = compressed_tensors_nvfp4(w)
    assert torch.equal(ours["weight_global_scale"], g)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours["weight_packed"], packed)
    loaded = NVFP4PackedCompressor.decompress(dict(ours), ct_scheme)["weight"]
    assert torch.equal(loaded.float(), scheme.decode_as_loaded(ours))


def test_nvfp4_mse_never_loses_to_rtn_and_stores_what_it_searched():
    from llama4_quant.scale_search import search_scales

    w = weights(32, 256, 3)
    scheme = ct.get_scheme("nvfp4a16")
    bound = scheme.for_weight(w)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(4)) ** 2
    steps = search_scales(w, scheme, imp)
    rtn = bound.rtn_scales(w)
    searched = bound.scales_with(w, steps)
    assert torch.equal(searched["weight_global_scale"], rtn["weight_global_scale"])
    assert torch.equal(S.nvfp4_steps(searched["weight_scale"], searched["weight_global_scale"]), steps)

    def err(scales):
        d = bound.dequantize(bound.quantize(w, scales), scales).double()
        return ((w.double() - d) ** 2 * imp.double()).unflatten(-1, (-1, 16)).sum(-1)

    assert bool((err(searched) <= err(rtn) * (1 + 1e-6)).all())
    assert float(err(searched).sum()) < 0.97 * float(err(rtn).sum())


def test_nvfp4_gptq_beats_rtn_on_correlated_inputs():
    from llama4_quant.calibrate.gptq import gptq_quantize
    from llama4_quant.scale_search import search_scales

    torch.manual_seed(5)
    w = weights(48, 256, 5)
    x = torch.randn(2048, 32) @ torch.randn(32, 256) + 0.1 * torch.randn(2048, 256)  # strongly correlated
    h = x.T @ x / len(x)
    bound = ct.get_scheme("nvfp4a16").for_weight(w)
    steps = search_scales(w, bound)
    result = gptq_quantize(w, h, bound, steps, block_size=128, damp=0.01, act_order=True)
    assert not result.fell_back and result.q.dtype == torch.uint8 and int(result.q.max()) < 16
    scales = bound.scales_with(w, result.scale)

    def out_err(q):
        d = bound.dequantize(q, scales)
        return float(((x @ (w.float() - d).T) ** 2).mean())

    assert out_err(result.q) < 0.8 * out_err(bound.quantize(w, scales))


# ------------------------------------------------------------------------------------------ MXFP4


def test_mxfp4_exponents_against_float64():
    """E8M0 exponent: log2 of the group absmax rounded to a power of two (up from 1.75x), minus 2."""
    import math

    powers = torch.tensor([2.0**k for k in range(-140, 128, 3)], dtype=torch.float64)
    absmax = torch.cat([powers, powers * 1.5, powers * 1.75, powers * 1.7421875, powers * 1.9921875,
                        torch.tensor([0.0, 1e-45, 3.3895313892515355e38])]).float()
    absmax = absmax[torch.isfinite(absmax)]
    got = S.mxfp4_exponents(absmax).tolist()
    for a, e in zip(absmax.double().tolist(), got):
        if a == 0:
            assert e == 0
            continue
        p = math.floor(math.log2(a))
        p += a / 2.0**p >= 1.75
        assert e == min(max(p - 2 + 127, 0), S.MXFP4_MAX_EXPONENT), a
    steps = S.mxfp4_steps(torch.tensor(got, dtype=torch.uint8))
    assert torch.equal(S.mxfp4_exponents_of_steps(steps), torch.tensor(got, dtype=torch.uint8))
    with pytest.raises(ValueError, match="powers of two"):
        S.mxfp4_exponents_of_steps(torch.tensor([0.75]))


def compressed_tensors_mxfp4(w: torch.Tensor):
    """compressed-tensors' own MXFP4 path for one weight: E8M0 scales and packed bytes."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    groups = w.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    return scheme, MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)


@pytest.mark.parametrize("seed", [0, 1])
def test_mxfp4_bytes_equal_compressed_tensors(seed):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor

    w = weights(64, 512, seed)
    w[3, :32] = torch.tensor([1.75 * 2.0**-5] + [0.0] * 31)  # a group whose absmax rounds up to a power of two
    scheme = ct.get_scheme("mxfp4a16")
    module = "model.layers.0.feed_forward.experts.1.gate_proj"
    ours = {n.removeprefix(module + "."): t for n, t in scheme.encode_weight(module, w)}
    ct_scheme, theirs = compressed_tensors_mxfp4(w)
    assert ours["weight_scale"].dtype == torch.uint8 and torch.equal(ours["weight_scale"], theirs["weight_scale"])
    assert torch.equal(ours["weight_packed"], theirs["weight_packed"])
    loaded = MXFP4PackedCompressor.decompress(dict(ours), ct_scheme)["weight"]
    assert torch.equal(loaded.float(), scheme.decode_as_loaded(ours))


def test_mxfp4_mse_and_gptq():
    from llama4_quant.calibrate.gptq import gptq_quantize
    from llama4_quant.scale_search import search_scales

    w = weights(48, 256, 11)
    scheme = ct.get_scheme("mxfp4a16")
    imp = torch.rand(256, generator=torch.Generator().manual_seed(12)) ** 2
    steps = search_scales(w, scheme, imp)
    searched, rtn = scheme.scales_with(w, steps), scheme.rtn_scales(w)
    # the candidates are powers of two: the RTN scale or the one below it
    assert bool(((rtn["weight_scale"].int() - searched["weight_scale"].int()) <= 1).all())

    def err(scales):
        d = scheme.dequantize(scheme.quantize(w, scales), scales).double()
        return ((w.double() - d) ** 2 * imp.double()).unflatten(-1, (-1, 32)).sum(-1)

    assert bool((err(searched) <= err(rtn) * (1 + 1e-6)).all())
    assert float(err(searched).sum()) < float(err(rtn).sum())
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(13)) @ torch.randn(32, 256)
    h = x.T @ x / len(x)
    result = gptq_quantize(w, h, scheme, steps, block_size=128, damp=0.01, act_order=True)
    assert not result.fell_back and result.q.dtype == torch.uint8 and int(result.q.max()) < 16

    def out_err(q):
        return float(((x @ (w.float() - scheme.dequantize(q, searched)).T) ** 2).mean())

    assert out_err(result.q) < 0.8 * out_err(scheme.quantize(w, searched))


def test_mxfp4_inputs_quantize_as_compressed_tensors_does():
    """The W4A4 scheme's dynamic input quantization (what l4q eval applies) is compressed-tensors' own."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    args = preset_name_to_scheme("MXFP4", ["Linear"]).input_activations
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(16, 512, generator=g) * torch.logspace(-4, 3, 512)).to(BF16)
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Linear(512, 1))
    quantize = ct.get_scheme("mxfp4").served_input({})
    assert torch.equal(quantize(x), fake_quantize(x, scale, zp, args))
    assert ct.get_scheme("mxfp4a16").served_input({}) is None


# ------------------------------------------------------------------------------------- FP8 block


def test_fp8_block_against_compressed_tensors():
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = weights(256, 384, 6)
    scheme = ct.get_scheme("fp8-block")
    ct_scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    blocks = w.float().unflatten(0, (2, 128)).unflatten(-1, (3, 128))
    theirs, _ = calculate_qparams(blocks.amin((1, 3)), blocks.amax((1, 3)), ct_scheme.weights)
    ours = scheme.rtn_scales(w)["weight_scale"]
    # l4q rounds the BF16 scale up (compressed-tensors to nearest): never below, at most one BF16 step above
    assert bool((ours.float() >= theirs.to(BF16).float()).all())
    assert bool((ours.float() <= theirs.float() * (1 + 2**-7)).all())
    module = "model.layers.0.feed_forward.experts.1.down_proj"
    stored = {n.removeprefix(module + "."): t for n, t in scheme.encode_weight(module, w)}
    loaded = FloatQuantizationCompressor.decompress(dict(stored), ct_scheme)["weight"]
    assert torch.equal(loaded.float(), scheme.decode_as_loaded(stored))
    # Given the same scales, compressed-tensors divides BF16 by BF16 in BF16, so its quotient is rounded
    # twice (to BF16, then to FP8); l4q divides in float32 and rounds once. Where the two differ, l4q's
    # value is the nearer one, and never more than one FP8 step away from theirs.
    same = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ours}, ct_scheme)["weight"]
    s = ours.float().repeat_interleave(128, 0).repeat_interleave(128, 1)
    mine_err = (w.float() - stored["weight"].float() * s).abs()
    their_err = (w.float() - same.float() * s).abs()
    assert bool((mine_err <= their_err).all())
    steps = (stored["weight"].view(torch.uint8).int() - same.view(torch.uint8).int()).abs()
    assert int(steps.max()) <= 1


def test_fp8_block_search_and_gptq_keep_one_scale_per_block():
    """mse sums the error of a block's 128 rows for each candidate; GPTQ rounds with that block scale."""
    from llama4_quant.calibrate.gptq import gptq_quantize
    from llama4_quant.scale_search import search_scales

    w = weights(256, 256, 8)
    scheme = ct.get_scheme("fp8-block")
    imp = torch.rand(256, generator=torch.Generator().manual_seed(9)) ** 2
    per_row = search_scales(w, scheme, imp)
    assert per_row.shape == (256, 2)
    assert torch.equal(per_row, per_row[::128].repeat_interleave(128, 0))
    searched, rtn = scheme.scales_with(w, per_row), scheme.rtn_scales(w)
    assert bool((searched["weight_scale"] <= rtn["weight_scale"]).all())

    def block_err(scales):
        d = scheme.dequantize(scheme.quantize(w, scales), scales).double()
        return ((w.double() - d) ** 2 * imp.double()).unflatten(0, (2, 128)).unflatten(-1, (2, 128)).sum((1, 3))

    assert bool((block_err(searched) <= block_err(rtn) * (1 + 1e-6)).all())
    assert float(block_err(searched).sum()) < float(block_err(rtn).sum())
    wf = w.float()  # GPTQ hands the kernels float32 weights: they must not change them
    assert torch.equal(search_scales(wf, scheme, imp), per_row) and torch.equal(wf, w.float())
    with pytest.raises(ValueError, match="equal over each block"):
        scheme.scales_with(w, torch.cat([per_row[:1] * 2, per_row[1:]]))

    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(10)) @ torch.randn(32, 256)
    h = x.T @ x / len(x)
    result = gptq_quantize(w, h, scheme, per_row, block_size=128, damp=0.01, act_order=True)
    assert not result.fell_back and result.q.dtype == torch.float8_e4m3fn

    def out_err(q):
        return float(((x @ (w.float() - scheme.dequantize(q, searched)).T) ** 2).mean())

    assert out_err(result.q) < 0.9 * out_err(scheme.quantize(w, searched))


# ---------------------------------------------------------------------------- whole tiny outputs

# vLLM's FusedMoE.make_expert_params_mapping, as its Llama 4 loader uses it: a checkpoint name holding
# `experts.{e}.{proj}.` becomes `experts.w13_` (gate, up: shards w1, w3) or `experts.w2_` (down) +
# the suffix, loaded into expert e's shard of that fused parameter.
VLLM_SHARDS = {"gate_proj": ("w13_", "w1"), "up_proj": ("w13_", "w3"), "down_proj": ("w2_", "w2")}
# The per-expert parameters vLLM's compressed-tensors MoE methods register, by scheme.
VLLM_MOE_PARAMS = {
    "int4": {"weight_packed", "weight_scale", "weight_shape"},
    "fp8-block": {"weight", "weight_scale"},
    "nvfp4a16": {"weight_packed", "weight_scale", "weight_global_scale"},
    "nvfp4": {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"},
    "mxfp4a16": {"weight_packed", "weight_scale"},
    "mxfp4": {"weight_packed", "weight_scale"},
}


def vllm_expert_param(name: str) -> tuple[str, int, str] | None:
    m = re.search(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.", name)
    if m is None:
        return None
    prefix, shard = VLLM_SHARDS[m.group(2)]
    return name.replace(m.group(0), f".experts.{prefix}"), int(m.group(1)), shard


@pytest.fixture(scope="module")
def tiny_stats(tmp_path_factory):
    from click.testing import CliRunner

    from cli.main import main

    out = tmp_path_factory.mktemp("stats") / "stats"
    result = CliRunner().invoke(main, ["calibrate", "tiny", "--out", str(out), "--samples", "8", "--seq-len", "64",
                                       "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny_outputs(tmp_path_factory, tiny_stats):
    out = tmp_path_factory.mktemp("fp")
    src = sources.resolve("tiny")
    for scheme in ("nvfp4a16", "fp8-block", "int4", "mxfp4a16", "mxfp4"):
        pipeline.quantize(src, out / scheme, scheme, show_progress=False)
    pipeline.quantize(src, out / "nvfp4", "nvfp4", calib=tiny_stats, show_progress=False)
    return out


def tensors(path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            found.update({n: f.get_tensor(n) for n in f.keys()})
    return found


@pytest.mark.parametrize("scheme", ["nvfp4a16", "nvfp4", "fp8-block", "int4", "mxfp4a16", "mxfp4"])
def test_expert_names_map_onto_vllm_parameters(tiny_outputs, scheme):
    import json

    config = json.loads((tiny_outputs / scheme / "config.json").read_text())
    qc = config["quantization_config"]
    assert ct.scheme_for_config(qc) is ct.get_scheme(scheme) and len(qc["config_groups"]) == 1  # one scheme
    spec_experts = config["text_config"]["num_local_experts"]
    loaded = Counter()
    for name in tensors(tiny_outputs / scheme):
        mapped = vllm_expert_param(name)
        if mapped is None:
            assert ".experts." not in name, name
            continue
        param, expert, shard = mapped
        base, _, suffix = param.rpartition(".experts.")
        assert suffix.split("_", 1)[1] in VLLM_MOE_PARAMS[scheme], name
        loaded[(base, suffix, shard)] += 1
        assert 0 <= expert < spec_experts
    assert loaded and set(loaded.values()) == {spec_experts}  # every expert, every shard, exactly once


def test_fused_groups_share_their_global_scale(tiny_outputs):
    found = tensors(tiny_outputs / "nvfp4a16")
    gates = [n for n in found if n.endswith("gate_proj.weight_global_scale")]
    assert len(gates) > 16
    for gate in gates:
        up = gate.replace("gate_proj", "up_proj")
        assert torch.equal(found[gate], found[up]), gate
        # the shared global scale is the pair's: the larger absmax of the two sets it
        g = found[gate]
        assert bool((found[gate.replace("weight_global_scale", "weight_scale")].float() <= 448).all()) and g > 0
    downs = [found[n] for n in found if n.endswith("down_proj.weight_global_scale")]
    assert len({float(d) for d in downs}) > 1


# ------------------------------------------------------------------------------------ nvfp4 (W4A4)


def test_nvfp4_input_scales_come_from_the_calibrated_ranges(tiny_outputs, tiny_stats):
    from llama4_quant.calibrate.stats import Stats

    found = tensors(tiny_outputs / "nvfp4")
    stats = Stats(tiny_stats)
    names = [n for n in found if n.endswith(".input_global_scale")]
    assert len(names) == len([n for n in found if n.endswith(".weight_packed")])  # every quantized Linear
    for name in names:
        m = re.search(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.", name)
        if m:
            absmax = stats.input_absmax(f"{m.group(1)}.{m.group(3)}")[int(m.group(2))]
        else:
            absmax = stats.input_absmax(name.removesuffix(".input_global_scale"))[0]
        assert torch.equal(found[name], S.nvfp4_global_scale(absmax)), name
        if ".gate_proj." in name:  # gate and up read the same input
            assert torch.equal(found[name], found[name.replace("gate_proj", "up_proj")])
    # the weights are nvfp4a16's, byte for byte
    weights_only = tensors(tiny_outputs / "nvfp4a16")
    assert all(torch.equal(t.view(torch.uint8), weights_only[n].view(torch.uint8))
               for n, t in found.items() if not n.endswith(".input_global_scale") and t.dtype != torch.float32)


def test_nvfp4_without_statistics_is_one_line(tmp_path, tiny_stats):
    import shutil

    from click.testing import CliRunner

    from cli.main import main

    result = CliRunner().invoke(main, ["quantize", "--model", "tiny", "--to", "nvfp4", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "--calib" in result.stderr
    old = Path(shutil.copytree(tiny_stats, tmp_path / "old-stats"))
    (old / "activations.safetensors").unlink()  # statistics from before activation ranges were recorded
    result = CliRunner().invoke(main, ["quantize", "--model", "tiny", "--to", "nvfp4", "--calib", str(old),
                                       "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "rerun l4q calibrate" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_eval_quantizes_nvfp4_inputs_as_vllm_does(tiny_outputs):
    """transformers decompresses the weights and drops the input quantization; l4q's eval puts it back."""
    from llama4_quant import evaluate

    model = evaluate.load_causal_lm(tiny_outputs / "nvfp4")
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    assert len(hooked) == len([n for n in tensors(tiny_outputs / "nvfp4") if n.endswith(".input_global_scale")])
    ids = torch.arange(1, 33).view(1, 32)
    with torch.no_grad():
        w4a4 = model(ids).logits
        w4a16 = evaluate.load_causal_lm(tiny_outputs / "nvfp4a16")(ids).logits
    assert not torch.equal(w4a4, w4a16) and float((w4a4 - w4a16).abs().max()) < 5
    x = torch.randn(3, 64)
    g = S.nvfp4_global_scale(x.abs().max())
    y = S.nvfp4_fake_quantize_input(x, g)
    # per group of 16: FP4 values times the group's step, the step from the group's absmax
    steps = S.nvfp4_steps(S.nvfp4_scales(x.unflatten(-1, (4, 16)).abs().amax(-1), g), g)
    assert torch.equal(y, S.round_fp4_((x.unflatten(-1, (4, 16)) / steps[..., None]).clamp(-6, 6)).mul(
        steps[..., None]).flatten(-2))


def test_eval_quantizes_mxfp4_inputs_dynamically(tiny_outputs):
    from llama4_quant import evaluate

    model = evaluate.load_causal_lm(tiny_outputs / "mxfp4")
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    assert len(hooked) == len([n for n in tensors(tiny_outputs / "mxfp4") if n.endswith(".weight_packed")]) > 0
    ids = torch.arange(1, 33).view(1, 32)
    with torch.no_grad():
        w4a4 = model(ids).logits
        w4a16 = evaluate.load_causal_lm(tiny_outputs / "mxfp4a16")(ids).logits
    assert not torch.equal(w4a4, w4a16) and float((w4a4 - w4a16).abs().max()) < 5
    assert not [m for m in evaluate.load_causal_lm(tiny_outputs / "int4").modules() if m._forward_pre_hooks]


def test_experts_a_layout_cannot_hold_are_one_line(tmp_path):
    """Routed experts whose rows a scheme's groups (or blocks) do not divide are refused, not kept BF16."""
    from click.testing import CliRunner

    from cli.main import main
    from conftest import small_config
    from llama4_quant import synthetic

    config = small_config(num_layers=2)
    config["text_config"]["intermediate_size"] = 48  # down_proj rows of 48: whole groups of 16, not of 32 or 128
    model = synthetic.write_synthetic_checkpoint(tmp_path / "model", config)
    for scheme in ("mxfp4a16", "int4", "fp8-block"):
        result = CliRunner().invoke(main, ["quantize", "--model", str(model), "--to", scheme,
                                           "--out", str(tmp_path / scheme)])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
        expected = "gate_proj (48 x 256)" if scheme == "fp8-block" else "down_proj (256 x 48)"  # blocks need 128 rows
        assert f"--to {scheme} cannot hold the routed experts' {expected}" in result.stderr
        assert not (tmp_path / scheme).exists()
    result = CliRunner().invoke(main, ["quantize", "--model", str(model), "--to", "nvfp4a16",
                                       "--out", str(tmp_path / "nvfp4a16"), "--quiet"])
    assert result.exit_code == 0, result.stderr  # groups of 16 divide 48
    assert "language_model.model.layers.1.feed_forward.experts.3.down_proj.weight_packed" in tensors(tmp_path / "nvfp4a16")
