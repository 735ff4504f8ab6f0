"""llama.cpp's own tools, as an independent reference for tests and benchmarks (not used by l4q).

The llama-cpp-python source distribution carries llama.cpp, whose `convert_hf_to_gguf.py` is the
converter llama.cpp users run. This module fetches that sdist (the same version as the installed
llama-cpp-python) from the package registry once, keeps the converter under the l4q cache, and runs
it. The only change: llama.cpp identifies a BPE pre-tokenizer by hashing a test string's token ids,
which no list can know for the tiny models' own vocabulary, so the detection is told "llama4", the
pre-tokenizer those vocabularies are built for. And the converter names Llama 4's vision adapter
layers `fc1` / `fc2` through its table of block numbers, which for a vision tower of fewer than 3
layers (the tiny models have 2; Scout has 34) stops before `fc2`: the table is built for 3 at least.

    python scripts/llama_cpp_reference.py convert MODEL_DIR OUT.gguf [--outtype f16] [--mmproj]
    python scripts/llama_cpp_reference.py build-quantize      # builds llama-quantize
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

WANTED = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")

RUN_CONVERTER = """
import runpy, sys
root = sys.argv[1]
sys.path.insert(0, root)
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[2:]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama4"
name_map = conversion.base.gguf.get_tensor_name_map
conversion.base.gguf.get_tensor_name_map = lambda arch, n_blocks: name_map(arch, max(n_blocks, 3))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cache_root() -> Path:
    return Path(os.environ.get("L4Q_CACHE", Path.home() / ".cache" / "l4q"))


def sdist(ver: str | None = None) -> Path:
    """The llama-cpp-python source archive for `ver` (default: the installed version), downloaded once."""
    ver = ver or version("llama-cpp-python")
    target = cache_root() / "llama.cpp" / f"llama_cpp_python-{ver}.tar.gz"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={ver}", "-d", tmp],
                check=True,
            )
            (downloaded,) = Path(tmp).glob("*.tar.gz")
            os.replace(downloaded, target)
    return target


def converter_dir(ver: str | None = None) -> Path:
    """llama.cpp's directory holding convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    archive = sdist(ver)
    src = archive.parent / archive.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if any(w in m.name for w in WANTED)]
            tar.extractall(archive.parent, members=members, filter="data")
    return src


def quantize_tool(ver: str | None = None) -> Path:
    """llama.cpp's `llama-quantize`, built once from the same source distribution (a few minutes)."""
    archive = sdist(ver)
    root = archive.parent / archive.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    binary = root / "build" / "bin" / "llama-quantize"
    if binary.is_file():
        return binary
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(archive.parent, members=members, filter="data")
    subprocess.run(
        ["cmake", "-S", str(root), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"],
        check=True, capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-quantize", "-j", str(os.cpu_count() or 2)],
                   check=True, capture_output=True)
    return binary


def llama_quantize(src_gguf: Path, out_gguf: Path, ftype: str, imatrix: Path | None = None, options: tuple[str, ...] = ()) -> Path:
    """Run llama.cpp's own quantizer, e.g. F16 GGUF -> Q4_K_M; `options` go before the files
    (--tensor-type ..., --output-tensor-type ...)."""
    cmd = ([str(quantize_tool())] + (["--imatrix", str(imatrix)] if imatrix else []) + list(options)
           + [str(src_gguf), str(out_gguf), ftype])
    subprocess.run(cmd, check=True, capture_output=True)
    return out_gguf


def convert(model_dir: Path, outfile: Path, outtype: str = "f16", mmproj: bool = False) -> Path:
    """Run llama.cpp's own HF -> GGUF converter on `model_dir` (`mmproj`: the vision tower and projector
    file instead of the text model)."""
    subprocess.run(
        [sys.executable, "-c", RUN_CONVERTER, str(converter_dir()), str(model_dir), "--outfile", str(outfile),
         "--outtype", outtype] + (["--mmproj"] if mmproj else []),
        check=True, capture_output=True, text=True,
    )
    return outfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("model_dir", type=Path)
    c.add_argument("outfile", type=Path)
    c.add_argument("--outtype", default="f16")
    c.add_argument("--mmproj", action="store_true", help="write the vision mmproj file")
    sub.add_parser("build-quantize")
    args = parser.parse_args()
    if args.command == "convert":
        print(convert(args.model_dir, args.outfile, args.outtype, args.mmproj))
    else:
        print(quantize_tool())


if __name__ == "__main__":
    main()
