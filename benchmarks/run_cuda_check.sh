#!/usr/bin/env bash
# Short GPU check (fits what is left of a 15-minute device budget after a run_cuda.sh quick run): build the CUDA
# kernels, run the kernel tests against the reference on every worker, then the batch-1 GEMV section.
#   bash benchmarks/run_cuda_check.sh OUT_DIR
# SKIP_TESTS=1 skips the tests (a second call on a machine still warm from a run_cuda.sh run that ran them).
set -u
OUT_DIR=${1:-/tmp/quantkit-cuda-check}
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1 QUANTKIT_CUDA_JIT=1 MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
python3 -c "import quantkit.ops as o; s = o.cuda_status(); print('cuda kernels:', s); assert s['loaded']" \
  > "$OUT_DIR/cuda_tests.log" 2>&1
echo "build: $(( $(date +%s) - start )) s"
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
  timeout 210 python3 -m pytest -q -p no:cacheprovider -p no:benchmark $XDIST tests/ops/test_cuda_kernels.py \
    tests/ops/test_triton_resident.py -rs >> "$OUT_DIR/cuda_tests.log" 2>&1
  rc=$?
  grep -E "passed|failed|error|FAILED|SKIPPED" "$OUT_DIR/cuda_tests.log" | tail -15
  echo "tests: rc=$rc, $(( $(date +%s) - start )) s"
fi
timeout 90 python3 benchmarks/kernels.py --device cuda --only gemv --rounds 3 --json "$OUT_DIR/kernels-cuda-gemv.json" \
  --markdown "$OUT_DIR/kernels-cuda-gemv.md" > "$OUT_DIR/bench.log" 2>&1
grep -E "^  gemv" "$OUT_DIR/bench.log" | cut -c1-420
echo "gemv: $(( $(date +%s) - start )) s"
exit "$rc"
