#!/usr/bin/env bash
# Wheels for a lent GPU machine (its image has torch 2.11 + CUDA, Triton, transformers, safetensors, scipy, click,
# pyyaml, tqdm, ... but no diffusers, pulp or pydantic, and nothing can be fetched there). Run here, in the repo
# root: it downloads the missing packages for its Python 3.12 into .whl/ (ignored through .git/info/exclude).
#   bash benchmarks/device_wheels.sh
# Then each device call carries ".whl" and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 && bash benchmarks/run_cuda.sh $OUT quick
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
# Versions as CI resolves them here (pure-Python wheels, except pydantic-core).
PKGS=$(python3 - <<'EOF'
from importlib.metadata import version
names = ["diffusers", "pulp", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $PKGS
# The opt-in CUTLASS int8 GEMM's library (quantkit.ops.cutlass_gemm), built here for sm_90a (about 2 min on two
# cores) so the GPU machine need not: run_cuda.sh points QUANTKIT_CUTLASS_LIB at it.
python3 -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
PYTHONPATH=src python3 -c "
from pathlib import Path; import subprocess
from quantkit.ops import cutlass_gemm
subprocess.run(cutlass_gemm.nvcc_command(Path('.whl/libquantkit_cutlass.so')), check=True)"
ls -1 .whl
du -sh .whl
