#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU and a CUDA build of torch: compile the CUDA kernels
# (JIT, from this checkout), run their tests against the reference, then the kernel and UNet benchmarks.
#   bash benchmarks/run_cuda.sh [OUT_DIR] [quick]      (OUT_DIR defaults to benchmarks/results)
# "quick" fits one call of a 15-minute device budget (QUICK_BUDGET seconds, default 570): the CUTLASS engine's tests,
# the UNet step at 10 steps with a kernel profile (FP16, W8A8 and W4A8 with the fusions, unet.py --fuse, W8A8/W4A8
# also on the Triton int8 GEMMs, QUANTKIT_INT8_GEMM=triton; W4A8 with 4-bit linears on the opt-in CUTLASS int4 x int8
# GEMM, QUANTKIT_RESIDENT_W4=cutlass), the linear section (each CUTLASS config per shape),
# the other GPU tests, then unfused (the defaults of a model quantized in memory), the GEMV section, fused W4A8 with
# conv8 and the conv section while time remains. Timings on an H100 and an H200 (2026-11-27): build 32-34 s, tests 167-174 s on 16 workers (210 s limit
# in quick mode), a UNet variant 25-50 s, GEMV 90 s, linear 30 s. Results come back as OUT_DIR/results.tgz plus
# the test log. benchmarks/run_cuda_check.sh is the short form (tests + GEMV).
# The exit status is the tests'; the benchmarks run regardless, and their failures are logged.
set -u
OUT_DIR=${1:-benchmarks/results}
QUICK=${2:-}
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1 QUANTKIT_CUDA_JIT=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
  "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")}
# The opt-in CUTLASS int8 GEMM (quantkit.ops.cutlass_gemm): a library prebuilt by benchmarks/device_wheels.sh
# (carried in .whl/) saves building it here.
[ -f .whl/libquantkit_cutlass.so ] && export QUANTKIT_CUTLASS_LIB=${QUANTKIT_CUTLASS_LIB:-$PWD/.whl/libquantkit_cutlass.so}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

start=$(date +%s)
python3 -c "import quantkit.ops as o; s = o.cuda_status(); print('cuda kernels:', s); assert s['loaded']" \
  2>&1 | tee "$OUT_DIR/cuda_tests.log"
echo "build: $(( $(date +%s) - start )) s"

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
gpu_tests() {  # gpu_tests SECONDS FILES...: pytest on the GPU test files; rc accumulates failures
  local t=$1; shift
  timeout "$t" python3 -m pytest -q -p no:cacheprovider -p no:benchmark $XDIST "$@" -rs \
    2>&1 | tee -a "$OUT_DIR/cuda_tests.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  echo "tests ($*): rc=$rc, $(( $(date +%s) - start )) s"
}
rc=0
GPU_TESTS="tests/ops/test_triton_resident.py tests/ops/test_cuda_kernels.py tests/calibrate/test_device.py"
# The CUTLASS engine's tests first (short); in quick mode the other GPU tests run after the UNet figures
gpu_tests 120 tests/ops/test_cutlass_gpu.py
[ "$QUICK" = quick ] || gpu_tests 240 $GPU_TESTS

