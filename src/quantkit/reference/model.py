"""Configs and constructors of the untrained reference pipeline components.

The pipeline is a standard ``StableDiffusionPipeline`` at toy scale:

* ``AutoencoderKL``: 32x32x3 images <-> 8x8x8 latents (three blocks of width 16/32/64, 4x downsampling).
* ``UNet2DConditionModel``: 8x8x8 latents, cross-attention to the text encoder states plus their attention
  pooling added to the timestep embedding (``addition_embed_type="text"``), v-prediction.
* ``CLIPTextModel``: 2 layers, width 64, over a tokenizer whose vocabulary is the prompt grammar's words
  (written by :func:`quantkit.models.tokenizer.write_clip_tokenizer`).
* ``DDPMScheduler`` (ancestral sampling): cosine betas with zero terminal SNR (``rescale_betas_zero_snr``), the
  log-SNR shifted by :func:`scheduler_config` in the committed model, and ``"trailing"`` spacing, so 1, 2 and 4
  step sampling start from pure noise and land on the timesteps the UNet was trained hardest on.
  (``DDIMScheduler.from_config`` works too; at 2-4 steps it measured less accurate and further from the real
  data in judge features.)
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "MAX_LENGTH",
    "SCHEDULER_CONFIG",
    "TEXT_CONFIG",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "build_scheduler",
    "scheduler_config",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "count_parameters",
]

MAX_LENGTH = 12  # "a red handwritten digit seven on the left" is 8 words + bos + eos

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    # (8, 16, 32) reconstructed held-out digits at 6.6x the real-vs-real Frechet floor (darker, blurrier
    # strokes); twice the width reached 1.3x with the same step count.
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=1.0,  # replaced by 1/std of the training latents before saving
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=8,
    out_channels=8,
    # Cross-attention at 4x4 and in the mid block (2x2); the 8x8 level is convolutional (30% cheaper).
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
    norm_num_groups=16,
    transformer_layers_per_block=1,
    # Attention-pooled text embedding added to the timestep embedding: a global conditioning path into
    # every ResNet block, which makes the digit word learnable within the CPU budget.
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift",  # FiLM: the (time + text) embedding scales and shifts features
)

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=64,
    hidden_act="quick_gelu",
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    # Cosine rather than SD's scaled_linear: the last of 4 (2) "trailing" steps then starts at alpha_bar 0.85
    # (0.49) instead of 0.65 (0.24), so the final x0 prediction is less of a blurred posterior mean.
    beta_schedule="squaredcos_cap_v2",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
    variance_type="fixed_small",
    steps_offset=1,  # unused by "trailing" spacing; 1 silences a diffusers deprecation warning
)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet(pooled_text: bool = True, transformer_layers: int = 1):
    """The UNet of :data:`UNET_CONFIG`. Two ablations (``python -m quantkit.reference.train``):
    ``pooled_text=False`` drops the pooled text embedding, so the prompt enters through cross-attention only, as in
    SD 1.5/2.1 (``--no-pooled-text``); ``transformer_layers`` stacks that many transformer blocks at every
    cross-attention site, which moves the weights towards the content layers (``attn2``, ``ff``: 17 % of the
    weights at 1, 42 % at 4; SDXL has 69 %) (``--transformer-layers``)."""
    from diffusers import UNet2DConditionModel

    if transformer_layers < 1:
        raise ValueError(f"transformer_layers must be >= 1, got {transformer_layers}")
    cfg = dict(UNET_CONFIG, transformer_layers_per_block=transformer_layers)
    if not pooled_text:
        cfg = {k: v for k, v in cfg.items() if not k.startswith("addition_embed_type")}
    return UNet2DConditionModel(**cfg)


def build_tokenizer(folder: str | Path):
    """Write the grammar's tokenizer to ``folder``; returns ``(CLIPTokenizer, special token ids)``."""
    from transformers import CLIPTokenizer

    from quantkit.models.tokenizer import write_clip_tokenizer
    from quantkit.reference.data import PROMPT_WORDS

    ids = write_clip_tokenizer(folder, PROMPT_WORDS, model_max_length=MAX_LENGTH)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)
    return tok, ids


def build_text_encoder(token_ids: dict[str, int]):
    """A ``CLIPTextModel`` whose vocabulary and special tokens are those returned by the tokenizer writer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=token_ids["vocab_size"],
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=token_ids["eos_token_id"],
        pad_token_id=token_ids["pad_token_id"],
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def scheduler_config(logsnr_shift: float = 1.0) -> dict:
    """``SCHEDULER_CONFIG``, or with every timestep's log-SNR moved by ``2 ln(logsnr_shift)`` (explicit
    ``trained_betas``; the terminal SNR stays zero). A shift below 1 lowers the SNR of the few-step timesteps.

    Measured (docs/reference-model.md, "Noise-schedule shift"): 0.65 and 0.8 give sharper 4-step images and better
    alignment than the unshifted 1.0; 1.6 and 2.5 are far worse. The committed assets use 0.65
    (``quantkit.reference.train.DEFAULT_LOGSNR_SHIFT``).
    """
    if logsnr_shift <= 0:
        raise ValueError(f"logsnr_shift must be positive, got {logsnr_shift}")
    if logsnr_shift == 1.0:
        return dict(SCHEDULER_CONFIG)
    from diffusers import DDPMScheduler

    ab = DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.double()
    logsnr = torch.log(ab) - torch.log1p(-ab)
    ab_s = torch.sigmoid(logsnr + 2 * torch.log(torch.tensor(logsnr_shift, dtype=torch.float64)))
    ab_s[-1] = 0.0
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab_s[:-1]])
    betas = (1 - ab_s / prev).clamp(0, 1)
    return {**SCHEDULER_CONFIG, "trained_betas": [float(b) for b in betas]}


def build_scheduler(logsnr_shift: float = 1.0):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(logsnr_shift))


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
