#!/usr/bin/env bash
# The first run on an Ascend host (910B or 310P, CANN 8.x, after scripts/setup.sh): builds and installs the custom
# ops, runs both Ascend kernel sets' parity tests against kernels/reference.py, the golden tests on the NPU, the
# kernel benchmarks and a tensor-parallel smoke run, and writes everything to one report file. Every step runs even
# when an earlier one failed; the summary at the end says which passed.
#
#   source /usr/local/Ascend/ascend-toolkit/set_env.sh
#   bash scripts/ascend_first_run.sh [REPORT]   # default: build/ascend_first_run/report_<host>_<UTC time>.txt
#
# Send back the report file (it includes the CANN build log's tail and every test's output).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${ASCEND_FIRST_RUN_DIR:-build/ascend_first_run}
mkdir -p "$WORK"
REPORT=${1:-$WORK/report_$(hostname -s)_$(date -u +%Y%m%dT%H%M%SZ).txt}
: >"$REPORT"
SUMMARY=()

section() { printf '\n==== %s ====\n' "$1" >>"$REPORT"; }

# step NAME COMMAND...: runs it with its output in the report, records pass/fail
step() {
    local name=$1; shift
    section "$name: $*"
    local start=$SECONDS
    "$@" >>"$REPORT" 2>&1
    local rc=$?
    SUMMARY+=("$(printf '%-34s %s (%ss)' "$name" "$([ $rc -eq 0 ] && echo pass || echo "FAIL rc=$rc")" $((SECONDS - start)))")
    return 0
}

section "host"
{
    date -u; hostname; uname -a
    git rev-parse HEAD 2>/dev/null && git status --short | head -20
    command -v npu-smi >/dev/null && npu-smi info || echo "npu-smi: not found"
    for f in "${ASCEND_HOME_PATH:-/usr/local/Ascend/ascend-toolkit/latest}"/*/ascend_toolkit_install.info \
             "${ASCEND_HOME_PATH:-/usr/local/Ascend/ascend-toolkit/latest}"/version.cfg; do
        [ -f "$f" ] && { echo "--- $f"; cat "$f"; }
    done
    env | grep -E '^(ASCEND|HCCL|MS_|DEVICE_ID|RANK)' | sort
    "$PY" -c "import mindspore, sys; print('python', sys.version.split()[0], 'mindspore', mindspore.__version__)"
} >>"$REPORT" 2>&1

step "device selection" "$PY" -c "
from kernels.device import probe_npu, select_device
from kernels.sku import detect_sku_info
print(probe_npu()); print(detect_sku_info()); print(select_device('ascend'))"

step "custom ops: build + install" "$PY" -m kernels.ascend_build --build-dir "$WORK/build" \
    --soc ascend910b --soc ascend310p --install-path "$WORK/opp"
section "custom ops: build log (last 80 lines)"
tail -n 80 "$WORK/build/ascend_build.log" >>"$REPORT" 2>&1 || echo "no build log" >>"$REPORT"
export COGVLM2_REQUIRE_NPU=1  # the NPU tests fail, not skip, without an NPU or the custom ops
export ASCEND_CUSTOM_OPP_PATH="$PWD/$WORK/opp/vendors/cogvlm2${ASCEND_CUSTOM_OPP_PATH:+:$ASCEND_CUSTOM_OPP_PATH}"

step "host-logic tests" "$PY" -m pytest -q -p no:cacheprovider tests/test_ascend_host.py tests/test_sku.py \
    tests/test_ascend_tiling.py
step "NPU parity: both kernel sets" "$PY" -m pytest -v -rA -p no:cacheprovider tests/test_ascend_npu.py \
    -k attention
step "NPU goldens" "$PY" -m pytest -v -rA -p no:cacheprovider tests/test_ascend_npu.py -k goldens
step "demo answer on the NPU" .venv/bin/cogvlm2 generate --device ascend \
    --image cogvlm2/demo_model/demo_0.png --prompt "What shapes are in the image?" --json
step "kernel benchmarks" "$PY" benchmarks/ascend_kernels.py --json "$WORK/ascend_kernels.json"
step "kernel benchmarks, block 16" "$PY" benchmarks/ascend_kernels.py --block-size 16
if "$PY" -c "from kernels.device import probe_npu; import sys; sys.exit(probe_npu().device_count < 2)" 2>/dev/null; then
    step "tensor parallel x2 (HCCL)" .venv/bin/cogvlm2 generate --device ascend --tensor-parallel-size 2 \
        --prompt "Hello" --json
else
    SUMMARY+=("$(printf '%-34s %s' "tensor parallel x2 (HCCL)" "skipped: fewer than 2 NPUs")")
fi

section "summary"
printf '%s\n' "${SUMMARY[@]}" >>"$REPORT"
printf '%s\n' "${SUMMARY[@]}"
echo "report: $REPORT (send this file back)"