if [ "$QUICK" = "quick" ]; then
  # The UNet step first (the figures that matter), then the per-layer sections while time remains: every stage
  # runs under min(its own limit, what is left of QUICK_BUDGET seconds from the start, default 570) and is skipped
  # with under 30 s left. FP16, W8A8 and W4A8 with the fusions (unet.py --fuse: quantkit.fuse, what a loaded export
  # gets by itself, and diffusers' fused q/k/v projections for FP16), each fused kernel's time in the profile; the
  # same three unfused with the defaults (4-bit layers widened per call onto the 8-bit kernels, convolution inputs
  # quantized into the bordered codes); the GEMV section (every kernel forced); fused W4A8 with 4-bit convolutions
  # held 8 bits wide (QUANTKIT_RESIDENT_W4=conv8); then convolutions and linears. JSON and logs go to $RES and, after every stage, into
  # OUT_DIR/results.tgz (a device machine returns at most 8 files).
  RES=$(mktemp -d)
  BUDGET=${QUICK_BUDGET:-570}
  pack() { tar czf "$OUT_DIR/results.tgz" -C "$RES" . ; }
  limit() {  # limit SECONDS: prints min(SECONDS, time left - 5), or nothing with under 30 s left
    local left=$(( BUDGET - ($(date +%s) - start) - 5 ))
    [ "$left" -ge 30 ] && echo $(( $1 < left ? $1 : left ))
  }
  section() {  # section NAME SECONDS: the kernels.py section NAME
    local t; t=$(limit "$2") || { echo "$1: skipped (time)"; return; }
    timeout "$t" python3 benchmarks/kernels.py --device cuda --only "$1" --rounds 3 \
      --json "$RES/kernels-cuda-$1.json" --markdown "$RES/kernels-cuda-$1.md" >> "$RES/bench.log" 2>&1
    grep -E "^  (linear|conv|gemv)" "$RES/bench.log" | grep -F "  $1 " | cut -c1-600 | tail -12
    pack
    echo "$1: $(( $(date +%s) - start )) s"
  }
  unet() {  # unet NAME VARIANTS SECONDS [ENV=VALUE ...] (UNET_ARGS: extra benchmarks/unet.py options)
    local name=$1 variants=$2 t; t=$(limit "$3") || { echo "unet $name: skipped (time)"; return; }
    shift 3
    local n; n=$(echo "$variants" | tr , '\n' | wc -l)
    env "$@" timeout "$t" python3 benchmarks/unet.py --device cuda --steps 10 --variants "$variants" --profile \
      ${UNET_ARGS:-} --json "$RES/unet-cuda-$name.json" >> "$RES/unet_cuda.log" 2>&1
    echo "== $name ($*)"; grep -E "^\| (fp|w8|w4)" "$RES/unet_cuda.log" | tail -n "$n"
    pack
  }
  # Fused FP16, W8A8 and W4A8 with the defaults (on Hopper with the CUTLASS library: the resident 8-bit and widened
  # 4-bit linears on the CUTLASS int8 GEMM), each quantized one also on the Triton kernels ("+triton"), side by side
  # in one call; the linear section times every CUTLASS config per shape beside the Triton kernels; then the rest
  # of the GPU tests (210 s limit).
  UNET_ARGS=--fuse unet fused fp,w8a8,w8a8+triton,w4a8,w4a8+triton 260
  # The opt-in int4 x int8 CUTLASS GEMM: symmetric 4-bit linears held as signed nibbles, no per-call widening.
  UNET_ARGS=--fuse unet w4a8-cutlass w4a8 75 QUANTKIT_RESIDENT_W4=cutlass
  section linear 90
  t=$(limit 210) && gpu_tests "$t" $GPU_TESTS || echo "tests ($GPU_TESTS): skipped (time)"
  unet default fp,w8a8,w4a8 180
  section gemv 90
  UNET_ARGS=--fuse unet w4a8-conv8 w4a8 70 QUANTKIT_RESIDENT_W4=conv8
  echo "unet: $(( $(date +%s) - start )) s"
  section conv 60
else
  python3 benchmarks/unet.py --device cuda --variants fp,w8a8,w4a8,w4a16,w8a8:cublaslt --profile \
    --json "$OUT_DIR/unet-cuda.json" 2>&1 | tee "$OUT_DIR/unet_cuda.log"
  python3 benchmarks/kernels.py --device cuda --json "$OUT_DIR/kernels-cuda.json" \
    --markdown "$OUT_DIR/results-kernels-cuda.md" 2>&1 | tee "$OUT_DIR/kernels_cuda.log"
fi
echo "benchmarks: $(( $(date +%s) - start )) s"
exit "$rc"
