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


def _attention(cross: bool, scheme=None, ranges=((-2.0, 2.0),) * 3):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(1)
    attn = Attention(64, cross_attention_dim=48 if cross else None, heads=4, dim_head=16).eval()
    scheme = scheme or LayerScheme(WeightFormat(8), ActFormat(8))
    for name, rng in zip(("to_q", "to_k", "to_v"), ranges):
        setattr(attn, name, quantize_module(getattr(attn, name), scheme, act_range=rng))
    return attn


def test_fused_projections_give_the_same_attention_output():
    """Self-attention gets one to_qkv, cross-attention one to_kv (its to_q reads another input); the outputs are
    unchanged bit for bit, the projections' codes become views of the fused layer's rows, and unfuse restores the
    default processor."""
    x = torch.randn(2, 10, 64)
    ctx = torch.randn(2, 7, 48)
    self_attn, cross_attn = _attention(False), _attention(True, ranges=((-2.0, 2.0), (-3.0, 3.0), (-3.0, 3.0)))
    model = torch.nn.ModuleList([self_attn, cross_attn])
    with torch.no_grad():
        want = self_attn(x), cross_attn(x, encoder_hidden_states=ctx)
        assert fuse(model) == 2
        assert self_attn.to_qkv.out_features == 3 * 64 and cross_attn.to_kv.out_features == 2 * 64
        assert not any(p.is_meta for p in self_attn.to_qkv.parameters())
        fused = self_attn.to_qkv.weight_packed
        assert self_attn.to_k.weight_packed.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        got = self_attn(x), cross_attn(x, encoder_hidden_states=ctx)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert type(self_attn.processor).__name__ == "FusedQuantAttnProcessor"
        unfuse(model)
        assert not hasattr(self_attn, "to_qkv") and type(self_attn.processor).__name__ == "AttnProcessor2_0"
        assert torch.equal(self_attn(x), want[0])


def test_fused_attention_processor_matches_diffusers_with_masks_and_output_factors():
    """The fused attentions' processor (diffusers' fused one without the division by an output factor of 1) gives
    diffusers' unfused outputs bit for bit with an attention mask on the text tokens, and with an output factor of
    2 (diffusers' own path)."""
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 48)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    for factor in (1.0, 2.0):
        attn = _attention(True, ranges=((-2.0, 2.0), (-3.0, 3.0), (-3.0, 3.0)))
        attn.rescale_output_factor = factor
        with torch.no_grad():
            want = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
            assert fuse(attn) == 1
            assert torch.equal(attn(x, encoder_hidden_states=ctx, attention_mask=mask), want)


def test_projections_with_different_input_scales_or_dynamic_activations_stay_apart():
    unequal = _attention(False, ranges=((-2.0, 2.0), (-2.0, 2.5), (-2.0, 2.0)))
    dynamic = _attention(False, scheme=LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True)), ranges=(None,) * 3)
    assert fuse(torch.nn.ModuleList([unequal, dynamic])) == 0


def _resnets():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(2)
    w8a8, dynamic = LayerScheme(WeightFormat(8), ActFormat(8)), LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True))
    blocks = []
    for kwargs, scheme in (({}, w8a8), ({}, dynamic), ({"down": True}, w8a8),
                           ({"time_embedding_norm": "scale_shift"}, w8a8)):
        block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8, **kwargs).eval()
        for name in ("conv1", "conv2"):
            rng = None if scheme.act.dynamic else (-1.0, 3.0)
            setattr(block, name, quantize_module(getattr(block, name), scheme, act_range=rng))
        blocks.append(block)
    return torch.nn.ModuleList(blocks)


def test_groupnorm_fusion_is_on_by_default_and_takes_plain_static_resnet_blocks_only(monkeypatch):
    """The GroupNorm fusion (QUANTKIT_FUSE_GROUPNORM=0 turns it off): resnet blocks with static 8-bit convolutions,
    no resampling and the default time-embedding norm; without resident weights the fused forward is the block's
    own (same output)."""
    model = _resnets()
    monkeypatch.setenv("QUANTKIT_FUSE_GROUPNORM", "0")
    assert fuse(model) == 0
    monkeypatch.delenv("QUANTKIT_FUSE_GROUPNORM")
    x, temb = torch.randn(1, 32, 8, 8), torch.randn(1, 16)
    with torch.no_grad():
        want = model[0](x, temb)
        assert fuse(model) == 1
        assert "forward" in model[0].__dict__ and all("forward" not in m.__dict__ for m in model[1:])
        assert torch.equal(model[0](x, temb), want)
    unfuse(model)
    assert all("forward" not in m.__dict__ for m in model)


