"""Plain-PyTorch reference math of every quantkit op: the CPU fallback, the test oracle and the spec.

Integer accumulation is exact: codes are centred (``code - zero_point``) and multiplied in float64, which holds
every int32 accumulator exactly. The epilogue (scales, bias) then runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.formats.pack import dequantize_codebook as _dequantize_codebook
from quantkit.formats.pack import unpack
from quantkit.formats.spec import WeightFormat

__all__ = [
    "act_qparams_from_range",
    "quantize_act",
    "quantize_act_dynamic",
    "int_gemm",
    "gemm",
    "conv2d",
    "dequantize_packed",
    "unpack",
    "dequantize_codebook",
    "gemm_codebook",
    "conv2d_codebook",
]


def act_qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale/zero point for a range (forced to include 0): ``(scale fp32, zero_point int32)``."""
    qmax = (1 << bits) - 1
    lo = torch.clamp(lo.to(torch.float32), max=0.0)
    hi = torch.clamp(hi.to(torch.float32), min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def quantize_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Static activation quantization: ``clamp(round(x / scale) + zp, 0, 2**bits - 1)`` as uint8."""
    q = torch.round(x.to(torch.float32) / scale.to(torch.float32)) + zero_point.to(torch.float32)
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def quantize_act_dynamic(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization of ``x [M, K]``: ``(codes uint8 [M, K], scale fp32 [M, 1], zp int32 [M, 1])``."""
    xf = x.to(torch.float32)
    scale, zero_point = act_qparams_from_range(xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), bits)
    return quantize_act(xf, scale, zero_point, bits), scale, zero_point


def _check_canonical(qdata: torch.Tensor) -> None:
    if qdata.dtype == torch.int8:
        raise ValueError("this weight is held in the GPU-resident layout (a module compacted on CUDA), which only "
                         "the Triton integer kernels read: call quantkit.expand(model) first to get the canonical "
                         "codes back")
    if qdata.dtype == torch.uint8:
        raise ValueError("this weight is held in the native CPU kernel layout (a compacted module), which only the "
                         "native CPU kernels read: call quantkit.expand(model) first to get the canonical codes back")


def dequantize_packed(
    qdata: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed int32 words -> float weight ``[O, in_features]``."""
    from quantkit.formats.pack import dequantize_weight

    _check_canonical(qdata)
    fmt = WeightFormat(w_bits, group_size, symmetric=w_zero_point is None)
    return dequantize_weight(unpack(qdata, w_bits, in_features), w_scale, w_zero_point, fmt, dtype)


def _centred_weight(qdata, w_scale, w_zero_point, w_bits, in_features) -> torch.Tensor:
    """Integer weight minus its zero point, float64 ``[O, K]``."""
    _check_canonical(qdata)
    codes = unpack(qdata, w_bits, in_features).to(torch.float64)
    groups = w_scale.shape[1]
    if w_zero_point is None:
        zp = torch.full_like(w_scale, 1 << (w_bits - 1), dtype=torch.float64)
    else:
        zp = w_zero_point.to(torch.float64)
    o, k = codes.shape
    return (codes.view(o, groups, k // groups) - zp.unsqueeze(-1)).view(o, k)


def int_gemm(x_codes: torch.Tensor, x_zp: torch.Tensor, w_centred: torch.Tensor, groups: int) -> torch.Tensor:
    """Exact integer accumulation per weight group: int64 ``[M, N, groups]`` of ``(xq - zp) . (wq - wzp)``."""
    m, k = x_codes.shape
    xc = x_codes.to(torch.float64) - x_zp.to(torch.float64)
    gk = k // groups
    acc = torch.einsum("mgk,ngk->mng", xc.view(m, groups, gk), w_centred.view(-1, groups, gk))
    return acc.to(torch.int64)


def gemm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_zero_point: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    """Quantized linear ``y = x W^T + b`` with packed weights.

    Args:
        x: input ``[..., K]`` (float).
        qdata, w_scale, w_zero_point: the layer's packed weight (see :mod:`quantkit.formats.spec`).
        bias: float ``[N]`` or None.
        in_scale, in_zero_point: static activation qparams (``[1]``); None with ``act_bits < 16`` = dynamic
            per-token.
        w_bits, group_size: the weight format.
        act_bits: activation bits; 16 = weight-only (activations stay floating point).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if act_bits >= 16:
        w = dequantize_packed(qdata, w_scale, w_zero_point, w_bits, group_size, k, x.dtype)
        return F.linear(x2, w, None if bias is None else bias.to(x.dtype)).reshape(*lead, -1)
    if in_scale is None:
        x_codes, s_x, zp_x = quantize_act_dynamic(x2, act_bits)
    else:
        x_codes, s_x, zp_x = quantize_act(x2, in_scale, in_zero_point, act_bits), in_scale, in_zero_point
        s_x, zp_x = s_x.to(torch.float32).view(1, 1), zp_x.view(1, 1)
    groups = w_scale.shape[1]
    acc = int_gemm(x_codes, zp_x, _centred_weight(qdata, w_scale, w_zero_point, w_bits, k), groups)
    # Epilogue in fp32: per-group weight scale, then activation scale, then bias.
    y = (acc.to(torch.float32) * w_scale.to(torch.float32).unsqueeze(0)).sum(dim=-1) * s_x.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, -1)


