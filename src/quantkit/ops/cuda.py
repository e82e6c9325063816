"""CUDA kernels of the quantkit ops (``csrc/cuda``), loaded when torch is a CUDA build.

The extension (``quantkit._C_cuda``, built by ``setup.py`` when torch has CUDA and ``nvcc`` is found; or compiled
on first use with ``QUANTKIT_CUDA_JIT=1`` from its sources, a checkout's or a wheel's) defines internal
``quantkit_cuda::`` ops. This module registers the ``CUDA`` dispatch key of the public ``quantkit::`` ops with one
routing rule, :func:`cuda_path`:

* integer formats (``gemm_*``/``conv2d_*`` with activations): weights of 2, 3, 4 bits or symmetric 8 bits with one
  scale per output channel, activations static per tensor or dynamic -> ``"int8"``: int8 tensor cores through
  cuBLASLt with activation quantization and an epilogue kernel, exact against the reference. Opt-in
  (``QUANTKIT_CUDA_GEMM=triton`` or :func:`set_gemm_engine`): linears with symmetric 8-bit or 4-bit weights on
  Hopper -> ``"triton"``, one Triton int8 GEMM that reads the packed weights and fuses the epilogue
  (:mod:`quantkit.ops.triton_gemm`), also exact; measured slower than cuBLASLt on an H200 (docs/results.md), so
  not the default;
* 4-bit weight-only at 4 rows or fewer -> the GEMV kernel (weights dequantized in registers);
* other weight-only formats -> the weight dequantized by a kernel (exactly as the reference) and cuBLAS / cuDNN;
* everything else (grouped integer weights, asymmetric 8-bit, per-tensor-incompatible scales) -> the reference.

Layers compacted on the GPU (:func:`quantkit.compact`: 8-bit symmetric or 4-bit per-channel weights with
activations of at most 8 bits, on Hopper with Triton) hold their weights in the resident layout
(:mod:`quantkit.ops.resident`, an int8 blob) and always run the Triton kernels that read it: activation codes from
one quantization kernel (NHWC for convolutions), then one GEMM (an implicit GEMM for convolutions, no im2col
buffer) with the epilogue fused, exact against the reference. :func:`resident_ok` says whether a layer can.

A CPU-only torch, no GPU or a missing build leave the reference in place; :func:`cuda_status` says which.
``QUANTKIT_DISABLE_NATIVE=1`` skips loading.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.ops import reference
from quantkit.ops.library import CONV_OPS, GEMM_OPS
from quantkit.ops.sources import csrc_dir

__all__ = ["cuda_path", "cuda_status", "load_cuda", "resident_ok", "set_gemm_engine"]

logger = logging.getLogger("quantkit")
_STATUS: dict = {"loaded": False, "path": None, "error": None}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_GEMV_MAX_ROWS = 4
_INT32_SAFE_K = 65536  # |sum (q - 128) * w| < 2**31 for K below this (|q - 128| <= 128, |w| <= 127)
_CSRC = csrc_dir() / "cuda"
_impl_lib: torch.library.Library | None = None
_GEMM_ENGINES = ("cublaslt", "triton")
_gemm_engine = os.environ.get("QUANTKIT_CUDA_GEMM", "cublaslt")
if _gemm_engine not in _GEMM_ENGINES:
    logger.warning("quantkit: QUANTKIT_CUDA_GEMM=%s is not an engine (choose %s); using cublaslt", _gemm_engine,
                   " or ".join(_GEMM_ENGINES))
    _gemm_engine = "cublaslt"


def set_gemm_engine(name: str) -> str:
    """Choose the engine of the integer linears on the GPU: ``"cublaslt"`` (the default) or ``"triton"`` (used
    where it can run: Triton importable, sm_90+, symmetric 8-bit or 4-bit weights). Returns the previous choice."""
    global _gemm_engine
    if name not in _GEMM_ENGINES:
        raise ValueError(f"unknown CUDA GEMM engine {name!r}: choose one of {', '.join(_GEMM_ENGINES)}")
    previous, _gemm_engine = _gemm_engine, name
    return previous


def _triton_ok() -> bool:
    if _gemm_engine != "triton":
        return False
    from quantkit.ops import triton_gemm

    return triton_gemm.available()


def resident_ok(device: torch.device) -> bool:
    """Whether layers on ``device`` can be compacted to the GPU-resident layout: a CUDA device, the CUDA kernels
    loaded (activation quantization) and the Triton engine available (sm_90+)."""
    if device.type != "cuda" or not load_cuda():
        return False
    from quantkit.ops import triton_gemm

    return triton_gemm.available()


def _jit_build() -> str:
    """Compile the extension from quantkit's CUDA sources with torch's JIT builder; return the library path."""
    from torch.utils import cpp_extension

    sources = [str(_CSRC / "ops_cuda.cpp"), str(_CSRC / "kernels.cu")]
    if not all(Path(s).exists() for s in sources):
        raise RuntimeError(f"CUDA sources not found under {_CSRC} (JIT builds need a source checkout or a wheel "
                           "built with setup.py)")
    cpp_extension.load(
        name="quantkit_cuda_jit",
        sources=sources,
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        is_python_module=False,
        verbose=os.environ.get("QUANTKIT_CUDA_JIT_VERBOSE") == "1",
    )
    return "jit:quantkit_cuda_jit"


def load_cuda() -> bool:
    """Load the CUDA kernels if torch has CUDA and they were built; return whether they are registered."""
    if _STATUS["loaded"] or _STATUS["error"]:
        return _STATUS["loaded"]
    if os.environ.get("QUANTKIT_DISABLE_NATIVE") == "1":
        _STATUS["error"] = "disabled by QUANTKIT_DISABLE_NATIVE=1"
        return False
    if torch.version.cuda is None:
        _STATUS["error"] = "this torch is a CPU-only build"
        return False
    try:
        spec = importlib.util.find_spec("quantkit._C_cuda")
        if spec is not None and spec.origin is not None:
            torch.ops.load_library(spec.origin)
            path = spec.origin
        elif os.environ.get("QUANTKIT_CUDA_JIT") == "1":
            path = _jit_build()
        else:
            _STATUS["error"] = "quantkit._C_cuda not built (set QUANTKIT_CUDA_JIT=1 or reinstall with nvcc present)"
            if torch.cuda.is_available():
                logger.warning("quantkit: CUDA kernels not built, the GPU runs the reference ops (%s)",
                               _STATUS["error"])
            return False
    except (OSError, RuntimeError, ImportError) as exc:
        _STATUS["error"] = f"failed to load the CUDA kernels: {exc}"
        logger.warning("quantkit: CUDA kernels unavailable, using the reference ops (%s)", exc)
        return False
    _register()
    _STATUS.update(loaded=True, path=path)
    return True


def cuda_status() -> dict:
    """``{"loaded", "path", "error"}`` of the CUDA kernels."""
    return dict(_STATUS)


def cuda_path(x: torch.Tensor, w_scale: torch.Tensor, w_zero_point, in_scale, w_bits: int, group_size: int,
              act_bits: int, in_features: int, conv: bool) -> str:
    """Which CUDA path runs a call: ``"triton"``, ``"int8"``, ``"gemv"``, ``"dequant"`` or ``"reference"`` (the
    routing rule)."""
    if x.dtype not in _FLOATS or w_scale.dtype != torch.float16:
        return "reference"
    if act_bits < 16:
        per_channel = w_scale.shape[1] == 1
        centred_fits_int8 = w_bits in (2, 3, 4) or (w_bits == 8 and w_zero_point is None)
        static_ok = in_scale is None or in_scale.numel() == 1
        if per_channel and centred_fits_int8 and static_ok and act_bits <= 8 and in_features < _INT32_SAFE_K:
            triton_format = w_bits == 4 or (w_bits == 8 and w_zero_point is None)
            if not conv and triton_format and _triton_ok():
                return "triton"
            return "int8"
        return "reference"
    glen = in_features // w_scale.shape[1]
    rows = x.numel() // max(in_features, 1)
    if not conv and w_bits == 4 and in_features % 8 == 0 and glen % 8 == 0 and rows <= _GEMV_MAX_ROWS:
        return "gemv"
    return "dequant"


def _gemm(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size, act_bits):
    k = x.shape[-1]
    if qdata.dtype == torch.int8:
        return _resident_gemm(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits)
    path = cuda_path(x, w_scale, w_zero_point, in_scale, w_bits, group_size, act_bits, k, conv=False)
    ops = torch.ops.quantkit_cuda
    if path == "triton":
        return _triton_gemm(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits)
    if path == "int8":
        return ops.linear_a8(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits)
    if path == "gemv":
        return ops.linear_w4a16(x, qdata, w_scale, w_zero_point, bias)
    if path == "dequant":
        w = ops.dequant(qdata, w_scale, w_zero_point, w_bits, k, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return reference.gemm(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size,
                          act_bits)


def _s8_linear(gemm, x, weight, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits):
    """One Triton linear: int8 activation codes (static or per-row dynamic), then ``gemm`` (a
    :mod:`quantkit.ops.triton_gemm` function taking ``(codes, weight, w_zero_point, w_scale, s, zp, bias, w_bits,
    out_dtype)``)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    ops = torch.ops.quantkit_cuda
    if in_scale is None:
        a, s, zp = ops.quantize_act_dynamic_s8(x2, act_bits)
    else:
        a, s, zp = ops.quantize_act_s8(x2, in_scale, in_zero_point, act_bits), in_scale, in_zero_point
    y = gemm(a, weight, w_zero_point, w_scale, s, zp, bias, w_bits, x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _triton_gemm(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits):
    from quantkit.ops import triton_gemm

    return _s8_linear(triton_gemm.int8_linear, x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point,
                      w_bits, act_bits)


def _resident_check(x, w_scale, act_bits):
    if x.dtype not in _FLOATS or act_bits > 8 or w_scale.dtype != torch.float16 or w_scale.shape[1] != 1:
        raise ValueError("this layer holds GPU-resident weights (quantkit.compact on CUDA), which only the Triton "
                         "integer kernels read (float activations, <= 8 activation bits): call "
                         "quantkit.expand(model) first")


def _resident_gemm(x, blob, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits):
    from quantkit.ops import resident, triton_gemm

    _resident_check(x, w_scale, act_bits)
    w_bits, w_zero_point = resident.kernel_format(blob, w_bits, w_zero_point, x.shape[-1])
    return _s8_linear(triton_gemm.resident_linear, x, blob, w_scale, w_zero_point, bias, in_scale, in_zero_point,
                      w_bits, act_bits)


def _resident_conv(x, blob, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits, kernel_size,
                   stride, padding, dilation):
    from quantkit.ops import resident, triton_gemm

    _resident_check(x, w_scale, act_bits)
    k = x.shape[1] * kernel_size[0] * kernel_size[1]
    w_bits, w_zero_point = resident.kernel_format(blob, w_bits, w_zero_point, k)
    if in_scale is not None and act_bits == 8 and triton_gemm.conv_quant_fused_selected():
        y = triton_gemm.resident_conv2d_float(x, blob, w_zero_point, w_scale, in_scale, in_zero_point, bias, w_bits,
                                              kernel_size, stride, padding, dilation)
        if y is not None:
            return y
    xq, s, zp = torch.ops.quantkit_cuda.quantize_nhwc_s8(x, in_scale, in_zero_point, act_bits)
    return triton_gemm.resident_conv2d(xq, blob, w_zero_point, w_scale, s, zp, bias, w_bits, kernel_size, stride,
                                       padding, dilation, x.dtype)


def _conv(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size, act_bits, kernel_size,
          stride, padding, dilation):
    if qdata.dtype == torch.int8:
        return _resident_conv(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits,
                              kernel_size, stride, padding, dilation)
    c = x.shape[1]
    k = c * kernel_size[0] * kernel_size[1]
    path = cuda_path(x, w_scale, w_zero_point, in_scale, w_bits, group_size, act_bits, k, conv=True)
    ops = torch.ops.quantkit_cuda
    if path == "int8":
        return ops.conv_a8(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, act_bits,
                           kernel_size, stride, padding, dilation)
    if path == "dequant":
        w = ops.dequant(qdata, w_scale, w_zero_point, w_bits, k, x.dtype).view(-1, c, *kernel_size)
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
    return reference.conv2d(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size,
                            act_bits, kernel_size, stride, padding, dilation)


def _quantize_act(x, scale, zero_point, bits):
    if x.dtype in _FLOATS and scale.numel() == 1 and zero_point.numel() == 1:
        return torch.ops.quantkit_cuda.quantize_act(x, scale, zero_point, bits)
    return reference.quantize_act(x, scale, zero_point, bits)


def _quantize_act_dynamic(x, bits):
    if x.dtype in _FLOATS and x.dim() == 2:
        return torch.ops.quantkit_cuda.quantize_act_dynamic(x, bits)
    return reference.quantize_act_dynamic(x, bits)


def _register() -> None:
    """Register the CUDA dispatch key of the public ops (once)."""
    global _impl_lib
    if _impl_lib is not None:
        return
    lib = torch.library.Library("quantkit", "IMPL")  # noqa: TOR901 - kept alive for the process lifetime
    for name in GEMM_OPS:
        lib.impl(name, _gemm, "CUDA")
    for name in CONV_OPS:
        lib.impl(name, _conv, "CUDA")
    lib.impl("quantize_act", _quantize_act, "CUDA")
    lib.impl("quantize_act_dynamic", _quantize_act_dynamic, "CUDA")
    _impl_lib = lib