def test_groupnorm_fusion_takes_a_transformer_with_a_quantized_linear_proj_in(monkeypatch):
    """Transformer2DModel with use_linear_projection and a static 8-bit proj_in (not a conv proj_in, not a dynamic
    one); without resident weights the fused method is the model's own (same output)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    monkeypatch.delenv("QUANTKIT_FUSE_GROUPNORM", raising=False)  # on by default
    models = []
    for linear, act in ((True, ActFormat(8)), (False, ActFormat(8)), (True, ActFormat(8, dynamic=True))):
        torch.manual_seed(3)
        t = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8,
                               cross_attention_dim=24, use_linear_projection=linear).eval()
        rng = None if act.dynamic else (-3.0, 3.0)
        t.proj_in = quantize_module(t.proj_in, LayerScheme(WeightFormat(8), act), act_range=rng)
        models.append(t)
    x, enc = torch.randn(1, 32, 4, 4), torch.randn(1, 5, 24)
    with torch.no_grad():
        want = models[0](x, encoder_hidden_states=enc).sample
        assert fuse(torch.nn.ModuleList(models)) == 1
        assert "_operate_on_continuous_inputs" in models[0].__dict__
        assert all("_operate_on_continuous_inputs" not in m.__dict__ for m in models[1:])
        assert torch.equal(models[0](x, encoder_hidden_states=enc).sample, want)
    unfuse(torch.nn.ModuleList(models))
    assert "_operate_on_continuous_inputs" not in models[0].__dict__


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = _blocks()[0]

    def forward(self, x):
        return self.ff(x)


def test_fuse_on_first_gpu_call_waits_for_resident_layers_then_fuses_once(monkeypatch):
    """What loading an export arranges: nothing while the layers hold canonical codes (CPU), fuse at the first call
    with GPU-resident layers (simulated here), then the hook is gone; not a submodule (state_dict unchanged);
    QUANTKIT_FUSE=0 turns it off; accelerate's offloading hooks cancel it."""
    import sys

    from quantkit.nn import compact
    from quantkit.nn.fuse import _auto_fuse_hook, fuse_on_first_gpu_call
    from quantkit.nn.modules import _QuantMixin

    net = _Net()
    keys = set(net.state_dict())
    monkeypatch.setenv("QUANTKIT_FUSE", "0")
    assert not fuse_on_first_gpu_call(net)
    monkeypatch.delenv("QUANTKIT_FUSE")
    assert fuse_on_first_gpu_call(net) and not fuse_on_first_gpu_call(net)  # once
    assert set(net.state_dict()) == keys and len(list(net.modules())) == len(list(_Net().modules()))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = net(x)  # canonical codes on the CPU: not fused
    assert "forward" not in net.ff.__dict__ and "_auto_fuse_handle" in net.__dict__
    assert torch.equal(want, net.ff(x))
    monkeypatch.setattr(_QuantMixin, "_resident_here", staticmethod(lambda w: True))
    compact(net)  # resident blobs, as on a GPU
    fuse_module = sys.modules["quantkit.nn.fuse"]  # the attribute quantkit.nn.fuse is the function
    monkeypatch.setattr(fuse_module, "_on_gpu", lambda w: True)
    _auto_fuse_hook(net, (x,), {})
    assert "forward" in net.ff.__dict__  # fused
    assert "_auto_fuse_handle" not in net.__dict__ and not net._forward_pre_hooks

    offloaded = _Net()
    offloaded.ff._hf_hook = object()  # accelerate's offloading marker
    assert fuse_on_first_gpu_call(offloaded)
    compact(offloaded)
    _auto_fuse_hook(offloaded, (x,), {})
    assert "forward" not in offloaded.ff.__dict__ and not offloaded._forward_pre_hooks
