#!/usr/bin/env bash
# Builds tools/gpu/flash_sm90_check.cu with nvcc alone (the portable forward for sm_90, the Hopper
# forward for sm_90a; no torch, ~15 s on 16 cores) and runs it, then compute-sanitizer memcheck and
# racecheck on its small cases. Run from anywhere on a machine with a Hopper GPU:
#   bash tools/gpu/flash_sm90_check.sh [OUT_DIR]
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT_DIR=${1:-${OUT:-/tmp/scaletrain-gpu}}
WORK=$(mktemp -d)
mkdir -p "$OUT_DIR"
cd "$ROOT"
NV="nvcc -O3 -std=c++17 -Isrc -Iinclude"
$NV -gencode=arch=compute_90,code=sm_90 -DSCALETRAIN_WITH_SM90 -c src/attention/flash_attention.cu -o "$WORK/fa.o" &
$NV -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -c src/attention/flash_attention_sm90.cu -o "$WORK/fa90.o" \
  > "$OUT_DIR/ptxas.log" 2>&1 &
$NV -gencode=arch=compute_90,code=sm_90 -c tools/gpu/flash_sm90_check.cu -o "$WORK/check.o" &
wait
grep -E "registers|spill|C75" "$OUT_DIR/ptxas.log"
$NV "$WORK/fa.o" "$WORK/fa90.o" "$WORK/check.o" -o "$WORK/check" || exit 1
"$WORK/check" | tee "$OUT_DIR/flash_sm90_check.log"
status=${PIPESTATUS[0]}
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool "$WORK/check" small > "$OUT_DIR/$tool.log" 2>&1
  echo "$tool: exit $?, $(tail -n 1 "$OUT_DIR/$tool.log")"
done
rm -rf "$WORK"
exit "$status"
