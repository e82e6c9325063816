#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU and a CUDA build of torch: compile the CUDA kernels
# (JIT, from this checkout), run their tests against the reference, then the kernel and UNet benchmarks.
#   bash benchmarks/run_cuda.sh [OUT_DIR]        (OUT_DIR defaults to benchmarks/results)
# Logs and JSON land in OUT_DIR; exit status is the tests' (benchmarks run regardless, their failures are logged).
set -u
OUT_DIR=${1:-benchmarks/results}
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

python3 benchmarks/unet.py --device cuda --json "$OUT_DIR/unet-cuda.json" 2>&1 | tee "$OUT_DIR/unet_cuda.log"
echo "unet: $(( $(date +%s) - start )) s"
python3 benchmarks/kernels.py --device cuda --json "$OUT_DIR/kernels-cuda.json" \
  --markdown "$OUT_DIR/results-kernels-cuda.md" 2>&1 | tee "$OUT_DIR/kernels_cuda.log"
echo "kernels: $(( $(date +%s) - start )) s"
exit "$rc"
