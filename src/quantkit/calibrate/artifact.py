"""The calibration artifact: one folder with ``stats.safetensors``, ``denoiser_io.safetensors`` and a manifest.

Layout (``<workdir>/calibration/``):

* ``stats.safetensors``: ``<fqn>.<stat>`` for every observed layer (see :class:`ActivationObserver.state`);
* ``denoiser_io.safetensors``: the denoiser's inputs and FP outputs at every sampling step, ``step<i>.<arg>``
  (positional args ``arg<j>``, keyword args ``kw.<name>``, nested dicts ``kw.<name>.<key>``) and ``step<i>.output``;
* ``manifest.json``: the resolved config, the layer list, the non-tensor arguments of each call, the prompts,
  timings and a fingerprint used to reuse the artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.io import atomic_output, load_safetensors, read_json

__all__ = ["CalibrationArtifact", "save_artifact", "load_artifact", "move_tensors"]

MANIFEST = "manifest.json"


def move_tensors(value, device: torch.device | str):
    """``value`` with every tensor inside (nested dicts, lists, tuples) moved to ``device``; other leaves kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move_tensors(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_tensors(v, device) for v in value)
    return value


@dataclass
class CalibrationArtifact:
    """In-memory form of the calibration folder."""

    stats: dict[str, dict[str, torch.Tensor]]
    steps: list[dict]  # each: {"args": {...}, "kwargs": {...}, "output": Tensor}; tensors and plain values
    manifest: dict = field(default_factory=dict)

    def act_range(self, fqn: str, skip_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """MixDQ's static range of a layer input: EMA min/max (of the tokens after the prefix if ``skip_prefix``)."""
        s = self.stats[fqn]
        key = "rest_ema_" if skip_prefix else "ema_"
        return s[key + "min"][0], s[key + "max"][0]

    def prefix_invariant(self, fqn: str, rtol: float = 1e-4) -> bool:
        """Whether the first token's input row was the same for every calibration prompt (verified, not assumed)."""
        s = self.stats.get(fqn, {})
        if "prefix_max_dev" not in s:
            return False
        return float(s["prefix_max_dev"][0]) <= rtol * max(float(s["prefix_ref"].abs().max()), 1e-12)

    def prefix_rows(self, fqn: str) -> torch.Tensor:
        """The prompt-invariant leading input rows ``[1, D]`` of a text-embedding layer."""
        return self.stats[fqn]["prefix_ref"]

    def token_report(self) -> dict | None:
        """Per-token-position absmax of the text embedding (first cross-attention key input), to show the outlier."""
        for fqn, s in self.stats.items():
            if "token_absmax" in s:
                tok = s["token_absmax"]
                return {"layer": fqn, "token_absmax": [round(float(v), 4) for v in tok],
                        "first_token_absmax": float(tok[0]), "other_tokens_absmax": float(tok[1:].max()),
                        "first_token_prompt_invariant": self.prefix_invariant(fqn)}
        return None


def _flatten(prefix: str, value, tensors: dict, plain: dict, seen: dict) -> None:
    if isinstance(value, torch.Tensor):
        # The same tensor is often passed at every step (text embeddings): store it once, refer to it after.
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if ident in seen:
            plain[prefix] = {"__ref__": seen[ident]}
        else:
            seen[ident] = prefix
            tensors[prefix] = value.detach().to("cpu").contiguous().clone()
    elif isinstance(value, dict):
        plain[prefix] = {"__dict__": sorted(value)}
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, tensors, plain, seen)
    elif value is None or isinstance(value, (bool, int, float, str)):
        plain[prefix] = value
    else:
        plain[prefix] = {"__unsupported__": type(value).__name__}


def _unflatten(prefix: str, tensors: dict, plain: dict):
    if prefix in tensors:
        return tensors[prefix]
    v = plain.get(prefix)
    if isinstance(v, dict) and "__ref__" in v:
        return tensors[v["__ref__"]]
    if isinstance(v, dict) and "__dict__" in v:
        return {k: _unflatten(f"{prefix}.{k}", tensors, plain) for k in v["__dict__"]}
    return v


def save_artifact(art: CalibrationArtifact, folder: Path) -> None:
    """Write the artifact to ``folder`` atomically."""
    with atomic_output(folder) as tmp:
        stats = {f"{fqn}.{k}": v.contiguous() for fqn, d in art.stats.items() for k, v in d.items()}
        save_file(stats, tmp / "stats.safetensors")
        tensors: dict = {}
        plain: dict = {}
        seen: dict = {}
        for i, step in enumerate(art.steps):
            for j, a in enumerate(step["args"]):
                _flatten(f"step{i}.arg{j}", a, tensors, plain, seen)
            for k, v in step["kwargs"].items():
                _flatten(f"step{i}.kw.{k}", v, tensors, plain, seen)
            tensors[f"step{i}.output"] = step["output"].detach().cpu().contiguous()
        save_file(tensors, tmp / "denoiser_io.safetensors")
        manifest = dict(art.manifest)
        manifest["steps"] = [{"num_args": len(s["args"]), "kwargs": sorted(s["kwargs"])} for s in art.steps]
        manifest["plain_values"] = plain
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load_artifact(folder: Path) -> CalibrationArtifact:
    """Read a calibration folder (safetensors + JSON only).

    Raises:
        QuantkitError: missing or corrupted files.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise QuantkitError(f"no calibration found in {folder}; run quantkit calibrate first")
    manifest = read_json(folder / MANIFEST)
    flat = load_safetensors(folder / "stats.safetensors")
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        fqn, stat = key.rsplit(".", 1)
        stats.setdefault(fqn, {})[stat] = value
    io = load_safetensors(folder / "denoiser_io.safetensors")
    plain = manifest.get("plain_values", {})
    steps = []
    for i, desc in enumerate(manifest.get("steps", [])):
        args = [_unflatten(f"step{i}.arg{j}", io, plain) for j in range(desc["num_args"])]
        kwargs = {k: _unflatten(f"step{i}.kw.{k}", io, plain) for k in desc["kwargs"]}
        steps.append({"args": args, "kwargs": kwargs, "output": io[f"step{i}.output"]})
    return CalibrationArtifact(stats=stats, steps=steps, manifest=manifest)
