#!/usr/bin/env bash
# Set up dsa-train in ./.venv (idempotent). `--test` also installs the test-only dependencies
# (pytest, and transformers + the CPU build of PyTorch for the parity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
