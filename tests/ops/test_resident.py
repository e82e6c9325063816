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


@pytest.mark.parametrize("symmetric,kernel,c", [(True, (3, 3), 64), (False, (1, 1), 128), (True, (3, 3), 96),
                                                 (False, None, 72)])
def test_widened_4_bit_blob_is_the_8_bit_form_of_the_centred_codes(symmetric, kernel, c):
    """A 4-bit weight held 8 bits wide: the 8-bit layout of code - zp (what the 8-bit kernels read as a symmetric
    8-bit weight, kernel_format), the same row sums as the nibble form, the canonical words back from expand."""
    n = 24
    qdata, zp = _canonical(n, c, 4, symmetric, kernel)
    conv_shape = None if kernel is None else (c, *kernel)
    k = c if kernel is None else c * kernel[0] * kernel[1]
    blob = resident.make(qdata, zp, 4, k, conv_shape, width=8)
    assert tuple(blob.shape) == (n, resident.row_bytes(8, k)) and resident.width_of(blob, 4, k) == 8
    assert resident.kernel_format(blob, 4, zp, k) == (8, None)
    centred = reference._centred_weight(qdata, torch.ones(n, 1, dtype=torch.float16), zp, 4, k)  # [N, K] canonical
    want = centred if kernel is None else centred.view(n, c, *kernel).permute(0, 2, 3, 1).reshape(n, k)
    assert torch.equal(resident.body(blob, 8, k)[:, :k].to(torch.int32), want.to(torch.int32))
    assert torch.all(resident.body(blob, 8, k)[:, k:] == 0)
    assert torch.equal(resident.row_sums(blob, 8, k), centred.sum(dim=1).to(torch.int32))
    if kernel is None or c % 64 == 0:
        nibbles = resident.make(qdata, zp, 4, k, conv_shape)
        assert resident.width_of(nibbles, 4, k) == 4 and resident.kernel_format(nibbles, 4, zp, k) == (4, zp)
        assert torch.equal(resident.row_sums(nibbles, 4, k), resident.row_sums(blob, 8, k))
    assert torch.equal(resident.expand(blob, 4, k, conv_shape, zp), qdata)


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


@pytest.mark.parametrize("c", [64, 100, 1280])
def test_signed_nibbles_round_trip_and_sit_where_cutlass_reads_them(c):
    """A symmetric 4-bit linear as signed nibbles (QUANTKIT_RESIDENT_W4=cutlass): column 2j in the low nibble of
    byte j, 2j + 1 in the high one, each the two's-complement int4 of code - 8; zero padding nibbles; the row sums of
    the nibble form in a 32-byte tail (which tells the layouts apart); the canonical words back from expand."""
    n = 24
    qdata, zp = _canonical(n, c, 4)
    blob = resident.make(qdata, zp, 4, c, signed=True)
    assert blob.dtype == torch.int8 and tuple(blob.shape) == (n, resident.s4_row_bytes(c))
    assert resident.layout_of(blob, 4, c) == "s4" and resident.width_of(blob, 4, c) == 4
    assert resident.layout_of(resident.make(qdata, zp, 4, c), 4, c) == "nibbles"
    assert resident.layout_of(resident.make(qdata, zp, 4, c, width=8), 4, c) == "int8"
    codes = unpack(qdata, 4, c).to(torch.int32)
    data = resident.body(blob, 4, c).to(torch.int32) & 0xFF
    nib = torch.stack([data & 15, data >> 4], dim=2).reshape(n, -1)
    signed = torch.where(nib >= 8, nib - 16, nib)
    assert torch.equal(signed[:, :c], codes - 8) and torch.all(signed[:, c:] == 0)
    assert torch.equal(resident.row_sums(blob, 4, c), (codes - 8).sum(dim=1).to(torch.int32))
    assert torch.all(blob[:, -2 * resident.TAIL + 4:] == 0)
    assert torch.equal(resident.expand(blob, 4, c), qdata)
    with pytest.raises(ValueError, match="symmetric 4-bit linear"):
        resident.make(*_canonical(n, c, 4, symmetric=False), 4, c, signed=True)
    with pytest.raises(ValueError, match="symmetric 4-bit linear"):  # convolutions keep the nibble blocks
        resident.make(_canonical(n, 64, 4, kernel=(1, 1))[0], None, 4, 64, (64, 1, 1), signed=True)
    with pytest.raises(ValueError, match="symmetric 4-bit linear"):
        resident.make(_canonical(n, c, 8)[0], None, 8, c, signed=True)


