"""The CUDA routing rule and GEMM-engine choice (src/quantkit/ops/cuda.py), which need no GPU to check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quantkit.ops import cuda, triton_gemm


def test_engine_choice_is_validated():
    with pytest.raises(ValueError, match="unknown CUDA GEMM engine 'cutlass'"):
        cuda.set_gemm_engine("cutlass")
    previous = cuda.set_gemm_engine("triton")
    try:
        assert cuda.set_gemm_engine("cublaslt") == "triton"
    finally:
        cuda.set_gemm_engine(previous)


def test_bad_engine_variable_warns_and_keeps_cublaslt():
    env = {**os.environ, "QUANTKIT_CUDA_GEMM": "cutlas", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", "import quantkit.ops.cuda as c; print(c._gemm_engine)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cublaslt"
    assert "QUANTKIT_CUDA_GEMM=cutlas is not an engine" in out.stderr


def test_routing_rule():
    x = torch.randn(4, 128, dtype=torch.float16)
    per_channel = torch.ones(64, 1, dtype=torch.float16)
    grouped = torch.ones(64, 4, dtype=torch.float16)
    assert cuda.cuda_path(x, per_channel, None, None, 8, -1, 8, 128, conv=False) == "int8"
    assert cuda.cuda_path(x, grouped, None, None, 4, 32, 8, 128, conv=False) == "reference"
    assert cuda.cuda_path(x, grouped, None, None, 4, 32, 16, 128, conv=False) == "gemv"
    assert cuda.cuda_path(torch.randn(5, 128, dtype=torch.float16), grouped, None, None, 4, 32, 16, 128,
                          conv=False) == "dequant"  # more than 4 rows
    previous = cuda.set_gemm_engine("triton")
    try:  # the opt-in engine only where it can run (Triton and an sm_90+ GPU); here it falls back to cuBLASLt
        want = "triton" if triton_gemm.available() else "int8"
        assert cuda.cuda_path(x, per_channel, None, None, 8, -1, 8, 128, conv=False) == want
        assert cuda.cuda_path(x, per_channel, None, None, 3, -1, 8, 128, conv=False) == "int8"  # 3-bit: cuBLASLt
    finally:
        cuda.set_gemm_engine(previous)
