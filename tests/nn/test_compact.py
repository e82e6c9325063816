"""Compacted modules: the native CPU tile layout held in place of the canonical codes (one copy of each weight).

Every check compares against the same module before compaction: outputs bit for bit, the state_dict's canonical
codes, the dequantized weight; plus the ways out of the compact form (expand, load_state_dict, .to(device)).
"""

import copy

import pytest
import torch

from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import compact, expand, quantize_module
from quantkit.ops import native, reference
from tests.ops.samples import packed_weight, static_qparams

pytestmark = pytest.mark.skipif(
    not native.native_status()["loaded"],
    reason=f"quantkit._C not loaded ({native.native_status()['error']}); build it with "
    "`pip install --no-build-isolation -e .`",
)

SCHEMES = [
    LayerScheme(WeightFormat(8), ActFormat(8)),
    LayerScheme(WeightFormat(8, 16, symmetric=False), ActFormat(8, dynamic=True)),
    LayerScheme(WeightFormat(8), ActFormat(7)),
    LayerScheme(WeightFormat(4), ActFormat(8)),
    LayerScheme(WeightFormat(4, 16, symmetric=False), ActFormat(8, dynamic=True)),
    LayerScheme(WeightFormat(4, 16)),
    LayerScheme(WeightFormat(4, -1, symmetric=False)),
]


def _layers(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 37)
    conv = torch.nn.Conv2d(16, 19, 3, stride=2, padding=1)
    xs = {"lin": [torch.randn(1, 48), torch.randn(3, 7, 48), torch.randn(300, 48)],
          "conv": [torch.randn(2, 16, 9, 11)]}
    out = []
    for key, layer in (("lin", lin), ("conv", conv)):
        x0 = xs[key][0]
        out.append((quantize_module(layer, scheme, (x0.min() - 1, x0.max() + 1)), xs[key]))
    return out


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_compact_is_bit_identical_and_saves_canonical(scheme):
    for q, inputs in _layers(scheme):
        canonical = q.weight_packed.detach().clone()
        sd_before = {k: v.clone() for k, v in q.state_dict().items()}
        deq_before = q.dequantized_weight()
        with torch.no_grad():
            before = [q(x) for x in inputs]
        freed = q.compact_()
        assert q.is_compact and q.weight_packed.dtype == torch.uint8
        assert freed == canonical.numel() * 4
        with torch.no_grad():
            for x, y in zip(inputs, before):
                assert torch.equal(q(x), y)
        sd = q.state_dict()
        assert set(sd) == set(sd_before)
        for k in sd:
            assert sd[k].dtype == sd_before[k].dtype and torch.equal(sd[k], sd_before[k]), k
        assert torch.equal(q.dequantized_weight(), deq_before)
        q.expand_()
        assert not q.is_compact and torch.equal(q.weight_packed, canonical)


def test_load_state_dict_into_compact_module_and_deepcopy():
    scheme = LayerScheme(WeightFormat(4, 16, symmetric=False), ActFormat(8))
    (a, xs), _ = _layers(scheme)
    b = quantize_module(torch.nn.Linear(48, 37), scheme, (-2.0, 2.0))
    b.compact_()
    b.load_state_dict(a.state_dict())
    assert b.is_compact
    c = copy.deepcopy(b)
    with torch.no_grad():
        for x in xs:
            assert torch.equal(b(x), a(x))
            assert torch.equal(c(x), a(x))


def test_compact_model_and_expand():
    scheme = LayerScheme(WeightFormat(8), ActFormat(8))
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(5, 32)
    for i in (0, 2):
        model[i] = quantize_module(model[i], scheme, (-4.0, 4.0))
    with torch.no_grad():
        y = model(x)
    assert compact(model) == (64 * 32 + 16 * 64)  # 8-bit codes: one byte per weight
    assert all(model[i].is_compact for i in (0, 2))
    with torch.no_grad():
        assert torch.equal(model(x), y)
    expand(model)
    assert not any(model[i].is_compact for i in (0, 2))
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_only_native_cpu_ops_are_compacted():
    w8_weight_only = quantize_module(torch.nn.Linear(32, 8), LayerScheme(WeightFormat(8)))  # gemm_wxax: reference
    assert not w8_weight_only.can_compact() and w8_weight_only.compact_() == 0
    assert w8_weight_only.weight_packed.dtype == torch.int32


def test_moving_off_the_cpu_expands_first():
    q = quantize_module(torch.nn.Linear(32, 8), LayerScheme(WeightFormat(4), ActFormat(8)), (-1.0, 1.0))
    canonical = q.weight_packed.detach().clone()
    q.compact_()
    q.to(torch.float64)  # dtype casts leave integer tensors alone: still compact
    assert q.is_compact and q.bias.dtype == torch.float64
    q.to("meta")
    assert not q.is_compact and q.weight_packed.dtype == torch.int32 and q.weight_packed.shape == canonical.shape


def test_reference_ops_refuse_the_tile_layout_with_a_clear_error():
    q, s, zp, _ = packed_weight(13, 48, 8)
    blob = native.compact_weight(q, s, zp, 8, 48)
    with pytest.raises(ValueError, match="quantkit.expand"):
        reference.gemm(torch.randn(2, 48), blob, s, zp, None, None, None, 8, -1, 8)
    assert torch.equal(native.expand_weight(blob), q)


def test_conv_blob_called_for_another_layout_is_repacked():
    # A W4 conv blob is in nibble panels; a static zero point outside uint8 needs byte panels: still exact.
    q, s, zp, _ = packed_weight(5, 6, 4, kernel=(3, 3))
    blob = native.compact_weight(q, s, zp, 4, 54, (6, 3, 3))
    x = torch.randn(1, 6, 7, 7)
    isc, _ = static_qparams(x, 8)
    izp = torch.tensor([300], dtype=torch.int32)
    args = (x, q, s, zp, None, isc, izp, 4, -1, 8, [3, 3], [1, 1], [1, 1], [1, 1])
    expected = torch.ops.quantkit.conv2d_w4a8(*args)
    got = torch.ops.quantkit.conv2d_w4a8(x, blob, *args[2:])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("op", ["gemm_w8a8", "gemm_w4a8", "gemm_w4a16"])
def test_opcheck_on_compact_weights(op):
    bits, act_bits = (8, 8) if op == "gemm_w8a8" else (4, 8 if op == "gemm_w4a8" else 16)
    q, s, zp, _ = packed_weight(13, 48, bits, 16, symmetric=False)
    blob = native.compact_weight(q, s, zp, bits, 48)
    x = torch.randn(2, 5, 48)
    args = (x, blob, s, zp, torch.randn(13), None, None, bits, 16, act_bits)
    torch.library.opcheck(getattr(torch.ops.quantkit, op).default, args)
    assert torch.equal(getattr(torch.ops.quantkit, op)(*args),
                       getattr(torch.ops.quantkit, op)(x, q, *args[2:]))
