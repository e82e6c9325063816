"""quantkit.fuse / unfuse on any machine: which blocks it takes, and that a fused block whose weights are not
GPU-resident (here: canonical codes on the CPU) runs its own forward. The fused kernel itself is checked under
Triton's interpreter and on a GPU (tests/ops/test_triton_resident.py)."""

import sys

import torch
from diffusers.models.attention import FeedForward

from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import fuse, quantize_module, unfuse
from tests.helpers import quantized_transformer_block

W8A8 = LayerScheme(WeightFormat(8), ActFormat(8))


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


def test_layernorm_fusion_is_opt_in_and_defers_each_norm_into_its_quantized_consumers(monkeypatch):
    """QUANTKIT_FUSE_LAYERNORM=1: norm1 goes into the fused q/k/v projection, norm2 into the cross-attention's
    to_q, norm3 into the feed-forward's input projection; the norms stay in the model (state_dict unchanged) with
    an identity forward; without resident weights each consumer applies the norm and runs its own forward (the
    same output, bit for bit); unfuse restores everything."""
    block, x, enc = quantized_transformer_block(W8A8)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=enc)
    monkeypatch.delenv("QUANTKIT_FUSE_LAYERNORM", raising=False)
    plain = fuse(block)  # GEGLU, to_qkv, to_kv
    keys = set(block.state_dict())
    assert plain == 3 and all("forward" not in n.__dict__ for n in (block.norm1, block.norm2, block.norm3))
    unfuse(block)
    monkeypatch.setenv("QUANTKIT_FUSE_LAYERNORM", "1")
    assert fuse(block) == plain + 3
    assert fuse(block) == 0  # already fused
    assert block.attn1.to_qkv.__dict__["_prenorm"] is block.norm1
    assert block.attn2.to_q.__dict__["_prenorm"] is block.norm2
    assert block.ff.net[0].proj.__dict__["_prenorm"] is block.norm3
    assert torch.equal(block.norm1(x), x) and set(block.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(block(x, encoder_hidden_states=enc), want)
    unfuse(block)
    assert all("forward" not in m.__dict__ and "_prenorm" not in m.__dict__ for m in block.modules())
    with torch.no_grad():
        assert torch.equal(block(x, encoder_hidden_states=enc), want)


def test_layernorm_fusion_leaves_norms_with_a_consumer_it_cannot_take(monkeypatch):
    """A dynamic-activation to_q keeps norm2 in place; a float feed-forward projection keeps norm3; the others are
    still deferred."""
    dynamic = LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True))
    block, x, enc = quantized_transformer_block(W8A8, {"attn2.to_q": dynamic, "ff.net.0.proj": None})
    with torch.no_grad():
        want = block(x, encoder_hidden_states=enc)
    monkeypatch.setenv("QUANTKIT_FUSE_LAYERNORM", "1")
    fuse(block)
    assert "forward" in block.norm1.__dict__
    assert "forward" not in block.norm2.__dict__ and "forward" not in block.norm3.__dict__
    with torch.no_grad():
        assert torch.equal(block(x, encoder_hidden_states=enc), want)


def test_projections_fused_after_their_norm_was_deferred_apply_it(monkeypatch):
    """The norm deferred into to_q / to_k / to_v while they could not fuse (e.g. CPU tile layouts) moves to the
    to_qkv a later fuse call makes of them."""
    from quantkit.nn import fuse as fuse_fn

    fuse_module = sys.modules[fuse_fn.__module__]
    block, x, enc = quantized_transformer_block(W8A8)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=enc)
    monkeypatch.setenv("QUANTKIT_FUSE_LAYERNORM", "1")
    with monkeypatch.context() as m:
        m.setattr(fuse_module, "_projections", lambda attn: None)
        fuse(block)
    assert block.attn1.to_q.__dict__["_prenorm"] is block.norm1 and not hasattr(block.attn1, "to_qkv")
    fuse(block)
    assert block.attn1.to_qkv.__dict__["_prenorm"] is block.norm1
    with torch.no_grad():
        assert torch.equal(block(x, encoder_hidden_states=enc), want)


def test_residual_fusion_is_opt_in_and_keeps_the_block_output(monkeypatch):
    """QUANTKIT_FUSE_RESIDUAL=1 (with and without the LayerNorm fusion): the block's residual adds move into the
    layers producing each branch (off the GPU: the same separate adds), the output is unchanged bit for bit, a
    processor replaced afterwards sends the block back to diffusers' forward, and unfuse restores it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for layernorm in ("0", "1"):
        block, x, enc = quantized_transformer_block(W8A8)
        with torch.no_grad():
            want = block(x, encoder_hidden_states=enc)
        monkeypatch.setenv("QUANTKIT_FUSE_LAYERNORM", layernorm)
        monkeypatch.delenv("QUANTKIT_FUSE_RESIDUAL", raising=False)
        base = fuse(block)
        assert "forward" not in block.__dict__
        unfuse(block)
        monkeypatch.setenv("QUANTKIT_FUSE_RESIDUAL", "1")
        assert fuse(block) == base + 1 and "forward" in block.__dict__
        with torch.no_grad():
            assert torch.equal(block(x, encoder_hidden_states=enc), want)
            block.attn2.set_processor(AttnProcessor2_0())  # its to_q / to_k / to_v still hold their rows
            assert torch.equal(block(x, encoder_hidden_states=enc), want)
        unfuse(block)
        assert all("forward" not in m.__dict__ for m in block.modules())
        with torch.no_grad():
            assert torch.equal(block(x, encoder_hidden_states=enc), want)
