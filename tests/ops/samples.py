"""Sample inputs for every quantkit op (used by opcheck and the reference tests)."""

from __future__ import annotations

import torch

from quantkit.formats import WeightFormat, pack, quantize_weight
from quantkit.ops import reference


def packed_weight(out_f: int, in_f: int, bits: int, group_size: int = -1, symmetric: bool = True, kernel=None):
    """(qdata, scale, zero_point, float weight) for a random layer."""
    shape = (out_f, in_f) if kernel is None else (out_f, in_f, *kernel)
    w = torch.randn(shape)
    codes, scale, zp = quantize_weight(w, WeightFormat(bits, group_size, symmetric))
    return pack(codes, bits), scale, zp, w


def static_qparams(x: torch.Tensor, bits: int):
    scale, zp = reference.act_qparams_from_range(x.min(), x.max(), bits)
    return scale.reshape(1), zp.reshape(1)


def gemm_samples():
    """(op name, args) covering each gemm op: static/dynamic, sym/asym, per-channel/group, odd shapes."""
    out = []
    x = torch.randn(2, 5, 48)
    for name, bits, act_bits in [("gemm_w8a8", 8, 8), ("gemm_w4a8", 4, 8), ("gemm_w4a16", 4, 16),
                                 ("gemm_wxax", 3, 6), ("gemm_wxax", 2, 16)]:
        for group_size, symmetric, dynamic in [(-1, True, False), (16, False, True)]:
            q, s, zp, _ = packed_weight(13, 48, bits, group_size, symmetric)
            if act_bits < 16 and not dynamic:
                isc, izp = static_qparams(x, act_bits)
            else:
                isc = izp = None
            out.append((name, (x, q, s, zp, torch.randn(13), isc, izp, bits, group_size, act_bits)))
    return out


def conv_samples():
    out = []
    x = torch.randn(2, 6, 9, 7)
    for name, bits, act_bits in [("conv2d_w8a8", 8, 8), ("conv2d_w4a8", 4, 8), ("conv2d_w4a16", 4, 16),
                                 ("conv2d_wxax", 2, 4)]:
        for kernel, stride, padding, dynamic in [((3, 3), (1, 1), (1, 1), False), ((3, 3), (2, 2), (1, 1), True),
                                                 ((1, 1), (1, 1), (0, 0), False)]:
            q, s, zp, _ = packed_weight(5, 6, bits, kernel=kernel)
            isc, izp = static_qparams(x, act_bits) if act_bits < 16 and not dynamic else (None, None)
            out.append((name, (x, q, s, zp, torch.randn(5), isc, izp, bits, -1, act_bits, list(kernel),
                               list(stride), list(padding), [1, 1])))
    return out


def all_samples():
    x = torch.randn(4, 10)
    scale, zp = static_qparams(x, 8)
    q, _, _, _ = packed_weight(3, 10, 4)
    return gemm_samples() + conv_samples() + [
        ("quantize_act", (x, scale, zp, 8)),
        ("quantize_act_dynamic", (x, 4)),
        ("unpack", (q, 4, 10)),
    ]
