"""Modules compacted to the GPU-resident layout (quantkit.compact on CUDA), checked on any machine.

Which layers a GPU compaction picks (8-bit by default, 4-bit opt-in), that moving a model onto the GPU compacts
it, and that everything reading the weights as data still sees the canonical
codes (state_dict, dequantized_weight, expand, load_state_dict, deepcopy). The device test is replaced by one that
accepts CPU tensors (``_resident_here``), so no forward runs here: the kernels' results are checked on a GPU
(tests/ops/test_cuda_kernels.py) and under Triton's interpreter (tests/ops/test_triton_resident.py).
"""

import copy

import torch

from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import compact, expand, quantize_module
from quantkit.nn.modules import _QuantMixin


def _resident_on_cpu(monkeypatch):
    monkeypatch.setattr(_QuantMixin, "_resident_here", staticmethod(lambda w: True))


def _model():
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({
        "w8a8": torch.nn.Linear(130, 40),
        "w4a8_asym": torch.nn.Linear(96, 24),
        "w8a8_conv": torch.nn.Conv2d(32, 16, 3, padding=1),
        "w4a8_conv": torch.nn.Conv2d(64, 8, 3),
        "w8_asym": torch.nn.Linear(64, 8),
        "w4a16": torch.nn.Linear(64, 8),
        "conv_in": torch.nn.Conv2d(4, 8, 3, padding=1),
        "w4_conv_96": torch.nn.Conv2d(96, 8, 1),
        "w4_grouped": torch.nn.Linear(64, 8),
    })
    schemes = {
        "w8a8": LayerScheme(WeightFormat(8), ActFormat(8)),
        "w4a8_asym": LayerScheme(WeightFormat(4, -1, symmetric=False), ActFormat(8, dynamic=True)),
        "w8a8_conv": LayerScheme(WeightFormat(8), ActFormat(8)),
        "w4a8_conv": LayerScheme(WeightFormat(4), ActFormat(7)),
        "w8_asym": LayerScheme(WeightFormat(8, -1, symmetric=False), ActFormat(8)),
        "w4a16": LayerScheme(WeightFormat(4)),
        "conv_in": LayerScheme(WeightFormat(8), ActFormat(8)),
        "w4_conv_96": LayerScheme(WeightFormat(4), ActFormat(8)),
        "w4_grouped": LayerScheme(WeightFormat(4, 32), ActFormat(8)),
    }
    for name, scheme in schemes.items():
        rng = None if scheme.act is None or scheme.act.dynamic else (-3.0, 3.0)
        m[name] = quantize_module(m[name], scheme, act_range=rng)
    return m


def test_gpu_compaction_keeps_4_bit_layers_canonical_when_told(monkeypatch):
    """QUANTKIT_RESIDENT_W4=0: only the 8-bit layers take the resident layout."""
    model = _model()
    _resident_on_cpu(monkeypatch)
    monkeypatch.setenv("QUANTKIT_RESIDENT_W4", "0")
    compact(model)
    assert {n for n, m in model.items() if m.is_compact} == {"w8a8", "w8a8_conv"}


def test_conv8_widens_4_bit_convolutions_and_keeps_canonical_data(monkeypatch):
    """QUANTKIT_RESIDENT_W4=conv8: 4-bit linears in the nibble layout, 4-bit convolutions 8 bits wide (so a
    96-channel one qualifies too, under the 8-bit rule), and the canonical codes wherever weights are data."""
    model = _model()
    _resident_on_cpu(monkeypatch)
    monkeypatch.setenv("QUANTKIT_RESIDENT_W4", "conv8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {n: m.dequantized_weight() for n, m in model.items()}
    compact(model)
    assert {n for n, m in model.items() if m.is_compact} == {"w8a8", "w4a8_asym", "w8a8_conv", "w4a8_conv",
                                                             "w4_conv_96"}
    assert model["w4a8_asym"].weight_packed.shape[1] == 128 // 2 + 16  # nibbles (K = 96 padded to 128)
    assert model["w4a8_conv"].weight_packed.shape[1] == 64 * 9 + 16  # one byte per column (Kp = 576)
    assert model["w4_conv_96"].weight_packed.shape[1] == 128 + 16  # K = 96 padded to 128
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(model[n].dequantized_weight(), weights[n]) for n in model)
    expand(model)
    assert not any(m.is_compact for m in model.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_moving_onto_the_gpu_compacts_unless_turned_off(monkeypatch):
    model = _model()
    _resident_on_cpu(monkeypatch)  # any _apply now lands "on a GPU"
    monkeypatch.setenv("QUANTKIT_COMPACT", "0")
    model.float()
    assert not any(m.is_compact for m in model.values())
    monkeypatch.delenv("QUANTKIT_COMPACT")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.float()
    assert {n for n, m in model.items() if m.is_compact} == {"w8a8", "w4a8_asym", "w8a8_conv", "w4a8_conv"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gpu_compaction_picks_the_resident_formats_and_keeps_canonical_data(monkeypatch):
    model = _model()
    _resident_on_cpu(monkeypatch)
    monkeypatch.delenv("QUANTKIT_RESIDENT_W4", raising=False)  # the default: 4-bit layers resident too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {n: m.dequantized_weight() for n, m in model.items()}
    freed = compact(model)
    picked = {n for n, m in model.items() if m.is_compact}
    assert picked == {"w8a8", "w4a8_asym", "w8a8_conv", "w4a8_conv"}
    assert freed == sum(before[f"{n}.weight_packed"].numel() * 4 for n in picked)
    assert all(model[n].weight_packed.dtype == torch.int8 for n in picked)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # canonical codes, bit for bit
    assert all(torch.equal(model[n].dequantized_weight(), weights[n]) for n in model)

    clone = copy.deepcopy(model)
    assert clone["w8a8"].is_compact
    assert all(torch.equal(v, before[k]) for k, v in clone.state_dict().items())
    model.load_state_dict(before)  # loading into a compact module keeps it compact, with the new codes
    assert model["w8a8_conv"].is_compact
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    expand(model)
    assert not any(m.is_compact for m in model.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
