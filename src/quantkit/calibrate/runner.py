"""The calibration stage: run the FP pipeline over prompts, observe layer inputs, record denoiser I/O."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from quantkit.calibrate.artifact import CalibrationArtifact, load_artifact, move_tensors, save_artifact
from quantkit.calibrate.observers import OBSERVERS
from quantkit.config import CalibrationSettings
from quantkit.models.layers import LayerInfo, is_text_kv
from quantkit.models.pipeline import denoiser_of, generate
from quantkit.prompts import load_prompts

__all__ = ["calibrate_pipeline", "fingerprint", "load_or_calibrate"]


def fingerprint(model: str, settings: CalibrationSettings, layers: list[LayerInfo]) -> str:
    """Hash of everything a calibration result depends on (model, settings, observed layers)."""
    blob = json.dumps({"model": model, "settings": settings.model_dump(mode="json"),
                       "layers": [layer.fqn for layer in layers]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibrate_pipeline(pipe, settings: CalibrationSettings, layers: list[LayerInfo],
                       model: str = "") -> CalibrationArtifact:
    """Run the pipeline over the calibration prompts at every sampling step and collect statistics.

    Args:
        pipe: a floating-point diffusers pipeline.
        settings: prompts, sampling and observer settings.
        layers: the layers whose inputs are observed.
        model: the model spec, recorded in the manifest.

    Returns:
        The in-memory artifact; see :mod:`quantkit.calibrate.artifact` for its contents.
    """
    _, denoiser = denoiser_of(pipe)
    modules = dict(denoiser.named_modules())
    observer_cls = OBSERVERS["minmax"]
    observers = {}
    prefix_observers = {}
    handles = []
    for layer in layers:
        obs = observer_cls(channel_dim=1 if layer.kind == "conv" else -1, momentum=settings.ema_momentum,
                           bins_per_octave=settings.histogram_bins_per_octave)
        observers[layer.fqn] = obs
        handles.append(modules[layer.fqn].register_forward_pre_hook(lambda m, args, obs=obs: obs.update(args[0])))
        if is_text_kv(layer.fqn):
            pobs = OBSERVERS["prefix"](momentum=settings.ema_momentum,
                                       bins_per_octave=settings.histogram_bins_per_octave)
            prefix_observers[layer.fqn] = pobs
            handles.append(modules[layer.fqn].register_forward_pre_hook(lambda m, args, o=pobs: o.update(args[0])))

    steps: list[dict] = []

    def record(module: nn.Module, args, kwargs, output):  # kept on the CPU whatever the pipeline's device
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        steps.append({"args": move_tensors(list(args), "cpu"), "kwargs": move_tensors(dict(kwargs), "cpu"),
                      "output": out.detach().to("cpu", copy=True)})

    handles.append(denoiser.register_forward_hook(record, with_kwargs=True))
    prompts = load_prompts(settings.prompts, settings.num_prompts)
    start = time.perf_counter()
    try:
        batches = range(0, len(prompts), settings.batch_size)
        for b in tqdm(batches, desc="calibrate", unit="batch"):
            generate(pipe, prompts[b:b + settings.batch_size], settings.num_inference_steps, settings.guidance_scale,
                     settings.seed + b, settings.height, settings.width, output_type="latent")
    finally:
        for h in handles:
            h.remove()
    manifest = {
        "model": model,
        "pipeline_class": type(pipe).__name__,
        "calibration": settings.model_dump(mode="json"),
        "prompts": prompts,
        "layers": [{"fqn": la.fqn, "kind": la.kind, "role": la.role, "weight_shape": list(la.weight_shape)}
                   for la in layers],
        "fingerprint": fingerprint(model, settings, layers),
        "seconds": round(time.perf_counter() - start, 2),
        "denoiser_calls": len(steps),
    }
    stats = {fqn: obs.state() for fqn, obs in observers.items() if obs.batches}
    for fqn, pobs in prefix_observers.items():
        if fqn in stats:
            stats[fqn].update(pobs.state())
    art = CalibrationArtifact(stats=stats, steps=steps, manifest=manifest)
    art.manifest["text_token_report"] = art.token_report()
    return art


def load_or_calibrate(pipe, settings: CalibrationSettings, layers: list[LayerInfo], model: str, folder: Path,
                      force: bool = False) -> CalibrationArtifact:
    """Reuse the calibration in ``folder`` when its fingerprint matches; otherwise calibrate and save it."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not force and manifest_path.is_file():
        try:
            same = json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint(model, settings, layers)
        except json.JSONDecodeError:
            same = False
        if same:
            return load_artifact(folder)
    art = calibrate_pipeline(pipe, settings, layers, model)
    save_artifact(art, folder)
    return art
