"""Digests of l4q's outputs over a matrix of runs, to prove a refactor leaves the bytes unchanged.

Run it before and after a change and compare the two JSON files:

    .venv/bin/python scripts/output_digests.py --out before.json
    ... change the code ...
    .venv/bin/python scripts/output_digests.py --out after.json && diff before.json after.json

The matrix, for each tiny model: calibration statistics (the imatrix files and token ids), every
compressed-tensors scheme with rtn, mse, mse weighted by the statistics and gptq, one run with quantized
attention, every GGUF file type, and the K-quant types searched with the imatrix. Each
compressed-tensors output is digested over its shards, index and config.json (l4q_recipe.json records
the l4q version, so it is left out); each GGUF file over all its bytes; statistics over their tensor
files. `tests/test_outputs.py` reruns the matrix in-process against `tests/data/output_digests.json`.

Statistics and GPTQ run the model's forward passes, whose float32 sums depend on the CPU's matmul
kernels (AVX2, AVX-512, AMX give different last bits), and so does tiny-maverick itself (its routers
are balanced by a forward pass when it is generated): those digests hold on one kind of CPU only, and
the file records which (`cpu`). The cells that consume statistics (calibrated mse, imatrix K-quants)
read the statistics committed under tests/data/stats, so their bytes hold on every CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STORED_STATS = Path(__file__).resolve().parents[1] / "tests" / "data" / "stats"
MODELS = ("tiny", "tiny-maverick")
SCHEMES = ("int4", "int8", "fp8")
METHODS = ("rtn", "mse", "mse-calib", "gptq")
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q4_K_M")
IMATRIX_GGUF_TYPES = ("Q6_K", "Q4_K_M")
# (activations.safetensors, added later for nvfp4's input scales, is checked by tests/test_fp_schemes.py)
STATS_FILES = ("imatrix.gguf", "imatrix.safetensors", "tokens.safetensors")
CALIBRATION = ["--samples", "8", "--seq-len", "64", "--device", "cpu"]
CPU_DEPENDENT = ("-stats", "-gptq")  # cells whose bytes come from this CPU's matmuls


def cpu_signature() -> str:
    """What picks torch's CPU matmul kernels: its vector ISA level and the matrix extensions."""
    import torch

    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pass
    extensions = sorted(flags & {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_fp16", "avx_vnni"})
    return ",".join([torch.backends.cpu.get_cpu_capability(), *extensions])


def cpu_dependent(name: str) -> bool:
    return name.endswith(CPU_DEPENDENT) or name.startswith("tiny-maverick-")


def digest_output(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif (path / "stats.json").is_file():  # statistics: the files recorded since the matrix began
        files = [path / name for name in STATS_FILES]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name in (
            "model.safetensors.index.json", "config.json", "imatrix.gguf"))
    for f in files:
        h.update(f.name.encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def runs(work: Path) -> list[tuple[str, list[str]]]:
    """(name, l4q arguments) for every cell of the matrix."""
    cells = []
    for model in MODELS:
        cells.append((f"{model}-stats", ["calibrate", model, "--out", str(work / f"{model}-stats"), *CALIBRATION]))
        stats = STORED_STATS / model
        for scheme in SCHEMES:
            for method in METHODS:
                name = f"{model}-{scheme}-{method}"
                calib = ["--calib", str(stats)] if method in ("mse-calib", "gptq") else []
                cells.append((name, ["quantize", "--model", model, "--to", scheme, "--method", method.split("-")[0],
                                     *calib, "--device", "cpu", "--out", str(work / name)]))
        name = f"{model}-int4-rtn-attention"
        cells.append((name, ["quantize", "--model", model, "--to", "int4", "--quantize-attention", "--out", str(work / name)]))
        for ftype in GGUF_TYPES:
            name = f"{model}-{ftype}.gguf"
            cells.append((name, ["export", "gguf", model, "--type", ftype, "--out", str(work / name)]))
        for ftype in IMATRIX_GGUF_TYPES:
            name = f"{model}-{ftype}-imatrix.gguf"
            cells.append((name, ["export", "gguf", model, "--type", ftype, "--imatrix", str(stats),
                                 "--out", str(work / name)]))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of {run: sha256}")
    opts = parser.parse_args()
    digests = {"cpu": cpu_signature()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, args in runs(work):
            subprocess.run([sys.executable, "-m", "cli.main", *args, "--quiet"], check=True)
            digests[name] = digest_output(work / name)
            print(name, digests[name], flush=True)
    opts.out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
