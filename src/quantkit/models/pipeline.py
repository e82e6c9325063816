"""Loading diffusers pipelines (local folder, built-in, or hub id) and running them reproducibly."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError

__all__ = [
    "BUILTIN_MODELS",
    "DENOISER_NAMES",
    "cache_dir",
    "resolve_model",
    "check_device",
    "load_fp_pipeline",
    "resolve_device",
    "denoiser_of",
    "family_of",
    "generate",
]

DENOISER_NAMES = ("unet", "transformer")
BUILTIN_MODELS = ("digits", "tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-lcm")


def cache_dir() -> Path:
    """Where built-in pipelines are built once (``$QUANTKIT_CACHE`` or ``~/.cache/quantkit``)."""
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def _builtin_folder(name: str) -> Path:
    if name == "digits":
        try:
            from quantkit.reference import DEFAULT_PIPELINE_DIR
        except ImportError:
            DEFAULT_PIPELINE_DIR = None
        if DEFAULT_PIPELINE_DIR is None or not (Path(DEFAULT_PIPELINE_DIR) / "model_index.json").is_file():
            raise QuantkitError("builtin:digits (the trained reference model) is not part of this installation; "
                                "use builtin:tiny-sd or a pipeline folder")
        return Path(DEFAULT_PIPELINE_DIR)
    if name.startswith("tiny-"):
        from quantkit.testing.tiny import build_tiny

        folder = cache_dir() / "builtin" / name
        if not (folder / "model_index.json").is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            build_tiny(name.removeprefix("tiny-"), tmp)
            tmp.rename(folder) if not folder.exists() else None
        return folder
    raise QuantkitError(f"unknown built-in model 'builtin:{name}'; choose one of: "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))


def resolve_model(spec: str) -> str:
    """Turn a model spec (``builtin:NAME``, a local folder, or a hub id) into what ``from_pretrained`` takes.

    Raises:
        QuantkitError: the folder is missing or is not a diffusers pipeline folder.
    """
    if spec.startswith("builtin:"):
        return str(_builtin_folder(spec.removeprefix("builtin:")))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QuantkitError(f"model path {path} is a file; pass a diffusers pipeline folder")
        if not (path / "model_index.json").is_file():
            raise QuantkitError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                                "pass the folder written by save_pretrained")
        return str(path)
    if not spec.startswith((".", "/", "~")) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec):
        return spec  # a hub id: from_pretrained resolves it (needs network access)
    raise QuantkitError(f"model folder not found: {spec}")


def check_device(spec: str) -> torch.device:
    """A ``cpu`` / ``cuda`` / ``cuda:N`` device string as a ``torch.device`` (ValueError naming the valid forms)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {spec!r} is not cpu, cuda or cuda:N")
    return device


def resolve_device(spec: str | None) -> torch.device:
    """The device a stage runs pipelines on: ``spec``, or the GPU when CUDA is available, else the CPU.

    Raises:
        QuantkitError: not a cpu/cuda device, or a CUDA device asked for and CUDA is not available (or has
            fewer GPUs).
    """
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = check_device(spec)
    except ValueError as exc:
        raise QuantkitError(str(exc)) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantkitError(f"device {spec!r} asked for, but this torch has no CUDA device; ask for cpu "
                                "(or leave the device unset to use the GPU when there is one)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QuantkitError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def load_fp_pipeline(spec: str, torch_dtype: torch.dtype | None = None):
    """Load a floating-point diffusers pipeline from a model spec (see :func:`resolve_model`).

    Only safetensors weights are read (``use_safetensors=True``): a component stored as a pickle
    (``.bin``/``.ckpt``) is refused with a message naming the fix, never unpickled.
    """
    from diffusers import DiffusionPipeline

    target = resolve_model(spec)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(target, use_safetensors=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise QuantkitError(f"cannot load pipeline '{spec}': {load_error_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    denoiser_of(pipe)
    return pipe


SAFETENSORS_ONLY = ("quantkit reads only safetensors weights (never pickles): re-save it with "
                    "save_pretrained(..., safe_serialization=True) or pick a repository that has .safetensors files")


def load_error_line(exc: BaseException) -> str:
    """The first line of a loading error, with the safetensors-only fix when a pickle file is what was found."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if re.search(r"safetensors|pytorch_model\.bin|diffusion_pytorch_model\.bin", text, re.I):
        first = f"{first.rstrip('.')}; {SAFETENSORS_ONLY}"
    return first


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """``(component name, module)`` of the pipeline's denoiser (``unet`` or ``transformer``)."""
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise QuantkitError(f"{type(pipe).__name__} has no unet or transformer component to quantize")


def family_of(pipe) -> str:
    """``sd`` (SD 1.x/2.x, SD-Turbo, LCM), ``sdxl``, ``pixart`` or the pipeline class name."""
    name = type(pipe).__name__
    if "XL" in name:
        return "sdxl"
    if "PixArt" in name:
        return "pixart"
    if name.startswith(("StableDiffusion", "LatentConsistency")):
        return "sd"
    return name


def generate(pipe, prompts: list[str], num_inference_steps: int, guidance_scale: float | None, seed: int,
             height: int | None = None, width: int | None = None, output_type: str = "np"):
    """Run the pipeline with one generator per prompt (``seed + index``), so images do not depend on batching.

    Args:
        seed: base seed; prompt ``i`` of this call uses ``seed + i`` (pass a shifted seed for later batches).
        guidance_scale: classifier-free guidance; None keeps the pipeline's default.
    """
    params = inspect.signature(pipe.__call__).parameters
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    kwargs = dict(prompt=prompts, num_inference_steps=num_inference_steps, generator=gens, output_type=output_type)
    if guidance_scale is not None:  # None: the pipeline's own default
        kwargs["guidance_scale"] = guidance_scale
    if height is not None:
        kwargs.update(height=height, width=width or height)
    if "use_resolution_binning" in params:
        kwargs["use_resolution_binning"] = False  # keep the requested size (tiny and custom models)
    with torch.inference_mode():
        return pipe(**kwargs).images
