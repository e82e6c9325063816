"""CUTLASS int8 GEMM for resident 8-bit linears on Hopper, the default there where its library loads or builds.

``QUANTKIT_INT8_GEMM``: unset (``auto``) takes it on a Hopper GPU where ``QUANTKIT_CUTLASS_LIB`` names the library
or the ``nvidia-cutlass`` headers and nvcc can build it (once, cached); ``cutlass`` insists (a failure raises);
``triton`` keeps the Triton kernels.

Why: the Triton int8 GEMMs (:mod:`quantkit.ops.triton_gemm`) run at 0.69-1.10x of fp16 cuBLAS on SDXL's shapes
(H200, docs/results.md), where int8 tensor cores allow about 2x; that is the main limit of the W8A8 UNet step.
CUTLASS 3.x's warp-specialised TMA/wgmma kernels (a producer warp group feeding two consumer groups in ping-pong)
are the known way there. ``csrc/cuda/cutlass/w8a8_sm90.cu`` instantiates one with quantkit's epilogue as an
epilogue visitor tree:

    y = T(((float(acc + zw_n) * w_scale_n) * s) + bias_n),   zw_n = (128 - zp) * wsum_n

the fp32 order of the reference (the file is compiled with ``--fmad=false``), so the output equals
:func:`quantkit.ops.reference.gemm` bit for bit. It covers what the default W8A8 step runs most: static per-tensor
activations, symmetric 8-bit (or widened 4-bit) resident weights, fp16/bf16 out, ``K % 16 == 0`` and
``N % 8 == 0`` (TMA alignment). Everything else keeps the Triton kernels.

The library is standalone (no torch headers): built by nvcc for ``sm_90a`` against the CUTLASS headers of the
``nvidia-cutlass`` wheel (or ``CUTLASS_DIR``), cached under ``~/.cache/quantkit/cutlass/``, loaded with ctypes and
called with raw pointers on the current stream (CUDA graphs capture it). ``QUANTKIT_CUTLASS_LIB`` names a prebuilt
library instead (one built on a CPU machine with :func:`nvcc_command` runs on the GPU machine).

Measured on an H200 (docs/results.md): 1.04-1.46x faster than the Triton kernel on 10 of SDXL's 11 linear shapes
(the eleventh, a GEMV-like M = 1 layer, 0.88x), the fused W8A8 SDXL step 1.16x -> 1.27x of FP16. A stream-K
configuration was slower on every shape and was removed.

The same library holds an int4 x int8 GEMM (``csrc/cuda/cutlass/w4a8_sm90.cu``, :func:`linear_w4`) for symmetric
4-bit linears held as signed nibbles (``QUANTKIT_RESIDENT_W4=cutlass``, :func:`quantkit.ops.resident.held_signed`):
CUTLASS's mixed-input mainloop converts the weights to int8 in registers, so 4-bit linears need no per-call
widening. Opt-in; not yet measured on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import warnings
import weakref
from pathlib import Path

import torch

from quantkit.ops.sources import csrc_dir

logger = logging.getLogger(__name__)

__all__ = ["SOURCES", "selected", "describe", "headers", "nvcc_command", "library", "config_of", "supported", "linear",
           "w4_supported", "linear_w4"]

# the library's sources: the W8A8 GEMM, and the int4 x int8 one of signed-nibble 4-bit linears (both include
# quant_gemm.hpp, the epilogue they share)
SOURCES = tuple(csrc_dir() / "cuda" / "cutlass" / f"{name}_sm90.cu" for name in ("w8a8", "w4a8"))
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_SMALL_M = 128  # at most this many rows: 64-row tiles (config 1), else 128-row tiles in clusters of two (config 0)
CONFIGS = (0, 1)  # the kernel configurations csrc/cuda/cutlass/w8a8_sm90.cu instantiates
_ERRORS = {1: "shape not implementable (alignment)", 2: "initialisation failed", 3: "launch failed",
           4: "workspace too small", 5: "CUDA error", 6: "unknown dtype or config"}


def selected() -> bool:
    """Whether resident 8-bit linears on a Hopper GPU go to this engine: ``QUANTKIT_INT8_GEMM=cutlass`` always
    (building the library if need be, a failure raises), ``=triton`` never, unset (``auto``) where a Hopper GPU is
    present and the library loads or builds; an auto build that fails warns once and keeps the Triton kernels."""
    choice = os.environ.get("QUANTKIT_INT8_GEMM", "auto") or "auto"
    if choice == "cutlass":
        return True
    if choice == "auto":
        return usable()
    if choice != "triton":
        _warn_once(f"QUANTKIT_INT8_GEMM={choice!r} is not one of auto, cutlass, triton; using the Triton kernels")
    return False


@functools.cache
def usable() -> bool:
    """Whether the library can run here: a Hopper GPU, and the library loads (``QUANTKIT_CUTLASS_LIB``) or builds
    (quantkit's CUDA sources, the ``nvidia-cutlass`` headers and nvcc; once, cached). A build or load that fails warns
    once; without a Hopper GPU or anything to build from, False silently."""
    if not (torch.cuda.is_available()
            and any(torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count()))):
        return False
    if not os.environ.get("QUANTKIT_CUTLASS_LIB") and not _buildable():
        return False  # nothing to load or build it from: the Triton kernels, as without the nvidia-cutlass wheel
    try:
        library()
    except Exception as exc:  # a failed build or load: report once, keep the Triton kernels
        _warn_once(f"the CUTLASS int8 GEMM is not available ({str(exc)[-300:]}); using the Triton kernels "
                   "(QUANTKIT_INT8_GEMM=triton silences this)")
        return False
    return True


def describe() -> str:
    """Which engine the resident 8-bit linears take on a Hopper GPU, in words (``quantkit doctor``); builds nothing."""
    choice = os.environ.get("QUANTKIT_INT8_GEMM", "auto") or "auto"
    if choice not in ("auto", "cutlass"):
        return f"the Triton kernels (QUANTKIT_INT8_GEMM={choice})"
    if os.environ.get("QUANTKIT_CUTLASS_LIB"):
        return f"the CUTLASS int8 GEMM ({os.environ['QUANTKIT_CUTLASS_LIB']})"
    if _buildable():
        return "the CUTLASS int8 GEMM (built once at the first call and cached, about 2-3 minutes)"
    if choice == "cutlass":
        return ("none: QUANTKIT_INT8_GEMM=cutlass, but the CUTLASS GEMM cannot be built here (quantkit's sources, "
                "pip install nvidia-cutlass and nvcc on PATH, or QUANTKIT_CUTLASS_LIB)")
    return "the Triton kernels (pip install nvidia-cutlass, with nvcc on PATH, for the faster CUTLASS int8 GEMM)"


def _buildable() -> bool:
    """Whether :func:`library` can build the library here: its sources (checkout or wheel), headers and nvcc."""
    return all(f.is_file() for f in SOURCES) and headers() is not None and shutil.which("nvcc") is not None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def headers() -> Path | None:
    """CUTLASS's source root (with ``include/`` and ``tools/util/include/``): ``CUTLASS_DIR``, else the
    ``nvidia-cutlass`` wheel's ``cutlass_library/source``; None when neither has the headers."""
    roots = [Path(os.environ["CUTLASS_DIR"])] if os.environ.get("CUTLASS_DIR") else []
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported: only its headers are needed
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]) / "source")
    for root in roots:
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return root
    return None


