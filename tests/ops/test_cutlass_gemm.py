"""The CUTLASS engine's host side (quantkit.ops.cutlass_gemm) on any machine: selection, shape rules, the build
command and the per-layer constant cache. The kernel itself: test_cutlass_gpu.py (GPU), test_cuda_build.py (nvcc)."""

from __future__ import annotations

import gc

import torch

from quantkit.ops import cutlass_gemm


def test_selected_only_by_the_switch(monkeypatch):
    monkeypatch.delenv("QUANTKIT_INT8_GEMM", raising=False)
    assert not cutlass_gemm.selected()
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlass")
    assert cutlass_gemm.selected()
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "triton")
    assert not cutlass_gemm.selected()


def test_cpu_tensors_are_never_supported():
    a = torch.zeros(256, 64, dtype=torch.int8)
    assert not cutlass_gemm.supported(256, 64, 64, a, torch.ones(1), torch.float16)


def test_build_command_targets_sm90a_without_contracted_multiply_adds(tmp_path, monkeypatch):
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    monkeypatch.setenv("CUTLASS_DIR", str(tmp_path))
    assert cutlass_gemm.headers() == tmp_path
    cmd = cutlass_gemm.nvcc_command(tmp_path / "lib.so")
    assert "--fmad=false" in cmd and "-gencode=arch=compute_90a,code=sm_90a" in cmd
    assert f"-I{tmp_path / 'include'}" in cmd and str(cutlass_gemm.SOURCE) in cmd
    assert cmd[-1] == str(tmp_path / "lib.so")
    assert cutlass_gemm.SOURCE.is_file()


def test_layer_constants_are_made_once_and_follow_their_tensors():
    made = []
    w, zp = torch.arange(8, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)

    def maker(w, zp):  # the cache keeps what make() returns, not make itself
        def make():
            made.append(1)
            return (128 - zp) * w
        return make

    first = cutlass_gemm._constant((w, zp), maker(w, zp))
    assert cutlass_gemm._constant((w, zp), maker(w, zp)) is first and len(made) == 1
    zp.fill_(5)  # an in-place change bumps the version: the constant is made again
    again = cutlass_gemm._constant((w, zp), maker(w, zp))
    assert len(made) == 2 and torch.equal(again, (128 - 5) * w)
    before = len(cutlass_gemm._CONSTANTS)
    del w, first, again
    gc.collect()
    assert len(cutlass_gemm._CONSTANTS) <= before - 2  # both entries made from w are gone with it
    assert torch.equal(cutlass_gemm._fp32(torch.ones(4, dtype=torch.float16)), torch.ones(4))
    x = torch.ones(4)
    assert cutlass_gemm._fp32(x) is x
