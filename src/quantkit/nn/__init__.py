"""Quantized modules."""

from quantkit.nn.fuse import fuse, unfuse
from quantkit.nn.modules import (
    QUANT_MODULES,
    QuantConv2d,
    QuantLinear,
    compact,
    empty_quant_module,
    expand,
    is_quantizable,
    quantize_module,
)

__all__ = ["QUANT_MODULES", "QuantConv2d", "QuantLinear", "compact", "empty_quant_module", "expand", "fuse",
           "is_quantizable", "quantize_module", "unfuse"]
