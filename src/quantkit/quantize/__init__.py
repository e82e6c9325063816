"""Quantization: resolve per-layer plans and apply round-to-nearest quantization."""

from quantkit.quantize.apply import quantize_denoiser, set_submodule, swap_empty
from quantkit.quantize.plan import apply_bos, resolve_plan, validate_plan

__all__ = ["apply_bos", "quantize_denoiser", "resolve_plan", "set_submodule", "swap_empty", "validate_plan"]
