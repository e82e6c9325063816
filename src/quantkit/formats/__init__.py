"""Packed on-disk formats: the one description of quantized bits (design.md section 4)."""

from quantkit.formats.pack import dequantize_weight, pack, quantize_weight, unpack
from quantkit.formats.spec import (
    ACT_BITS,
    FORMAT_VERSION,
    WEIGHT_BITS,
    ActFormat,
    LayerScheme,
    WeightFormat,
    bits_per_weight,
    values_per_word,
)

__all__ = [
    "ACT_BITS",
    "FORMAT_VERSION",
    "WEIGHT_BITS",
    "ActFormat",
    "LayerScheme",
    "WeightFormat",
    "bits_per_weight",
    "dequantize_weight",
    "pack",
    "quantize_weight",
    "unpack",
    "values_per_word",
]
