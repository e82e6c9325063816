"""Input Gram matrices ``H = X^T X`` of layers, from the calibration run's recorded denoiser inputs.

The calibration artifact stores the denoiser's inputs at every sampling step; replaying them through the FP
denoiser with forward pre-hooks gives each layer's inputs ``X`` (im2col patches for convolutions, in PyTorch's
``[C, kh, kw]`` weight order) without keeping them: only ``X^T X`` per split is accumulated. Calls are split by
index into ``train`` and held-out sets (``val``, and ``test`` when asked), so early stopping and reported errors
use inputs the learning never saw. Layers are processed in chunks that fit ``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerGram", "collect_grams", "default_split", "layer_patches"]


def default_split(i: int) -> str:
    """Every fifth recorded denoiser call is held out for validation, the rest trains."""
    return "val" if i % 5 == 4 else "train"


@dataclass
class LayerGram:
    """``sum x x^T`` over the inputs of one layer, per split, and the number of rows summed."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def mean(self, split: str) -> torch.Tensor:
        """``X^T X / n`` of a split (``[K, K]`` float32)."""
        return self.grams[split] / max(self.rows[split], 1)


def layer_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``[N, K]`` a Linear / Conv2d multiplies by its flattened weight."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_grams(denoiser: nn.Module, fqns: Sequence[str], steps: Sequence[dict],
                  split: Callable[[int], str] = default_split, max_bytes: int = 1 << 30) -> dict[str, LayerGram]:
    """Replay recorded denoiser calls and accumulate every listed layer's input Gram matrix per split.

    Args:
        denoiser: the floating-point denoiser (its layers must not be quantized yet).
        fqns: the Linear / Conv2d layers to observe.
        steps: recorded calls, ``{"args": [...], "kwargs": {...}}`` (``CalibrationArtifact.steps``).
        split: call index -> split name.
        max_bytes: memory for Gram matrices per replay pass; more layers take more passes.

    Returns:
        ``{fqn: LayerGram}``.
    """
    modules = {f: denoiser.get_submodule(f) for f in fqns}
    splits = sorted({split(i) for i in range(len(steps))})
    sizes = {f: math.prod(m.weight.shape[1:]) for f, m in modules.items()}
    chunks: list[list[str]] = [[]]
    used = 0
    for f in fqns:
        need = 4 * sizes[f] ** 2 * len(splits)
        if chunks[-1] and used + need > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(f)
        used += need
    out: dict[str, LayerGram] = {}
    phase = {"name": "train"}
    for chunk in chunks:
        grams = {f: LayerGram({s: torch.zeros(sizes[f], sizes[f]) for s in splits}, dict.fromkeys(splits, 0))
                 for f in chunk}
        handles = []
        for f in chunk:
            def hook(m, args, f=f):
                x = layer_patches(m, args[0].detach().to(torch.float32))
                grams[f].grams[phase["name"]].addmm_(x.T, x)
                grams[f].rows[phase["name"]] += x.shape[0]

            handles.append(modules[f].register_forward_pre_hook(hook))
        try:
            for i, step in enumerate(steps):
                phase["name"] = split(i)
                denoiser(*step["args"], **step["kwargs"])
        finally:
            for h in handles:
                h.remove()
        out.update(grams)
    return out
