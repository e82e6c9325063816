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


def codebook_weight(out_f: int, in_f: int, bits: int, groups: int, shared: bool, seed: int = 0):
    """(codes, codebook, w_scale, row_group) of a random codebook (JLCM) weight, already packed."""
    from quantkit.formats.pack import pack_codebook

    g = torch.Generator().manual_seed(seed)
    ng = min(groups, out_f)
    idx = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    rg = torch.randint(0, ng, (out_f,), generator=g)
    cb = torch.sort(torch.randn(1 if shared else ng, 1 << bits, generator=g), dim=1).values.to(torch.float16)
    scale = (torch.rand(ng, generator=g) + 0.5).to(torch.float16) if shared else None
    codes, row_group = pack_codebook(idx, rg, bits, ng)
    return codes, cb, scale, row_group


def codebook_samples():
    """(op name, args) for the codebook ops: 2/3/4-bit, shared and per-group codebooks, odd shapes."""
    out = []
    x = torch.randn(2, 5, 37)
    xc = torch.randn(2, 6, 9, 7)
    for bits, groups, shared in [(2, 4, False), (3, 3, True), (4, 16, False)]:
        codes, cb, scale, rg = codebook_weight(13, 37, bits, groups, shared)
        out.append(("gemm_codebook", (x, codes, cb, scale, rg, torch.randn(13), bits)))
        out.append(("dequantize_codebook", (codes, cb, scale, rg, bits, 37)))
        codes, cb, scale, rg = codebook_weight(5, 54, bits, groups, shared)
        out.append(("conv2d_codebook", (xc, codes, cb, scale, rg, torch.randn(5), bits, [3, 3], [2, 1], [1, 1],
                                        [1, 1])))
    return out


def all_samples():
    x = torch.randn(4, 10)
    scale, zp = static_qparams(x, 8)
    q, _, _, _ = packed_weight(3, 10, 4)
    return gemm_samples() + conv_samples() + codebook_samples() + [
        ("quantize_act", (x, scale, zp, 8)),
        ("quantize_act_dynamic", (x, 4)),
        ("unpack", (q, 4, 10)),
    ]
