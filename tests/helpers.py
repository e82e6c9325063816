"""Shared test helpers: the tolerance table for comparing kernels with the reference ops, and a calibrated
quantized diffusers transformer block."""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close_to_reference", "quantized_transformer_block"]

# Kernel output vs the reference op, by output dtype. Integer paths differ from the reference only in the
# order of the fp32 sum over weight groups (per-channel outputs are bit-identical); the fused W4A16 kernel
# reassociates the dot product; half-precision outputs may differ by one or two rounding steps.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``expected.dtype``; atol scaled by the output range."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOLERANCES[expected.dtype]
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def quantized_transformer_block(scheme, schemes: dict | None = None, dim: int = 64, seed: int = 0):
    """``(block, x, enc)``: a diffusers ``BasicTransformerBlock`` (plain LayerNorms, GEGLU, cross-attention from
    48-wide text states) with every linear quantized with ``scheme`` (``schemes``: another per module name, None
    to keep it float), each static activation range calibrated on the block's own inputs ``x [2, 12, dim]`` (far
    from zero mean, as a residual stream is) and ``enc [2, 7, 48]``."""
    from diffusers.models.attention import BasicTransformerBlock

    from quantkit.nn import quantize_module

    torch.manual_seed(seed)
    block = BasicTransformerBlock(dim, 2, dim // 2, cross_attention_dim=48, activation_fn="geglu").eval()
    x, enc = torch.randn(2, 12, dim) * 2 + 3, torch.randn(2, 7, 48)
    ranges, hooks = {}, []
    for name, m in block.named_modules():
        if isinstance(m, torch.nn.Linear):
            def record(mod, args, name=name):
                ranges[name] = (float(args[0].min()), float(args[0].max()))
            hooks.append(m.register_forward_pre_hook(record))
    with torch.no_grad():
        block(x, encoder_hidden_states=enc)
    for h in hooks:
        h.remove()
    for name in ranges:
        parent, _, child = name.rpartition(".")
        owner = block.get_submodule(parent)
        sch = (schemes or {}).get(name, scheme)
        if sch is None:  # stays float
            continue
        rng = None if sch.act is None or sch.act.dynamic else ranges[name]
        setattr(owner, child, quantize_module(getattr(owner, child), sch, act_range=rng))
    return block, x, enc
