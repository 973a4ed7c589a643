#!/usr/bin/env bash
# Packs the lossless CIFAR-10 folder into three parts small enough for the device tool, which carries
# at most 64 MiB per call (186 MB raw; about 140 MB as tar.xz, so three parts of about 46 MB):
#
#   bash scripts/split_lossless.sh ../shared/data      # writes .lossless/cifar10.tar.xz.part-0{0,1,2} and SHA256
#
# Then three calls on one warm GPU machine, each carrying one part and SHA256; the `lossless` stage of
# scripts/gpu_session.sh gathers them and unpacks the copy once all three are there (see README).
set -euo pipefail
src=${1:?usage: split_lossless.sh DIR_HOLDING_cifar-10-batches-py}
[ -f "$src/cifar-10-batches-py/data_batch_1" ] || { echo "$src/cifar-10-batches-py/data_batch_1 not found: pass the folder that holds cifar-10-batches-py" >&2; exit 2; }
mkdir -p .lossless
archive=.lossless/cifar10.tar.xz
tar -C "$src" -cf - cifar-10-batches-py | xz -9 -T0 > "$archive"
sha256sum < "$archive" | cut -d' ' -f1 > .lossless/SHA256
split -n 3 -d "$archive" "$archive.part-"
rm "$archive"
ls -l .lossless
