"""One job in several processes: the real CLI under torchrun, 2 ranks with the gloo backend on 127.0.0.1,
against the same command in one process. Every output must be byte-identical, and a job whose rank 1 is
killed mid-run must resume (with any number of ranks) to the same bytes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from llama4_quant import distributed

REPO = Path(__file__).resolve().parents[1]
# One thread in every process: the promise is the same bytes with the same threads per process (on some
# CPUs, torch's matrix products at 2 threads and at 1 differ in the last bits), and 2 ranks on this
# machine get one core each.
CALIBRATE = ["--samples", "6", "--seq-len", "48", "--threads", "1", "--quiet"]
# GPTQ int4 in several shards and an imatrix-weighted K-quant GGUF, from one read
QUANTIZE = ["--to", "int4", "--method", "gptq", "--gguf", "Q4_K_M", "--max-shard-size", "2MB", "--threads", "1",
            "--quiet"]

# Runs the CLI with rank 1 killed (SIGKILL, as by the OOM killer) at a chosen moment; rank 0 is then
# stopped by torchrun.
KILL_RANK_1 = """
import os, signal, sys
if os.environ["RANK"] == "1":
    when = os.environ["KILL_WHEN"]
    if when == "gptq-layer-1":  # right after saving its share of layer 1, before the others see it
        from llama4_quant.calibrate import methods
        real_save = methods.GPTQPass.save_layer
        def save_layer(self, layer, work_dir):
            real_save(self, layer, work_dir)
            if layer == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        methods.GPTQPass.save_layer = save_layer
    else:  # "written-2": right after recording the second piece of output it wrote
        from llama4_quant import outputs
        real_mark = outputs.Partial.mark_done
        marked = []
        def mark_done(self, item):
            real_mark(self, item)
            marked.append(item)
            if len(marked) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        outputs.Partial.mark_done = mark_done
from cli.main import main
sys.argv = ["l4q"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def l4q(args: list[str], cwd: Path, ranks: int = 1, kill_when: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in one process (ranks=1) or as a torchrun job of `ranks` processes."""
    program = ["-m", "cli.main"]
    if kill_when:
        (cwd / "kill_rank_1.py").write_text(KILL_RANK_1)
        program = [str(cwd / "kill_rank_1.py")]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                     "--master-port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_WHEN": kill_when or ""}
    return subprocess.run([*launcher, *program, *args], cwd=cwd, env=env, capture_output=True, text=True)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(expected: Path, actual: Path) -> None:
    want, got = files(expected), files(actual)
    assert sorted(want) == sorted(got)
    different = [name for name in want if want[name] != got[name]]
    assert not different, different


# ---------------------------------------------------------------------------------------------
# The work split


def test_owned_ranges_partition_the_experts_in_order():
    for count in (1, 5, 16, 128):
        for world in (1, 2, 3, 8, 20):
            ranges = [distributed.owned_range(count, r, world) for r in range(world)]
            assert [e for r in ranges for e in r] == list(range(count))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_assignment_is_balanced_and_the_same_everywhere():
    sizes = [100, 5, 70, 30, 30, 1, 64]
    owner = distributed.assign(sizes, 2)
    assert owner == distributed.assign(list(sizes), 2)
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert sum(load) == sum(sizes) and max(load) - min(load) <= 30  # 140 / 160: largest-first greedy
    assert distributed.assign(sizes, 1) == [0] * len(sizes)
    assert set(distributed.assign([1] * 3, 8)) == {0, 1, 2}  # more ranks than items: some own nothing


def test_single_process_commands_are_refused_in_a_job(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["eval", "tiny", str(tmp_path / "q")])
    assert result.exit_code == 2
    assert "l4q eval runs in one process" in result.output


# ---------------------------------------------------------------------------------------------
# One process vs two: calibration statistics, GPTQ int4 shards and an imatrix GGUF


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """model -> the directory holding the one-process run's statistics and quantized outputs (run once)."""
    done = {}

    def run(model: str) -> Path:
        if model not in done:
            cwd = tmp_path_factory.mktemp(f"one-{model}")
            ok(l4q(["calibrate", model, "--out", "stats", *CALIBRATE], cwd))
            ok(l4q(["quantize", "--model", model, *QUANTIZE, "--calib", "stats", "--out-dir", "out"], cwd))
            done[model] = cwd
        return done[model]

    return run


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_calibration_statistics_are_identical(one_process, tmp_path, model):
    ref = one_process(model)
    ok(l4q(["calibrate", model, "--out", "stats", *CALIBRATE], tmp_path, ranks=2))
    assert_same_files(ref / "stats", tmp_path / "stats")


@pytest.mark.parametrize("model", ["tiny", "tiny-maverick"])
def test_gptq_and_gguf_outputs_are_identical(one_process, tmp_path, model):
    ref = one_process(model)
    result = l4q(["quantize", "--model", model, *QUANTIZE, "--calib", str(ref / "stats"), "--out-dir", "out"],
                 tmp_path, ranks=2)
    ok(result)
    assert len(list((tmp_path / "out").glob("*-int4/*.safetensors"))) >= 3  # both ranks wrote shards
    assert_same_files(ref / "out", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# A rank killed mid-run, then --resume


@pytest.mark.parametrize("kill_when, resume_ranks", [("gptq-layer-1", 2), ("written-2", 1)])
def test_killed_rank_then_resume_gives_the_same_bytes(one_process, tmp_path, kill_when, resume_ranks):
    model = "tiny"
    ref = one_process(model)
    args = ["quantize", "--model", model, *QUANTIZE, "--calib", str(ref / "stats"), "--out-dir", "out"]
    killed = l4q(args, tmp_path, ranks=2, kill_when=kill_when)
    assert killed.returncode != 0
    assert "Signal 9" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-4000:]
    out = tmp_path / "out"
    assert not [p for p in out.iterdir() if not p.name.endswith(".l4q-partial")]  # nothing looks finished
    if kill_when == "gptq-layer-1":  # rank 0 refuses the partial output, and the job ends instead of waiting
        again = l4q(args, tmp_path, ranks=2)
        assert again.returncode != 0 and "--resume" in again.stderr
    ok(l4q([*args, "--resume"], tmp_path, ranks=resume_ranks))
    assert_same_files(ref / "out", out)
