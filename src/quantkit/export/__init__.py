"""Export of quantized pipelines in the canonical packed format."""

from quantkit.export.qconfig import QUANT_METHOD, plan_to_qconfig, qconfig_to_plan
from quantkit.export.writer import WEIGHTS_NAME, export_pipeline, write_quantized_component

__all__ = ["QUANT_METHOD", "WEIGHTS_NAME", "export_pipeline", "plan_to_qconfig", "qconfig_to_plan",
           "write_quantized_component"]
