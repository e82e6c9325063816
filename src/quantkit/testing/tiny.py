"""Tiny, randomly initialised diffusers text-to-image pipelines, built and saved locally.

Each builder writes a complete ``save_pretrained`` folder that ``diffusers.DiffusionPipeline.from_pretrained``
loads back with no network access. Weights are random but deterministic: the same ``seed`` always gives
bit-identical weights (every component is initialised under its own forked, seeded torch RNG, so the caller's
global RNG state is left untouched). Everything is float32; building and saving take under a second.

All four pipelines generate ``32 x 32`` images (latent ``16 x 16`` with 4 channels, VAE scale factor 2) and
use trailing timestep spacing so that 1-2 inference steps are valid (an ``EulerDiscreteScheduler``; the LCM one
an ``LCMScheduler``).

Example:
    >>> from quantkit.testing.tiny import build_tiny
    >>> folder = build_tiny("sd", tmp_path / "sd")                     # doctest: +SKIP
    >>> pipe = diffusers.DiffusionPipeline.from_pretrained(folder)      # doctest: +SKIP
    >>> pipe("a photo of a cat", num_inference_steps=2, output_type="np")  # doctest: +SKIP

Note:
    ``PixArtAlphaPipeline`` only supports resolution binning for ``sample_size`` in {32, 64, 128}; the tiny
    transformer has ``sample_size=16``, so call it with ``use_resolution_binning=False``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch

from quantkit.models.tokenizer import write_clip_tokenizer

__all__ = [
    "TINY_KINDS",
    "TINY_WORDS",
    "TINY_RESOLUTION",
    "build_tiny",
    "build_tiny_sd",
    "build_tiny_lcm",
    "build_tiny_sdxl",
    "build_tiny_pixart",
    "build_t5_tokenizer",
    "build_tiny_clip",
]

#: Pipeline kinds understood by :func:`build_tiny`.
TINY_KINDS: tuple[str, ...] = ("sd", "sdxl", "pixart", "lcm")

#: Vocabulary words of the tiny tokenizers. Each is one T5 token; in the CLIP tokenizers (built by
#: ``write_clip_tokenizer``) a few ("photo", "riding", "handwritten", "three") currently split into pieces
#: because merges of different words interact. Any other text falls back to single characters.
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "painting", "picture", "of", "on", "in", "with", "and",
    "astronaut", "riding", "horse", "cat", "dog", "red", "blue", "green", "black", "white",
    "digit", "handwritten", "number", "zero", "one", "two", "three", "four", "five",
    "six", "seven", "eight", "nine",
)  # fmt: skip

#: Native image resolution (height = width) of every tiny pipeline.
TINY_RESOLUTION = 32

_LATENT_SIZE = 16  # TINY_RESOLUTION // VAE scale factor (2)
_CLIP_MAX_LENGTH = 16  # CLIP tokenizer model_max_length == CLIPTextConfig.max_position_embeddings
_T5_MAX_LENGTH = 120  # PixArtAlphaPipeline's default max_sequence_length

_M = TypeVar("_M", bound=torch.nn.Module)


def _seeded(seed: int, factory: Callable[[], _M]) -> _M:
    """Build a module under a forked torch RNG seeded with ``seed``; return it in float32 eval mode."""
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            module = factory()
        finally:
            torch.set_default_dtype(previous_dtype)
    return module.eval()


def _scheduler(beta_schedule: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )


def _vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_RESOLUTION,
            scaling_factor=scaling_factor,
        ),
    )


def _clip_tokenizer(folder: Path, subfolder: str):
    """Write a CLIP tokenizer to ``folder/subfolder`` and load it; return ``(tokenizer, special ids)``."""
    from transformers import CLIPTokenizer

    path = folder / subfolder
    ids = write_clip_tokenizer(path, TINY_WORDS, model_max_length=_CLIP_MAX_LENGTH)
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=_CLIP_MAX_LENGTH), ids


def _clip_config(ids: dict[str, int], projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random ``CLIPModel`` (text and vision towers, projection 32) with its tokenizer
    and image processor (images resized and cropped to ``TINY_RESOLUTION``), for CLIP-score tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    folder = Path(folder)
    ids = write_clip_tokenizer(folder, TINY_WORDS, model_max_length=_CLIP_MAX_LENGTH)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TINY_RESOLUTION, patch_size=8, projection_dim=32)
    config = CLIPConfig(text_config=_clip_config(ids).to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    _seeded(seed, lambda: CLIPModel(config)).save_pretrained(folder, safe_serialization=True)
    size = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
    CLIPImageProcessor(size={"shortest_edge": TINY_RESOLUTION}, crop_size=size).save_pretrained(folder)
    return folder


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny ``StableDiffusionPipeline``.

    Components: ``unet`` (``UNet2DConditionModel``, blocks ``(32, 64)``, ``CrossAttnDownBlock2D`` +
    ``DownBlock2D``, cross-attention dim 32, latent ``16 x 16``), ``vae`` (``AutoencoderKL``, 4 latent
    channels, ``scaling_factor=0.18215``), ``text_encoder`` (``CLIPTextModel``, hidden 32, 2 layers),
    ``tokenizer`` (``CLIPTokenizer``, ``model_max_length=16``) and an ``EulerDiscreteScheduler`` with
    trailing timestep spacing. No safety checker or feature extractor.

    Args:
        folder: destination folder (created if needed).
        seed: seed of the random weights; equal seeds give identical weights.

    Returns:
        ``folder`` as a ``Path``; it generates ``32 x 32`` images.
    """
    from diffusers import StableDiffusionPipeline

    return _build_sd_family(StableDiffusionPipeline, folder, seed, _scheduler())


