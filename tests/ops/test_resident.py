"""The GPU-resident weight layout (quantkit.ops.resident): plain PyTorch, so it is checked on any machine.

The blob must give back the canonical words bit for bit, carry the exact row sums, and put each GEMM column where
the layout says (centred int8 for 8 bits, split nibbles for 4 bits, (ky, kx, c) order for convolutions).
"""

from __future__ import annotations

import pytest
import torch

from quantkit.formats import WeightFormat, pack, quantize_weight, unpack
from quantkit.ops import reference, resident


def _canonical(n, k, bits, symmetric=True, kernel=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, k) if kernel is None else (n, k, *kernel)
    codes, _, zp = quantize_weight(torch.randn(shape, generator=g), WeightFormat(bits, -1, symmetric))
    return pack(codes, bits), zp


CASES = [(8, True, None, 40), (8, True, None, 130), (4, True, None, 64), (4, True, None, 200), (4, False, None, 72),
         (8, True, (3, 3), 48), (4, True, (3, 3), 64), (4, False, (1, 1), 128), (8, True, (3, 1), 33)]


@pytest.mark.parametrize("bits,symmetric,kernel,c", CASES)
def test_blob_round_trips_and_carries_exact_row_sums(bits, symmetric, kernel, c):
    n = 24
    qdata, zp = _canonical(n, c, bits, symmetric, kernel)
    conv_shape = None if kernel is None else (c, *kernel)
    k = c if kernel is None else c * kernel[0] * kernel[1]
    blob = resident.make(qdata, zp, bits, k, conv_shape)
    assert blob.dtype == torch.int8 and tuple(blob.shape) == (n, resident.row_bytes(bits, k))
    assert torch.equal(resident.expand(blob, bits, k, conv_shape), qdata)
    centred = reference._centred_weight(qdata, torch.ones(n, 1, dtype=torch.float16), zp, bits, k)
    assert torch.equal(resident.row_sums(blob, bits, k), centred.sum(dim=1).to(torch.int32))
    assert torch.all(blob[:, resident.row_bytes(bits, k) - resident.TAIL + 4:] == 0)


def test_columns_are_where_the_layout_says():
    n, c, kh, kw = 5, 64, 3, 3
    qdata, _ = _canonical(n, c, 8, kernel=(kh, kw))
    k = c * kh * kw
    codes = unpack(qdata, 8, k).view(n, c, kh, kw).to(torch.int32)
    blob = resident.make(qdata, None, 8, k, (c, kh, kw))
    body = resident.body(blob, 8, k).to(torch.int32)
    ky, kx, ch = 2, 1, 17  # GEMM column (ky * kw + kx) * C + c holds code(c, ky, kx) - 128
    assert torch.equal(body[:, (ky * kw + kx) * c + ch], codes[:, ch, ky, kx] - 128)
    assert torch.all(body[:, k:] == 0)  # padding columns up to a multiple of 64

    qdata4, _ = _canonical(n, 100, 4)
    codes4 = unpack(qdata4, 4, 100).to(torch.int32)
    body4 = resident.body(resident.make(qdata4, None, 4, 100), 4, 100).to(torch.int32) & 0xFF
    assert body4.shape[1] == 64  # Kp = 128 columns in two nibble blocks of 32 bytes
    for col in (0, 31, 32, 63, 64, 95, 96, 99):
        blk, j = divmod(col, 64)
        byte = body4[:, blk * 32 + j % 32]
        assert torch.equal(byte & 15 if j < 32 else byte >> 4, codes4[:, col])


def test_unsupported_formats_are_refused():
    qdata, zp = _canonical(8, 64, 8, symmetric=False)
    with pytest.raises(ValueError, match="8-bit symmetric or 4-bit"):
        resident.make(qdata, zp, 8, 64)
    assert not resident.layout_supported(8, False, True)
    assert not resident.layout_supported(4, True, False)
    assert not resident.layout_supported(8, True, True, conv_shape=(4, 3, 3))  # conv_in: too few channels
    assert not resident.layout_supported(4, True, True, conv_shape=(96, 3, 3))  # a nibble block would span taps
    assert resident.layout_supported(4, True, True, conv_shape=(320, 3, 3))
    with pytest.raises(ValueError, match="not a resident"):
        resident.expand(torch.zeros(8, 10, dtype=torch.int8), 8, 64)


def test_reference_ops_refuse_a_resident_blob_with_the_fix():
    qdata, _ = _canonical(8, 64, 8)
    blob = resident.make(qdata, None, 8, 64)
    with pytest.raises(ValueError, match=r"quantkit\.expand"):
        reference.gemm(torch.randn(2, 64), blob, torch.ones(8, 1, dtype=torch.float16), None, None, None, None, 8,
                       -1, 16)
