#!/usr/bin/env bash
# The fused kernels must not change the math: 500 bf16 steps of GPT-2 124M (the DSL data as bytes,
# block 256, warmup 50), once with model.fused_ops true and once false, losses every 50 steps.
# EXTRA (e.g. "--set optim.eps=1.00001e-8") perturbs both runs at the rounding level, to see how far
# such a change alone moves the trajectory. Logs go to OUT_DIR, run folders to /tmp.
# Run on the GPU host after tools/gpu/run_tests.sh has built build-gpu:
#   bash tools/gpu/converge_fused_ops.sh [OUT_DIR]
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/scaletrain-gpu}}
BUILD=${BUILD:-build-gpu}
mkdir -p "$OUT_DIR"
for fused in true false; do
  "$BUILD/scaletrain" train --config configs/gpt2_124m.yaml --set data.source=dsl --set model.vocab_size=258 \
    --set model.block_size=256 --set train.max_steps=500 --set train.grad_accum_steps=1 \
    --set optim.warmup_steps=50 --set train.log_every=50 --set eval.every=0 --set model.fused_ops=$fused \
    --set "train.out_dir=/tmp/converge_fused_ops_$fused" ${EXTRA:-} > "$OUT_DIR/converge_fused_ops_$fused.log" 2>&1 ||
    { tail -n 20 "$OUT_DIR/converge_fused_ops_$fused.log"; exit 1; }
  grep -E "step [0-9]+/500|val loss [0-9]" "$OUT_DIR/converge_fused_ops_$fused.log" | sed "s/^/fused_ops=$fused /"
done
