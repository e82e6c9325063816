"""Probe (GPU, under Nsight Compute): the batch-1 GEMV kernel and cuBLAS fp16 on one layer, three calls each, so
``ncu`` reports each kernel's own duration and DRAM throughput apart from launch gaps.
    ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python3 benchmarks/ncu_gemv.py [K N]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_kernels  # noqa: E402

import quantkit  # noqa: E402, F401  (registers the ops)


def main() -> None:
    k, n = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (1280, 10240)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    b = torch.randn(n, device="cuda", dtype=torch.float16)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
    q, s, _ = cuda_kernels._packed(n, k, 4, 64)
    for engine in ("v3", "v2", "v3"):
        os.environ["QUANTKIT_GEMV"] = engine
        F.linear(x, w16, b)
        torch.ops.quantkit.gemm_w4a16(x, q, s, None, b, None, None, 4, 64, 16)
    torch.cuda.synchronize()
    print(f"K={k} N={n}: fp16 weights {2 * n * k / 1e6:.1f} MB, w4 g64 {n * k / 2e6 + n * k / 64 * 2 / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
