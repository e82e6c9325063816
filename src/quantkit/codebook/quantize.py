"""Quantize one Linear / Conv2d into a learned codebook (JLCM) layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from quantkit.codebook.calib import LayerGram
from quantkit.codebook.learn import CodebookFit, LearnSettings, fit_codebook
from quantkit.formats.spec import LayerScheme
from quantkit.nn.modules import codebook_module

__all__ = ["column_weight", "quantize_layer"]


def column_weight(module: nn.Module, channel_sqmean: torch.Tensor | None) -> torch.Tensor | None:
    """Per-column input second moment ``E[x_j^2]`` of the flattened weight from calibration's per-channel
    ``channel_sqmean`` (a conv channel covers ``kh*kw`` columns); None when calibration did not record it."""
    if channel_sqmean is None:
        return None
    k = math.prod(module.weight.shape[1:])
    per = k // channel_sqmean.numel()
    if per * channel_sqmean.numel() != k:
        return None
    return channel_sqmean.to(torch.float32).repeat_interleave(per)


def quantize_layer(module: nn.Module, scheme: LayerScheme, gram: LayerGram, settings: LearnSettings | None = None,
                   channel_sqmean: torch.Tensor | None = None) -> tuple[nn.Module, CodebookFit]:
    """Learn the codebook weight of ``module`` and return its quantized twin and the fit.

    Args:
        module: the float Linear / Conv2d.
        scheme: a codebook scheme.
        gram: the layer's input Gram matrices (``train``, optionally ``val``).
        settings: learning settings (defaults when None).
        channel_sqmean: calibration's per-input-channel second moment (initialisation weights).

    Raises:
        ValueError: ``scheme`` is not a codebook scheme.
    """
    if not scheme.is_codebook:
        raise ValueError(f"quantize_layer needs a codebook scheme, got {scheme.name}")
    h_val = gram.mean("val") if gram.rows.get("val") else None
    fit = fit_codebook(module.weight, scheme.weight, gram.mean("train"), h_val,
                       column_weight(module, channel_sqmean), settings)
    return codebook_module(module, scheme, fit.tensors()), fit
