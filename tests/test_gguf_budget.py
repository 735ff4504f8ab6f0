"""`l4q export gguf --target-size / --target-bpw`: per-tensor types chosen within a budget."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from cli.main import main
from llama4_quant import evaluate, sources
from llama4_quant.calibrate.stats import Stats
from llama4_quant.checkpoint import read_slice, read_tensor
from llama4_quant.errors import UsageError
from llama4_quant.formats import gguf as l4q_gguf
from llama4_quant.formats import gguf_budget
from llama4_quant.model import open_model, unfuse_gate_up

STATS = Path(__file__).parent / "data" / "stats"


def test_allocation_is_the_best_within_the_budget():
    """Against every combination of a small random problem: the choice fits, and no other choice that
    fits has less error by more than the Lagrangian's gap (one tensor's step)."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        options = {}
        for n in range(5):
            sizes = np.sort(rng.integers(10, 200, 4))
            errors = np.sort(rng.random(4))[::-1] * rng.uniform(0.1, 10)
            options[f"t{n}"] = [gguf_budget.Option(q, int(b), float(e)) for q, b, e in zip("abcd", sizes, errors)]
        smallest = sum(o[0].nbytes for o in options.values())
        budget = int(smallest + rng.random() * 300)
        chosen = gguf_budget.allocate(options, budget)
        pick = {n: next(o for o in opts if o.qtype == chosen[n]) for n, opts in options.items()}
        assert sum(o.nbytes for o in pick.values()) <= budget
        best = min(sum(o.error for o in combo) for combo in itertools.product(*options.values())
                   if sum(o.nbytes for o in combo) <= budget)
        largest_step = max(o[0].error - o[-1].error for o in options.values())
        assert sum(o.error for o in pick.values()) <= best + largest_step, trial
        assert sum(o.error for o in pick.values()) <= best * 1.5 + 1e-9, trial


def test_a_budget_below_the_smallest_choice_is_refused():
    options = {"t": [gguf_budget.Option("Q2_K", 100, 1.0), gguf_budget.Option("Q4_K", 200, 0.1)]}
    with pytest.raises(UsageError, match="at least 0.00 MB"):
        gguf_budget.allocate(options, 99)


def exact_error(model, name: str, layer: int | None, importance: np.ndarray, shares, qtype: str) -> float:
    """The importance-weighted error of a whole tensor (every row; every expert, by routing share)."""
    info = model.ckpt.by_name[name]
    if "experts" not in name:
        return gguf_budget.weighted_error(read_tensor(info).float(), importance, qtype)
    total = 0.0
    for e in range(info.shape[0]):
        stored = read_slice(info, e)
        matrix = unfuse_gate_up(stored)[0] if name.endswith("gate_up_proj") else stored.T
        total += shares[e] * gguf_budget.weighted_error(matrix.float().contiguous(), importance[e], qtype)
    return total


@pytest.mark.parametrize("model_name", ["tiny", "tiny-maverick"])
def test_sampled_errors_estimate_the_whole_tensor(model_name):
    model = open_model(sources.resolve(model_name))
    stats = Stats(STATS / model_name)
    tensors = l4q_gguf.plan(model, "Q4_K_M", has_imatrix=True)
    options = gguf_budget.estimate(model, tensors, stats.importance, stats.routing_shares, set())
    p = model.spec.layer_prefix
    checks = {"blk.1.attn_q.weight": (f"{p}1.self_attn.q_proj.weight", f"{p}1.self_attn.q_proj", None),
              "blk.1.ffn_gate_exps.weight": (f"{p}1.feed_forward.experts.gate_up_proj", f"{p}1.feed_forward.experts.gate", 1)}
    for gguf_name, (hf_name, key, layer) in checks.items():
        for option in options[gguf_name]:
            exact = exact_error(model, hf_name, layer, stats.importance(key), stats.routing_shares(1), option.qtype)
            assert option.error == pytest.approx(exact, rel=0.35), (gguf_name, option.qtype)
        errors = [o.error for o in options[gguf_name]]
        assert errors == sorted(errors, reverse=True)  # more bits, less error
    assert "token_embd.weight" not in options and "output.weight" not in options  # no importance data


def export(model: str, *args: str, out: Path) -> Path:
    result = CliRunner().invoke(main, ["export", "gguf", model, "--imatrix", str(STATS / model), "--out", str(out),
                                       "--quiet", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_target_size_beats_the_plain_type_of_that_size_in_llama_cpp(model, tmp_path):
    """At Q3_K_S's size, the chosen mix is no larger and closer to BF16 in llama.cpp."""
    plain = export(model, "--type", "Q3_K_S", out=tmp_path / "plain.gguf")
    size = plain.stat().st_size
    mixed = export(model, "--target-size", str(size), out=tmp_path / "mixed.gguf")
    assert size * 0.98 < mixed.stat().st_size <= size
    types = {t.tensor_type.name for t in GGUFReader(str(mixed)).tensors}
    assert len(types - {"F32"}) >= 3  # a mix, not one type
    report = evaluate.evaluate(sources.resolve(model), [plain, mixed], ctx=256, max_tokens=16 * 256, progress=False)
    kld = [c["kld"]["mean"] for c in report["candidates"]]
    print(f"{model}: Q3_K_S {size} bytes, mean KLD {kld[0]:.5f}; --target-size {mixed.stat().st_size}: {kld[1]:.5f}")
    assert kld[1] < kld[0] / 1.5


def test_target_bpw_and_its_errors(tmp_path):
    out = export("tiny", "--target-bpw", "4.5", out=tmp_path / "bpw.gguf")
    reader = GGUFReader(str(out))
    elements = sum(int(np.prod(t.shape)) for t in reader.tensors)
    bits = 8 * sum(t.n_bytes for t in reader.tensors)
    assert 4.3 < bits / elements <= 4.5
    cases = {
        ("--target-size", "6MB"): "--imatrix",
        ("--target-size", "1MB", "--imatrix", str(STATS / "tiny")): "at least",
        ("--target-size", "6MB", "--target-bpw", "4", "--imatrix", str(STATS / "tiny")): "not both",
    }
    for args, words in cases.items():
        result = CliRunner().invoke(main, ["export", "gguf", "tiny", "--out", str(tmp_path / "x.gguf"), "--quiet", *args])
        assert result.exit_code != 0 and words in result.output, (args, result.output)
        assert not list(tmp_path.glob("x.gguf*"))


def test_pinned_tensors_keep_their_override(tmp_path):
    out = export("tiny", "--target-bpw", "4", "--tensor-type", "attn_v=Q8_0", out=tmp_path / "p.gguf")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert all(q == "Q8_0" for n, q in types.items() if ".attn_v." in n)
    again = export("tiny", "--target-bpw", "4", "--tensor-type", "attn_v=Q8_0", out=tmp_path / "q.gguf")
    assert out.read_bytes() == again.read_bytes()
