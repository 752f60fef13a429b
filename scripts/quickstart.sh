#!/usr/bin/env bash
# Install, then run the whole pipeline on the embedded SmolLM2-135M with the quickstart config:
# SL-CAI (prompts -> critique/revision -> export -> fine-tune), then RL-CAI (pairs -> AI feedback ->
# preference mix -> preference model -> PPO), and print what the run holds. Extra arguments go to
# `cai run` (e.g. `bash scripts/quickstart.sh sl.rounds=2`, or `rl.method=dpo`). Run it again to
# resume; finished stages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
cai model fetch smollm2-135m
cai run configs/quickstart.yaml "$@"
run_dir=$(python -c "import sys; from cai.config import load_config; print(load_config('configs/quickstart.yaml', sys.argv[1:]).run_dir)" "$@")
cai show "$run_dir" --rows 1
