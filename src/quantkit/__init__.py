"""quantkit: post-training quantization for diffusers text-to-image pipelines.

``import quantkit`` registers the ``quantkit`` quantization method with diffusers, so
``DiffusionPipeline.from_pretrained(exported_folder)`` returns the quantized pipeline.
"""

from quantkit import ops as _ops  # noqa: F401  (defines the quantkit:: ops, loads native kernels)
from quantkit.config import QuantkitConfig, load_config
from quantkit.errors import QuantkitError
from quantkit.integrations.diffusers import load_pipeline, register
from quantkit.nn import compact, expand, fuse, unfuse
from quantkit.stages import allocate, analyze, calibrate, evaluate_export, export, inspect_export, run

__version__ = "0.1.0"

__all__ = [
    "QuantkitConfig",
    "QuantkitError",
    "allocate",
    "analyze",
    "calibrate",
    "compact",
    "evaluate_export",
    "expand",
    "export",
    "fuse",
    "inspect_export",
    "load_config",
    "load_pipeline",
    "run",
    "unfuse",
    "__version__",
]

register()
