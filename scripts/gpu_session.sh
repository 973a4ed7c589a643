#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in stages that fit the device tool's calls
# (10 minutes per call, 15 minutes per task, machine start included):
#
#   CALL_SECONDS=390 TEST_SECONDS=120 BENCH_SECONDS=150 TESTS_K="adamw or runs_on_cuda_with_compile" \
#       bash scripts/gpu_session.sh OUT_DIR tests triton   # timeout_s 410
#   CALL_SECONDS=$((LEFT - 40)) bash scripts/gpu_session.sh OUT_DIR full   # at once after it, timeout_s LEFT - 10,
#       # LEFT: the device's budget_left_s (the full run: about 340 s); FULL_FLAGS="--attention triton" if the
#       # triton stage's bench row beat the default's
# (On an H100, 2026-11-27 afternoon, the stages of the day: `tests bench autotune` with TESTS_K="(whole_step and
# torchvision) or never_waits": 4 CUDA-graph tests in 149 s, bench 91 s with three rows of 390 steps, autotune
# stopped at its 111 s; full 341 s; the start and both calls held the machine 774 s of the task's 900. The triton
# stage has not run on a GPU yet.)
#
# Stages (any order, any subset; run from the repository root with .device/ carried, see README):
#   bench     bench.py: reference, fast (defaults: the whole step, Adam included, as one CUDA graph), and fast
#             with --compile-mode reduce-overhead (forward and backward graphed, Adam on the host), profiled
#   autotune  bench.py's reference and default rows again, with Inductor's GEMM autotuning and coordinate-descent
#             tuning of its other kernels (TORCHINDUCTOR_MAX_AUTOTUNE=1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1):
#             whether tuned kernels shorten the step, and what they cost in compile time (bench-autotune.*)
#   triton    --attention triton (triton_attention.py): its tests, the kernels timed alone against PyTorch's
#             (scripts/attention_backends.py), and bench.py's default row against the same with --attention triton
#   full      the 200-epoch default recipe (`python3 main.py`, no flags but the folders and FULL_FLAGS, e.g.
#             FULL_FLAGS="--compile-mode reduce-overhead" should the tests show the default's graph broken)
#   tests     the CUDA tests: tests/test_cuda.py and the CUDA cases of tests/test_augment.py (TESTS_K: another
#             pytest -k expression, e.g. "whole_step or reduce_overhead" for the CUDA-graph ones alone)
#   torchrun  issue 4: `torchrun --nproc_per_node=1 main.py` against `python main.py`, same flags, 3 epochs each
#   lossless  gathers the carried parts of the lossless copy (scripts/split_lossless.sh) in /tmp; once all
#             three are there, checks and unpacks them into /tmp/lossless
# Data: DATA=jpeg (default) unpacks and uses the carried JPEG copy (.device/); DATA=lossless uses /tmp/lossless.
# Each stage stops by its own limit (BENCH_SECONDS, FULL_RUN_SECONDS, TEST_SECONDS, TORCHRUN_SECONDS)
# or 15 s before the call's end (CALL_SECONDS after the start), whichever comes
# first. The device tool returns at most 8 files: OUT_DIR gets the main ones and session.tar.gz with
# everything.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR STAGE...}
shift
work=$(mktemp -d /tmp/gpu-session.XXXX)
deadline=$(( $(date +%s) + ${CALL_SECONDS:-560} ))
export PYTHONUNBUFFERED=1
mkdir -p "$out"

pack() {  # the files the device tool returns: a few on their own, all of them in one archive
    for f in machine.txt bench.json bench-autotune.log triton.log full_run.log metrics.csv results.png tests.log; do
        [ -f "$work/$f" ] && cp "$work/$f" "$out/"
    done
    tar czf "$out/session.tar.gz" -C "$work" .
}
trap pack EXIT

limit() {  # seconds a stage may run: its own limit, or what is left of the call less 15 s
    local left=$(( deadline - $(date +%s) - 15 ))
    echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} | tee "$work/machine.txt"
case ${DATA:-jpeg} in
jpeg)
    data_dir=/tmp/data
    [ -d $data_dir/cifar-10-batches-py ] || python3 .device/unpack_jpeg.py .device/cifar10-jpeg75.npz $data_dir || exit 1 ;;
lossless)
    data_dir=/tmp/lossless ;;
*)
    echo "DATA=${DATA}: choose jpeg or lossless"; exit 2 ;;
esac
echo "data: ${DATA:-jpeg} copy in $data_dir" | tee -a "$work/machine.txt"