def build_tiny_lcm(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny ``LatentConsistencyModelPipeline`` (LCM, e.g. ``SimianLuo/LCM_Dreamshaper_v7``).

    The components of :func:`build_tiny_sd`, with a UNet that takes LCM's guidance embedding
    (``time_cond_proj_dim=32``, passed as ``timestep_cond``) and an ``LCMScheduler``.
    """
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="trailing")
    return _build_sd_family(LatentConsistencyModelPipeline, folder, seed, scheduler, time_cond_proj_dim=32)


def _build_sd_family(pipeline_cls, folder: str | Path, seed: int, scheduler, time_cond_proj_dim: int | None = None
                     ) -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, ids = _clip_tokenizer(Path(tmp), "tokenizer")
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
            time_cond_proj_dim=time_cond_proj_dim,
        ),
    )
    vae = _vae(seed + 1, scaling_factor=0.18215)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(_clip_config(ids)))
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny ``StableDiffusionXLPipeline``.

    Mirrors diffusers' own SDXL test components: ``unet`` (``UNet2DConditionModel`` with blocks
    ``(32, 64)``, ``DownBlock2D`` + ``CrossAttnDownBlock2D``, ``transformer_layers_per_block=(1, 2)``,
    ``addition_embed_type="text_time"``, ``addition_time_embed_dim=8``,
    ``projection_class_embeddings_input_dim = 6 * 8 + 32``, ``cross_attention_dim = 32 + 32``),
    ``text_encoder`` (``CLIPTextModel``, hidden 32), ``text_encoder_2``
    (``CLIPTextModelWithProjection``, hidden 32, projection 32), two ``CLIPTokenizer`` s
    (``model_max_length=16``), ``vae`` (``scaling_factor=0.13025``) and an ``EulerDiscreteScheduler``
    with trailing timestep spacing.

    Args:
        folder: destination folder (created if needed).
        seed: seed of the random weights; equal seeds give identical weights.

    Returns:
        ``folder`` as a ``Path``; it generates ``32 x 32`` images.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, ids = _clip_tokenizer(Path(tmp), "tokenizer")
        tokenizer_2, ids_2 = _clip_tokenizer(Path(tmp), "tokenizer_2")
    config = _clip_config(ids)
    config_2 = _clip_config(ids_2, projection_dim=32)
    time_embed_dim = 8
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 micro-conditions (original size, crop top-left, target size) + pooled text embeds.
            projection_class_embeddings_input_dim=6 * time_embed_dim + config_2.projection_dim,
            cross_attention_dim=config.hidden_size + config_2.hidden_size,
            norm_num_groups=32,
        ),
    )
    vae = _vae(seed + 1, scaling_factor=0.13025)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(config))
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(config_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_t5_tokenizer(words: Iterable[str] = TINY_WORDS, model_max_length: int = _T5_MAX_LENGTH):
    """Build a small T5 (Unigram, SentencePiece-style) tokenizer in code, with no ``spiece.model``.

    The ``tokenizers.Tokenizer`` is assembled directly (Unigram model, Metaspace pre-tokenizer/decoder, ``</s>``
    appended) and wrapped in ``T5TokenizerFast(tokenizer_object=...)``, so it saves as ``tokenizer.json`` and
    loads back without sentencepiece. Ids follow T5's layout: ``<pad>=0``, ``</s>=1``, ``<unk>=2``; every word of
    ``words`` (lower-cased) is a single ``"▁word"`` token and single ASCII characters cover other text. No
    ``<extra_id_*>`` sentinels.

    Args:
        words: words that must each map to a single token.
        model_max_length: maximum sequence length recorded in the tokenizer config.

    Returns:
        A ``transformers.T5TokenizerFast`` (in transformers 5 an alias of the ``tokenizers``-backed
        ``T5Tokenizer``).
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {tok for tok, _ in vocab}
    for word in sorted({w.lower() for w in words}):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"tokenizer word {word!r} must be non-empty and contain no spaces")
        tok = "\u2581" + word
        if tok not in seen:
            seen.add(tok)
            vocab.append((tok, -1.0))
    for code in range(33, 127):
        for tok in (chr(code), "\u2581" + chr(code)):
            if tok not in seen:
                seen.add(tok)
                vocab.append((tok, -10.0))

    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=model_max_length,
    )


