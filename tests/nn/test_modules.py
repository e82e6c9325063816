import pytest
import torch

from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import QuantConv2d, QuantLinear, empty_quant_module, quantize_module
from quantkit.sensitivity.metrics import sqnr

# Output SQNR floors (dB) of a random layer on Gaussian inputs, measured with margin:
# w8a8 ~40, w4a8 ~20, w4 weight-only ~20, w8 weight-only ~44.
CASES = [
    (LayerScheme(WeightFormat(8), ActFormat(8)), 34.0),
    (LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True)), 34.0),
    (LayerScheme(WeightFormat(4), ActFormat(8)), 16.0),
    (LayerScheme(WeightFormat(4, 16)), 17.0),
    (LayerScheme(WeightFormat(8, -1, symmetric=False)), 38.0),
]


@pytest.mark.parametrize("scheme,floor", CASES, ids=lambda v: v.name if hasattr(v, "name") else "")
def test_quant_linear_and_conv_sqnr(scheme, floor):
    lin, conv = torch.nn.Linear(64, 48), torch.nn.Conv2d(16, 24, 3, padding=1)
    x, xc = torch.randn(3, 10, 64), torch.randn(2, 16, 8, 8)
    ql = quantize_module(lin, scheme, (x.min(), x.max()))
    qc = quantize_module(conv, scheme, (xc.min(), xc.max()))
    assert isinstance(ql, QuantLinear) and isinstance(qc, QuantConv2d)
    with torch.no_grad():
        assert sqnr(lin(x), ql(x)) > floor
        assert sqnr(conv(xc), qc(xc)) > floor


def test_state_dict_roundtrip_into_empty_module():
    scheme = LayerScheme(WeightFormat(4, 16, symmetric=False), ActFormat(8))
    lin = torch.nn.Linear(32, 8)
    q = quantize_module(lin, scheme, (-3.0, 3.0))
    sd = q.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "input_scale",
                       "input_zero_point", "bias"}
    assert all(not p.requires_grad for p in q.parameters())
    fresh = empty_quant_module(lin, scheme)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 32)
    assert torch.equal(fresh(x), q(x))
    assert fresh.in_features == 32 and fresh.out_features == 8 and fresh.weight.shape == (8, 32)


def test_static_scheme_needs_a_range():
    with pytest.raises(ValueError, match="calibrated"):
        quantize_module(torch.nn.Linear(8, 8), LayerScheme(WeightFormat(8), ActFormat(8)))


def test_quantized_twin_keeps_the_training_mode_of_the_layer_it_replaces():
    """A layer quantized inside a model in eval mode (how pipelines are quantized) is in eval mode too."""
    w8 = LayerScheme(WeightFormat(8))
    assert not quantize_module(torch.nn.Linear(8, 8).eval(), w8).training
    assert quantize_module(torch.nn.Linear(8, 8).train(), w8).training
    assert not quantize_module(torch.nn.Conv2d(4, 8, 3).eval(), w8).training
