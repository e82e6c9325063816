"""The reference ops against independent oracles: int64 matmul for the integer accumulation, and
dequantize-then-matmul in float64 for the outputs."""

import pytest
import torch
import torch.nn.functional as F

from quantkit.formats import WeightFormat, dequantize_weight, unpack
from quantkit.ops import library, op_names, reference
from tests.ops.samples import all_samples, conv_samples, gemm_samples, packed_weight


def _fake_quant_x(x, act_bits, in_scale, in_zp, per_row):
    if act_bits >= 16:
        return x.double()
    if in_scale is None:
        if per_row:
            codes, s, z = reference.quantize_act_dynamic(x.reshape(-1, x.shape[-1]), act_bits)
            return ((codes.double() - z.double()) * s.double()).reshape(x.shape)
        flat = x.reshape(x.shape[0], -1)
        s, z = reference.act_qparams_from_range(flat.amin(1), flat.amax(1), act_bits)
        s, z = s.view(-1, *[1] * (x.dim() - 1)), z.view(-1, *[1] * (x.dim() - 1))
    else:
        s, z = in_scale, in_zp
    codes = reference.quantize_act(x, s, z, act_bits)
    return (codes.double() - z.double()) * s.double()


def _weight(q, s, zp, bits, group_size, k):
    fmt = WeightFormat(bits, group_size, zp is None)
    return dequantize_weight(unpack(q, bits, k), s, zp, fmt, torch.float64)


@pytest.mark.parametrize("name,args", gemm_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_gemm_matches_dequantized_oracle(name, args):
    x, q, s, zp, bias, isc, izp, bits, gs, act_bits = args
    y = getattr(torch.ops.quantkit, name)(*args)
    xq = _fake_quant_x(x, act_bits, isc, izp, per_row=True)
    ref = F.linear(xq, _weight(q, s, zp, bits, gs, x.shape[-1]), bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,args", conv_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_conv_matches_dequantized_oracle(name, args):
    x, q, s, zp, bias, isc, izp, bits, gs, act_bits, kernel, stride, padding, dilation = args
    y = getattr(torch.ops.quantkit, name)(*args)
    xq = _fake_quant_x(x, act_bits, isc, izp, per_row=False)
    w = _weight(q, s, zp, bits, gs, x.shape[1] * kernel[0] * kernel[1]).view(-1, x.shape[1], *kernel)
    ref = F.conv2d(xq, w, bias.double(), stride, padding, dilation)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group_size", [-1, 8])
def test_int_gemm_is_exact(group_size):
    x = torch.randn(7, 40)
    codes, s, z = reference.quantize_act_dynamic(x, 8)
    q, ws, _, _ = packed_weight(9, 40, 8, group_size)
    wc = reference._centred_weight(q, ws, None, 8, 40)
    acc = reference.int_gemm(codes, z, wc, ws.shape[1])
    xi = codes.to(torch.int64) - z.to(torch.int64)
    wi = wc.to(torch.int64)
    g = ws.shape[1]
    expect = torch.stack([xi.view(7, g, -1)[:, i] @ wi.view(9, g, -1)[:, i].T for i in range(g)], dim=-1)
    assert torch.equal(acc, expect)


def test_static_activation_codes():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0, 100.0])
    scale, zp = reference.act_qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), 8)
    codes = reference.quantize_act(x, scale, zp, 8)
    assert codes.tolist()[0] == 0 and codes.tolist()[-1] == 255  # clamped
    assert codes[1].item() == zp.item()  # zero is exactly representable


@pytest.mark.parametrize("name,args", all_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.quantkit, name).default, args)


def test_every_op_has_a_sample():
    assert {f"quantkit::{n}" for n, _ in all_samples()} == set(op_names())


def test_select_op_routing():
    from quantkit.formats import ActFormat, LayerScheme

    w8, w4, w2 = WeightFormat(8), WeightFormat(4, 64), WeightFormat(2)
    assert library.select_op(LayerScheme(w8, ActFormat(8)), conv=False).name() == "quantkit::gemm_w8a8"
    assert library.select_op(LayerScheme(w4, ActFormat(6)), conv=True).name() == "quantkit::conv2d_w4a8"
    assert library.select_op(LayerScheme(w4), conv=False).name() == "quantkit::gemm_w4a16"
    assert library.select_op(LayerScheme(w2, ActFormat(8)), conv=False).name() == "quantkit::gemm_wxax"
    assert library.select_op(LayerScheme(w8), conv=False).name() == "quantkit::gemm_wxax"
