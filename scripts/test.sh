#!/usr/bin/env bash
# Install, then run the fast test suite (lint first). Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The run report's browser test drives Debian's Chromium: install it where that is possible (root or
# password-less sudo, with apt-get); where it is not, that one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  if { [ -z "$sudo" ] || sudo -n true 2>/dev/null; } &&
     { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "test.sh: installed chromium for the report's browser test" >&2
  else
    echo "test.sh: could not install chromium; the report's browser test will skip" >&2
  fi
fi
. .venv/bin/activate
ruff check src tests bench scripts reliability
cai model fetch smollm2-135m >/dev/null
python -m pytest -q "$@"
