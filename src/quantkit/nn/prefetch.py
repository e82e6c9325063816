"""4-bit weights widened ahead of their layers on a side CUDA stream (opt-in, ``QUANTKIT_W4_PREFETCH=1`` in
:func:`quantkit.fuse`, until measured on a GPU).

A resident 4-bit linear runs on the 8-bit kernels after a per-call widening of its nibbles
(:func:`quantkit.ops.triton_gemm.widen_w4`): a memory-bound pass on the critical path, 2.8 ms of the fused W4A8 SDXL
step on an H100 and the whole gap to W8A8 (28.28 vs 25.70 ms, docs/results.md). Here a forward pre-hook on each
diffusers ``BasicTransformerBlock`` widens the block's resident 4-bit linears, in the order they run, on a side
stream, recording one event per layer; each layer makes the current stream wait for its own event only
(:meth:`~quantkit.nn.modules.QuantLinear.kernel_weight`) and multiplies the widened blob, so the widening of later
layers runs while the GEMMs of earlier ones keep the tensor cores busy. The outputs are the same bit for bit (the
widened blob is what the per-call path makes).

Streams: the side stream first waits for the current one (the fork), each widened blob is allocated on the current
stream before the side stream writes it (so it is freed in the current stream's order, after its GEMM), and a
post-hook makes the current stream wait for the side one (the join): CUDA graph capture records the fork and the
join. Under ``torch.compile`` tracing the hooks do nothing (the per-call widening runs). The transient blobs of one
block live until its layers have run (about 33 MB for an SDXL 1280-wide block).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from quantkit.nn.modules import QuantLinear

_STREAMS: dict[int, torch.cuda.Stream] = {}


def selected() -> bool:
    """``QUANTKIT_W4_PREFETCH=1``."""
    return os.environ.get("QUANTKIT_W4_PREFETCH", "0") == "1"


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def _attention_layers(attn: nn.Module | None) -> list[nn.Module]:
    """An ``Attention``'s projections in the order they run (one fused q/k/v or k/v layer after quantkit.fuse)."""
    if attn is None:
        return []
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        projections = [attn.to_qkv]
    elif getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):
        projections = [attn.to_q, attn.to_kv]
    else:
        projections = [attn.to_q, attn.to_k, attn.to_v]
    return projections + [attn.to_out[0]]


def block_layers(block: nn.Module) -> list[QuantLinear]:
    """The 4-bit resident linears of a diffusers ``BasicTransformerBlock`` that its forward calls, in that order:
    self-attention, cross-attention, feed-forward (the GEGLU projection, then the output linear)."""
    ff = getattr(block, "ff", None)
    ff_layers = []
    if ff is not None and isinstance(getattr(ff, "net", None), nn.ModuleList) and len(ff.net) == 3:
        ff_layers = [getattr(ff.net[0], "proj", None), ff.net[2]]
    layers = (_attention_layers(getattr(block, "attn1", None)) + _attention_layers(getattr(block, "attn2", None))
              + ff_layers)
    return [q for q in layers if isinstance(q, QuantLinear) and _widenable(q)]


def _widenable(q: QuantLinear) -> bool:
    from quantkit.ops import resident

    w = q.weight_packed
    return (q.scheme.weight.bits == 4 and not q.scheme.is_codebook and w.dtype == torch.int8
            and resident.width_of(w, 4, q.in_features) == 4)


def _before(block: nn.Module, args, kwargs) -> None:
    from quantkit.ops import resident, triton_gemm

    if torch.compiler.is_compiling():
        return
    layers = block_layers(block)
    if not layers or not layers[0].weight_packed.is_cuda:
        return
    device = layers[0].weight_packed.device
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    outs = [torch.empty((q.weight_packed.shape[0], resident.row_bytes(8, q.in_features)), dtype=torch.int8,
                        device=device) for q in layers]  # on the current stream: freed in its order
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for q, out in zip(layers, outs):
            _, wzp = resident.kernel_format(q.weight_packed, 4, q.weight_zero_point, q.in_features)
            triton_gemm.widen_w4(q.weight_packed, wzp, q.in_features, out=out)
            done = torch.cuda.Event()
            done.record(side)
            q._ahead = (out, done)
    block.__dict__["_prefetched"] = (layers, main, side)


def _after(block: nn.Module, args, kwargs, output) -> None:
    pending = block.__dict__.pop("_prefetched", None)
    if pending is None:
        return
    layers, main, side = pending
    for q in layers:
        if q.__dict__.get("_ahead") is not None:  # widened but not called (a branch the forward did not take)
            q.kernel_weight()  # wait, then drop
    main.wait_stream(side)


def install(model: nn.Module) -> int:
    """Hook every ``BasicTransformerBlock`` of ``model`` (once); returns the number hooked."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "BasicTransformerBlock" and "_prefetch_hooks" not in m.__dict__:
            m._prefetch_hooks = (m.register_forward_pre_hook(_before, with_kwargs=True),
                                 m.register_forward_hook(_after, with_kwargs=True))
            n += 1
    return n


def remove(model: nn.Module) -> None:
    """Undo :func:`install`."""
    for m in model.modules():
        hooks = m.__dict__.pop("_prefetch_hooks", None)
        for h in hooks or ():
            h.remove()
