"""Quantization: resolve per-layer plans and apply round-to-nearest quantization."""

from quantkit.quantize.apply import quantize_denoiser, set_submodule, swap_empty
from quantkit.quantize.plan import resolve_plan, validate_plan

__all__ = ["quantize_denoiser", "resolve_plan", "set_submodule", "swap_empty", "validate_plan"]
