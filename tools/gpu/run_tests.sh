#!/usr/bin/env bash
# Builds scaletrain on the GPU host and runs the whole test suite there, GPU tests included,
# then the demo config on the GPU. Run from the repository root on the GPU host:
#   bash tools/gpu/run_tests.sh [OUT_DIR]
# Expects torch in /opt/torch/.venv (or PYTHON=...), and the Debian packages of
# tools/gpu/pack-debs.sh in .deps/ (packed on a Debian machine and carried along).
# Logs and a summary go to OUT_DIR (default $OUT, else /tmp/scaletrain-gpu).
# SCALETRAIN_GPU_TESTS=0 skips ctest and pytest, SCALETRAIN_GPU_DEMO=0 the demo run; SCALETRAIN_GPU_BENCH=1 adds the benchmarks.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT_DIR=${1:-${OUT:-/tmp/scaletrain-gpu}}
PYTHON=${PYTHON:-/opt/torch/.venv/bin/python}
DEPS=${DEPS:-/tmp/deps}
BUILD=${BUILD:-$ROOT/build-gpu}
ARCHES=${SCALETRAIN_CUDA_ARCHITECTURES:-80;90}
mkdir -p "$OUT_DIR" "$DEPS"
cd "$ROOT"

step() { echo "== $*"; }
fail() { echo "gpu: FAILED at: $*" | tee -a "$OUT_DIR/summary.txt"; exit 1; }

step "unpacking Debian packages into $DEPS"
ls .deps/*.deb >/dev/null 2>&1 || fail "no .deps/*.deb (run tools/gpu/pack-debs.sh on a Debian machine and carry .deps)"
for f in .deps/*.deb; do dpkg -x "$f" "$DEPS"; done
# Some -dev packages link their .so to an absolute /lib path (zlib): point such links into DEPS.
find "$DEPS" -type l -lname '/*' | while read -r link; do
  target=$(readlink "$link")
  if [ -e "$DEPS$target" ]; then ln -sf "$DEPS$target" "$link"; fi
done
export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$(dirname "$PYTHON"):$PATH"

step "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
  nvcc --version | tail -n 2; cmake --version | head -n 1; } 2>&1 | tee "$OUT_DIR/environment.txt"

step "configure"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSCALETRAIN_PYTHON_EXECUTABLE="$PYTHON" \
  -DSCALETRAIN_CUDA=ON "-DSCALETRAIN_CUDA_ARCHITECTURES=$ARCHES" -DCMAKE_PREFIX_PATH="$DEPS/usr" \
  > "$OUT_DIR/configure.log" 2>&1 || { tail -n 40 "$OUT_DIR/configure.log"; fail configure; }

step "build"
start=$(date +%s)
cmake --build "$BUILD" -j "$(nproc)" > "$OUT_DIR/build.log" 2>&1 || { grep -m 20 -E "error|FAILED" "$OUT_DIR/build.log"; fail build; }
echo "build: $(( $(date +%s) - start )) s" | tee "$OUT_DIR/summary.txt"

step "info"
"$BUILD/scaletrain" info | tee "$OUT_DIR/info.txt"

ctest_status=0; pytest_status=0
if [ "${SCALETRAIN_GPU_TESTS:-1}" = 1 ]; then
  step "ctest"
  # 4 tests at a time, 4 CPU threads each: the CPU training tests crawl when 16-thread runs share 16 cores.
  (cd "$BUILD" && OMP_NUM_THREADS=4 ctest -j 4 --timeout 300 --output-on-failure) > "$OUT_DIR/ctest.log" 2>&1
  ctest_status=$?
  grep -E "tests passed|tests failed" "$OUT_DIR/ctest.log" | tee -a "$OUT_DIR/summary.txt"
  grep -E "\(Failed\)|\(SEGFAULT\)|Not Run|Timeout" "$OUT_DIR/ctest.log" | tee -a "$OUT_DIR/summary.txt"
  echo "ctest skipped: $(grep -c '\*\*\*Skipped' "$OUT_DIR/ctest.log")" | tee -a "$OUT_DIR/summary.txt"

  step "pytest"
  SCALETRAIN_BUILD="$BUILD" PYTHONPATH="$ROOT/python" "$PYTHON" -m pytest -q -rs > "$OUT_DIR/pytest.log" 2>&1
  pytest_status=$?
  tail -n 3 "$OUT_DIR/pytest.log" | tee -a "$OUT_DIR/summary.txt"

fi

demo_status=0
if [ "${SCALETRAIN_GPU_DEMO:-1}" = 1 ]; then
  step "demo config on the GPU"
  "$BUILD/scaletrain" train --config configs/tiny_cpu.yaml --set "train.out_dir=$OUT_DIR/demo" \
    > "$OUT_DIR/demo.log" 2>&1
  demo_status=$?
  grep -A 4 "== summary" "$OUT_DIR/demo.log" | tee -a "$OUT_DIR/summary.txt"
fi

# SCALETRAIN_GPU_BENCH=1: the benchmarks of benchmarks/python, JSON into OUT_DIR/results.
if [ "${SCALETRAIN_GPU_BENCH:-0}" = 1 ]; then
  step "benchmarks"
  mkdir -p "$OUT_DIR/results"
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -oiE "h100|h200|a100" | tr A-Z a-z)
  PYTHONPATH="$ROOT/python" "$PYTHON" benchmarks/python/bench_grad_pass.py --out "$OUT_DIR/results/amp_${device:-gpu}.json" \
    2>&1 | tee "$OUT_DIR/bench_grad_pass.log" | tee -a "$OUT_DIR/summary.txt"
  PYTHONPATH="$ROOT/python" "$PYTHON" benchmarks/python/bench_train_gpt2.py --build "$BUILD" \
    --out "$OUT_DIR/results/train_gpt2_${device:-gpu}.json" 2>&1 | tee "$OUT_DIR/bench_train_gpt2.log" | tee -a "$OUT_DIR/summary.txt"
fi

echo "gpu: ctest exit $ctest_status, pytest exit $pytest_status, demo exit $demo_status" | tee -a "$OUT_DIR/summary.txt"
[ $ctest_status -eq 0 ] && [ $pytest_status -eq 0 ] && [ $demo_status -eq 0 ]
