#!/usr/bin/env bash
# Create .venv (once) and install the project into it. Safe to run again: it only adds what is missing.
#   CAI_TORCH   the torch requirement to install first (default torch==2.13.0, a CPU build here)
#   PYTHON      the interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build from the registry.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${CAI_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
