#!/usr/bin/env bash
# One GPU check, run on a lent GPU machine (it has torch, triton, pytest, no network):
#   bash bench/device_check.sh
# 1. the GPU test subset (the same tests the CPU runs in the interpreter, on the real kernels),
# 2. the timing table of bench/time_pnnh_conv.py, written to docs/perf/ (or $OUT/perf when the
#    device tool's $OUT is set, so that it comes back) and printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -x -q -p no:cacheprovider tests/test_triton_conv.py tests/test_pnnh_conv.py 2>&1 | tail -25
tests_status=${PIPESTATUS[0]}
perf_dir="${OUT:+$OUT/perf}"
python3 bench/time_pnnh_conv.py --out "${perf_dir:-docs/perf}"
timing_status=$?
echo "tests exit ${tests_status}, timing exit ${timing_status}"
exit $(( tests_status != 0 || timing_status != 0 ))
