#!/usr/bin/env bash
# Refresh constraints.txt, the pins scripts/setup.sh installs with: build a fresh venv in a temporary
# folder, install torch pinned, then the project with its dev extra unconstrained (the newest releases
# inside pyproject.toml's ranges), and write `pip freeze` of it. Run the test suite on the new pins
# (bash scripts/test.sh) before committing them.
#   bash scripts/lock.sh [OUT]   OUT defaults to constraints.txt
#   CAI_TORCH   the torch requirement (default torch==2.13.0, as scripts/setup.sh)
#   PYTHON      the interpreter (default python3); the pins hold for its minor version
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-constraints.txt}
torch_req=${CAI_TORCH:-torch==2.13.0}  # the pin scripts/setup.sh installs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
py=$tmp/venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$py" -m pip install -q "$torch_req"
"$py" -m pip install -q -e ".[dev]"
{
  echo "# The versions the test suite passed with; scripts/setup.sh installs with these pins."
  echo "# Written by scripts/lock.sh (run it to refresh, then run the tests); do not edit by hand."
  echo "# python $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  # A local build label (torch 2.13.0+cpu) is dropped so the pin matches the CUDA build as well.
  "$py" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" "$out"
