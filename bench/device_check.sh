#!/usr/bin/env bash
# One GPU check, run on a lent GPU machine (it has torch, triton, pytest, no network):
#   bash bench/device_check.sh
# 0. the CUDA extension built on the machine, with its resource report,
# 1. the GPU tests of the Triton and CUDA backends, compute-sanitizer memcheck/racecheck on the CUDA one,
# 1'. the experiment that tells the static mainloop model's two readings apart (bench/mainloop_experiment.py),
# 2. the benchmark suite on the CIFAR shapes and its claims report,
# 3. ResNet-18 training throughput per variant (pnnh train, synthetic CIFAR-shaped data),
# (1a. the DRAM bytes and launches of one training step, Nsight Compute, beside the traffic ledger's
#  count, and 1b. the timing table of bench/time_pnnh_conv.py, right after the tests.)
# PNNH_CHECK_SKIP="sanitizer bench train" (any of ncu tests experiment timing host sanitizer bench
# train) skips steps;
# PNNH_SANITIZER_TOOLS (default "memcheck racecheck") picks compute-sanitizer's tools.
# Everything is written to docs/perf/ (or $OUT/perf when the device tool's $OUT is set, so that it
# comes back to the developer's machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
perf_dir="${OUT:+$OUT/perf}"
out_dir="${perf_dir:-docs/perf}"
mkdir -p "$out_dir"
# Each step runs under a time limit and the whole check under a deadline, so that a lease of a few
# minutes returns what finished instead of nothing: PNNH_CHECK_DEADLINE (seconds since the epoch,
# default: 40 minutes from now) caps every step's limit at the time left.
deadline="${PNNH_CHECK_DEADLINE:-$(( $(date +%s) + 2400 ))}"
skip() { [[ " ${PNNH_CHECK_SKIP:-} " == *" $1 "* ]]; }
step_limit() {  # the smaller of the step's own limit ($1 s) and the time left before the deadline
    local left=$(( deadline - $(date +%s) ))
    (( left < 1 )) && left=1
    echo $(( $1 < left ? $1 : left ))
}
# 0. Build the CUDA extension here (nvcc, cmake, pybind11 are on the machine) into a cache folder
#    that pnnh_kernels.cuda loads, with its ptxas resource report.
export PNNH_CUDA_CACHE="${TMPDIR:-/tmp}/pnnh_cuda_cache"
timeout "$(step_limit 300)" python3 -m pnnh_kernels.cuda.build --report "$out_dir/cuda_resources.md" > "$out_dir/cuda_build.log" 2>&1
build_status=$?
tail -3 "$out_dir/cuda_build.log"
python3 -c "import pnnh_kernels.cuda as c; print('cuda backend available:', c.is_available(), c.why_unavailable() or '')"
# 1. GPU tests: Triton and CUDA backends against the float64 reference, in four parallel groups
#    (the time goes to compiling kernels on the CPU; each group's log lands in the output folder).
tests_status=0
pids=()
run_tests() {  # $1: log name; the rest: pytest arguments
    skip tests && return 0
    local log="$out_dir/tests_$1.log"; shift
    timeout "$(step_limit 200)" python3 -m pytest -q -p no:cacheprovider --tb=short "$@" > "$log" 2>&1
}
run_tests triton_fp32 tests/test_triton_conv.py -k "fp32" & pids+=($!)
run_tests triton_other tests/test_triton_conv.py -k "not fp32" & pids+=($!)
run_tests cuda tests/test_cuda_conv.py tests/test_cuda_graphs.py & pids+=($!)
run_tests layers tests/test_pnnh_conv.py tests/test_pnnh_linear.py tests/test_nonfinite.py \
    tests/test_module_protocols.py tests/test_convert.py & pids+=($!)  # convert: real torchvision there
for pid in "${pids[@]}"; do wait "$pid" || tests_status=1; done
for log in "$out_dir"/tests_*.log; do
    [[ -f "$log" ]] || continue
    echo "== $log: $(tail -1 "$log")"; grep -E "^(FAILED|ERROR)" "$log" | head -10
