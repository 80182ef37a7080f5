#!/usr/bin/env bash
# Creates .venv and installs the package (MindSpore 2.10 CPU, numpy<2, ...) in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,serve]"
# The eager-dispatch twin of the in-place kernels (kernels/pyboost.py): optional, the AOT ops cover a failure.
.venv/bin/python -m kernels.pyboost || echo "setup: continuing without the pyboost extension"
