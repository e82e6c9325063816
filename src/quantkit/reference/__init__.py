"""A tiny, checkable text-to-image reference pipeline, trained here on scikit-learn's digits.

``load_reference_pipeline()`` returns a standard diffusers ``StableDiffusionPipeline`` (UNet2DConditionModel
with cross-attention, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPM (ancestral) with zero terminal SNR and
"trailing" spacing, v-prediction) that draws 32x32 coloured digits from prompts such as
``"a red handwritten digit seven on the left"`` in 1, 2 or 4 steps. Judges trained on the same data give
the metrics a quantized pipeline is compared by:

* alignment: :func:`judge_accuracy` -- per attribute (digit, colour, position), the fraction of generated
  images the judge reads as the prompt asked (the CLIP-score analogue);
* quality: :func:`frechet_distance` -- Frechet distance in judge features to real images (the FID analogue),
  to be read against the real-vs-real noise floor of the same number of images.

Weights live in ``assets/`` (safetensors + JSON only); ``python -m quantkit.reference.train`` rebuilds them.
See docs/reference-model.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantkit.reference.data import (
    ATTRIBUTES,
    COLOURS,
    DIGIT_WORDS,
    IMAGE_SIZE,
    POSITIONS,
    Prompt,
    default_prompts,
    format_prompt,
    parse_prompt,
    read_prompts_file,
    real_images,
    write_prompts_file,
)

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "DEFAULT_ASSETS_DIR",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_JUDGE_DIR",
    "DEFAULT_NUM_STEPS",
    "DEFAULT_PIPELINE_DIR",
    "DIGIT_WORDS",
    "IMAGE_SIZE",
    "POSITIONS",
    "Prompt",
    "SUPPORTED_NUM_STEPS",
    "default_prompts",
    "evaluate_pipeline",
    "extract_features",
    "format_prompt",
    "frechet_distance",
    "generate",
    "judge_accuracy",
    "load_judge",
    "load_reference_pipeline",
    "parse_prompt",
    "read_prompts_file",
    "real_images",
    "unet_sha256",
    "write_prompts_file",
]

DEFAULT_ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_PIPELINE_DIR = DEFAULT_ASSETS_DIR / "digits-pipeline"
DEFAULT_JUDGE_DIR = DEFAULT_ASSETS_DIR / "judges"
SUPPORTED_NUM_STEPS = (1, 2, 4)
DEFAULT_NUM_STEPS = 4
DEFAULT_GUIDANCE_SCALE = 1.25  # mild classifier-free guidance (trained with 10% prompt dropout); 1.0 disables it


def load_reference_pipeline(path: str | Path | None = None, torch_dtype=None):
    """The committed (or ``path``'s) pipeline as a ``diffusers.StableDiffusionPipeline`` on CPU."""
    from diffusers import StableDiffusionPipeline

    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = StableDiffusionPipeline.from_pretrained(str(path or DEFAULT_PIPELINE_DIR), use_safetensors=True,
                                                   **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_sha256(pipeline_dir: str | Path | None = None) -> str:
    """sha256 of a reference pipeline's UNet weights (default: the committed one): which trained model a
    benchmark's figures belong to."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(pipeline_dir or DEFAULT_PIPELINE_DIR) / "unet" / "diffusion_pytorch_model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate(pipe, prompts: Sequence[Prompt | str | dict], num_inference_steps: int = DEFAULT_NUM_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, batch_size: int = 64):
    """Images ``[N, 3, 32, 32]`` in [0, 1] (torch) for ``prompts``; image ``i`` uses seed ``seed + i``.

    Per-image generators make every image independent of batch size and of the other prompts.
    """
    import torch

    from quantkit.models.pipeline import generate as generate_images
    from quantkit.reference.data import as_prompts

    ps = as_prompts(prompts)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, len(ps), batch_size):
        chunk = ps[start : start + batch_size]
        images = generate_images(pipe, [p.text for p in chunk], num_inference_steps, guidance_scale, seed + start,
                                 height=size, width=size, output_type="pt")
        out.append(images.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


def evaluate_pipeline(pipe, num_prompts: int = 800, steps: Sequence[int] = SUPPORTED_NUM_STEPS,
                      guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0,
                      judge_dir: str | Path | None = None) -> dict:
    """Judge accuracy per attribute and Frechet distance to real images at each step count.

    The Frechet reference is ``num_prompts`` real images of the training split with the same prompts; the
    noise floor is the distance from an equally sized, identically labelled held-out real set to it.
    """
    from quantkit.reference.judges import extract_features, frechet_distance_from_features, judge_accuracy, load_judge

    judge = load_judge(judge_dir)
    prompts = default_prompts(num_prompts, seed)
    ref = extract_features(real_images(prompts, "train", seed=seed + 1), judge)
    held = extract_features(real_images(prompts, "heldout", seed=seed + 2), judge)
    result: dict = {
        "num_prompts": num_prompts,
        "guidance_scale": guidance_scale,
        "frechet_real_vs_real": frechet_distance_from_features(held, ref),
        "heldout_real_accuracy": judge_accuracy(real_images(prompts, "heldout", seed=seed + 2), prompts, judge),
        "steps": {},
    }
    for n in steps:
        images = generate(pipe, prompts, num_inference_steps=n, guidance_scale=guidance_scale, seed=seed + 1000)
        fd = frechet_distance_from_features(extract_features(images, judge), ref)
        result["steps"][str(n)] = {
            "accuracy": judge_accuracy(images, prompts, judge),
            "frechet": fd,
            "frechet_ratio_to_floor": fd / max(result["frechet_real_vs_real"], 1e-12),
        }
    return result


def __getattr__(name: str):
    # Judge functions import torch; load them lazily so ``import quantkit.reference`` stays light.
    if name in ("judge_accuracy", "frechet_distance", "extract_features", "load_judge"):
        from quantkit.reference import judges

        return getattr(judges, name)
    raise AttributeError(f"module 'quantkit.reference' has no attribute {name!r}")