def nvcc_command(out: Path, root: Path | None = None) -> list[str]:
    """The nvcc command that builds the shared library ``out`` from :data:`SOURCES` (``root``: :func:`headers`)."""
    root = root or headers()
    if root is None:
        raise RuntimeError("CUTLASS headers not found: pip install nvidia-cutlass, or set CUTLASS_DIR")
    nvcc = shutil.which("nvcc") or "nvcc"
    return [nvcc, "-std=c++17", "-O3", "--fmad=false", "--expt-relaxed-constexpr", "-DNDEBUG", "-shared",
            "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a", f"-I{root / 'include'}",
            f"-I{root / 'tools' / 'util' / 'include'}", *map(str, SOURCES), "-o", str(out)]


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library: ``QUANTKIT_CUTLASS_LIB``, or built once from :data:`SOURCES` into the cache."""
    path = os.environ.get("QUANTKIT_CUTLASS_LIB")
    if not path:
        missing = [str(f) for f in SOURCES if not f.is_file()]
        if missing:
            raise RuntimeError(f"{missing[0]} not found: the CUTLASS engine builds from quantkit's CUDA sources (a "
                               "source checkout, or a wheel built with setup.py); or set QUANTKIT_CUTLASS_LIB")
        root = headers()
        cmd = nvcc_command(Path("OUT"), root)
        files = sorted(SOURCES[0].parent.glob("*.[ch]*"))  # the sources and the header they share
        key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(cmd).encode()).hexdigest()[:16]
        folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantkit" / "cutlass" / key
        lib = folder / "libquantkit_cutlass.so"
        if not lib.is_file():
            logger.warning("quantkit: building the CUTLASS int8 GEMM for this machine once (about 2-3 minutes), "
                           "cached in %s", folder)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"libquantkit_cutlass.{os.getpid()}.so"
            proc = subprocess.run(nvcc_command(tmp, root), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"building the CUTLASS library failed: {proc.stderr[-2000:]}")
            tmp.replace(lib)
        path = str(lib)
    dll = ctypes.CDLL(path)
    p, i32, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
    for kind in ("w8a8", "w4a8"):  # the same three entries for each GEMM
        for name, argtypes, restype in (
                ("static", [i32, i32, p, p, i64, p, p, p, p, p, i32, i32, i32, i32, p, sz, p], i32),
                ("workspace", [i32, i32, i32, i32, i32, i32], sz),
                ("can_implement", [i32, i32, i64, i32, i32, i32, i32], i32)):
            fn = getattr(dll, f"quantkit_cutlass_{kind}_{name}")
            fn.argtypes, fn.restype = argtypes, restype
    return dll


def config_of(m: int) -> int:
    """The kernel configuration for ``m`` rows: 1 (64-row tiles) up to 128 rows, else 0 (128-row tiles, clusters
    of two); ``QUANTKIT_CUTLASS_CONFIG`` forces one (the benchmarks time each). Measured per SDXL shape on an H200
    (docs/results.md), this rule picks the faster of the two everywhere; a stream-K configuration was slower on
    every shape, including the under-filled waves it is meant for (0.69x vs 0.93x of fp16 at 1024x1280x1280)."""
    forced = os.environ.get("QUANTKIT_CUTLASS_CONFIG")
    if forced:
        return int(forced)
    return 1 if m <= _SMALL_M else 0


def supported(m: int, n: int, k: int, a: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether :func:`linear` takes a resident 8-bit linear: a Hopper GPU, static activations (one scale), fp16 or
    bf16 out, rows of A contiguous and 16-byte aligned (``K % 16``), D rows aligned (``N % 8``)."""
    return (a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0) and s.numel() == 1
            and out_dtype in _DTYPES and m > 0 and k % 16 == 0 and n % 8 == 0 and a.stride(1) == 1
            and a.stride(0) == k and a.data_ptr() % 16 == 0)


