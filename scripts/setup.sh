#!/usr/bin/env bash
# Create .venv (once) and install l4q into it; `setup.sh test` adds what the tests drive: pytest,
# gguf-py, llama-cpp-python (which builds llama.cpp from source: about 14 minutes the first time,
# then pip reuses the wheel it cached under ~/.cache/pip) and Debian's headless Chromium, which
# renders the eval report in the screenshot test.
# Where no torch is installed yet, take PyTorch 2.13.0 (the CPU build on machines that keep it in
# their local wheel store) instead of letting pip pull an unpinned multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
if [ "${1:-}" = "test" ]; then
  # llama.cpp for a portable x86-64 / arm64 target, not -march=native: on VMs that advertise AMX and
  # AVX-512 the native build's quantized matmuls crashed (SIGSEGV, SIGILL) in every GGUF test.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
  .venv/bin/pip install --quiet -e ".[test]"
else
  .venv/bin/pip install --quiet -e .
fi
