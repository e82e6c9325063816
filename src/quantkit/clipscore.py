"""Text alignment and distribution shift of any pipeline's images, measured with a CLIP model.

Fidelity to FP (PSNR/SSIM of each image against the FP image of the same prompt and seed) says how far a
quantized pipeline's pixels moved, not whether its images still show the prompt. With a CLIP model
(``quantkit eval --clip-model``, ``evaluation.clip_model`` in a config) quantkit also reports:

* **CLIP score** (text alignment): ``100 * max(cos(image embedding, prompt embedding), 0)`` per image, the
  definition of Hessel et al. (2021) as torchmetrics computes it, with the prompt truncated to the text
  encoder's length; mean over images, and paired against FP (:func:`quantkit.stats.paired_mean_difference`).
* **CLIP Frechet distance to FP** (distribution shift): the Frechet distance between Gaussians fitted to the
  projected CLIP image embeddings of the quantized images and of the FP images, next to the same distance
  between two FP image sets of different seeds (the distance sampling alone gives with this many images).

The model is a CLIP folder or hub id (``openai/clip-vit-large-patch14`` is the usual choice for Stable Diffusion
papers), loaded from safetensors only, with its own tokenizer and image processor. Images are ``uint8`` or
``[0, 1]`` float arrays ``[N, H, W, 3]`` (what pipelines return with ``output_type="np"``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError
from quantkit.io import read_json

__all__ = ["ClipScorer", "clip_scores_from_features", "load_clip_scorer"]

EXAMPLE_MODEL = "openai/clip-vit-large-patch14"


def clip_scores_from_features(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
    """Per-row CLIP score ``100 * max(cos(image_i, text_i), 0)`` of paired embeddings ``[N, D]``."""
    a = np.asarray(image_feats, np.float64)
    b = np.asarray(text_feats, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image and text embeddings differ in shape: {a.shape} vs {b.shape}")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100.0 * np.clip(cos, 0.0, None)


def _pooled(out) -> torch.Tensor:
    """Projected embeddings from ``get_*_features``: a tensor (transformers 4) or an output's ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _to_uint8(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.clip(np.round(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return x


class ClipScorer:
    """A CLIP model with its tokenizer and image processor; embeddings in float64 NumPy.

    Args:
        model, tokenizer, processor: a ``transformers.CLIPModel``, its tokenizer and ``CLIPImageProcessor``.
        name: the spec it was loaded from (reported in metrics).
        batch_size: images or prompts per forward pass.
    """

    def __init__(self, model, tokenizer, processor, name: str = "", batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.batch_size = batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def image_features(self, images) -> np.ndarray:
        """Projected image embeddings ``[N, D]`` (not normalised)."""
        x = _to_uint8(images)
        out = []
        starts = range(0, len(x), self.batch_size)
        for i in tqdm(starts, desc="CLIP images", unit="batch", leave=False, disable=len(starts) < 2):
            px = self.processor(images=list(x[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            px = px.to(self.model.device, self.model.dtype)
            out.append(_pooled(self.model.get_image_features(pixel_values=px)).cpu())
        return torch.cat(out).double().numpy()

    @torch.inference_mode()
    def text_features(self, prompts: list[str]) -> np.ndarray:
        """Projected prompt embeddings ``[N, D]`` (not normalised); prompts truncated to the encoder's length."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            dev = self.model.device
            out.append(_pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                            attention_mask=tok["attention_mask"].to(dev))).cpu())
        return torch.cat(out).double().numpy()

    def scores(self, images, prompts: list[str]) -> np.ndarray:
        """CLIP score of each image against its own prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        return clip_scores_from_features(self.image_features(images), self.text_features(prompts))


def _resolve(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise QuantkitError(f"{path} is not a CLIP model folder (no config.json); pass a folder written by "
                                f"CLIPModel.save_pretrained or a hub id such as {EXAMPLE_MODEL}")
        return str(path)
    if not spec.startswith((".", "/", "~")) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec):
        return spec  # a hub id (needs network access or the hub cache)
    raise QuantkitError(f"CLIP model folder not found: {spec} (give a folder or a hub id such as {EXAMPLE_MODEL})")


def load_clip_scorer(spec: str, batch_size: int = 32, device: torch.device | str = "cpu") -> ClipScorer:
    """Load a CLIP model, tokenizer and image processor from a folder or hub id (safetensors weights only), the
    model on ``device``.

    Raises:
        QuantkitError: not found, not a CLIP model, no safetensors weights, or no tokenizer/image processor.
    """
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPModel

    from quantkit.models.pipeline import load_error_line

    target = _resolve(spec)
    try:
        if Path(target).is_dir():
            model_type = read_json(Path(target) / "config.json").get("model_type")
        else:
            model_type = AutoConfig.from_pretrained(target).model_type
        if model_type != "clip":
            raise QuantkitError(f"{spec} is not a CLIP model (model_type {model_type!r}); give a CLIP model such as "
                                f"{EXAMPLE_MODEL}")
        model = CLIPModel.from_pretrained(target, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(target)
        processor = CLIPImageProcessor.from_pretrained(target)
    except QuantkitError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise QuantkitError(f"cannot load CLIP model '{spec}': {load_error_line(exc)}") from None
    return ClipScorer(model.to(device), tokenizer, processor, name=spec, batch_size=batch_size)
