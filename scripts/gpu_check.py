"""One-shot check of the CUDA paths on a lent GPU machine: every kernel and pass on the GPU against the CPU.

Sections run in this order, most telling first, each on its own (a failing section is reported and
the next one runs; the exit status says which failed), each row printed as soon as it is measured
and, with --rows FILE, appended to FILE as one JSON line, so a lease that ends early still returns
what was measured:

1. Several GPUs (skipped with fewer than two): `l4q calibrate` and `l4q quantize --to int4 --method
   gptq --gguf Q4_K_M` on `tiny-maverick` (128 experts), once in one process on one GPU and once as a
   torchrun job of one rank per GPU (NCCL); wall time of each and whether the job's files are
   byte-identical to the one-process run's (`--ranks-on cpu` rehearses it with gloo on the CPU).
2. int4, fp8, GGUF Q8_0 and Q4_K_M of the last of --models written with `--device cpu` and on CUDA:
   wall time of each and whether the files are byte-identical (they should be: the kernels do the
   same float32 operations, every division correctly rounded, on both).
3. On one Scout-shaped synthetic decoder layer (~8 GB, written by a background process while
   section 2 runs): its 16 routed experts' 48 projections (2.0 G parameters) encoded as Q4_K on the
   GPU (issue #12's target: under 10 s on an H100-class GPU), expert 0's encoded on the CPU too and
   compared byte for byte (Q4_K and Q8_0); then int4, fp8, Q8_0 and Q4_K_M of the whole checkpoint
   on the GPU, timed.
4. On each of --models: the calibration pass (routing counts and importance matrix) and a GPTQ int4
   quantization on each device with the same token ids; how far the CUDA results are from the CPU
   ones and the time per layer of each. GPTQ is not expected to be bit-identical across devices:
   the GPU sums matrix products in another order, each rounding decision feeds the next columns, and
   the differences grow layer by layer through the sequential pass.
5. The Scout-shaped layer's calibration and GPTQ passes on CUDA, time and peak GPU memory, and GPTQ
   of one Scout-sized expert projection on both devices compared value by value.
6. vLLM (skipped where vLLM or a GPU is missing): each compressed-tensors scheme's `tiny` derivative
   (nvfp4 calibrated here) loaded in vLLM, its prompt log-probabilities on held-out ids compared
   with transformers' on the same ids (l4q's loader: W4A4 inputs quantized as vLLM's kernels do),
   and the BF16 model as the control row. A scheme vLLM refuses is reported, not fatal.

    python scripts/gpu_check.py --rows rows.jsonl    # what a lent device runs (~9 min on an H200)
    python scripts/gpu_check.py --devices cpu cpu --scout ~/.cache/l4q/tiny-maverick-...  # a CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.distributed import launcher  # noqa: E402
from benchmarks.gguf_export import borrow_tiny_tokenizer  # noqa: E402
from benchmarks.multi_target import digest  # noqa: E402
from llama4_quant import sources, synthetic  # noqa: E402
from llama4_quant.calibrate.data import calibration_ids  # noqa: E402
from llama4_quant.calibrate.gptq import gptq_quantize  # noqa: E402
from llama4_quant.calibrate.stats import Stats, calibrate, hessian  # noqa: E402
from llama4_quant.calibrate.weights import WeightSource  # noqa: E402
from llama4_quant.formats import gguf_quants  # noqa: E402
from llama4_quant.formats.gguf import export_gguf  # noqa: E402
from llama4_quant.pipeline import quantize  # noqa: E402
from llama4_quant.scale_search import search_scales  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def compare_tiny(name: str, devices: list[str], work: Path, samples: int, seq_len: int) -> list[dict]:
    src = sources.resolve(name)
    ids, description = calibration_ids(src.path, None, samples, seq_len)
    layers = WeightSource(src.path).spec.num_layers
    results = {}
    for i, device in enumerate(devices):
        stats_dir = work / f"{name}-stats-{i}"
        result, t_cal = timed(device, lambda: calibrate(src, stats_dir, ids, description, device=device, show_progress=False))
        calibrate_stats = Stats(stats_dir)
        out, t_gptq = timed(device, lambda: quantize(src, work / f"{name}-gptq-{i}", "int4", method="gptq",
                                                      calib=stats_dir, device=device, show_progress=False).out)
        results[i] = (result.stats, calibrate_stats, out, t_cal, t_gptq)
    (s0, c0, o0, *_), (s1, c1, o1, *_) = results[0], results[1]
    count_diff = max(abs(a["tokens"] - b["tokens"]) for la, lb in zip(s0["moe_layers"], s1["moe_layers"])
                     for a, b in zip(la["experts"], lb["experts"]))
    imp_diff = 0.0
    for key in ("self_attn.q_proj", "feed_forward.experts.gate", "feed_forward.experts.down"):
        a = torch.from_numpy(c0.importance(f"language_model.model.layers.{layers - 1}.{key}"))
        b = torch.from_numpy(c1.importance(f"language_model.model.layers.{layers - 1}.{key}"))
        imp_diff = max(imp_diff, ((a - b).abs().max() / a.abs().max()).item())
    w0, w1 = WeightSource(o0), WeightSource(o1)
    same, total, werr = 0, 0, 0.0
    for module in [f"language_model.model.layers.{layers - 1}.self_attn.q_proj",
                   f"language_model.model.layers.{layers - 1}.feed_forward.experts.3.down_proj"]:
        a, b = w0.linear(module), w1.linear(module)
        same += int((a == b).sum())
        total += a.numel()
        werr = max(werr, ((a - b).norm() / a.norm()).item())
    return [{
        "model": name, "devices": devices, "tokens": int(ids.numel()),
        "max routed-count difference": count_diff, "max relative importance difference": f"{imp_diff:.2e}",
        "GPTQ weights identical": f"{same / total:.2%}", "GPTQ weight rel. difference": f"{werr:.2e}",
        **{f"calibrate s/layer ({d})": f"{results[i][3] / layers:.2f}" for i, d in enumerate(devices)},
        **{f"gptq s/layer ({d})": f"{results[i][4] / layers:.2f}" for i, d in enumerate(devices)},
    }]


def scout_checkpoint(work: Path) -> Path:
    path = work / "scout-1L"
    if not path.is_dir():
        synthetic.write_synthetic_checkpoint(path, synthetic.scout_config(1))
        borrow_tiny_tokenizer(path)
    return path


def derivatives(devices: list[str], model: Path, work: Path) -> dict:
    """int4, fp8, Q8_0 and Q4_K_M of `model` written on each of `devices`: times and whether the bytes match."""
    src = sources.resolve(str(model))
    row = {"model": model.name, "devices": devices}
    for target in ("int4", "fp8", "Q8_0", "Q4_K_M"):
        digests = []
        for i, dev in enumerate(devices):
            out = work / f"{target}-{i}" if target in ("int4", "fp8") else work / f"{target}-{i}.gguf"
            if target in ("int4", "fp8"):
                _, seconds = timed(dev, lambda: quantize(src, out, target, device=dev, show_progress=False))
            else:
                _, seconds = timed(dev, lambda: export_gguf(src, out, target, device=dev, show_progress=False))
            digests.append(digest(out))
            row[f"{target} {dev} s"] = f"{seconds:.1f}"
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if len(devices) > 1:
            row[f"{target} same bytes"] = digests[0] == digests[1]
    return row


def moe_layer_kernels(device: str, model: Path) -> dict:
    """The first MoE layer's routed expert projections encoded as Q4_K on `device` (issue #12's
    target for a Scout layer: under 10 s on an H100-class GPU), and expert 0's projections encoded
    on the CPU too, compared byte for byte, for Q4_K and Q8_0."""
    weights = WeightSource(model)
    layer = weights.spec.moe_layers[0]
    experts = [p.to(torch.bfloat16) for e in range(weights.spec.num_experts) for p in weights.expert(layer, e)]
    gguf_quants.quantize(experts[0][:256], "Q4_K", device=device)  # warm-up: CUDA context, kernels
    _, seconds = timed(device, lambda: [gguf_quants.quantize(p, "Q4_K", device=device) for p in experts])
    row = {"model": model.name, "device": device, "layer": layer, "routed expert projections": len(experts),
           "parameters": sum(p.numel() for p in experts),
           f"all to Q4_K on {device} s": f"{seconds:.2f}"}
    per_expert = len(experts) // weights.spec.num_experts
    for qtype in ("Q4_K", "Q8_0"):
        same = [np.array_equal(gguf_quants.quantize(p, qtype, device="cpu"), gguf_quants.quantize(p, qtype, device=device))
                for p in experts[:per_expert]]
        row[f"expert 0 {qtype} cpu == {device}"] = all(same)
    return row


def scout_layer(device: str, model: Path, work: Path, samples: int, seq_len: int) -> dict:
    src = sources.resolve(str(model))
    ids = torch.randint(0, 202048, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    _, t_cal = timed(device, lambda: calibrate(src, work / "scout-stats", ids, "random ids", device=device, show_progress=False))
    cal_peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    _, t_gptq = timed(device, lambda: quantize(src, work / "scout-gptq", "int4", method="gptq", calib=work / "scout-stats",
                                               device=device, show_progress=False))
    gptq_peak = torch.cuda.max_memory_allocated() / 1e9
    # One expert projection [8192, 5120] with a Hessian from random inputs, on both devices.
    w = WeightSource(model).expert(0, 0)[0]
    x = torch.randn(4096, w.shape[1], generator=torch.Generator().manual_seed(1))
    h = hessian(x)
    q = {}
    for dev in ("cpu", device):
        wd, hd = w.to(dev), h.to(dev)
        q[dev], seconds = timed(dev, lambda: gptq_quantize(wd, hd, "int4", search_scales(wd, "int4", hd.diagonal())).q.cpu())
        q[dev + " s"] = seconds
    return {"model": "Scout-shaped synthetic, 1 layer", "device": device, "tokens": samples * seq_len,
            "calibrate s/layer": f"{t_cal:.1f}", "calibrate peak GPU GB": f"{cal_peak:.2f}",
            "gptq s/layer (incl. writing)": f"{t_gptq:.1f}", "gptq peak GPU GB": f"{gptq_peak:.2f}",
            "one expert gate_proj GPTQ s (cpu)": f"{q['cpu s']:.1f}", f"... ({device})": f"{q[device + ' s']:.2f}",
            "same int4 values cpu vs cuda": f"{(q['cpu'] == q[device]).float().mean().item():.2%}"}


def vllm_child(model_dir: str, ids_file: str, out_file: str) -> None:
    """In a fresh process (vLLM keeps GPU memory until exit): the log-probability vLLM gives each
    prompt token after the first, and its top-1 token at each position."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ids = json.loads(Path(ids_file).read_text())
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=len(ids[0]) + 8, limit_mm_per_prompt={"image": 0})
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    rows = []
    for out in llm.generate([TokensPrompt(prompt_token_ids=seq) for seq in ids], params):
        logprobs, top1 = [], []
        for tok, pos in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            logprobs.append(pos[tok].logprob)
            top1.append(next(t for t, lp in pos.items() if lp.rank == 1))
        rows.append({"logprobs": logprobs, "top1": top1})
    Path(out_file).write_text(json.dumps(rows))


