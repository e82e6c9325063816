"""diffusers integration: ``DiffusionPipeline.from_pretrained`` loads quantkit exports after ``import quantkit``.

quantkit adds ``"quantkit"`` to diffusers' two quantizer dictionaries (``AUTO_QUANTIZER_MAPPING`` and
``AUTO_QUANTIZATION_CONFIG_MAPPING``). Loading then goes through diffusers' own path: the model is built on the
meta device, :meth:`QuantkitQuantizer._process_model_before_weight_loading` swaps the planned layers for empty
quantized twins with the saved shapes and dtypes, diffusers fills them from the safetensors shards (validating
every shape and naming the key on mismatch), and the after-loading step checks nothing was left unloaded.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

import torch
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from quantkit.errors import QuantkitError
from quantkit.export.qconfig import QUANT_METHOD, qconfig_to_plan
from quantkit.formats.spec import FORMAT_VERSION, LayerScheme
from quantkit.io import check_safetensors, read_json
from quantkit.models.pipeline import load_error_line
from quantkit.nn.fuse import fuse_on_first_gpu_call
from quantkit.nn.modules import QUANT_MODULES, compact
from quantkit.quantize.apply import swap_empty

__all__ = ["QuantkitMethod", "QuantkitQuantizationConfig", "QuantkitQuantizer", "register", "load_pipeline"]


class QuantkitMethod(str, Enum):
    """diffusers reads ``quant_method.value``: a str Enum member."""

    QUANTKIT = QUANT_METHOD


class QuantkitQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quantkit export (see :mod:`quantkit.export.qconfig`)."""

    def __init__(self, config_groups: dict | None = None, format_version: int = FORMAT_VERSION,
                 ignore: list[str] | None = None, quant_method: str = QUANT_METHOD, **kwargs):
        self.quant_method = QuantkitMethod.QUANTKIT
        self.config_groups = dict(config_groups or {})
        self.format_version = format_version
        self.ignore = list(ignore or [])

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "config_groups": self.config_groups, "ignore": self.ignore}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        n = sum(len(g.get("targets", [])) for g in self.config_groups.values())
        return f"QuantkitQuantizationConfig({len(self.config_groups)} groups, {n} layers)"

    def plan(self, layer_names: list[str] | None = None) -> dict[str, LayerScheme]:
        """``{fqn: LayerScheme}`` described by this config."""
        return qconfig_to_plan(self.to_dict(), layer_names)


class QuantkitQuantizer(DiffusersQuantizer):
    """Loads pre-quantized quantkit components; quantizing an FP checkpoint on load is not offered."""

    requires_calibration = True
    use_keep_in_fp32_modules = False
    required_packages = None

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def update_torch_dtype(self, torch_dtype: torch.dtype | None = None) -> torch.dtype:
        return torch.float32 if torch_dtype is None else torch_dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        names = [n for n, _ in model.named_modules()]
        swap_empty(model, self.quantization_config.plan(names))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for fqn, module in model.named_modules():
            if not isinstance(module, QUANT_MODULES):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if p.is_meta:
                    raise ValueError(f"quantized tensor '{fqn}.{pname}' is missing from the checkpoint")
            saved = tuple(int(v) for v in module.weight_shape.tolist())
            if saved != tuple(module._weight_shape):
                raise ValueError(f"'{fqn}.weight_shape' is {saved} but the model config gives "
                                 f"{tuple(module._weight_shape)}: quantization_config does not match the tensors")
        if os.environ.get("QUANTKIT_COMPACT", "1") != "0":
            compact(model)  # CPU layers keep only the native kernels' layout: each weight in memory once
            fuse_on_first_gpu_call(model)  # on a GPU, the fusions around the resident layers (bit for bit)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Add quantkit to diffusers' quantizer registry (idempotent; done by ``import quantkit``)."""
    _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QuantkitQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QuantkitQuantizationConfig


def _quantized_components(folder: Path) -> list[Path]:
    comps = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        cfg = sub / "config.json"
        if cfg.is_file() and "quantization_config" in read_json(cfg):
            comps.append(sub)
    return comps


def load_pipeline(path: str | Path, **kwargs):
    """Load a quantkit-exported pipeline folder (the explicit twin of ``DiffusionPipeline.from_pretrained``).

    Args:
        path: the folder written by ``quantkit export`` / ``quantkit run``.
        **kwargs: passed to ``DiffusionPipeline.from_pretrained`` (e.g. ``torch_dtype``).

    Raises:
        QuantkitError: not a pipeline folder, no quantized component, corrupted safetensors, or tensors that do
            not match the quantization_config.
    """
    from diffusers import DiffusionPipeline

    register()
    folder = Path(path)
    if not folder.is_dir():
        raise QuantkitError(f"pipeline folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise QuantkitError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    comps = _quantized_components(folder)
    if not comps:
        raise QuantkitError(f"{folder} has no quantkit-quantized component (no quantization_config in any config.json)")
    for comp in comps:
        qc = read_json(comp / "config.json")["quantization_config"]
        if qc.get("quant_method") != QUANT_METHOD:
            raise QuantkitError(f"{comp}: quant_method is {qc.get('quant_method')!r}, not 'quantkit'")
        files = sorted(comp.glob("*.safetensors"))
        if not files:
            raise QuantkitError(f"{comp} holds no .safetensors weights")
        for f in files:
            check_safetensors(f)
    kwargs.setdefault("use_safetensors", True)  # the other components too: never unpickle a .bin
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except QuantkitError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise QuantkitError(f"cannot load quantized pipeline {folder}: {load_error_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
