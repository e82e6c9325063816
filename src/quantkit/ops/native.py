"""Loading of the optional native kernel library ``quantkit._C`` (built from ``csrc/``).

A missing or failed build never breaks ``import quantkit``: the reference ops keep running, with one warning.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

__all__ = ["load_native", "native_status"]

logger = logging.getLogger("quantkit")
_STATUS: dict = {"loaded": False, "path": None, "error": None}


def load_native() -> bool:
    """Load ``quantkit._C`` if it was built; return whether native kernels are registered."""
    if _STATUS["loaded"] or _STATUS["error"]:
        return _STATUS["loaded"]
    if os.environ.get("QUANTKIT_DISABLE_NATIVE") == "1":
        _STATUS["error"] = "disabled by QUANTKIT_DISABLE_NATIVE=1"
        return False
    spec = importlib.util.find_spec("quantkit._C")
    if spec is None or spec.origin is None:
        _STATUS["error"] = "quantkit._C not built (reference kernels in use)"
        return False
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as exc:  # ABI mismatch, missing symbol...
        _STATUS["error"] = f"failed to load {spec.origin}: {exc}"
        logger.warning("quantkit: native kernels unavailable, using the reference ops (%s)", exc)
        return False
    _STATUS.update(loaded=True, path=spec.origin)
    return True


def native_status() -> dict:
    """``{"loaded", "path", "error"}`` describing the native kernel library."""
    return dict(_STATUS)
