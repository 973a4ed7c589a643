#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call (about 10 minutes at most):
# the full 200-epoch default recipe on the JPEG copy of CIFAR-10, bench.py, and the CUDA tests.
#   bash scripts/gpu_session.sh OUT_DIR        (run from the repository root; needs .device/, see README)
set -u
out=${1:?usage: gpu_session.sh OUT_DIR}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} | tee "$out/tests.log"
python3 .device/unpack_jpeg.py .device/cifar10-jpeg75.npz /tmp/data || exit 1

start=$(date +%s)
timeout "${FULL_RUN_SECONDS:-250}" python3 main.py --data-dir /tmp/data --out-dir /tmp/full > "$out/full_run.log" 2>&1
echo "full run: exit $?, $(( $(date +%s) - start )) s wall (model build, compile and final report included)" | tee -a "$out/full_run.log"
for f in metrics.csv results.png attention.png; do cp "/tmp/full/$f" "$out/" 2>/dev/null; done

timeout "${BENCH_SECONDS:-90}" python3 bench.py --device cuda --data-dir /tmp/data --json "$out/bench.json" --steps 200 --warmup 20 \
    --out-dir /tmp/bench > "$out/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$out/bench.log"

timeout "${TEST_SECONDS:-60}" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider >> "$out/tests.log" 2>&1
echo "cuda tests: exit $?" | tee -a "$out/tests.log"

echo "==== summary"
grep -E "^epoch|^done|full run" "$out/full_run.log" | tail -n 6
tail -n 8 "$out/bench.log"
tail -n 4 "$out/tests.log"