def build_tiny_pixart(folder: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny ``PixArtAlphaPipeline``.

    Components: ``transformer`` (``PixArtTransformer2DModel``, 2 layers, 4 heads x 8, patch 2,
    ``sample_size=16``, ``out_channels=8`` i.e. learned sigma, ``norm_type="ada_norm_single"``),
    ``text_encoder`` (``T5EncoderModel``, d_model 32, 2 layers, gated-gelu), ``tokenizer`` (``T5Tokenizer``
    from :func:`build_t5_tokenizer`, saved as ``tokenizer.json`` only), ``vae`` (``scaling_factor=0.18215``)
    and an ``EulerDiscreteScheduler`` (linear betas, trailing spacing).

    Args:
        folder: destination folder (created if needed).
        seed: seed of the random weights; equal seeds give identical weights.

    Returns:
        ``folder`` as a ``Path``; it generates ``32 x 32`` images when called with
        ``use_resolution_binning=False`` (binning only exists for ``sample_size`` 32/64/128).
    """
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer = build_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    transformer = _seeded(
        seed,
        lambda: PixArtTransformer2DModel(
            sample_size=_LATENT_SIZE,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=4,
            in_channels=4,
            out_channels=8,
            caption_channels=t5_config.d_model,
            cross_attention_dim=32,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
    )
    vae = _vae(seed + 1, scaling_factor=0.18215)
    text_encoder = _seeded(seed + 2, lambda: T5EncoderModel(t5_config))
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    )
    pipe.save_pretrained(folder)
    return folder


_BUILDERS: dict[str, Callable[..., Path]] = {
    "sd": build_tiny_sd,
    "sdxl": build_tiny_sdxl,
    "pixart": build_tiny_pixart,
    "lcm": build_tiny_lcm,
}


def build_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny pipeline of the given kind.

    Args:
        kind: one of :data:`TINY_KINDS` (``"sd"``, ``"sdxl"``, ``"pixart"``, ``"lcm"``).
        folder: destination folder (created if needed).
        seed: seed of the random weights.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        ValueError: if ``kind`` is not one of :data:`TINY_KINDS`.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; valid kinds: {', '.join(TINY_KINDS)}")
    return _BUILDERS[kind](folder, seed=seed)
