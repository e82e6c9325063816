"""Fusions of quantized layers with the work around them, on Hopper GPUs with Triton.

:func:`fuse` rewires diffusers' ``FeedForward`` blocks whose output linear is a GPU-resident layer with static 8-bit
activations (what ``pipe.to("cuda")`` makes of a W8A8 export): the GEGLU gating (``hidden * gelu(gate)``) and the
output linear's activation quantization become one Triton kernel (:func:`quantkit.ops.triton_gemm.geglu_quant`)
that reads the projection once and writes int8 codes, which the resident kernel multiplies directly. Unfused, the
step runs a GELU kernel, a multiply and a quantization kernel over the same activations (on an SDXL step on an H200
about 1.3 + 1.2 ms of GELU and multiply, and the quantization's share of 2.7 ms). The codes are bit for bit the
unfused ones. Opt-in until measured on a GPU; :func:`unfuse` undoes it. Anything the fused path cannot take
(canonical weights, e.g. on the CPU; training mode; dynamic activations) runs the block's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from quantkit.nn.modules import QuantLinear


def _geglu_block(module: nn.Module) -> bool:
    """A diffusers ``FeedForward``: ``net`` = [GEGLU with exact GELU, Dropout, a quantized output linear with
    static 8-bit activations and no BOS prefix]."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) != 3:
        return False
    geglu, drop, out = net
    return (type(geglu).__name__ == "GEGLU" and getattr(geglu, "approximate", "none") == "none"
            and isinstance(getattr(geglu, "proj", None), nn.Module) and isinstance(drop, nn.Dropout)
            and isinstance(out, QuantLinear) and out.scheme.act is not None and not out.scheme.act.dynamic
            and out.scheme.act.bits == 8 and out.scheme.prefix_tokens == 0 and not out.scheme.is_codebook)


def _fusable_now(block: nn.Module, x: torch.Tensor) -> bool:
    """The output linear holds GPU-resident weights (made only on CUDA, where the Triton kernels run) on ``x``'s
    device, and the block is in eval mode (no dropout)."""
    out = block.net[2]
    w = out.weight_packed
    return (not block.training and w.dtype == torch.int8 and w.device == x.device
            and out.weight_scale.dtype == torch.float16 and out.weight_scale.shape[1] == 1
            and out.scheme.weight.bits in (4, 8) and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _fused_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _fusable_now(self, hidden_states):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    from quantkit.ops import triton_gemm

    out = self.net[2]
    p = self.net[0].proj(hidden_states)
    codes = triton_gemm.geglu_quant(p.reshape(-1, p.shape[-1]), out.input_scale, out.input_zero_point, 8)
    y = triton_gemm.resident_linear(codes, out.weight_packed, out.weight_zero_point, out.weight_scale,
                                    out.input_scale, out.input_zero_point, out.bias, out.scheme.weight.bits, p.dtype)
    return y.reshape(*p.shape[:-1], y.shape[-1])


def fuse(model: nn.Module) -> int:
    """Fuse the GEGLU gating of every eligible ``FeedForward`` in ``model`` with its output linear's activation
    quantization (see the module docstring). Returns the number of blocks fused."""
    n = 0
    for m in model.modules():
        if _geglu_block(m) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_fused_forward, m)
            n += 1
    return n


def unfuse(model: nn.Module) -> None:
    """Undo :func:`fuse`."""
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) is _fused_forward:
            del m.forward