# Per-layer constants made once (weights and calibration scales live as long as their layer): the zero-point term
# zw = (128 - zp) * wsum and fp32 contiguous copies, keyed by the tensors' identities and version counters.
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(key_tensors: tuple, make) -> torch.Tensor:
    key = tuple((id(t), t._version) for t in key_tensors)
    hit = _CONSTANTS.get(key)
    if hit is None:
        hit = _CONSTANTS[key] = make()
        for t in key_tensors:  # forget the constant with any tensor it was made from
            weakref.finalize(t, _CONSTANTS.pop, key, None)
    return hit


def _fp32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() % 16 == 0:  # the epilogue's vector loads
        return t
    return _constant((t,), lambda: t.to(torch.float32).contiguous())


@functools.cache
def _workspace_bytes(kind: str, dtype: int, config: int, m: int, n: int, k: int, nsm: int) -> int:
    """Workspace bytes of one GEMM shape (the persistent tile scheduler's; at least 1), asked of the library once;
    ``kind``: ``"w8a8"`` or ``"w4a8"``."""
    return max(int(getattr(library(), f"quantkit_cutlass_{kind}_workspace")(dtype, config, m, n, k, nsm)), 1)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def linear(a: torch.Tensor, blob: torch.Tensor, ws: torch.Tensor, w_scale: torch.Tensor, s: torch.Tensor,
           zp: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, m: int, n: int, k: int,
           weight: torch.Tensor | None = None) -> None:
    """``y [M, N] = T(((float(a @ blob^T + (128 - zp) * ws) * w_scale) * s) + bias)`` on the CUTLASS kernel.

    ``a``: int8 activation codes (q - 128) ``[M, K]``; ``blob``: an 8-bit (or widened 4-bit) resident blob;
    ``ws``: its row sums (int32, a strided view); ``s``/``zp``: the static activation scale and zero point;
    ``weight``: the layer's own weight tensor where ``blob`` is made per call (a 4-bit blob widened), so the
    zero-point term is made once per layer, not on every call."""
    _run("w8a8", config_of(m), a, blob, blob.stride(0), ws, w_scale, s, zp, bias, y, m, n, k,
         blob if weight is None else weight)


