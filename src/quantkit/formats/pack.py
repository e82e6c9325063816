"""Reference quantize / pack / unpack / dequantize for uniform integer weights.

The only Python implementation of the bits described in :mod:`quantkit.formats.spec`; native code mirrors
it and is tested against it bit for bit.
"""

from __future__ import annotations

import torch

from quantkit.formats.spec import WeightFormat, group_id_bits, values_per_word

__all__ = [
    "pack",
    "unpack",
    "quantize_weight",
    "dequantize_weight",
    "weight_zero_point",
    "pack_codebook",
    "unpack_row_group",
    "row_order",
    "codebook_groups",
    "effective_codebook",
    "dequantize_codebook",
]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[O, K]`` (any integer dtype, values in ``[0, 2**bits)``) into int32 words.

    Returns:
        int32 ``[O, ceil(K / values_per_word(bits))]``, least-significant value first; padding is zero.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    vpw = values_per_word(bits)
    rows, k = codes.shape
    words = -(-k // vpw)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    padded = torch.zeros(rows, words * vpw, dtype=torch.int64, device=codes.device)
    padded[:, :k] = c
    shifts = torch.arange(vpw, device=codes.device, dtype=torch.int64) * bits
    packed = (padded.view(rows, words, vpw) << shifts).sum(dim=-1)
    # Words are unsigned 32-bit patterns; store them in int32 by two's-complement wrap-around.
    packed = torch.where(packed >= (1 << 31), packed - (1 << 32), packed)
    return packed.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> unsigned codes ``[O, in_features]`` as uint8."""
    vpw = values_per_word(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack expects int32 [out, words], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] * vpw < in_features:
        raise ValueError(f"{packed.shape[1]} words of {bits}-bit codes cannot hold {in_features} values")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(vpw, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def quantize_weight(
    weight: torch.Tensor, fmt: WeightFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a weight (any shape, flattened to ``[O, K]``).

    Symmetric: ``scale = absmax / (2**(bits-1) - 1)``, codes in ``[0, 2**bits - 1]`` around ``2**(bits-1)``.
    Asymmetric: min/max range forced to include 0, ``scale = (max - min) / (2**bits - 1)``.
    Scales are rounded to float16 *before* rounding the weights so the stored codes match the stored scale.

    Returns:
        ``(codes uint8 [O, K], scale float16 [O, G], zero_point uint8 [O, G] or None)``.

    Raises:
        ValueError: when the group size does not divide ``K``.
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    out_features, k = w.shape
    groups = fmt.num_groups(k)
    wg = w.reshape(out_features, groups, k // groups)
    qmax_u = (1 << fmt.bits) - 1
    tiny = torch.finfo(torch.float16).tiny
    if fmt.symmetric:
        half = 1 << (fmt.bits - 1)
        absmax = wg.abs().amax(dim=-1)
        scale = (absmax / max(half - 1, 1)).clamp(min=tiny).to(torch.float16)
        codes = torch.round(wg / scale.float().unsqueeze(-1)) + half
        zero_point = None
    else:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / qmax_u).clamp(min=tiny).to(torch.float16)
        zp = torch.round(-lo / scale.float()).clamp(0, qmax_u)
        codes = torch.round(wg / scale.float().unsqueeze(-1)) + zp.unsqueeze(-1)
        zero_point = zp.to(torch.uint8)
    codes = codes.clamp(0, qmax_u).to(torch.uint8).reshape(out_features, k)
    return codes, scale, zero_point


def weight_zero_point(fmt: WeightFormat, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """The zero point to subtract from codes, as int32 shaped like ``scale`` (implicit when symmetric)."""
    if zero_point is None:
        if not fmt.symmetric:
            raise ValueError("an asymmetric weight format needs a stored weight_zero_point")
        return torch.full(scale.shape, 1 << (fmt.bits - 1), dtype=torch.int32, device=scale.device)
    return zero_point.to(torch.int32)


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: WeightFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unsigned codes ``[O, K]`` -> float weight ``[O, K]`` in ``dtype``."""
    out_features, k = codes.shape
    groups = scale.shape[1]
    zp = weight_zero_point(fmt, scale, zero_point)
    centred = codes.to(torch.int32).reshape(out_features, groups, k // groups) - zp.unsqueeze(-1)
    w = centred.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_features, k).to(dtype)


# ---- codebook (JLCM) weights ---------------------------------------------------------------------------------


def row_order(row_group: torch.Tensor) -> torch.Tensor:
    """Stored-row order of a codebook weight: ``perm[i]`` = original row of stored row ``i`` (stable sort)."""
    return torch.sort(row_group.to(torch.int64), stable=True).indices


def codebook_groups(weight_codebook: torch.Tensor, weight_scale: torch.Tensor | None) -> int:
    """``G`` of a codebook weight: rows of the codebook, or entries of the group scales when it is shared."""
    return int(weight_scale.shape[0]) if weight_scale is not None else int(weight_codebook.shape[0])


def pack_codebook(codes: torch.Tensor, row_group: torch.Tensor, bits: int, groups: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack codeword indices ``[O, K]`` (original row order) and row groups ``[O]`` into the stored tensors.

    Returns:
        ``(weight_codes int32 [O, words], weight_row_group int32 [1, words])``: rows sorted by group (stable).

    Raises:
        ValueError: a group id outside ``[0, groups)``.
    """
    rg = row_group.to(torch.int64).reshape(-1)
    if rg.numel() != codes.shape[0]:
        raise ValueError(f"row_group has {rg.numel()} entries for {codes.shape[0]} rows")
    if rg.numel() and (int(rg.min()) < 0 or int(rg.max()) >= groups):
        raise ValueError(f"row group ids must lie in [0, {groups})")
    perm = row_order(rg)
    return pack(codes[perm], bits), pack(rg.view(1, -1), group_id_bits(groups))


def unpack_row_group(weight_row_group: torch.Tensor, groups: int, out_features: int) -> torch.Tensor:
    """Inverse of the row-group packing: int64 ``[O]`` group of each original row."""
    return unpack(weight_row_group, group_id_bits(groups), out_features).reshape(-1).to(torch.int64)


def effective_codebook(weight_codebook: torch.Tensor, weight_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[G, 2**bits]`` codewords of every group (shared: ``scale[g] * codebook[0]``, one fp32 rounding)."""
    cb = weight_codebook.to(torch.float32)
    if weight_scale is None:
        return cb
    return weight_scale.to(torch.float32).view(-1, 1) * cb.view(1, -1)


def dequantize_codebook(
    weight_codes: torch.Tensor,
    weight_codebook: torch.Tensor,
    weight_scale: torch.Tensor | None,
    weight_row_group: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference gather: stored codebook tensors -> float weight ``[O, in_features]`` in original row order."""
    out_features = weight_codes.shape[0]
    groups = codebook_groups(weight_codebook, weight_scale)
    rg = unpack_row_group(weight_row_group, groups, out_features)
    perm = row_order(rg)
    idx = unpack(weight_codes, bits, in_features).to(torch.int64)  # stored order
    table = effective_codebook(weight_codebook, weight_scale)  # [G, C]
    stored = table[rg[perm]].gather(1, idx)  # [O, K]: stored row i uses its group's codewords
    w = torch.empty_like(stored)
    w[perm] = stored
    return w.to(dtype)
