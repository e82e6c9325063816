"""Tests for quantkit.testing.tiny: tiny pipelines build, load back, run, and are seed-deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from quantkit.testing.tiny import (  # noqa: E402
    TINY_KINDS,
    TINY_RESOLUTION,
    build_t5_tokenizer,
    build_tiny,
    build_tiny_pixart,
    build_tiny_sd,
    build_tiny_sdxl,
)

PIPELINE_CLASS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "pixart": "PixArtAlphaPipeline",
    "lcm": "LatentConsistencyModelPipeline",
}
DENOISER = {"sd": "unet", "sdxl": "unet", "pixart": "transformer", "lcm": "unet"}
CALL_KWARGS = {
    "sd": {},
    "sdxl": {},
    # Resolution binning only exists for sample_size 32/64/128; clean_caption needs bs4/ftfy.
    "pixart": {"use_resolution_binning": False, "clean_caption": False},
    "lcm": {"guidance_scale": 8.0},
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """These models are tiny: on a busy few-core machine, intra-op threads only add contention (50x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build each kind once (seed 0) and again with the same seed, for the determinism check."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: (build_tiny(kind, root / f"{kind}_a"), build_tiny(kind, root / f"{kind}_b")) for kind in TINY_KINDS}


def test_kinds():
    assert TINY_KINDS == ("sd", "sdxl", "pixart", "lcm")


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_load_and_run(built, kind):
    folder, _ = built[kind]
    assert (folder / "model_index.json").is_file()
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    denoiser = getattr(pipe, DENOISER[kind])
    assert all(p.dtype == torch.float32 for p in denoiser.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())

    out = pipe(
        "a photo of an astronaut riding a horse",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **CALL_KWARGS[kind],
    ).images
    assert out.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_same_seed_same_weights(built, kind):
    name = DENOISER[kind]
    a, b = (diffusers.DiffusionPipeline.from_pretrained(f) for f in built[kind])
    sd_a, sd_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # Text encoders are seeded too.
    ta, tb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_different_seed_different_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    build_tiny_sd(tmp_path / "s0", seed=0)
    build_tiny_sd(tmp_path / "s1", seed=1)
    u0 = UNet2DConditionModel.from_pretrained(tmp_path / "s0", subfolder="unet").state_dict()
    u1 = UNet2DConditionModel.from_pretrained(tmp_path / "s1", subfolder="unet").state_dict()
    assert not all(torch.equal(u0[k], u1[k]) for k in u0)


def test_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_sd(tmp_path / "sd")
    assert torch.equal(torch.rand(4), expected)


def test_builders_return_path(tmp_path):
    assert build_tiny_sdxl(str(tmp_path / "x")) == tmp_path / "x"
    assert build_tiny_pixart(tmp_path / "p") == tmp_path / "p"


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="sd, sdxl, pixart"):
        build_tiny("flux", tmp_path / "f")


def test_t5_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a photo of a cat zzz"
    ids = tok(text).input_ids
    assert loaded(text).input_ids == ids
    assert ids[-1] == tok.eos_token_id
    # Listed words are single tokens; unknown words fall back to characters, not <unk>.
    assert len(tok.tokenize("astronaut handwritten")) == 2
    assert tok.unk_token_id not in ids


def test_sdxl_unet_conditioning_dims(built):
    pipe = diffusers.DiffusionPipeline.from_pretrained(built["sdxl"][0])
    cfg = pipe.unet.config
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == (
        6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings


def test_lcm_unet_takes_the_guidance_embedding(built):
    pipe = diffusers.DiffusionPipeline.from_pretrained(built["lcm"][0])
    assert pipe.unet.config.time_cond_proj_dim == 32 and type(pipe.scheduler).__name__ == "LCMScheduler"
