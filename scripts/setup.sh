#!/usr/bin/env bash
# Create .venv (once) and install the project into it at the versions in constraints.txt (those the
# test suite passed with; scripts/lock.sh refreshes them). Safe to run again: it only adds what is missing.
#   CAI_TORCH   the torch requirement to install first (default torch==2.13.0, a CPU build here, the
#               pin in constraints.txt); another torch is an untested set, installed from the ranges
#   PYTHON      the interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The pins hold for the Python they were resolved on (the "# python" line of constraints.txt) and with
# the torch pinned here; otherwise the ranges in pyproject.toml apply. torch's own line is left out so
# that a torch already in .venv is kept rather than replaced.
pins=()
locked=$(sed -n 's/^# python \([0-9.]*\)$/\1/p' constraints.txt)
here=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -n "${CAI_TORCH:-}" ]; then
  echo "setup: CAI_TORCH is set: the pins in constraints.txt are for torch==2.13.0, installing from the ranges" >&2
elif [ "$locked" != "$here" ]; then
  echo "setup: constraints.txt is for Python $locked, this is $here: installing from the ranges" >&2
else
  grep -v '^torch==' constraints.txt > .venv/constraints-without-torch.txt
  pins=(-c .venv/constraints-without-torch.txt)
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build from the registry.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q ${pins[@]+"${pins[@]}"} "${CAI_TORCH:-torch==2.13.0}"
fi
python -m pip install -q ${pins[@]+"${pins[@]}"} -e ".[dev]"
