#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in stages that fit the device tool's calls
# (10 minutes per call, 15 minutes per task, machine start included):
#
#   bash scripts/gpu_session.sh OUT_DIR bench full      # first call: about 8 minutes
#   bash scripts/gpu_session.sh OUT_DIR torchrun tests  # second call, if time is left: 3 to 5 minutes
#
# Stages (any order, any subset; run from the repository root with .device/ carried, see README):
#   bench     bench.py: reference, fast (default compile) and fast with CUDA graphs, each profiled
#   full      the 200-epoch default recipe on the JPEG copy, with the compile mode bench found faster
#   tests     tests/test_cuda.py
#   torchrun  issue 4: `torchrun --nproc_per_node=1 main.py` against `python main.py`, same flags, 3 epochs each
# Time limits are environment variables: BENCH_SECONDS, FULL_RUN_SECONDS, TEST_SECONDS, TORCHRUN_SECONDS.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR STAGE...}
shift
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} | tee "$out/machine.txt"
[ -d /tmp/data/cifar-10-batches-py ] || python3 .device/unpack_jpeg.py .device/cifar10-jpeg75.npz /tmp/data || exit 1

faster_compile_mode() {  # the fast row bench measured fastest, as --compile-mode flags
    python3 - "$out/bench.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["training"][1:]
    print(max(rows, key=lambda r: r["train_images_per_s"])["flags"].replace("(defaults)", ""))
except (OSError, ValueError, KeyError):
    print("")
EOF
}

median_images_per_second() {  # over the epochs after the first (which compiles)
    python3 - "$1" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))[1:]
print(f"{statistics.median(float(r['images_per_second']) for r in rows):.0f} img/s over {len(rows)} epochs" if rows
      else "no epoch after the first finished")
EOF
}

for stage in "$@"; do
    start=$(date +%s)
    case $stage in
    bench)
        timeout "${BENCH_SECONDS:-200}" python3 bench.py --device cuda --data-dir /tmp/data --json "$out/bench.json" \
            --steps 200 --warmup 20 --profile-steps 20 --fast-flags "" --fast-flags "--compile-mode reduce-overhead" \
            --out-dir /tmp/bench > "$out/bench.log" 2>&1
        echo "bench: exit $?, $(( $(date +%s) - start )) s" | tee -a "$out/bench.log" ;;
    full)
        flags=$(faster_compile_mode)
        echo "full run flags: ${flags:-(defaults)}" | tee "$out/full_run.log"
        timeout "${FULL_RUN_SECONDS:-330}" python3 main.py --data-dir /tmp/data --out-dir /tmp/full $flags >> "$out/full_run.log" 2>&1
        echo "full run: exit $?, $(( $(date +%s) - start )) s wall (model build, compile and final report included)" \
            | tee -a "$out/full_run.log"
        for f in metrics.csv results.png attention.png confusion.png per_class.csv; do cp "/tmp/full/$f" "$out/" 2>/dev/null; done ;;
    tests)
        timeout "${TEST_SECONDS:-150}" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$out/tests.log" 2>&1
        echo "cuda tests: exit $?, $(( $(date +%s) - start )) s" | tee -a "$out/tests.log" ;;
    torchrun)
        common=(--data-dir /tmp/data --epochs 3 --warmup-epochs 1)
        timeout "${TORCHRUN_SECONDS:-75}" python3 main.py "${common[@]}" --out-dir /tmp/single > "$out/torchrun.log" 2>&1
        echo "python main.py: exit $?" >> "$out/torchrun.log"
        timeout "${TORCHRUN_SECONDS:-75}" torchrun --standalone --nproc_per_node=1 main.py "${common[@]}" --out-dir /tmp/ddp1 \
            >> "$out/torchrun.log" 2>&1
        echo "torchrun --nproc_per_node=1: exit $?" >> "$out/torchrun.log"
        { echo "python main.py:              $(median_images_per_second /tmp/single/metrics.csv)"
          echo "torchrun --nproc_per_node=1: $(median_images_per_second /tmp/ddp1/metrics.csv)"
        } | tee -a "$out/torchrun.log"
        cp /tmp/single/metrics.csv "$out/torchrun-single-metrics.csv" 2>/dev/null
        cp /tmp/ddp1/metrics.csv "$out/torchrun-ddp1-metrics.csv" 2>/dev/null ;;
    *)
        echo "unknown stage $stage (bench, full, tests, torchrun)"; exit 2 ;;
    esac
done

echo "==== summary"
[ -f "$out/bench.log" ] && grep -E "^(config|reference|fast|profile|augmentation)" "$out/bench.log"
[ -f "$out/full_run.log" ] && grep -E "^epoch|^done|full run" "$out/full_run.log" | tail -n 5
[ -f "$out/tests.log" ] && tail -n 3 "$out/tests.log"
[ -f "$out/torchrun.log" ] && tail -n 2 "$out/torchrun.log"
exit 0
