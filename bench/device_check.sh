#!/usr/bin/env bash
# One GPU check, run on a lent GPU machine (it has torch, triton, pytest, no network):
#   bash bench/device_check.sh
# 1. the GPU test subset (the same tests the CPU runs in the interpreter, on the real kernels),
# 2. the benchmark suite on the CIFAR shapes and its claims report,
# 3. ResNet-18 training throughput per variant (pnnh train, synthetic CIFAR-shaped data),
# 4. the timing table of bench/time_pnnh_conv.py, printed last.
# Everything is written to docs/perf/ (or $OUT/perf when the device tool's $OUT is set, so that it
# comes back to the developer's machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -x -q -p no:cacheprovider tests/test_triton_conv.py tests/test_pnnh_conv.py 2>&1 | tail -25
tests_status=${PIPESTATUS[0]}
perf_dir="${OUT:+$OUT/perf}"
out_dir="${perf_dir:-docs/perf}"
mkdir -p "$out_dir"
# 2. The benchmark suite on the CIFAR shapes (batch 256), eager only: torch.compile of every shape
#    would not fit the device budget. Then the claims report from its JSON.
python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider -k "not compile and (x32x32 or x16x16 or x8x8 or x4x4 or cifar)" \
    --benchmark-json="$out_dir/bench.json" 2>&1 | tail -15
bench_status=${PIPESTATUS[0]}
python3 -m pnnh_kernels.bench_report "$out_dir/bench.json" --out "$out_dir/bench_report" | tail -40
# 3. Training throughput of ResNet-18 at the CIFAR shape (synthetic data, bf16, batch 256), one epoch
#    of 10,240 images per variant: the per-epoch wall time of docs/training.md's recipes.
for variant in residual plain pnnh; do
    timeout 240 python3 -m pnnh_kernels train --data synthetic --synthetic-train-size 10240 \
        --synthetic-test-size 1024 --epochs 1 --batch-size 256 --model resnet18 --variant "$variant" \
        --out "$out_dir/train_$variant" 2>/dev/null | tail -1
done
# 4. The side-by-side timing table, printed last.
python3 -m bench.time_pnnh_conv --out "$out_dir"
timing_status=$?
echo "tests exit ${tests_status}, bench exit ${bench_status}, timing exit ${timing_status}"
exit $(( tests_status != 0 || bench_status != 0 || timing_status != 0 ))
