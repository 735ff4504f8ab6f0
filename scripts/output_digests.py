"""Digests of l4q's outputs over a matrix of runs, to prove a refactor leaves the bytes unchanged.

Run it before and after a change and compare the two JSON files:

    .venv/bin/python scripts/output_digests.py --out before.json
    ... change the code ...
    .venv/bin/python scripts/output_digests.py --out after.json && diff before.json after.json

Each compressed-tensors output is digested over its shards, index and config.json (l4q_recipe.json
records the l4q version and options, so it is left out); each GGUF file over all its bytes. Runs go
through the `l4q` command, so the digests do not depend on the library's internal API. Quantized
attention is asked for explicitly where the command knows the option, so the digests stay comparable
across the change of default that keeps attention BF16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

L4Q = [sys.executable, "-m", "cli.main"]
MODELS = ("tiny", "tiny-maverick")
SCHEMES = ("int4", "int8", "fp8")
METHODS = ("rtn", "mse")
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q4_K_M")


def digest_output(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name in (
            "model.safetensors.index.json", "config.json"))
    for f in files:
        h.update(f.name.encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def run(args: list[str]) -> None:
    subprocess.run(L4Q + args + ["--quiet"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of {run: sha256}")
    parser.add_argument("--quick", action="store_true", help="tiny only, rtn only, Q8_0 and Q4_K_M only")
    opts = parser.parse_args()
    help_text = subprocess.run(L4Q + ["quantize", "--help"], capture_output=True, text=True, check=True).stdout
    attention = ["--quantize-attention"] if "--quantize-attention" in help_text else []
    models = MODELS[:1] if opts.quick else MODELS
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in models:
            for scheme in SCHEMES:
                for method in METHODS[:1] if opts.quick else METHODS:
                    out = work / f"{model}-{scheme}-{method}"
                    run(["quantize", "--model", model, "--to", scheme, "--method", method, "--out", str(out), *attention])
                    digests[out.name] = digest_output(out)
                    print(out.name, digests[out.name], flush=True)
            for ftype in ("Q8_0", "Q4_K_M") if opts.quick else GGUF_TYPES:
                out = work / f"{model}-{ftype}.gguf"
                run(["export", "gguf", model, "--type", ftype, "--out", str(out)])
                digests[out.name] = digest_output(out)
                print(out.name, digests[out.name], flush=True)
    opts.out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
