#!/usr/bin/env bash
# The slow, still-automated companion of scripts/test.sh: slow test cases, then every benchmark on `bench`.
# Figures go to stdout and to out/benchmarks/*.json. Takes about an hour on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out/benchmarks
PY=.venv/bin/python
$PY -m pytest -q -m slow
$PY -m pytest -q benchmarks/ --benchmark-only
$PY benchmarks/kernels.py --json out/benchmarks/kernels.json
$PY benchmarks/loading.py --preset bench --json out/benchmarks/loading.json
$PY benchmarks/roofline.py --model bench --dtypes float32-weights,float32,bfloat16 --json out/benchmarks/roofline.json
$PY benchmarks/throughput.py --model bench --num-prompts 16 --kernels compare --json out/benchmarks/kernels_on_off.json
$PY benchmarks/throughput.py --model bench --one-at-a-time-limit 8 --json out/benchmarks/throughput.json
$PY benchmarks/throughput.py --model bench --dtypes float32-weights,float32,bfloat16 --json out/benchmarks/throughput_dtypes.json
$PY benchmarks/serving.py --launch tiny --num-requests 64 --concurrency 16 --json out/benchmarks/serving.json
$PY benchmarks/throughput.py --model bench --dtypes bfloat16 --quantizations none,w8a16 --kv-cache-dtypes auto,int8 --json out/benchmarks/throughput_quantized.json
$PY benchmarks/soak.py --minutes 10
$PY benchmarks/structured.py --model bench --json out/benchmarks/structured.json