def _conv_patches(x, kernel_size, stride, padding, dilation) -> tuple[torch.Tensor, int, int]:
    """im2col of ``x [B, C, H, W]`` -> ``[B*Ho*Wo, C*kh*kw]`` (PyTorch weight order), and ``(Ho, Wo)``."""
    b, _, h, w = x.shape
    kh, kw = kernel_size
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(b * ho * wo, -1), ho, wo


def conv2d(
    x: torch.Tensor,
    qdata: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_zero_point: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    act_bits: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """Quantized ``conv2d`` (groups = 1) with packed weights flattened to ``[O, C*kh*kw]``.

    Activation quantization happens on the input tensor before padding, so zero padding stays exactly zero
    (zero is always representable). Dynamic activation quantization is per sample.
    """
    b, c = x.shape[0], x.shape[1]
    k = c * kernel_size[0] * kernel_size[1]
    if act_bits >= 16:
        w = dequantize_packed(qdata, w_scale, w_zero_point, w_bits, group_size, k, x.dtype)
        w = w.view(-1, c, kernel_size[0], kernel_size[1])
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
    if in_scale is None:
        flat = x.reshape(b, -1).to(torch.float32)
        s_x, zp_x = act_qparams_from_range(flat.amin(dim=1), flat.amax(dim=1), act_bits)
        s_x, zp_x = s_x.view(b, 1, 1, 1), zp_x.view(b, 1, 1, 1)
    else:
        s_x, zp_x = in_scale.to(torch.float32).view(1, 1, 1, 1), in_zero_point.view(1, 1, 1, 1)
    # Centre the codes before im2col so the zero padding F.unfold inserts means "value 0" exactly.
    centred = quantize_act(x, s_x, zp_x, act_bits).to(torch.float64) - zp_x.to(torch.float64)
    cols, ho, wo = _conv_patches(centred, kernel_size, stride, padding, dilation)
    groups = w_scale.shape[1]
    zero = torch.zeros(1, 1, dtype=torch.float64)
    acc = int_gemm(cols, zero, _centred_weight(qdata, w_scale, w_zero_point, w_bits, k), groups)
    y = (acc.to(torch.float32) * w_scale.to(torch.float32).unsqueeze(0)).sum(dim=-1)  # [B*L, O]
    y = y.view(b, ho * wo, -1) * s_x.to(torch.float32).view(-1, 1, 1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.transpose(1, 2).reshape(b, -1, ho, wo).to(x.dtype).contiguous()


def dequantize_codebook(
    codes: torch.Tensor,
    codebook: torch.Tensor,
    w_scale: torch.Tensor | None,
    row_group: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """Codebook (JLCM) weight -> float32 ``[O, in_features]`` in original row order (the plain gather)."""
    return _dequantize_codebook(codes, codebook, w_scale, row_group, bits, in_features, torch.float32)


def gemm_codebook(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    w_scale: torch.Tensor | None,
    row_group: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """Linear ``y = x W^T + b`` with a codebook weight: gather the codewords, then a dense ``F.linear``.

    Args:
        x: input ``[..., K]`` (float).
        codes, codebook, w_scale, row_group: the stored tensors (``weight_codes``, ``weight_codebook``,
            ``weight_scale`` (shared codebook only), ``weight_row_group``; see :mod:`quantkit.formats.spec`).
        bias: float ``[N]`` or None.
        bits: index width.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    w = dequantize_codebook(codes, codebook, w_scale, row_group, bits, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def conv2d_codebook(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    w_scale: torch.Tensor | None,
    row_group: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """``conv2d`` (groups = 1) with a codebook weight flattened to ``[O, C*kh*kw]``: gather, then ``F.conv2d``."""
    c = x.shape[1]
    k = c * kernel_size[0] * kernel_size[1]
    w = dequantize_codebook(codes, codebook, w_scale, row_group, bits, k).to(x.dtype)
    w = w.view(-1, c, kernel_size[0], kernel_size[1])
    return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation)