def compare_in_vllm(work: Path, seqs: int = 4, seq_len: int = 128) -> list[dict]:
    """Section 4: every scheme's tiny derivative in vLLM against transformers on the same ids."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        print("vLLM section skipped: " + ("vLLM is not installed" if torch.cuda.is_available() else "no CUDA GPU"))
        return []
    from llama4_quant import evaluate
    from llama4_quant.formats import compressed_tensors as ct

    from llama4_quant.tiny_models import tiny_heldout_path

    src = sources.resolve("tiny")
    stats = work / "vllm-stats"
    cal_ids, description = calibration_ids(src.path, None, 16, 128)
    calibrate(src, stats, cal_ids, description, device="cuda", show_progress=False)
    ids = evaluate.token_windows(src.path, tiny_heldout_path().read_text(), seq_len, seqs * seq_len)
    ids_file = work / "vllm-ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    models = {"bf16": src.path}
    for name in ct.scheme_names():
        models[name] = work / f"vllm-{name}"
        quantize(src, models[name], name, calib=stats if ct.get_scheme(name).activations else None,
                 show_progress=False)
    rows = []
    for name, path in models.items():
        row = {"vLLM": name}
        out = work / f"vllm-{name}.json"
        r = subprocess.run([sys.executable, __file__, "--vllm-child", str(path), str(ids_file), str(out)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            row["error"] = (r.stderr.strip().splitlines() or ["exit status %d" % r.returncode])[-1][:300]
            rows.append(row)
            continue
        served = json.loads(out.read_text())
        model = evaluate.load_causal_lm(path, "cuda")
        with torch.no_grad():
            logits = model(ids.to("cuda")).logits.float()
        logp = torch.log_softmax(logits, -1)[:, :-1]
        ours = logp.gather(-1, ids[:, 1:].to("cuda").unsqueeze(-1)).squeeze(-1).cpu()
        theirs = torch.tensor([s["logprobs"] for s in served])
        top1 = torch.tensor([s["top1"] for s in served])
        diff = (ours - theirs).abs()
        row.update({"max |logprob diff|": f"{diff.max().item():.3f}", "mean |logprob diff|": f"{diff.mean().item():.4f}",
                    "top-1 agree": f"{(logp.argmax(-1).cpu() == top1).float().mean().item():.2%}"})
        del model
        torch.cuda.empty_cache()
        rows.append(row)
    return rows


def multi_gpu(work: Path, ranks_on: str, samples: int, seq_len: int) -> dict:
    """tiny-maverick's calibration and GPTQ + GGUF export: one process against one rank per GPU."""
    ranks = 2 if ranks_on == "cpu" else torch.cuda.device_count()
    row = {"model": "tiny-maverick", "ranks": ranks, "on": ranks_on}
    if ranks < 2:
        return {**row, "skipped": f"{ranks} GPU(s): a job needs two"}
    device = "cpu" if ranks_on == "cpu" else "cuda"
    for run_ranks, run in ((1, "one"), (ranks, "job")):
        command = launcher(run_ranks)  # a free port just before the job starts
        stats, out = work / f"mav-{run}-stats", work / f"mav-{run}-out"
        commands = {
            "calibrate": ["calibrate", "tiny-maverick", "--out", str(stats), "--samples", str(samples),
                          "--seq-len", str(seq_len), "--device", device, "--quiet"],
            # both from the one-process statistics, so the comparison is of the quantization alone
            "gptq int4 + Q4_K_M": ["quantize", "--model", "tiny-maverick", "--to", "int4", "--method", "gptq",
                                   "--gguf", "Q4_K_M", "--calib", str(work / "mav-one-stats"), "--out-dir", str(out),
                                   "--device", device, "--quiet"],
        }
        for name, args in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run([*command, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
            row[f"{name} {run} s"] = f"{time.perf_counter() - t0:.1f}"
            if done.returncode != 0:
                row[f"{name} {run} failed"] = done.stderr.strip().splitlines()[-1:]
    for name, path in (("calibrate", "stats"), ("gptq int4 + Q4_K_M", "out")):
        one, job_files = (sorted(p for p in (work / f"mav-{run}-{path}").rglob("*") if p.is_file())
                          for run in ("one", "job"))
        row[f"{name} identical"] = ([p.relative_to(work / f"mav-one-{path}") for p in one]
                                    == [p.relative_to(work / f"mav-job-{path}") for p in job_files]
                                    and all(a.read_bytes() == b.read_bytes() for a, b in zip(one, job_files)))
    return row


def write_scout_in_background(work: Path) -> subprocess.Popen:
    """Writing the Scout-shaped checkpoint (~8 GB of random BF16) takes a minute on one core: a
    separate process does it while the first sections run."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from scripts.gpu_check import scout_checkpoint; " \
           f"from pathlib import Path; scout_checkpoint(Path({str(work)!r}))"
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    if sys.argv[1:2] == ["--vllm-child"]:
        vllm_child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-maverick"])
    parser.add_argument("--skip-scout", action="store_true")
    parser.add_argument("--scout", type=Path, help="use this checkpoint for the Scout-shaped sections (a rehearsal "
                                                   "on a small model) instead of writing one")
    parser.add_argument("--ranks-on", choices=["cuda", "cpu"], default="cuda",
                        help="the multi-GPU job's ranks (cpu: 2 ranks with gloo, to rehearse without GPUs)")
    parser.add_argument("--only-multi", action="store_true", help="run only the several-GPU job")
    parser.add_argument("--rows", type=Path, help="also append each result row, as one JSON line, to this file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    work = Path(tempfile.mkdtemp(prefix="l4q-gpu-check-"))
    device = args.devices[1]
    scout = args.scout
    writer = None
    if scout is None and not args.skip_scout and not args.only_multi:
        writer = write_scout_in_background(work)
        scout = work / "scout-1L"
    failed = []

    def section(name: str, fn) -> None:
        """Run one section; a failure is reported and the next section still runs."""
        t0 = time.perf_counter()
        try:
            rows = fn()
        except Exception:
            failed.append(name)
            rows = [{"section": name, "error": traceback.format_exc(limit=-6)}]
        for row in rows if isinstance(rows, list) else [rows]:
            row = {"section": name, **row, "section s": f"{time.perf_counter() - t0:.1f}"}
            print(json.dumps(row, indent=1, default=str), flush=True)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")

    def scout_ready() -> Path:
        if writer is not None and writer.wait() != 0:
            raise RuntimeError("writing the Scout-shaped checkpoint failed")
        return scout

    try:
        section("several GPUs", lambda: multi_gpu(work, args.ranks_on, args.samples, args.seq_len))
        if args.only_multi:
            return
        # Most telling first: if the lease ends early, what came back is what matters most.
        section("derivatives cpu vs " + device, lambda: derivatives(args.devices, sources.resolve(args.models[-1]).path, work))
        if scout is not None:
            section("Scout MoE layer kernels", lambda: moe_layer_kernels(device, scout_ready()))
            section("Scout derivatives on " + device, lambda: derivatives([device], scout_ready(), work))
        for name in args.models:
            section("calibration + GPTQ cpu vs " + device, lambda: compare_tiny(name, args.devices, work, args.samples, args.seq_len))
        if scout is not None and not args.scout:
            section("Scout layer calibration + GPTQ", lambda: scout_layer(device, scout_ready(), work, 8, 512))
        section("vLLM", lambda: compare_in_vllm(work))
    finally:
        if writer is not None:
            writer.kill()
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
