import pytest
import torch

from quantkit.formats import (
    WEIGHT_BITS,
    ActFormat,
    LayerScheme,
    WeightFormat,
    bits_per_weight,
    dequantize_weight,
    pack,
    quantize_weight,
    unpack,
    values_per_word,
)
from quantkit.sensitivity.metrics import sqnr


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (5, 7), (3, 64), (17, 100), (2, 1001)], ids=str)
def test_pack_unpack_bit_exact(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == WeightFormat(bits).qdata_shape(*shape)
    assert torch.equal(unpack(packed, bits, shape[1]), codes)


def test_bit_order_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    word = pack(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 1 | (2 << 4) | (3 << 8) | (15 << 28)


def test_three_bit_packs_ten_per_word_and_pads_with_zero():
    assert values_per_word(3) == 10
    codes = torch.full((1, 11), 7, dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.shape == (1, 2)
    assert (packed[0, 1].item() & 0xFFFFFFFF) == 7  # one code, the rest zero padding
    assert (packed[0, 0].item() & 0xFFFFFFFF) >> 30 == 0  # top two bits unused


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([[16]]), 4)


# SQNR floors (dB) for a Gaussian weight, measured: w8 ~44, w4 ~20, w4g32 ~20, w3 ~14, w2 ~3 (per channel).
SQNR_FLOOR = {8: 40.0, 4: 17.0, 3: 11.0, 2: 1.5}


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_quality(bits, group_size, symmetric):
    fmt = WeightFormat(bits, group_size, symmetric)
    w = torch.randn(24, 96)
    codes, scale, zp = quantize_weight(w, fmt)
    assert scale.dtype == torch.float16 and scale.shape == fmt.scale_shape(24, 96)
    assert (zp is None) == symmetric
    w_hat = dequantize_weight(codes, scale, zp, fmt)
    assert sqnr(w, w_hat) > SQNR_FLOOR[bits]
    # codes are the nearest grid points of the *stored* fp16 scale: rounding w_hat on that grid gives them back
    groups = scale.shape[1]
    zp_f = (zp.float() if zp is not None else torch.full_like(scale.float(), 1 << (bits - 1))).unsqueeze(-1)
    back = torch.round(w_hat.view(24, groups, -1) / scale.float().unsqueeze(-1)) + zp_f
    assert torch.equal(back.view(24, 96).to(torch.uint8), codes)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 30), WeightFormat(4, 64))


def test_bits_per_weight_counts_everything():
    fmt = WeightFormat(4, 64)
    codes, scale, _ = quantize_weight(torch.randn(128, 256), fmt)
    tensors = {"weight_packed": pack(codes, 4), "weight_scale": scale}
    assert bits_per_weight(tensors, 128 * 256) == pytest.approx(4 + 16 / 64)


def test_scheme_names_and_specs():
    s = LayerScheme(WeightFormat(4, 64, False), ActFormat(8, dynamic=True))
    assert s.name == "w4g64asym-a8dyn"
    specs = s.tensor_specs((10, 3, 3, 128))
    assert specs["weight_packed"] == ((10, 144), torch.int32)
    assert specs["weight_zero_point"] == ((10, 18), torch.uint8)
    assert "input_scale" not in specs
    assert WeightFormat.from_dict(s.weight.to_dict()) == s.weight
    assert ActFormat.from_dict(s.act.to_dict()) == s.act
