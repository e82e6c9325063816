"""Sensitivity analysis and the metrics it (and every stage) uses."""

from quantkit.sensitivity.metrics import MAX_DB, psnr, sqnr, ssim

__all__ = ["MAX_DB", "psnr", "sqnr", "ssim"]
