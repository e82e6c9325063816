"""CI check that every CUDA source compiles, on machines without a GPU or a CUDA torch.

``csrc/cuda/*.cu`` go through nvcc for sm_80 (Ampere) and sm_90 (Hopper); the torch glue is compiled
(syntax only) against this torch's headers and the CUDA toolkit's. Skipped, with the reason, where nvcc or a C++
compiler is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: CUDA sources cannot be compiled here")


def _cuda_include() -> Path:
    """The CUDA toolkit's include folder, as nvcc itself reports it."""
    with_dummy = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    match = re.search(r'INCLUDES="-I([^"]+?)"', with_dummy.stdout + with_dummy.stderr)
    assert match, "could not read the include folder from `nvcc --dryrun`"
    return Path(match.group(1).strip())


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cu_sources_compile_for_sm80_and_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-c", str(CUDA_DIR / source), "-o", str(tmp_path / "k.o"),
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    listing = subprocess.run(["cuobjdump", "--list-elf", str(tmp_path / "k.o")], capture_output=True, text=True) \
        if shutil.which("cuobjdump") else None
    if listing is not None and listing.returncode == 0:
        assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


@needs_nvcc
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on PATH")
def test_torch_glue_compiles_against_torch_headers(tmp_path):
    torch_inc = Path(torch.__file__).parent / "include"
    includes = [torch_inc, torch_inc / "torch" / "csrc" / "api" / "include", _cuda_include()]
    # CPU wheels of torch ship c10/cuda headers but not the header CMake generates for CUDA builds; an empty one
    # stands in for it (it only holds build-time switches).
    macros = torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.insert(0, tmp_path)
    for source in sorted(CUDA_DIR.glob("*.cpp")):
        cmd = ["c++", "-std=c++17", "-fsyntax-only", *(f"-I{p}" for p in includes), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        errors = [line for line in proc.stderr.splitlines() if ": error" in line]
        assert proc.returncode == 0, "\n".join(errors[:20]) or proc.stderr[-4000:]


def test_cuda_kernels_absent_means_reference_on_cpu_torch():
    from quantkit.ops import cuda_status

    status = cuda_status()
    if torch.version.cuda is None:
        assert not status["loaded"] and status["error"]
    else:
        assert status["loaded"] or status["error"], "a CUDA torch must either load the kernels or say why not"


@pytest.fixture(scope="module")
def cutlass_library(tmp_path_factory):
    """The CUTLASS engine's library (quantkit.ops.cutlass_gemm: the W8A8 and W4A8 GEMMs), built with the command
    the engine itself uses; the headers come from the nvidia-cutlass wheel (.ci/run installs it without its
    dependencies)."""
    from quantkit.ops import cutlass_gemm

    if NVCC is None:
        pytest.skip("nvcc not found on PATH: CUDA sources cannot be compiled here")
    if cutlass_gemm.headers() is None:
        pytest.skip("CUTLASS headers not found (pip install --no-deps nvidia-cutlass, or set CUTLASS_DIR)")
    lib = tmp_path_factory.mktemp("cutlass") / "libquantkit_cutlass.so"
    proc = subprocess.run(cutlass_gemm.nvcc_command(lib), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTKIT_CUTLASS_LIB", str(lib))
    cutlass_gemm.library.cache_clear()
    try:  # the engine's own loader (argument types declared); loads without a GPU (static CUDA runtime)
        yield cutlass_gemm.library()
    finally:
        cutlass_gemm.library.cache_clear()
        mp.undo()


def test_cutlass_gemm_library_builds_for_sm90a(cutlass_library):
    for kind in ("w8a8", "w4a8"):
        for name in ("static", "workspace", "can_implement"):
            assert getattr(cutlass_library, f"quantkit_cutlass_{kind}_{name}").restype is not None


# SDXL's transformer linears (M = 4096 / 1024 tokens at 1024x1024, 77 text tokens) and the odd shapes of the GPU
# tests, each with the resident blob's row pitch as B's leading dimension.
CUTLASS_SHAPES = [(4096, 640, 640), (4096, 640, 5120), (4096, 2560, 640), (1024, 1280, 10240), (77, 2048, 1280),
                  (1, 64, 24), (129, 208, 72), (300, 336, 264)]


@pytest.mark.parametrize("m,k,n", CUTLASS_SHAPES)
def test_cutlass_gemm_implements_what_the_engine_sends_it(cutlass_library, m, k, n):
    """CUTLASS's own host-side rules (alignment of the problem shape, no GPU needed) accept every shape the engine
    takes (quantkit.ops.cutlass_gemm.supported: K % 16 == 0, N % 8 == 0), with the blob's row pitch, for both
    output dtypes, and refuse a K that breaks the 16-byte rows; the workspace query answers on the host too."""
    from quantkit.ops import cutlass_gemm, resident

    dll = cutlass_library
    assert k % 16 == 0 and n % 8 == 0
    for cfg in cutlass_gemm.CONFIGS:  # every configuration (QUANTKIT_CUTLASS_CONFIG can force any of them)
        for dtype in (0, 1):
            assert dll.quantkit_cutlass_w8a8_can_implement(dtype, cfg, resident.row_bytes(8, k), m, n, k, 132) == 0
            assert dll.quantkit_cutlass_w8a8_workspace(dtype, cfg, m, n, k, 132) < 2**20
        assert dll.quantkit_cutlass_w8a8_can_implement(0, cfg, resident.row_bytes(8, k + 8), m, n, k + 8, 132) == 1
    unknown = len(cutlass_gemm.CONFIGS)
    assert dll.quantkit_cutlass_w8a8_can_implement(0, unknown, resident.row_bytes(8, k), m, n, k, 132) == 6


@pytest.mark.parametrize("m,k,n", CUTLASS_SHAPES)
def test_cutlass_w4a8_implements_signed_nibble_linears(cutlass_library, m, k, n):
    """The int4 x int8 GEMM (QUANTKIT_RESIDENT_W4=cutlass) accepts every shape quantkit.ops.cutlass_gemm.w4_supported
    sends it (K % 32 == 0) with the signed-nibble blob's row pitch, for both output dtypes, and refuses K % 32 != 0
    (int4 rows of 16 bytes); one configuration."""
    from quantkit.ops import resident

    dll, lda = cutlass_library, 2 * resident.s4_row_bytes(k)
    for dtype in (0, 1):
        assert dll.quantkit_cutlass_w4a8_can_implement(dtype, 0, lda, m, n, k, 132) == (0 if k % 32 == 0 else 1)
        assert dll.quantkit_cutlass_w4a8_workspace(dtype, 0, m, n, k, 132) < 2**20
    assert dll.quantkit_cutlass_w4a8_can_implement(0, 1, lda, m, n, k, 132) == 6
