#!/usr/bin/env bash
# Create .venv (once) and install l4q with its test tools into it.
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
.venv/bin/pip install --quiet -e ".[test]"
