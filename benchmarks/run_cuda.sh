#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU and a CUDA build of torch: compile the CUDA kernels
# (JIT, from this checkout), run their tests against the reference, then the kernel and UNet benchmarks.
#   bash benchmarks/run_cuda.sh [OUT_DIR] [quick]      (OUT_DIR defaults to benchmarks/results)
# "quick" fits one call of a 15-minute device budget: the UNet step (FP16 and W8A8 with a kernel profile, W8A8 with
# the copy-engine linears off, W4A8 on resident 4-bit weights) at 10 steps, then the linear and batch-1 GEMV sections
# and an Nsight Compute probe of the GEMVs, each stage under its own time limit. Timings on an H200 (2026-11-26,
# third session): build 31-36 s, tests about 130 s on 16 workers, UNet stage 137 s, linear 30 s, GEMV 13 s. Logs
# and JSON land in OUT_DIR (8 files in quick mode). benchmarks/run_cuda_check.sh is the short form (tests + GEMV).
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
  2>&1 | tee "$OUT_DIR/cuda_tests.log"
echo "build: $(( $(date +%s) - start )) s"

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:benchmark $XDIST tests/ops/test_triton_resident.py tests/ops/test_cuda_kernels.py -rs \
  2>&1 | tee -a "$OUT_DIR/cuda_tests.log" | tail -15
rc=${PIPESTATUS[0]}
echo "tests: rc=$rc, $(( $(date +%s) - start )) s"

if [ "$QUICK" = "quick" ]; then
  # the UNet step first (the figures that matter), then the per-layer sections; each stage has its own time limit.
  # W8A8 twice: linears on the copy-engine (TMA) kernel, the default, and on the previous pointer kernel
  # (QUANTKIT_TRITON_TMA=0); W4A8 on resident 4-bit weights (QUANTKIT_RESIDENT_W4=1).
  timeout 110 python3 benchmarks/unet.py --device cuda --steps 10 --variants fp,w8a8 --profile \
    --json "$OUT_DIR/unet-cuda.json" > "$OUT_DIR/unet_cuda.log" 2>&1
  QUANTKIT_TRITON_TMA=0 timeout 50 python3 benchmarks/unet.py --device cuda --steps 10 --variants w8a8 \
    --json "$OUT_DIR/unet-cuda-ptr.json" >> "$OUT_DIR/unet_cuda.log" 2>&1
  QUANTKIT_RESIDENT_W4=1 timeout 60 python3 benchmarks/unet.py --device cuda --steps 10 --variants w4a8 --profile \
    --json "$OUT_DIR/unet-cuda-w4a8.json" >> "$OUT_DIR/unet_cuda.log" 2>&1
  grep -E "^\| |running" "$OUT_DIR/unet_cuda.log" | tail -14
  echo "unet: $(( $(date +%s) - start )) s"
  for section in linear:90 gemv:50; do
    limit=${section#*:} section=${section%:*}
    timeout "$limit" python3 benchmarks/kernels.py --device cuda --only "$section" --rounds 3 \
      --json "$OUT_DIR/kernels-cuda-$section.json" --markdown "/tmp/kernels-cuda-$section.md" \
      >> "$OUT_DIR/bench.log" 2>&1
    grep -E "^  (linear|gemv)" "$OUT_DIR/bench.log" | grep -F "${section}" | cut -c1-400 | tail -12
    echo "$section: $(( $(date +%s) - start )) s"
  done
  if command -v ncu > /dev/null; then  # the GEMV kernels' own duration and DRAM throughput, apart from launch gaps
    timeout 35 ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
      python3 benchmarks/ncu_gemv.py 1280 10240 > /tmp/ncu_gemv.log 2>&1
    cat /tmp/ncu_gemv.log >> "$OUT_DIR/bench.log"
    grep -E "gemv|gemm|Kernel|K=|duration|bytes_read|throughput|warps_active" /tmp/ncu_gemv.log | cut -c1-160 | tail -40
  fi
else
  python3 benchmarks/unet.py --device cuda --variants fp,w8a8,w4a8,w4a16,w8a8:cublaslt --profile \
    --json "$OUT_DIR/unet-cuda.json" 2>&1 | tee "$OUT_DIR/unet_cuda.log"
  python3 benchmarks/kernels.py --device cuda --json "$OUT_DIR/kernels-cuda.json" \
    --markdown "$OUT_DIR/results-kernels-cuda.md" 2>&1 | tee "$OUT_DIR/kernels_cuda.log"
fi
echo "benchmarks: $(( $(date +%s) - start )) s"
exit "$rc"
