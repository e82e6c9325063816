"""quantkit.fuse / unfuse on any machine: which blocks it takes, and that a fused block whose weights are not
GPU-resident (here: canonical codes on the CPU) runs its own forward. The fused kernel itself is checked under
Triton's interpreter and on a GPU (tests/ops/test_triton_resident.py)."""

import torch
from diffusers.models.attention import FeedForward

from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import fuse, quantize_module, unfuse


def _blocks():
    torch.manual_seed(0)
    geglu = FeedForward(32, mult=2, activation_fn="geglu").eval()
    geglu.net[2] = quantize_module(geglu.net[2], LayerScheme(WeightFormat(8), ActFormat(8)), act_range=(-1.0, 3.0))
    dynamic = FeedForward(32, mult=2, activation_fn="geglu").eval()
    dynamic.net[2] = quantize_module(dynamic.net[2], LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True)))
    gelu = FeedForward(32, mult=2, activation_fn="gelu").eval()
    gelu.net[2] = quantize_module(gelu.net[2], LayerScheme(WeightFormat(8), ActFormat(8)), act_range=(-1.0, 3.0))
    float_out = FeedForward(32, mult=2, activation_fn="geglu").eval()
    return torch.nn.ModuleList([geglu, dynamic, gelu, float_out])


def test_fuse_takes_geglu_blocks_with_a_static_8_bit_output_linear_only():
    model = _blocks()
    assert fuse(model) == 1
    assert "forward" in model[0].__dict__ and all("forward" not in m.__dict__ for m in model[1:])
    assert fuse(model) == 0  # already fused
    unfuse(model)
    assert all("forward" not in m.__dict__ for m in model)


def test_fused_block_without_resident_weights_runs_its_own_forward():
    model = _blocks()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = model[0](x)
        fuse(model)
        got = model[0](x)
    assert torch.equal(got, want)
