"""Probe (one-off, GPU): how fast can a Triton int8 GEMM with the quantkit epilogue go on SDXL linear shapes when
the weight is already a centred int8 matrix (no in-loop conversion, row sums precomputed)? Compared with fp16
cuBLAS, torch._int_mm and the packed-weight Triton engine. Writes JSON.
    PYTHONPATH=src python benchmarks/triton_int8_probe.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_kernels  # noqa: E402

from quantkit.formats import unpack  # noqa: E402
from quantkit.ops import triton_gemm  # noqa: E402

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=st, num_warps=wp)
           for bm, bn, bk, st, wp in [(128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (128, 256, 64, 4, 8),
                                      (256, 128, 64, 4, 8), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4),
                                      (128, 64, 128, 5, 4)]]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K"])
@triton.jit
def _gemm(a_ptr, w_ptr, y_ptr, wsum_ptr, wscale_ptr, s_ptr, zp_ptr, bias_ptr, M, N, K, BM: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = 8 * num_n
    first_m = (pid // group) * 8
    size_m = min(num_m - first_m, 8)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs, mask=(offs_n < N)[:, None], other=0)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        a_ptrs += BK
        w_ptrs += BK
    nmask = offs_n < N
    wsum = tl.load(wsum_ptr + offs_n, mask=nmask, other=0)
    wscale = tl.load(wscale_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    zc = 128 - tl.load(zp_ptr)
    s = tl.load(s_ptr)
    y = ((acc + zc * wsum[None, :]).to(tl.float32) * wscale[None, :]) * s
    y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(tl.float16), mask=nmask[None, :])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    ops = torch.ops.quantkit
    s, zp = cuda_kernels._static()
    rows = []
    for layer, m, k, n in cuda_kernels.LINEAR_SHAPES:
        if m < 1024:
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        q8, s8, _ = cuda_kernels._packed(n, k, 8)
        w_s8 = (unpack(q8, 8, k).to(torch.int32) - 128).to(torch.int8).contiguous()
        wsum = w_s8.to(torch.int32).sum(1, dtype=torch.int32).contiguous()
        ws = s8.reshape(-1).contiguous()
        a = torch.ops.quantkit_cuda.quantize_act_s8(x, s, zp, 8)
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)

        def pre():
            _gemm[lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)](
                a, w_s8, y, wsum, ws, s, zp, b, m, n, k, enable_fp_fusion=False)
            return y

        want = ops.gemm_w8a8(x, q8, s8, None, b, s, zp, 8, -1, 8)
        exact = bool(torch.equal(pre(), want))
        methods = {
            "fp16": lambda: F.linear(x, w16, b),
            "int_mm": lambda: torch._int_mm(a, w_s8.t()),
            "triton_precentred_gemm": pre,
            "triton_precentred_layer": lambda: (torch.ops.quantkit_cuda.quantize_act_s8(x, s, zp, 8), pre()),
            "triton_packed_gemm": lambda: triton_gemm.int8_linear(a, q8, None, s8, s, zp, b, 8, torch.float16),
        }
        us = {name: cuda_kernels.graph_time(fn, 20, 10, 3) * 1e6 for name, fn in methods.items()}
        best = str(_gemm.best_config)
        row = {"layer": layer, "M": m, "K": k, "N": n, "exact": exact, "best_config": best, "us": us,
               "speedup_vs_fp16": {k_: us["fp16"] / v for k_, v in us.items()}}
        rows.append(row)
        print(f"{layer:22s} M={m} K={k} N={n} exact={exact} {best} " +
              " ".join(f"{k_}={us['fp16'] / v:.2f}x" for k_, v in us.items()), flush=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
