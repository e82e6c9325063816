"""Configs of full-size denoisers (SD 1.5, SD 2.1 / SD-Turbo, SDXL / SDXL-Turbo, PixArt-alpha), built here
with random weights (or on the meta device) for size, memory and speed measurements and config validation;
nothing is downloaded.
"""

from __future__ import annotations

import torch

__all__ = ["ARCHITECTURES", "build_denoiser"]

_SD_COMMON = dict(
    act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, sample_size=64,
)

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # SD 1.5 and LCM-SD1.5 (e.g. LCM_Dreamshaper_v7).
    "sd15": ("UNet2DConditionModel", dict(_SD_COMMON, attention_head_dim=8, cross_attention_dim=768)),
    # SD 2.1 architecture: SD-Turbo (866M parameters).
    "sd-turbo": ("UNet2DConditionModel", dict(_SD_COMMON, attention_head_dim=[5, 10, 20, 20],
                                              cross_attention_dim=1024, use_linear_projection=True)),
    # SDXL base / SDXL-Turbo (2.6B parameters).
    "sdxl": ("UNet2DConditionModel", dict(
        act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
        projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True,
    )),
    # PixArt-alpha XL-2 at 512px (a DiT with T5 conditioning).
    "pixart": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, patch_size=2, sample_size=64, caption_channels=4096, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, attention_bias=True,
    )),
}


def build_denoiser(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0):
    """A full-size denoiser with random weights (``device="meta"`` builds only shapes, instantly)."""
    import diffusers

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    cls_name, config = ARCHITECTURES[name]
    cls = getattr(diffusers, cls_name)
    if str(device) == "meta":
        with torch.device("meta"):
            return cls(**config)
    torch.manual_seed(seed)
    return cls(**config).to(device=device, dtype=dtype)
