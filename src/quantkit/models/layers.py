"""Layer discovery in a denoiser and the one rule that tags each layer's role (MixDQ's metric decoupling).

Roles: ``content`` = cross-attention (``attn2``) and feed-forward (``ff``) layers, whose quantization moves the
image *content* and text alignment (measured by image SSIM); ``quality`` = everything else (measured by the SQNR
of the denoiser output).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.nn.modules import QUANT_MODULES, is_quantizable

__all__ = ["CONTENT_PATTERNS", "TEXT_KV_PATTERN", "LayerInfo", "role_of", "is_text_kv", "find_layers", "match",
           "check_pattern", "select_layers"]

CONTENT_PATTERNS = (r"(^|\.)attn2\.", r"(^|\.)ff\.")
# Cross-attention key/value projections read the text encoder's hidden states: MixDQ's BOS-aware candidates.
TEXT_KV_PATTERN = r"(^|\.)attn2\.to_(k|v)$"


def is_text_kv(fqn: str) -> bool:
    """Whether ``fqn`` projects the text embedding (cross-attention ``to_k``/``to_v``)."""
    return re.search(TEXT_KV_PATTERN, fqn) is not None


def role_of(fqn: str, content_patterns: Iterable[str] = CONTENT_PATTERNS) -> str:
    """``"content"`` for cross-attention / feed-forward layers, ``"quality"`` for the rest."""
    return "content" if any(re.search(p, fqn) for p in content_patterns) else "quality"


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer of the denoiser."""

    fqn: str
    kind: str  # "linear" | "conv"
    weight_shape: tuple[int, ...]
    role: str

    @property
    def in_features(self) -> int:
        """Length of a flattened weight row (``C*kh*kw`` for convs)."""
        return math.prod(self.weight_shape[1:])

    @property
    def num_weights(self) -> int:
        """Number of weight elements."""
        return math.prod(self.weight_shape)


def find_layers(denoiser: nn.Module) -> list[LayerInfo]:
    """Every quantizable Conv2d and Linear of ``denoiser`` (already-quantized layers included), in module order.

    Norms, attention matmuls, embeddings and grouped/depthwise convs are not listed: they stay floating point.
    """
    layers = []
    for fqn, module in denoiser.named_modules():
        if isinstance(module, QUANT_MODULES):
            shape = tuple(module._weight_shape)
        elif is_quantizable(module):
            shape = tuple(module.weight.shape)
        else:
            continue
        kind = "conv" if isinstance(module, nn.Conv2d) or len(shape) == 4 else "linear"
        layers.append(LayerInfo(fqn, kind, shape, role_of(fqn)))
    return layers


def match(pattern: str, fqn: str) -> bool:
    """Whether ``pattern`` (an exact name, or a regex prefixed with ``re:``) selects ``fqn``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return pattern == fqn


def check_pattern(pattern: str) -> None:
    """Raise ValueError where ``pattern`` is a ``re:`` regex that does not compile (exact names always do)."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"invalid regex '{pattern}': {exc}") from None


def select_layers(layers: list[LayerInfo], targets: list[str], ignore: list[str],
                  what: str = "targets") -> list[LayerInfo]:
    """Layers matched by any of ``targets`` and none of ``ignore``.

    Raises:
        QuantkitError: a pattern is an invalid regex, or matches no layer (a typo would otherwise silently
            quantize nothing).
    """
    names = [layer.fqn for layer in layers]
    for kind, patterns in ((what, targets), ("ignore", ignore)):
        for p in patterns:
            try:
                check_pattern(p)
            except ValueError as exc:
                raise QuantkitError(f"quantization.{kind}: {exc}") from None
            if not any(match(p, n) for n in names):
                example = names[0] if names else "(none)"
                raise QuantkitError(
                    f"quantization.{kind}: '{p}' matches no quantizable layer of this model "
                    f"({len(names)} layers, e.g. '{example}'; regexes need the 're:' prefix and match full names)"
                )
    return [layer for layer in layers
            if any(match(p, layer.fqn) for p in targets) and not any(match(p, layer.fqn) for p in ignore)]
