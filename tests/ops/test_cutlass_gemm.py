"""The CUTLASS engine's host side (quantkit.ops.cutlass_gemm) on any machine: selection, shape rules, the build
command and the per-layer constant cache. The kernel itself: test_cutlass_gpu.py (GPU), test_cuda_build.py (nvcc)."""

from __future__ import annotations

import gc

import pytest
import torch

from quantkit.ops import cutlass_gemm


def test_selection_by_the_switch_and_auto_only_on_hopper(monkeypatch):
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlass")
    assert cutlass_gemm.selected()
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "triton")
    assert not cutlass_gemm.selected()
    # auto (unset): never without a Hopper GPU, and without building anything
    monkeypatch.delenv("QUANTKIT_INT8_GEMM", raising=False)
    monkeypatch.setattr(cutlass_gemm, "library", lambda: pytest.fail("auto must not load the library here"))
    cutlass_gemm.usable.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cutlass_gemm.selected()
    cutlass_gemm.usable.cache_clear()


def test_auto_on_hopper_loads_the_library_or_warns_once_and_keeps_triton(monkeypatch):
    monkeypatch.delenv("QUANTKIT_INT8_GEMM", raising=False)
    monkeypatch.setenv("QUANTKIT_CUTLASS_LIB", "/nonexistent/libquantkit_cutlass.so")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    loads = []
    monkeypatch.setattr(cutlass_gemm, "library", lambda: loads.append(1))
    cutlass_gemm.usable.cache_clear()
    assert cutlass_gemm.selected() and cutlass_gemm.selected() and loads == [1]  # loaded once, then remembered

    def broken():
        raise OSError("cannot open shared object file")

    monkeypatch.setattr(cutlass_gemm, "library", broken)
    cutlass_gemm.usable.cache_clear()
    cutlass_gemm._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="CUTLASS int8 GEMM is not available.*using the Triton kernels"):
        assert not cutlass_gemm.selected()
    cutlass_gemm.usable.cache_clear()


def test_an_unknown_engine_name_warns_and_keeps_triton(monkeypatch):
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlas")
    cutlass_gemm._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="'cutlas' is not one of auto, cutlass, triton"):
        assert not cutlass_gemm.selected()


def test_describe_names_the_engine_without_building(monkeypatch, tmp_path):
    monkeypatch.setattr(cutlass_gemm, "library", lambda: pytest.fail("describe must not build or load"))
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "triton")
    assert cutlass_gemm.describe().startswith("the Triton kernels")
    monkeypatch.delenv("QUANTKIT_INT8_GEMM")
    monkeypatch.setenv("QUANTKIT_CUTLASS_LIB", str(tmp_path / "lib.so"))
    assert cutlass_gemm.describe() == f"the CUTLASS int8 GEMM ({tmp_path / 'lib.so'})"
    monkeypatch.delenv("QUANTKIT_CUTLASS_LIB")
    monkeypatch.setattr(cutlass_gemm, "headers", lambda: None)
    assert "pip install nvidia-cutlass" in cutlass_gemm.describe()
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlass")
    assert cutlass_gemm.describe().startswith("none: QUANTKIT_INT8_GEMM=cutlass")


def test_config_choice_by_rows_and_the_override(monkeypatch):
    monkeypatch.delenv("QUANTKIT_CUTLASS_CONFIG", raising=False)
    assert cutlass_gemm.config_of(1) == cutlass_gemm.config_of(128) == 1  # up to 128 rows: 64-row tiles
    assert cutlass_gemm.config_of(129) == cutlass_gemm.config_of(4096) == 0
    monkeypatch.setenv("QUANTKIT_CUTLASS_CONFIG", "1")
    assert cutlass_gemm.config_of(4096) == 1


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
    assert f"-I{tmp_path / 'include'}" in cmd and all(str(f) in cmd for f in cutlass_gemm.SOURCES)
    assert cmd[-1] == str(tmp_path / "lib.so")
    assert [f.name for f in cutlass_gemm.SOURCES] == ["w8a8_sm90.cu", "w4a8_sm90.cu"]
    assert all(f.is_file() for f in cutlass_gemm.SOURCES)


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
