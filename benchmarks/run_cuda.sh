#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU and a CUDA build of torch: compile the CUDA kernels
# (JIT, from this checkout), run their tests against the reference, then the kernel and UNet benchmarks.
#   bash benchmarks/run_cuda.sh [OUT_DIR] [quick]      (OUT_DIR defaults to benchmarks/results)
# "quick" fits a 15-minute device budget with room for a rerun. Timings on an H200 (2026-11-26): build 25-29 s,
# tests 130 s, GEMV section 15 s, linear section 60 s (Triton autotuning included), UNet 40-60 s per variant.
# It times the GEMV and linear sections and three UNet variants at 10 steps. Logs and JSON land in OUT_DIR.
# The exit status is the tests'; the benchmarks run regardless, and their failures are logged.
set -u
OUT_DIR=${1:-benchmarks/results}
QUICK=${2:-}
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1 QUANTKIT_CUDA_JIT=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
  "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

start=$(date +%s)
python3 -c "import quantkit.ops as o; s = o.cuda_status(); print('cuda kernels:', s); assert s['loaded']" \
  2>&1 | tee "$OUT_DIR/cuda_build.log"
echo "build: $(( $(date +%s) - start )) s"

python3 -m pytest -q -p no:cacheprovider tests/ops/test_cuda_kernels.py -rs 2>&1 | tee "$OUT_DIR/cuda_tests.log"
rc=${PIPESTATUS[0]}
echo "tests: rc=$rc, $(( $(date +%s) - start )) s"

if [ "$QUICK" = "quick" ]; then
  for section in gemv linear; do
    python3 benchmarks/kernels.py --device cuda --only "$section" --rounds 3 --json "$OUT_DIR/kernels-cuda-$section.json" \
      --markdown "$OUT_DIR/kernels-cuda-$section.md" > "$OUT_DIR/kernels_cuda_$section.log" 2>&1
    tail -14 "$OUT_DIR/kernels_cuda_$section.log"
    echo "$section: $(( $(date +%s) - start )) s"
  done
  python3 benchmarks/unet.py --device cuda --steps 10 --variants fp,w8a8,w4a16 --json "$OUT_DIR/unet-cuda.json" \
    > "$OUT_DIR/unet_cuda.log" 2>&1
  tail -6 "$OUT_DIR/unet_cuda.log"
else
  python3 benchmarks/unet.py --device cuda --variants fp,w8a8,w4a8,w4a16,w8a8:triton --json "$OUT_DIR/unet-cuda.json" \
    2>&1 | tee "$OUT_DIR/unet_cuda.log"
  python3 benchmarks/kernels.py --device cuda --json "$OUT_DIR/kernels-cuda.json" \
    --markdown "$OUT_DIR/results-kernels-cuda.md" 2>&1 | tee "$OUT_DIR/kernels_cuda.log"
fi
echo "benchmarks: $(( $(date +%s) - start )) s"
exit "$rc"
