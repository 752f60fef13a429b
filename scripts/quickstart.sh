#!/usr/bin/env bash
# Install, then run the whole pipeline on the embedded SmolLM2-135M with the quickstart config:
# SL-CAI (prompts -> critique/revision -> export -> fine-tune), then RL-CAI (pairs -> AI feedback ->
# preference mix -> preference model -> PPO), and print what the run holds. Extra arguments go to
# `cai run` (e.g. `bash scripts/quickstart.sh sl.rounds=2`, or `rl.method=dpo`). Run it again to
# resume; finished stages are kept.
#
# Size: on a machine that computes in fp32 (a CPU without fast bf16, which is most laptops) the full
# quickstart takes over 20 minutes on 2 cores, so there it runs at a reduced size (REDUCED below:
# 24 red-team prompts instead of 32, 2 critique-revision rounds instead of 4, 4 PPO steps instead
# of 8, and the evaluation compares the base model with the RL-CAI policy only), and says so. Every
# stage still runs.
#   CAI_QUICKSTART_SIZE   auto (default: reduced where bf16 is not fast), full, or reduced
# Arguments given to the script come after these and win over them.
set -euo pipefail
cd "$(dirname "$0")/.."
REDUCED=(prompts.red_team.0.limit=24 sl.rounds=2 rl.ppo.steps=4 "eval.models=[base,rl_cai]")
size=${CAI_QUICKSTART_SIZE:-auto}
case "$size" in
  auto|full|reduced) ;;
  *) echo "quickstart: CAI_QUICKSTART_SIZE=$size: expected auto, full or reduced" >&2; exit 2 ;;
esac
bash scripts/setup.sh
. .venv/bin/activate
cai model fetch smollm2-135m
why="CAI_QUICKSTART_SIZE=reduced"
if [ "$size" = auto ]; then
  size=$(python -c "from cai.models import bf16_fast, pick_device; print('full' if bf16_fast(pick_device('auto')) else 'reduced')")
  why="this machine computes in fp32 (no fast bf16)"
fi
if [ "$size" = reduced ]; then
  echo "quickstart: $why, so the quickstart runs at a reduced size: ${REDUCED[*]}" \
       "(arguments you give win). For the full size: CAI_QUICKSTART_SIZE=full bash scripts/quickstart.sh run_dir=runs/quickstart-full"
  set -- "${REDUCED[@]}" "$@"
fi
cai run configs/quickstart.yaml "$@"
run_dir=$(python -c "import sys; from cai.cli import split_overrides; from cai.config import load_config
print(load_config('configs/quickstart.yaml', split_overrides(sys.argv[1:])[1]).run_dir)" "$@")
cai show "$run_dir" --rows 1
