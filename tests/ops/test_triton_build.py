"""CI checks of the Triton kernels (src/quantkit/ops/triton_gemm.py) on machines without a GPU.

* Every kernel variant compiles ahead of time for Hopper (sm_90) and uses its ``wgmma`` tensor-core instructions:
  the Triton counterpart of test_cuda_build.py's nvcc check.
* The resident kernels equal the reference bit for bit under Triton's CPU interpreter
  (tests/ops/test_triton_resident.py run in a subprocess with ``TRITON_INTERPRET=1``, which must be set before the
  kernels are defined).

Skipped, with the reason, where Triton is not installed (CI installs it; CUDA builds of torch ship it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: its kernels cannot be compiled here")

from quantkit.ops import triton_gemm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
POINTERS = {"a_ptr": "*i8", "w_ptr": "*i8", "ws_ptr": "*i32", "wzp_ptr": "*u8", "y_ptr": "*fp16",
            "wscale_ptr": "*fp16", "s_ptr": "*fp32", "zp_ptr": "*i32", "bias_ptr": "*fp16"}
ALIGNED = ("K", "N", "C", "stride_am", "stride_w", "stride_wn", "stride_ym",  # as the launcher specializes them
           "HALF", "stride_src", "stride_dst")


def _compile(fn, constants: dict, num_warps: int, num_stages: int, pointers: dict | None = None):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    ptrs = {**POINTERS, **(pointers or {})}
    sig = {n: "constexpr" if n in constants else ptrs.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constants and (sig[n].startswith("*") or n in ALIGNED)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False})


RESIDENT = [  # (bits, conv, per_row, weight zero point, even K, (BM, BN, BK, stages, warps))
    (8, False, False, False, True, (128, 128, 64, 4, 4)),
    (8, False, True, False, False, (128, 256, 64, 3, 8)),
    (8, True, False, False, True, (128, 128, 128, 4, 8)),
    (8, True, True, False, False, (64, 128, 64, 4, 4)),
    (4, False, True, True, True, (128, 256, 64, 3, 8)),
    (4, True, False, False, True, (128, 128, 64, 4, 4)),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("bits,conv,per_row,wzp,even,tile", RESIDENT)
def test_resident_kernel_compiles_for_sm90_with_wgmma(bits, conv, per_row, wzp, even, tile):
    bm, bn, bk, stages, warps = tile
    constants = dict(W_BITS=bits, HAS_WZP=wzp, PER_ROW=per_row, HAS_BIAS=True, IS_CONV=conv, BM=bm, BN=bn, BK=bk,
                     GROUP_M=8, EVEN_K=even)
    kernel = _compile(triton_gemm._resident_kernel, constants, warps, stages)
    assert "wgmma" in kernel.asm["ptx"]
    assert kernel.asm["cubin"]  # ptxas assembled it for sm_90
    assert kernel.metadata.shared > bm * bk + bn * (bk if bits == 8 else bk // 2)  # multi-stage (pipelined) tiles


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("bits", [8, 4])
def test_tma_kernel_compiles_for_sm90_with_copy_engine_and_wgmma(bits):
    """Every tile config the autotuner may pick: tiles moved by the copy engine (cp.async.bulk.tensor loads and
    stores, no per-thread cp.async), multiplied by wgmma, no register spills."""
    import re

    fn = triton_gemm._resident_tma_kernel
    for cfg in triton_gemm._tma_configs(bits):
        kw = cfg.kwargs
        ab = kw["BK"] if bits == 8 else kw["BK"] // 2
        descs = {"a_desc": f"tensordesc<i8[{kw['BM']}, {ab}]>", "w_desc": f"tensordesc<i8[{kw['BN']}, {ab}]>",
                 "y_desc": f"tensordesc<fp16[{kw['BM']}, {kw['BN'] // 2 if kw['EPI_SPLIT'] else kw['BN']}]>"}
        constants = dict(W_BITS=bits, HAS_WZP=bits == 4, PER_ROW=True, HAS_BIAS=True, NUM_SMS=132, **kw)
        kernel = _compile(fn, constants, cfg.num_warps, cfg.num_stages, descs)
        ptx = kernel.asm["ptx"]
        assert "wgmma.mma_async" in ptx, kw
        assert re.search(r"cp\.async\.bulk\.tensor\.2d\.shared", ptx), kw  # TMA loads
        assert re.search(r"cp\.async\.bulk\.tensor\.2d\.global", ptx), kw  # TMA stores
        assert not re.search(r"cp\.async\.c[ag]\.", ptx), kw
        assert kernel.asm["cubin"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("wo", [128, 32])
def test_tma_conv_kernel_compiles_for_sm90_with_copy_engine_and_wgmma(wo):
    """Every conv tile config, for rows at least a tile wide (a box of one row's pixels) and 32 wide (boxes of whole
    rows): 3-D TMA loads of the padded codes, 2-D TMA stores, wgmma, no per-thread cp.async."""
    import re

    fn = triton_gemm._resident_conv_tma_kernel
    for cfg in triton_gemm._conv_tma_configs():
        kw = cfg.kwargs
        rows, bw = triton_gemm._conv_box(kw["BM"], wo)
        descs = {"a_desc": f"tensordesc<i8[{rows}, {bw}, {kw['BK']}]>",
                 "w_desc": f"tensordesc<i8[{kw['BN']}, {kw['BK']}]>",
                 "y_desc": f"tensordesc<fp16[{kw['BN']}, {kw['BM']}]>"}
        constants = dict(PER_ROW=True, HAS_BIAS=True, NUM_SMS=132, ROWS=rows, BW=bw, **kw)
        kernel = _compile(fn, constants, cfg.num_warps, cfg.num_stages, descs)
        ptx = kernel.asm["ptx"]
        assert "wgmma.mma_async" in ptx, kw
        assert re.search(r"cp\.async\.bulk\.tensor\.3d\.shared", ptx), kw
        assert re.search(r"cp\.async\.bulk\.tensor\.2d\.global", ptx), kw
        assert not re.search(r"cp\.async\.c[ag]\.", ptx), kw
        assert kernel.asm["cubin"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
def test_w4_swap_kernel_keeps_unpacked_weights_in_registers():
    """The swapped-operand 4-bit kernel: every config compiles for sm_90 with TMA loads and wgmma whose left
    operand (the unpacked weights) is a register tensor (``dot_op`` encoding), not a shared-memory tile."""
    import re

    fn = triton_gemm._resident_w4_swap_kernel
    for cfg in triton_gemm._swap_configs():
        bm, bn = cfg.kwargs["BM"], cfg.kwargs["BN"]
        descs = {"a_desc": f"tensordesc<i8[{bm}, 32]>", "w_desc": f"tensordesc<i8[{bn}, 32]>",
                 "y_desc": f"tensordesc<fp16[{bm}, {bn}]>"}
        constants = dict(HAS_WZP=True, PER_ROW=True, HAS_BIAS=True, NUM_SMS=132, **cfg.kwargs)
        kernel = _compile(fn, constants, cfg.num_warps, cfg.num_stages, descs)
        dots = [ln for ln in kernel.asm["ttgir"].splitlines() if "warp_group_dot " in ln]
        assert dots and all(re.search(r"tensor<\d+x32xi8, #ttg\.dot_op<\{opIdx = 0", ln) for ln in dots), cfg.kwargs
        assert "wgmma.mma_async" in kernel.asm["ptx"]
        assert re.search(r"cp\.async\.bulk\.tensor\.2d\.shared", kernel.asm["ptx"])
        assert kernel.asm["cubin"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("name", ["geglu", "pad"])
def test_every_elementwise_tile_compiles_for_sm90_with_exact_division(name):
    """Every tile the autotuner may pick for the GEGLU and padded-NHWC quantizers compiles for sm_90 with IEEE
    division (the first tile is checked in detail below)."""
    import re

    names, tiles = triton_gemm.ELEMENTWISE_TILES[name]
    for *blocks, warps in tiles[1:]:
        if name == "geglu":
            kernel = _compile(triton_gemm._geglu_quant_kernel, dict(QMAX=255.0, **dict(zip(names, blocks))), warps, 1,
                              {"p_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp16"})
        else:
            kernel = _compile(triton_gemm._quant_pad_nhwc_kernel,
                              dict(QMAX=255.0, NORM=True, SILU=True, **dict(zip(names, blocks))), warps, 1,
                              {"x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp16", "stats_ptr": "*fp32",
                               "gamma_ptr": "*fp16", "beta_ptr": "*fp16"})
        assert re.search(r"div\.rn\.f32", kernel.asm["ptx"]) and kernel.asm["cubin"], (name, blocks, warps)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fused_quantization_kernels_compile_for_sm90_with_exact_rounding(dtype):
    """The fused GEGLU + quantization kernel and the padded NHWC quantizer compile for sm_90 with IEEE division
    (div.rn, as the reference quantizer divides); the GEGLU kernel with round-to-nearest-even downcasts to the
    activation dtype (compiled, as launched, without fp fusion, so the gelu and product steps round as PyTorch's
    separate kernels do)."""
    import re

    kernel = _compile(triton_gemm._geglu_quant_kernel, dict(QMAX=255.0, BM=32, BH=128), 4, 1,
                      {"p_ptr": f"*{dtype}", "q_ptr": "*i8", "s_ptr": f"*{dtype}"})  # scales cast by .to(dtype)
    ptx = kernel.asm["ptx"]
    assert re.search(r"div\.rn\.f32", ptx) and not re.search(r"div\.(full|approx)\.f32", ptx)
    assert re.search(r"cvt\.rn\.(f16|bf16)(x2)?\.f32", ptx)
    assert kernel.asm["cubin"]
    for norm, silu in ((False, False), (True, True), (True, False)):  # GroupNorm (and SiLU) first, each step
        constants = dict(QMAX=255.0, NORM=norm, SILU=silu, BW=32, BC=64)  # rounded to the activation dtype
        pad = _compile(triton_gemm._quant_pad_nhwc_kernel, constants, 4, 1,
                       {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "s_ptr": f"*{dtype}", "stats_ptr": "*fp32",
                        "gamma_ptr": f"*{dtype}", "beta_ptr": f"*{dtype}"})
        ptx = pad.asm["ptx"]
        assert re.search(r"div\.rn\.f32", ptx) and pad.asm["cubin"]
        assert bool(re.search(r"cvt\.rn\.(f16|bf16)(x2)?\.f32", ptx)) == norm
    for fn, constants, ptrs in ((triton_gemm._gn_partial_kernel, dict(BLOCK=1024), {"x_ptr": f"*{dtype}"}),
                                (triton_gemm._gn_finalize_kernel, dict(BS=16), {"x_ptr": f"*{dtype}", "eps": "fp32"})):
        stats = _compile(fn, constants, 4, 1, {"part_ptr": "*fp32", "stats_ptr": "*fp32", **ptrs})
        assert stats.asm["cubin"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("wzp", [False, True])
@pytest.mark.parametrize("tile", triton_gemm.ELEMENTWISE_TILES["widen"][1])
def test_widen_w4_kernel_compiles_for_sm90_with_wide_accesses(wzp, tile):
    """The per-call 4-bit widening kernel (QUANTKIT_TRITON_W4=expand), on every tile the autotuner may pick,
    compiles for sm_90 and moves the weights with 16-byte loads and stores (a byte-at-a-time kernel would make the
    widening cost more than the GEMM it feeds)."""
    import re

    br, nb, warps = tile
    kernel = _compile(triton_gemm._widen_w4_kernel, dict(HAS_WZP=wzp, BR=br, NB=nb), warps, 1,
                      {"src_ptr": "*i8", "zp_ptr": "*u8", "dst_ptr": "*i8"})
    ptx = kernel.asm["ptx"]
    assert re.search(r"ld\.global(\.[a-z0-9:]+)*\.v4\.b32", ptx), "nibble loads are not vectorized"
    assert re.search(r"st\.global(\.[a-z0-9:]+)*\.v4\.b32", ptx), "int8 stores are not vectorized"
    assert kernel.asm["cubin"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("bits", [8, 4])
def test_packed_weight_engine_compiles_for_sm90_with_wgmma(bits):
    constants = dict(W_BITS=bits, HAS_WZP=False, PER_ROW=False, HAS_BIAS=True, BM=128, BN=128, BK=128, GROUP_M=8)
    kernel = _compile(triton_gemm._int8_linear_kernel, constants, 8, 4, {"w_ptr": "*u8" if bits == 8 else "*i32"})
    assert "wgmma" in kernel.asm["ptx"] and kernel.asm["cubin"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or triton_gemm.available(),
                    reason="already under the interpreter, or a GPU runs the module directly")
def test_resident_kernels_equal_the_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "ops" / "test_triton_resident.py")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_elementwise_launch_tunes_except_when_told_or_capturing(monkeypatch):
    """The element-wise kernels go through their autotuner by default, and on the fixed first tile with
    QUANTKIT_TRITON_TUNE=0, inside a CUDA-graph capture (where tuning's timed launches would break it), or on the
    tile a test names."""
    calls = []

    class Launch:  # stands for a Triton kernel: kernel[grid](*args, **kwargs)
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, kwargs))

    def launch(tile=None):
        calls.clear()
        triton_gemm._launch_elementwise("pad", Launch("fixed"), Launch("tuned"), None, (), {"NORM": False}, tile)
        return calls[0]

    monkeypatch.delenv("QUANTKIT_TRITON_TUNE", raising=False)
    if not torch.cuda.is_available():  # a CPU build of torch: no capture to ask about
        assert launch()[0] == "tuned"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert launch() == ("tuned", {"NORM": False})
    assert launch(tile=2) == ("fixed", {"NORM": False, "BW": 32, "BC": 128, "num_warps": 4})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert launch() == ("fixed", {"NORM": False, "BW": 32, "BC": 64, "num_warps": 4})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("QUANTKIT_TRITON_TUNE", "0")
    assert launch()[0] == "fixed"
