"""The quantkit op set: schemas, reference (default) implementations and fake (shape) implementations.

Native kernels (``csrc/``) register for the ``CPU`` / ``CUDA`` dispatch keys of these same ops and override the
reference there; everywhere else the reference in :mod:`quantkit.ops.reference` runs.

Op families, named ``<verb>_<weight-format>[_<act>]``:

* ``gemm_w8a8``, ``gemm_w4a8``: integer weights x integer activations (act_bits <= 8, static per-tensor or
  dynamic per-token), int32 accumulation, fused fp32 epilogue;
* ``gemm_w4a16``: 4-bit weights, floating point activations;
* ``gemm_wxax``: any other combination (2/3/8-bit weight-only, 2/3-bit weights with activations...), reference
  only;
* ``conv2d_*``: the same four for ``Conv2d`` (groups = 1);
* ``quantize_act``, ``quantize_act_dynamic``, ``unpack``: the building blocks, exposed for kernels and tests;
* ``gemm_codebook``, ``conv2d_codebook``, ``dequantize_codebook``: JLCM codebook weights (weight-only),
  ``(x, codes, codebook, w_scale?, row_group, bias?, bits[, conv args])``; the reference is a plain gather
  followed by a dense ``F.linear`` / ``F.conv2d``.

Shared gemm schema: ``(x, qdata, w_scale, w_zero_point?, bias?, in_scale?, in_zero_point?, w_bits, group_size,
act_bits)``; ``act_bits = 16`` means weight-only, ``in_scale = None`` with ``act_bits <= 8`` means dynamic.
"""

from __future__ import annotations

import torch

from quantkit.formats.spec import CodebookFormat, LayerScheme
from quantkit.ops import reference

__all__ = ["GEMM_OPS", "CONV_OPS", "CODEBOOK_OPS", "select_op", "op_names"]

_GEMM_ARGS = (
    "Tensor x, Tensor qdata, Tensor w_scale, Tensor? w_zero_point, Tensor? bias, Tensor? in_scale, "
    "Tensor? in_zero_point, int w_bits, int group_size, int act_bits"
)
_CONV_ARGS = _GEMM_ARGS + ", int[] kernel_size, int[] stride, int[] padding, int[] dilation"

GEMM_OPS = ("gemm_w8a8", "gemm_w4a8", "gemm_w4a16", "gemm_wxax")
CONV_OPS = ("conv2d_w8a8", "conv2d_w4a8", "conv2d_w4a16", "conv2d_wxax")

_lib = torch.library.Library("quantkit", "DEF")  # noqa: TOR901 - kept alive for the process lifetime


def _define_gemm(name: str) -> None:
    _lib.define(f"{name}({_GEMM_ARGS}) -> Tensor")

    def _impl(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size, act_bits):
        return reference.gemm(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits,
                              group_size, act_bits)

    def _fake(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size, act_bits):
        return x.new_empty(*x.shape[:-1], qdata.shape[0])

    _lib.impl(name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"quantkit::{name}", _fake, lib=_lib)


def _define_conv(name: str) -> None:
    _lib.define(f"{name}({_CONV_ARGS}) -> Tensor")

    def _impl(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size, act_bits,
              kernel_size, stride, padding, dilation):
        return reference.conv2d(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits,
                                group_size, act_bits, kernel_size, stride, padding, dilation)

    def _fake(x, qdata, w_scale, w_zero_point, bias, in_scale, in_zero_point, w_bits, group_size, act_bits,
              kernel_size, stride, padding, dilation):
        h, w = x.shape[2], x.shape[3]
        ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        return x.new_empty(x.shape[0], qdata.shape[0], ho, wo)

    _lib.impl(name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"quantkit::{name}", _fake, lib=_lib)


for _name in GEMM_OPS:
    _define_gemm(_name)
for _name in CONV_OPS:
    _define_conv(_name)

_lib.define("quantize_act(Tensor x, Tensor scale, Tensor zero_point, int bits) -> Tensor")
_lib.impl("quantize_act", reference.quantize_act, "CompositeExplicitAutograd")
torch.library.register_fake(
    "quantkit::quantize_act", lambda x, scale, zero_point, bits: x.new_empty(x.shape, dtype=torch.uint8), lib=_lib
)

