#!/usr/bin/env bash
# Set up dsa-train in ./.venv (idempotent). `--test` also installs the test-only dependencies
# (pytest, and transformers + the CPU build of PyTorch for the parity tests) and, where JAX is the
# 0.10.2 the CI runs, the libtpu that pairs with it (deviceless TPU compiles: `dsa-train plan
# --target tpu-...` and its test; ~250 MB download, ~700 MB installed). Other JAX versions get no
# libtpu here (a mismatched one could break them): the TPU compile tests then skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  jax_version=$(.venv/bin/python -c "import jax; print(jax.__version__)")
  if [ "$jax_version" = "0.10.2" ]; then
    .venv/bin/python -m pip install -q "libtpu==0.0.42.1"
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