def w4_supported(m: int, n: int, k: int, a: torch.Tensor, blob: torch.Tensor, s: torch.Tensor,
                 out_dtype: torch.dtype) -> bool:
    """Whether :func:`linear_w4` takes a signed-nibble linear: :func:`supported`'s rules, ``K % 32 == 0`` (TMA rows
    of int4) and a 16-byte aligned blob."""
    return (k % 32 == 0 and supported(m, n, k, a, s, out_dtype) and blob.data_ptr() % 16 == 0
            and blob.stride(1) == 1 and blob.stride(0) % 16 == 0)


def linear_w4(a: torch.Tensor, blob: torch.Tensor, ws: torch.Tensor, w_scale: torch.Tensor, s: torch.Tensor,
              zp: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, m: int, n: int, k: int) -> None:
    """:func:`linear` of a signed-nibble blob (``resident.make(..., signed=True)``) on the int4 x int8 kernel of
    ``csrc/cuda/cutlass/w4a8_sm90.cu`` (the weights converted to int8 in registers; the product computed swapped,
    ``y^T = W a^T``). Opt-in (``QUANTKIT_RESIDENT_W4=cutlass``) and not yet measured on a GPU."""
    _run("w4a8", 0, a, blob, 2 * blob.stride(0), ws, w_scale, s, zp, bias, y, m, n, k, blob)


def _run(kind: str, config: int, a, blob, ld: int, ws, w_scale, s, zp, bias, y, m: int, n: int, k: int,
         weight) -> None:
    """One call of the library's ``kind`` GEMM (``ld``: the blob's row pitch in weight elements)."""
    dll = library()
    zw = _constant((weight, zp), lambda: ((128 - zp.to(torch.int32)) * ws).contiguous())
    ws32, s32 = _fp32(w_scale), _fp32(s)
    b32 = _fp32(bias) if bias is not None else None
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    nsm = _sm_count(index)
    dtype = _DTYPES[y.dtype]
    work = torch.empty(_workspace_bytes(kind, dtype, config, m, n, k, nsm), dtype=torch.uint8, device=a.device)
    status = getattr(dll, f"quantkit_cutlass_{kind}_static")(
        dtype, config, a.data_ptr(), blob.data_ptr(), ld, zw.data_ptr(), ws32.data_ptr(),
        s32.data_ptr(), b32.data_ptr() if b32 is not None else None, y.data_ptr(), m, n, k, nsm, work.data_ptr(),
        work.numel(), torch.cuda.current_stream(a.device).cuda_stream)
    if status != 0:
        raise RuntimeError(f"CUTLASS {kind} GEMM ({m}x{n}x{k}): {_ERRORS.get(status, status)}")
