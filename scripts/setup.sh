#!/usr/bin/env bash
# Create .venv (once) and install l4q into it; `setup.sh test` adds the test tools (pytest, gguf-py,
# and llama-cpp-python, which builds llama.cpp from source: about 14 minutes the first time).
# Where no torch is installed yet, take PyTorch 2.13.0 (the CPU build on machines that keep it in
# their local wheel store) instead of letting pip pull an unpinned multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
if [ "${1:-}" = "test" ]; then
  .venv/bin/pip install --quiet -e ".[test]"
else
  .venv/bin/pip install --quiet -e .
fi