_lib.define("quantize_act_dynamic(Tensor x, int bits) -> (Tensor, Tensor, Tensor)")
_lib.impl("quantize_act_dynamic", reference.quantize_act_dynamic, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::quantize_act_dynamic", lib=_lib)
def _quantize_act_dynamic_fake(x, bits):
    m = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(m, 1, dtype=torch.float32),
            x.new_empty(m, 1, dtype=torch.int32))


_lib.define("unpack(Tensor qdata, int bits, int in_features) -> Tensor")
_lib.impl("unpack", lambda qdata, bits, in_features: reference.unpack(qdata, bits, in_features),
          "CompositeExplicitAutograd")
torch.library.register_fake(
    "quantkit::unpack",
    lambda qdata, bits, in_features: qdata.new_empty(qdata.shape[0], in_features, dtype=torch.uint8),
    lib=_lib,
)


CODEBOOK_OPS = ("gemm_codebook", "conv2d_codebook", "dequantize_codebook")
_CB_ARGS = "Tensor x, Tensor codes, Tensor codebook, Tensor? w_scale, Tensor row_group, Tensor? bias, int bits"

_lib.define(f"gemm_codebook({_CB_ARGS}) -> Tensor")
_lib.impl("gemm_codebook", reference.gemm_codebook, "CompositeExplicitAutograd")
torch.library.register_fake(
    "quantkit::gemm_codebook",
    lambda x, codes, codebook, w_scale, row_group, bias, bits: x.new_empty(*x.shape[:-1], codes.shape[0]),
    lib=_lib,
)

_lib.define(f"conv2d_codebook({_CB_ARGS}, int[] kernel_size, int[] stride, int[] padding, int[] dilation) -> Tensor")
_lib.impl("conv2d_codebook", reference.conv2d_codebook, "CompositeExplicitAutograd")


@torch.library.register_fake("quantkit::conv2d_codebook", lib=_lib)
def _conv2d_codebook_fake(x, codes, codebook, w_scale, row_group, bias, bits, kernel_size, stride, padding,
                          dilation):
    h, w = x.shape[2], x.shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return x.new_empty(x.shape[0], codes.shape[0], ho, wo)


_lib.define("dequantize_codebook(Tensor codes, Tensor codebook, Tensor? w_scale, Tensor row_group, int bits, "
            "int in_features) -> Tensor")
_lib.impl("dequantize_codebook", reference.dequantize_codebook, "CompositeExplicitAutograd")
torch.library.register_fake(
    "quantkit::dequantize_codebook",
    lambda codes, codebook, w_scale, row_group, bits, in_features: codes.new_empty(
        codes.shape[0], in_features, dtype=torch.float32),
    lib=_lib,
)


def op_names() -> tuple[str, ...]:
    """Every op quantkit defines, as ``quantkit::<name>``."""
    return tuple(f"quantkit::{n}" for n in (*GEMM_OPS, *CONV_OPS, "quantize_act", "quantize_act_dynamic", "unpack",
                                           *CODEBOOK_OPS))


def select_op(scheme: LayerScheme, conv: bool):
    """The op that executes a layer of this scheme: the single routing rule of the project.

    W8 with activations -> ``*_w8a8``; W4 with activations -> ``*_w4a8``; W4 weight-only -> ``*_w4a16``;
    codebook (JLCM) weights -> ``*_codebook``; everything else -> ``*_wxax`` (reference).
    """
    prefix = "conv2d" if conv else "gemm"
    if isinstance(scheme.weight, CodebookFormat):
        return getattr(torch.ops.quantkit, f"{prefix}_codebook").default
    w, a = scheme.weight.bits, scheme.act
    if a is not None and w == 8:
        family = "w8a8"
    elif a is not None and w == 4:
        family = "w4a8"
    elif a is None and w == 4:
        family = "w4a16"
    else:
        family = "wxax"
    return getattr(torch.ops.quantkit, f"{prefix}_{family}").default
