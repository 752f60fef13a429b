#!/usr/bin/env bash
# Install, then run the fast test suite (lint first). Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests bench
cai model fetch smollm2-135m >/dev/null
python -m pytest -q "$@"
