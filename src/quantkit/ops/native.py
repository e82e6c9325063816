"""Loading of the optional native kernel library ``quantkit._C`` (built from ``csrc/``).

A missing or failed build never breaks ``import quantkit``: the reference ops keep running, with one warning.

When loaded, ``quantkit._C`` registers ``CPU`` kernels for the integer and 4-bit ops (see :func:`kernel_ops`).
Their weights are repacked into a CPU tile layout (one uint8 "blob" per weight, csrc/cpu/internal.h). Two ways:

* compacted modules (:func:`quantkit.compact`, done by loading an export on the CPU) hold the blob in place of
  the canonical codes (:func:`compact_weight` / :func:`expand_weight` convert), so each weight is in memory once;
* otherwise the blob is built on first use and cached (keyed by the storages and version counters of ``qdata`` /
  ``w_scale`` / ``w_zero_point``, bounded by ``QUANTKIT_REPACK_CACHE_MB``, default 8192), a second copy beside
  the canonical codes; :func:`prepare` does it ahead of time, :func:`clear_cache` drops it (needed only after
  writing packed tensors in place behind autograd's back, e.g. through ``.data``). ``QUANTKIT_CPU_ISA=scalar``
  forces the portable kernels; ``QUANTKIT_DISABLE_NATIVE=1`` skips loading the library altogether.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "cache_info",
    "clear_cache",
    "compact_weight",
    "expand_weight",
    "cpu_features",
    "kernel_ops",
    "load_native",
    "native_status",
    "prepare",
    "set_isa",
]

logger = logging.getLogger("quantkit")
_STATUS: dict = {"loaded": False, "path": None, "error": None}
_MODULE = None


def load_native() -> bool:
    """Load ``quantkit._C`` if it was built; return whether native kernels are registered."""
    global _MODULE
    if _STATUS["loaded"] or _STATUS["error"]:
        return _STATUS["loaded"]
    if os.environ.get("QUANTKIT_DISABLE_NATIVE") == "1":
        _STATUS["error"] = "disabled by QUANTKIT_DISABLE_NATIVE=1"
        return False
    spec = importlib.util.find_spec("quantkit._C")
    if spec is None or spec.origin is None:
        _STATUS["error"] = "quantkit._C not built (reference kernels in use)"
        logger.warning(
            "quantkit: native kernels not built, using the reference ops "
            "(build them with `pip install --no-build-isolation -e .` and a C++ compiler)"
        )
        return False
    try:
        torch.ops.load_library(spec.origin)
        _MODULE = importlib.import_module("quantkit._C")
    except (OSError, RuntimeError, ImportError) as exc:  # ABI mismatch, missing symbol...
        _STATUS["error"] = f"failed to load {spec.origin}: {exc}"
        logger.warning("quantkit: native kernels unavailable, using the reference ops (%s)", exc)
        return False
    _STATUS.update(loaded=True, path=spec.origin)
    return True


def kernel_ops(dispatch_key: str = "CPU") -> list[str]:
    """The ``quantkit::`` ops that have a kernel registered for ``dispatch_key`` (beyond the reference)."""
    from quantkit.ops.library import op_names

    return [name for name in op_names() if torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)]


def cpu_features() -> dict:
    """``{"avx2_fma", "avx2_compiled", "isa"}``: what the CPU offers and which kernel set runs (empty if unloaded)."""
    return dict(_MODULE.cpu_features()) if _MODULE is not None else {}


def native_status() -> dict:
    """``{"loaded", "path", "error"}`` describing the native kernel library, plus its ISA and CPU kernels."""
    status = dict(_STATUS)
    if _STATUS["loaded"]:
        status["cpu_features"] = cpu_features()
        status["cpu_kernels"] = kernel_ops("CPU")
    return status


def set_isa(name: str) -> None:
    """Select the CPU kernel set: ``"auto"`` (AVX2 when the CPU has it), ``"avx2"`` or ``"scalar"``.

    Raises:
        RuntimeError: when native kernels are not loaded, or ``"avx2"`` is asked for on a CPU without it.
    """
    if _MODULE is None:
        raise RuntimeError(f"quantkit native kernels are not loaded: {_STATUS['error']}")
    _MODULE.set_isa(name)


def prepare(
    qdata: torch.Tensor | Mapping[str, torch.Tensor],
    w_scale: torch.Tensor | None = None,
    w_zero_point: torch.Tensor | None = None,
    w_bits: int | None = None,
    in_features: int | None = None,
    conv_shape: Sequence[int] | None = None,
    act_bits: int = 8,
) -> int:
    """Repack one layer's weight into the CPU kernel layout now rather than on its first call.

    Either pass the canonical tensors one by one, or a mapping of a layer's tensors named as on disk
    (``weight_packed``, ``weight_scale``, optional ``weight_zero_point`` and ``weight_shape``; ``qdata`` /
    ``w_scale`` / ``w_zero_point`` also work) plus ``w_bits``; ``in_features`` and ``conv_shape`` then come from
    ``weight_shape``.

    Args:
        qdata: the packed int32 codes, or the mapping described above.
        w_scale, w_zero_point: the layer's scales and (asymmetric formats) zero points.
        w_bits: weight bits.
        in_features: K (``C*kh*kw`` for a conv).
        conv_shape: ``(C, kh, kw)`` for a Conv2d weight, None for Linear.
        act_bits: the layer's activation bits (the panel layout depends on them for 8-bit weights).

    Returns:
        Bytes the repacked weight occupies in the cache (0 when native kernels are not loaded or the
        tensors are not on the CPU).

    Raises:
        ValueError: when a mapping lacks the packed codes, the scales or the shape information.
    """
    if isinstance(qdata, Mapping):
        tensors = qdata
        qdata = tensors.get("weight_packed", tensors.get("qdata"))
        w_scale = tensors.get("weight_scale", tensors.get("w_scale"))
        w_zero_point = tensors.get("weight_zero_point", tensors.get("w_zero_point"))
        shape = tensors.get("weight_shape")
        if shape is not None and in_features is None:
            dims = [int(v) for v in shape.tolist()]
            in_features = math.prod(dims[1:])
            if len(dims) == 4 and conv_shape is None:
                conv_shape = dims[1:]
        if qdata is None or w_scale is None:
            raise ValueError("prepare() needs 'weight_packed' and 'weight_scale' in the mapping")
    if w_bits is None or in_features is None:
        raise ValueError("prepare() needs w_bits and in_features (or a 'weight_shape' tensor)")
    if _MODULE is None or qdata.device.type != "cpu":
        return 0
    return int(
        _MODULE.prepare(
            qdata,
            w_scale,
            w_zero_point,
            int(w_bits),
            int(in_features),
            None if conv_shape is None else [int(v) for v in conv_shape],
            int(act_bits),
        )
    )


def compact_weight(
    qdata: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None,
    w_bits: int,
    in_features: int,
    conv_shape: Sequence[int] | None = None,
    act_bits: int = 8,
) -> torch.Tensor:
    """The CPU-kernel-layout blob (uint8 ``[out_features, n]``) of a canonical packed weight.

    ``act_bits`` picks the panel layout the layer's op will read (8-bit weights with activations of at most 7
    bits use the vpmaddubsw layout); a blob used with other activation bits is still exact, only slower.

    The quantkit ops accept it as ``qdata`` on the CPU in place of the canonical int32 codes (same result, bit
    for bit); it embeds copies of ``w_scale`` / ``w_zero_point``, so it is for inference: expand, edit, compact.

    Raises:
        RuntimeError: when native kernels are not loaded.
    """
    if _MODULE is None:
        raise RuntimeError(f"quantkit native kernels are not loaded: {_STATUS['error']}")
    return _MODULE.compact(qdata, w_scale, w_zero_point, int(w_bits), int(in_features),
                           None if conv_shape is None else [int(v) for v in conv_shape], int(act_bits))


def expand_weight(blob: torch.Tensor) -> torch.Tensor:
    """The canonical int32 codes ``[out_features, words]`` a :func:`compact_weight` blob was made from (exact)."""
    if _MODULE is None:
        raise RuntimeError(f"quantkit native kernels are not loaded: {_STATUS['error']}")
    return _MODULE.expand(blob)


def cache_info() -> dict:
    """Repacked-weight cache statistics: ``entries``, ``bytes``, ``limit``, ``hits``, ``misses``."""
    return dict(_MODULE.cache_info()) if _MODULE is not None else {}


def clear_cache() -> None:
    """Drop every repacked weight (they are rebuilt from the canonical tensors on the next call)."""
    if _MODULE is not None:
        _MODULE.cache_clear()