done
# 1'. The experiment that tells the static mainloop model's two readings apart (issue #23): one
#     mainloop in four tilings, the statistics pass in its sm_90 tiles and the weight gradient in two
#     pipeline budgets, measured beside both modelled times (bench/mainloop_experiment.py).
skip experiment || timeout "$(step_limit 180)" python3 -m bench.mainloop_experiment --out "$out_dir" | tail -26
# 1a. DRAM bytes and kernel launches of one training step per implementation and CIFAR stage shape
#     (Nsight Compute, caches flushed per kernel): the hardware check of the traffic model.
skip ncu || timeout "$(step_limit 300)" python3 -m bench.ncu_step --timeout 80 --out "$out_dir" | tail -22
# 1b. The side-by-side timing table (run early: it is the measurement a short lease must not lose).
timing_status=0
if ! skip timing; then
    timeout "$(step_limit 150)" python3 -m bench.time_pnnh_conv --out "$out_dir"
    timing_status=$?
fi
# 1b'. Host cost of a training step (enqueue behind a long kernel), device time as a CUDA graph
#      replay and eager wall time, PNNH layer and ResNet-18 beside the cuDNN ones (bench/test_host_cost.py).
skip host || timeout "$(step_limit 150)" python3 -m pytest bench/test_host_cost.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$out_dir/host_cost.json" 2>&1 | tail -3
# 1c. compute-sanitizer on one small forward + backward of the CUDA backend (fp32 and bf16).
cat > "${TMPDIR:-/tmp}/pnnh_sanitize.py" <<'PY'
import torch
from pnnh_kernels import FusedPNNHConv
for dtype in (torch.float32, torch.bfloat16):
    layer = FusedPNNHConv(40, 40, norm="batch", backend="cuda", coder_init="he", coder_trainable=True).cuda().to(dtype)
    for training in (False, True):
        layer.train(training)
        x = torch.randn(2, 40, 9, 7, device="cuda", dtype=dtype).requires_grad_(True)
        layer(x).sum().backward()
torch.cuda.synchronize()
print("sanitized run finished")
PY
for tool in ${PNNH_SANITIZER_TOOLS:-memcheck racecheck}; do
    skip sanitizer && break
    timeout "$(step_limit 120)" compute-sanitizer --tool "$tool" --error-exitcode 7 python3 "${TMPDIR:-/tmp}/pnnh_sanitize.py" \
        > "$out_dir/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool exit $?"; tail -4 "$out_dir/sanitizer_$tool.log"
done
# 2. The benchmark suite on the CIFAR shapes (batch 256), eager only: torch.compile of every shape
#    would not fit the device budget. Then the claims report from its JSON.
bench_status=0
if ! skip bench; then
timeout "$(step_limit 240)" python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider -k "not compile and not host_cost and (x32x32 or x16x16 or x8x8 or x4x4 or cifar)" \
    --benchmark-json="$out_dir/bench.json" 2>&1 | tail -15
bench_status=${PIPESTATUS[0]}
timeout "$(step_limit 60)" python3 -m pnnh_kernels report "$out_dir/bench.json" --out "$out_dir/bench_report" | tail -40
fi
# 3. Training throughput of ResNet-18 at the CIFAR shape (synthetic data, bf16, batch 256), one epoch
#    of 10,240 images per variant: the per-epoch wall time of docs/training.md's recipes.
for variant in residual plain pnnh; do
    skip train && break
    timeout "$(step_limit 120)" python3 -m pnnh_kernels train --data synthetic --synthetic-train-size 10240 \
        --synthetic-test-size 1024 --epochs 1 --batch-size 256 --model resnet18 --variant "$variant" \
        --out "$out_dir/train_$variant" 2>/dev/null | tail -1
done
echo "cuda build exit ${build_status}, tests exit ${tests_status}, bench exit ${bench_status}, timing exit ${timing_status}"
exit $(( build_status != 0 || tests_status != 0 || bench_status != 0 || timing_status != 0 ))
