"""Quantized modules."""

from quantkit.nn.modules import (
    QUANT_MODULES,
    QuantConv2d,
    QuantLinear,
    empty_quant_module,
    is_quantizable,
    quantize_module,
)

__all__ = ["QUANT_MODULES", "QuantConv2d", "QuantLinear", "empty_quant_module", "is_quantizable", "quantize_module"]