@pytest.mark.parametrize("c", [64, 100, 1280])
def test_signed_nibbles_widen_to_the_8_bit_form(c):
    """triton_gemm.widen_s4 (plain PyTorch: the calls the CUTLASS int4 GEMM does not take) gives the widened blob of
    the same weight bit for bit, so the 8-bit kernels run it exactly."""
    from quantkit.ops import triton_gemm

    qdata, zp = _canonical(24, c, 4, seed=c)
    s4 = resident.make(qdata, zp, 4, c, signed=True)
    assert torch.equal(triton_gemm.widen_s4(s4, c), resident.make(qdata, zp, 4, c, width=8))


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
    with pytest.raises(ValueError, match="8-bit symmetric or 4-bit"):
        resident.make(_canonical(8, 64, 8)[0], None, 8, 64, width=4)  # 8-bit weights cannot be narrowed
    assert resident.layout_supported(4, True, True, conv_shape=(96, 3, 3), width=8)  # widened: the 8-bit rule
    assert not resident.layout_supported(4, True, True, conv_shape=(16, 3, 3), width=8)


@pytest.mark.parametrize("mode,linear,conv", [(None, 4, 4), ("0", None, None), ("1", 4, 4), ("conv8", 4, 8),
                                              ("cutlass", 4, 4)])
def test_held_width_follows_quantkit_resident_w4(mode, linear, conv, monkeypatch):
    from quantkit.ops import cutlass_gemm

    monkeypatch.setattr(cutlass_gemm, "usable", lambda: True)  # as on a Hopper GPU with the CUTLASS library
    if mode is None:
        monkeypatch.delenv("QUANTKIT_RESIDENT_W4", raising=False)
    else:
        monkeypatch.setenv("QUANTKIT_RESIDENT_W4", mode)
    assert resident.held_width(8, False) == 8 and resident.held_width(8, True) == 8
    assert (resident.held_width(4, False), resident.held_width(4, True)) == (linear, conv)
    assert resident.held_width(2, True) is None
    assert resident.compact_bits() == ((8,) if linear is None else (8, 4))
    # signed nibbles: symmetric 4-bit linears under "cutlass" only, and only where the library runs
    assert resident.held_signed(4, False, True) == (mode == "cutlass")
    assert not (resident.held_signed(4, True, True) or resident.held_signed(4, False, False)
                or resident.held_signed(8, False, True))
    monkeypatch.setattr(cutlass_gemm, "usable", lambda: False)
    assert not resident.held_signed(4, False, True)


def test_unknown_quantkit_resident_w4_warns_and_keeps_the_default(monkeypatch, caplog):
    monkeypatch.setenv("QUANTKIT_RESIDENT_W4", "yes")
    with caplog.at_level("WARNING", logger="quantkit"):
        assert resident.held_width(4, True) == 4 and resident.compact_bits() == (8, 4)
    assert "QUANTKIT_RESIDENT_W4=yes is not a mode" in caplog.text


def test_reference_ops_refuse_a_resident_blob_with_the_fix():
    qdata, _ = _canonical(8, 64, 8)
    blob = resident.make(qdata, None, 8, 64)
    with pytest.raises(ValueError, match=r"quantkit\.expand"):
        reference.gemm(torch.randn(2, 64), blob, torch.ones(8, 1, dtype=torch.float16), None, None, None, None, 8,
                       -1, 16)
