"""Export: write a complete diffusers pipeline folder whose denoiser holds the packed quantized tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from quantkit.export.qconfig import plan_to_qconfig
from quantkit.formats.spec import LayerScheme
from quantkit.io import atomic_output

__all__ = ["WEIGHTS_NAME", "write_quantized_component", "export_pipeline"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Quantization parameters keep their format dtype whatever the export dtype (see formats/spec.py).
_FORMAT_TENSORS = ("weight_scale", "input_scale", "weight_codebook")


def write_quantized_component(denoiser: nn.Module, plan: dict[str, LayerScheme], folder: Path,
                              float_dtype: str = "keep", ignore: list[str] | None = None) -> None:
    """Write ``config.json`` (with ``quantization_config``) and the safetensors weights of a quantized denoiser."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(denoiser.to_json_string())
    config["quantization_config"] = plan_to_qconfig(plan, ignore)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    cast = _FLOAT_DTYPES.get(float_dtype)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in denoiser.state_dict().items():
        t = value.detach()
        if cast is not None and t.is_floating_point() and not key.endswith(_FORMAT_TENSORS):
            t = t.to(cast)
        ptr = t.untyped_storage().data_ptr()
        t = t.clone() if ptr in seen else t.contiguous()  # safetensors refuses shared storage
        seen.add(ptr)
        tensors[key] = t
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": "quantkit"})


def export_pipeline(pipe, denoiser_name: str, plan: dict[str, LayerScheme], out: str | Path,
                    overwrite: bool = False, float_dtype: str = "keep", ignore: list[str] | None = None) -> Path:
    """Write ``pipe`` (whose denoiser is already quantized) as a diffusers folder at ``out``, atomically.

    Raises:
        QuantkitError: ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out)
    with atomic_output(out, overwrite) as tmp:
        items = [(n, c) for n, c in pipe.components.items() if c is not None]
        for name, component in tqdm(items, desc="export", unit="component"):
            if name == denoiser_name:
                write_quantized_component(component, plan, tmp / name, float_dtype, ignore)
            elif hasattr(component, "save_pretrained"):
                component.save_pretrained(tmp / name)
        pipe.save_config(tmp)
    return out