gather_lossless() {  # this call's carried parts into /tmp; unpacked once all three are there
    mkdir -p /tmp/lossless-parts
    cp .lossless/cifar10.tar.xz.part-* .lossless/SHA256 /tmp/lossless-parts/ 2>/dev/null
    local parts=(/tmp/lossless-parts/cifar10.tar.xz.part-*)
    echo "lossless parts here: ${#parts[@]} of 3"
    [ -f /tmp/lossless-parts/cifar10.tar.xz.part-02 ] && [ -f /tmp/lossless-parts/cifar10.tar.xz.part-00 ] \
        && [ -f /tmp/lossless-parts/cifar10.tar.xz.part-01 ] || return 0
    if [ "$(cat /tmp/lossless-parts/cifar10.tar.xz.part-0{0,1,2} | sha256sum | cut -d' ' -f1)" \
         != "$(cat /tmp/lossless-parts/SHA256)" ]; then
        echo "lossless parts do not match SHA256: split them again and carry them anew"; return 1
    fi
    mkdir -p /tmp/lossless && cat /tmp/lossless-parts/cifar10.tar.xz.part-0{0,1,2} | xz -d | tar -x -C /tmp/lossless \
        && echo "unpacked the lossless copy into /tmp/lossless"
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
        data_flag=(--data-dir "$data_dir")  # random images while the data is not there yet (lossless, first part)
        [ -d "$data_dir/cifar-10-batches-py" ] || data_flag=()
        timeout "$(limit "${BENCH_SECONDS:-240}")" python3 bench.py --device cuda "${data_flag[@]}" \
            --json "$work/bench.json" --steps 390 --warmup 20 --profile-steps 10 \
            --fast-flags "" --fast-flags "--compile-mode reduce-overhead" > "$work/bench.log" 2>&1
        echo "bench: exit $?, $(( $(date +%s) - start )) s" | tee -a "$work/bench.log" ;;
    autotune)
        TORCHINDUCTOR_MAX_AUTOTUNE=1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 \
            timeout "$(limit "${BENCH_SECONDS:-240}")" python3 bench.py --device cuda --data-dir "$data_dir" \
            --json "$work/bench-autotune.json" --steps 390 --warmup 20 --profile-steps 10 > "$work/bench-autotune.log" 2>&1
        echo "autotune bench: exit $?, $(( $(date +%s) - start )) s" | tee -a "$work/bench-autotune.log" ;;
    triton)
        timeout "$(limit "${TEST_SECONDS:-300}")" python3 -m pytest tests/test_triton_attention.py tests/test_cuda.py \
            -k "triton or attention_backends" -q -rfE --durations=12 -p no:cacheprovider \
            -o faulthandler_timeout="${TEST_HANG_SECONDS:-120}" > "$work/triton.log" 2>&1
        echo "triton tests: exit $?, $(( $(date +%s) - start )) s" | tee -a "$work/triton.log"
        PYTHONPATH=. timeout "$(limit 120)" python3 scripts/attention_backends.py >> "$work/triton.log" 2>&1
        timeout "$(limit "${BENCH_SECONDS:-240}")" python3 bench.py --device cuda --data-dir "$data_dir" \
            --json "$work/bench-triton.json" --steps 390 --warmup 20 --profile-steps 10 \
            --fast-flags "" --fast-flags "--attention triton" > "$work/bench-triton.log" 2>&1
        echo "triton bench: exit $?, $(( $(date +%s) - start )) s" | tee -a "$work/triton.log" ;;
    full)
        timeout "$(limit "${FULL_RUN_SECONDS:-600}")" python3 main.py --data-dir "$data_dir" --out-dir /tmp/full \
            ${FULL_FLAGS:-} > "$work/full_run.log" 2>&1
        echo "full run: exit $?, $(( $(date +%s) - start )) s wall (model build, compile and final report included)" \
            | tee -a "$work/full_run.log"
        for f in metrics.csv results.png attention.png confusion.png per_class.csv; do cp "/tmp/full/$f" "$work/" 2>/dev/null; done ;;
    tests)
        timeout "$(limit "${TEST_SECONDS:-300}")" python3 -m pytest tests/test_cuda.py tests/test_augment.py \
            -k "${TESTS_K:-cuda}" -q -rfE --durations=12 -p no:cacheprovider \
            -o faulthandler_timeout="${TEST_HANG_SECONDS:-120}" > "$work/tests.log" 2>&1
        echo "cuda tests: exit $?, $(( $(date +%s) - start )) s" | tee -a "$work/tests.log" ;;
    torchrun)
        common=(--data-dir "$data_dir" --epochs 3 --warmup-epochs 1)
        timeout "$(limit "${TORCHRUN_SECONDS:-75}")" python3 main.py "${common[@]}" --out-dir /tmp/single > "$work/torchrun.log" 2>&1
        echo "python main.py: exit $?" >> "$work/torchrun.log"
        timeout "$(limit "${TORCHRUN_SECONDS:-75}")" torchrun --standalone --nproc_per_node=1 main.py "${common[@]}" \
            --out-dir /tmp/ddp1 >> "$work/torchrun.log" 2>&1
        echo "torchrun --nproc_per_node=1: exit $?" >> "$work/torchrun.log"
        { echo "python main.py:              $(median_images_per_second /tmp/single/metrics.csv)"
          echo "torchrun --nproc_per_node=1: $(median_images_per_second /tmp/ddp1/metrics.csv)"
        } | tee -a "$work/torchrun.log"
        cp /tmp/single/metrics.csv "$work/torchrun-single-metrics.csv" 2>/dev/null
        cp /tmp/ddp1/metrics.csv "$work/torchrun-ddp1-metrics.csv" 2>/dev/null ;;
    lossless)
        gather_lossless 2>&1 | tee -a "$work/lossless.log" ;;
    *)
        echo "unknown stage $stage (bench, autotune, full, tests, torchrun, lossless, triton)"; exit 2 ;;
    esac
done

echo "==== summary"
for log in bench bench-autotune; do
    [ -f "$work/$log.log" ] && grep -E "^(config|reference|fast|profile|augmentation|training speed|.*bench: exit)" "$work/$log.log"
done
[ -f "$work/full_run.log" ] && grep -E "^epoch|^done|full run|^model" "$work/full_run.log" | tail -n 6
[ -f "$work/tests.log" ] && tail -n 3 "$work/tests.log"
[ -f "$work/torchrun.log" ] && tail -n 2 "$work/torchrun.log"
exit 0
