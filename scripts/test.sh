#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite (slow cases excluded: see benchmarks/run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m "not slow" "$@"
