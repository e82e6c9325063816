"""quantkit.nn.prefetch on any machine: which layers of a transformer block are widened ahead and in which order,
the hooks quantkit.fuse installs and removes, and that without a GPU they leave the forward alone. The side-stream
widening itself is checked on a GPU (tests/ops/test_cuda_kernels.py)."""

import torch
from diffusers.models.attention import BasicTransformerBlock

from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import compact, fuse, prefetch, quantize_module, unfuse
from quantkit.nn.modules import _QuantMixin


def _block(bits: int = 4):
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 2, 32, cross_attention_dim=48, activation_fn="geglu").eval()
    scheme = LayerScheme(WeightFormat(bits), ActFormat(8))
    for m in list(block.modules()):
        for child, layer in list(m.named_children()):
            if isinstance(layer, torch.nn.Linear):
                setattr(m, child, quantize_module(layer, scheme, act_range=(-4.0, 4.0)))
    return block


def test_block_layers_are_the_resident_4_bit_linears_in_call_order(monkeypatch):
    block = _block()
    assert prefetch.block_layers(block) == []  # canonical codes: nothing to widen
    monkeypatch.setattr(_QuantMixin, "_resident_here", staticmethod(lambda w: True))
    compact(block)
    assert prefetch.block_layers(block) == [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v,
                                            block.attn1.to_out[0], block.attn2.to_q, block.attn2.to_k,
                                            block.attn2.to_v, block.attn2.to_out[0], block.ff.net[0].proj,
                                            block.ff.net[2]]
    monkeypatch.delenv("QUANTKIT_W4_PREFETCH", raising=False)
    fuse(block)  # one q/k/v (self) and one k/v (cross) projection
    assert prefetch.block_layers(block) == [block.attn1.to_qkv, block.attn1.to_out[0], block.attn2.to_q,
                                            block.attn2.to_kv, block.attn2.to_out[0], block.ff.net[0].proj,
                                            block.ff.net[2]]
    eight = _block(8)
    compact(eight)
    assert prefetch.block_layers(eight) == []  # 8-bit layers need no widening


def test_fuse_installs_the_hooks_only_when_asked_and_unfuse_removes_them(monkeypatch):
    block = _block()
    x, enc = torch.randn(1, 5, 64), torch.randn(1, 7, 48)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=enc)
        monkeypatch.delenv("QUANTKIT_W4_PREFETCH", raising=False)
        fuse(block)
        assert "_prefetch_hooks" not in block.__dict__
        unfuse(block)
        monkeypatch.setenv("QUANTKIT_W4_PREFETCH", "1")
        assert fuse(block) >= 1 and "_prefetch_hooks" in block.__dict__
        assert fuse(block) == 0  # hooked once
        assert torch.equal(block(x, encoder_hidden_states=enc), want)  # on the CPU the hooks do nothing
    assert block.ff.net[2].kernel_weight() is block.ff.net[2].weight_packed
    unfuse(block)
    assert "_prefetch_hooks" not in block.__dict__
    assert not block._forward_pre_hooks and not block._forward_hooks
