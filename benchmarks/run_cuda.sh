#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU and a CUDA build of torch: compile the CUDA kernels
# (JIT, from this checkout), run their tests against the reference, then the kernel and UNet benchmarks.
#   bash benchmarks/run_cuda.sh [OUT_DIR] [quick]      (OUT_DIR defaults to benchmarks/results)
# "quick" fits one call of a 15-minute device budget: the UNet step (FP16, W8A8 and W4A8 on resident weights,
# W8A8 on canonical weights / cuBLASLt) at 10 steps with a kernel profile, then the conv and linear sections, each
# stage under its own time limit. Timings on an H200 (2026-11-26, before resident weights): build 25-29 s, tests
# 130 s serially, linear section 60 s (Triton autotuning included), UNet 40-60 s per variant. Logs and JSON land
# in OUT_DIR (at most 8 files in quick mode).
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

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
timeout 150 python3 -m pytest -q -p no:cacheprovider $XDIST tests/ops/test_triton_resident.py tests/ops/test_cuda_kernels.py -rs \
  2>&1 | tee "$OUT_DIR/cuda_tests.log"
rc=${PIPESTATUS[0]}
echo "tests: rc=$rc, $(( $(date +%s) - start )) s"

if [ "$QUICK" = "quick" ]; then
  # the UNet step first (the figures that matter), then the per-layer sections; each stage has its own time limit
  timeout 250 python3 benchmarks/unet.py --device cuda --steps 10 --variants fp,w8a8,w4a8,w8a8:cublaslt --profile \
    --json "$OUT_DIR/unet-cuda.json" > "$OUT_DIR/unet_cuda.log" 2>&1
  grep -v '^{' "$OUT_DIR/unet_cuda.log" | tail -8
  echo "unet: $(( $(date +%s) - start )) s"
  for section in conv:70 linear:90; do
    limit=${section#*:} section=${section%:*}
    timeout "$limit" python3 benchmarks/kernels.py --device cuda --only "$section" --rounds 3 \
      --json "$OUT_DIR/kernels-cuda-$section.json" --markdown "/tmp/kernels-cuda-$section.md" \
      >> "$OUT_DIR/kernels_cuda.log" 2>&1
    grep -A30 "^| layer" "/tmp/kernels-cuda-$section.md" 2>/dev/null | head -16
    echo "$section: $(( $(date +%s) - start )) s"
  done
else
  python3 benchmarks/unet.py --device cuda --variants fp,w8a8,w4a8,w4a16,w8a8:cublaslt --profile \
    --json "$OUT_DIR/unet-cuda.json" 2>&1 | tee "$OUT_DIR/unet_cuda.log"
  python3 benchmarks/kernels.py --device cuda --json "$OUT_DIR/kernels-cuda.json" \
    --markdown "$OUT_DIR/results-kernels-cuda.md" 2>&1 | tee "$OUT_DIR/kernels_cuda.log"
fi
echo "benchmarks: $(( $(date +%s) - start )) s"
exit "$rc"
