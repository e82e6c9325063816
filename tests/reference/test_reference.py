"""The committed reference pipeline and judges: loading, generation quality, metrics (fast, CPU)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.reference import (
    DEFAULT_JUDGE_DIR,
    DEFAULT_PIPELINE_DIR,
    Prompt,
    default_prompts,
    generate,
    load_reference_pipeline,
    parse_prompt,
    read_prompts_file,
    real_images,
    unet_sha256,
    write_prompts_file,
)
from quantkit.reference import model as M
from quantkit.reference.data import COLOURS, POSITIONS, PROMPT_WORDS
from quantkit.reference.judges import (
    extract_features,
    frechet_distance,
    frechet_distance_from_features,
    judge_accuracy,
    judge_correct,
    load_judge,
    paired_comparison,
)

torch.set_num_threads(1)  # the suite runs on a shared 2-core machine: two OpenMP threads stall


@pytest.fixture(scope="module")
def pipe():
    return load_reference_pipeline()


def test_assets_are_safetensors_and_json_only():
    for folder in (DEFAULT_PIPELINE_DIR, DEFAULT_JUDGE_DIR):
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        assert files, folder
        for p in files:
            assert p.suffix in {".safetensors", ".json", ".txt"}, p
    total = sum(p.stat().st_size for p in Path(DEFAULT_PIPELINE_DIR).parent.rglob("*") if p.is_file())
    assert total < 15 * 2**20


def test_unet_sha256_hashes_the_unet_weights(tmp_path):
    import hashlib

    (tmp_path / "unet").mkdir()
    data = bytes(range(256)) * 5000  # spans several read chunks
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data)
    assert unet_sha256(tmp_path) == hashlib.sha256(data).hexdigest()
    committed = Path(DEFAULT_PIPELINE_DIR) / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_sha256() == hashlib.sha256(committed.read_bytes()).hexdigest()


def test_pipeline_loads_with_from_pretrained():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(str(DEFAULT_PIPELINE_DIR))
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.vae.config.scaling_factor != 1.0
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any("CrossAttn" in b for b in pipe.unet.config.down_block_types)
    for k, v in M.SCHEDULER_CONFIG.items():  # the committed scheduler is the one train.py builds
        assert pipe.scheduler.config[k] == v, k
    for n, expected in ((1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])):
        pipe.scheduler.set_timesteps(n)
        assert pipe.scheduler.timesteps.tolist() == expected
    cfg = pipe.text_encoder.config
    tok = pipe.tokenizer
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert cfg.max_position_embeddings == tok.model_max_length


def test_every_grammar_word_is_one_token(pipe):
    tok = pipe.tokenizer
    for word in PROMPT_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    enc = tok("a red handwritten digit seven on the left", padding="max_length",
              max_length=tok.model_max_length)
    assert len(enc.input_ids) == tok.model_max_length
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[9] == tok.eos_token_id


def test_prompt_grammar_roundtrip(tmp_path):
    prompts = default_prompts(160, seed=3)
    assert len(set(prompts)) == 160
    for p in prompts:
        assert parse_prompt(p.text) == p
    block = prompts[:40]
    assert all(sum(p.digit == d for p in block) == 4 for d in range(10))
    assert all(sum(p.colour == c for p in block) == 10 for c in range(len(COLOURS)))
    assert all(sum(p.position == q for p in block) == 10 for q in range(len(POSITIONS)))
    assert default_prompts(20, seed=3) == prompts[:20]
    path = write_prompts_file(tmp_path / "prompts.txt", prompts[:7])
    assert read_prompts_file(path) == prompts[:7]
    assert parse_prompt("a red handwritten digit seven on the left") == Prompt(7, 0, 0)
    with pytest.raises(ValueError):
        parse_prompt("a purple handwritten digit seven on the left")


def test_generated_images_are_judged_correct_at_4_steps(pipe):
    prompts = default_prompts(20, seed=0)
    images = generate(pipe, prompts, num_inference_steps=4, seed=0)
    assert images.shape == (20, 3, 32, 32)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    acc = judge_accuracy(images, prompts)
    for attribute in ("digit", "colour", "position"):
        assert acc[attribute] >= 0.9, acc
    # Same seed, same images.
    again = generate(pipe, prompts[:4], num_inference_steps=4, seed=0)
    torch.testing.assert_close(again, images[:4], atol=1e-5, rtol=0)


def test_judge_accepts_numpy_and_pil(pipe):
    from PIL import Image

    prompts = default_prompts(6, seed=1)
    real = real_images(prompts, "heldout", seed=0)
    nhwc = real.transpose(0, 2, 3, 1)
    pil = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in nhwc]
    a = judge_accuracy(torch.from_numpy(real), prompts)
    assert a == judge_accuracy(nhwc, prompts)
    assert a == judge_accuracy(pil, [p.text for p in prompts])


def test_judge_correct_is_per_image_and_consistent_with_accuracy():
    prompts = default_prompts(40, seed=7)
    real = real_images(prompts, "heldout", seed=7)
    c = judge_correct(real, prompts)
    assert set(c) == {"digit", "colour", "position", "all"}
    assert all(v.dtype == bool and v.shape == (40,) for v in c.values())
    np.testing.assert_array_equal(c["all"], c["digit"] & c["colour"] & c["position"])
    assert judge_accuracy(real, prompts) == {k: float(v.mean()) for k, v in c.items()}
    # The same images under prompts naming another digit: an image read as its true digit cannot match.
    other = [Prompt((p.digit + 1) % 10, p.colour, p.position) for p in prompts]
    c2 = judge_correct(real, other)
    assert not np.any(c["digit"] & c2["digit"])
    np.testing.assert_array_equal(c2["colour"], c["colour"])


def test_paired_comparison_counts_discordant_images_and_bounds_the_difference():
    from scipy.stats import binomtest

    rng = np.random.default_rng(0)
    n = 200
    real = rng.normal(size=(300, 8))
    fa, fb = rng.normal(size=(n, 8)), rng.normal(size=(n, 8)) + 0.5
    ca = {"digit": rng.random(n) < 0.9}
    cb = {"digit": ca["digit"].copy()}
    cb["digit"][:30] = ~cb["digit"][:30]  # 30 discordant images
    r = paired_comparison(ca, cb, fa, fb, real, attributes=("digit",), n_boot=300)
    d = r["digit"]
    a_only, b_only = int(np.sum(ca["digit"][:30])), int(np.sum(~ca["digit"][:30]))
    assert (d["a_only"], d["b_only"]) == (a_only, b_only) and r["images"] == n
    assert d["diff"] == pytest.approx((a_only - b_only) / n)
    assert d["p_value"] == pytest.approx(binomtest(a_only, 30, 0.5).pvalue)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    f = r["frechet"]
    fd = frechet_distance_from_features
    assert f["diff"] == pytest.approx(fd(fa, real) - fd(fb, real))
    assert f["ci95"][0] < f["diff"] < f["ci95"][1] < 0  # B is shifted away from the real features
    same = paired_comparison(ca, ca, fa, fa, real, attributes=("digit",), n_boot=50)
    assert same["digit"] == {"diff": 0.0, "a_only": 0, "b_only": 0, "p_value": 1.0, "ci95": [0.0, 0.0]}
    assert same["frechet"] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same number of images"):
        paired_comparison(ca, cb, fa[:-1], fb, real, attributes=("digit",))


def test_judge_reads_held_out_real_digits():
    prompts = default_prompts(320, seed=5)
    acc = judge_accuracy(real_images(prompts, "heldout", seed=5), prompts)
    assert acc["digit"] >= 0.95 and acc["colour"] == 1.0 and acc["position"] == 1.0, acc


def test_frechet_distance_self_zero_and_noise_large():
    prompts = default_prompts(200, seed=2)
    real = real_images(prompts, "train", seed=1)
    held = real_images(prompts, "heldout", seed=2)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    floor = frechet_distance(held, real)
    rng = np.random.default_rng(0)
    flat = real.reshape(len(real), 3, -1)
    shuffled = np.stack([im[:, rng.permutation(flat.shape[-1])] for im in flat]).reshape(real.shape)
    noise = rng.random(real.shape).astype(np.float32)
    assert frechet_distance(shuffled, real) > 10 * floor
    assert frechet_distance(noise, real) > 10 * floor
    f = extract_features(real)
    assert f.shape[0] == 200 and f.ndim == 2
    assert frechet_distance_from_features(f, f + 1.0) == pytest.approx(f.shape[1], rel=1e-6)


def test_judges_load_without_pickle(monkeypatch):
    from quantkit.reference import judges

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    judges._load_cached.cache_clear()
    judge = load_judge()
    assert set(judge.classes) == {"digit", "colour", "position"}
    assert {p.suffix for p in Path(DEFAULT_JUDGE_DIR).iterdir()} <= {".safetensors", ".json"}


def test_train_smoke(tmp_path):
    """``train`` end to end on a tiny budget: a loadable pipeline, judges and a report (quality not checked)."""
    from diffusers import StableDiffusionPipeline

    from quantkit.reference.train import DEFAULT_MINUTES, STEPS_AT_DEFAULT, train

    minutes = DEFAULT_MINUTES * 3 / STEPS_AT_DEFAULT["unet"]  # a few steps per stage
    threads_before = torch.get_num_threads()
    log = train(seed=0, out=tmp_path, minutes=minutes, evaluate=False, glyph_limit=10)
    assert log["steps"]["unet"] == 3 and log["steps"]["vae"] >= 1
    assert log["threads_per_worker"] == 2 and log["logsnr_shift"] == 0.65 and log["pooled_text"]  # the default recipe
    unet_cfg = json.loads((tmp_path / "digits-pipeline" / "unet" / "config.json").read_text())
    assert unet_cfg["addition_embed_type"] == "text"
    assert torch.get_num_threads() == threads_before  # the caller's setting is restored
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["seconds"]["total_training"] > 0 and set(report["judge_heldout_accuracy"]) >= {"digit", "all"}
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "digits-pipeline"))
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, default_prompts(2), num_inference_steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert {p.suffix for p in (tmp_path / "judges").iterdir()} == {".safetensors", ".json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-pipeline", "judges", "train_report.json"]


def test_interrupted_training_leaves_the_previous_outputs_untouched(tmp_path, monkeypatch):
    from quantkit.reference import train as T

    (tmp_path / "judges").mkdir()
    (tmp_path / "judges" / "judge.json").write_text("{}")
    (tmp_path / "train_report.json").write_text('{"old": true}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_unet", interrupted)
    minutes = T.DEFAULT_MINUTES * 2 / T.STEPS_AT_DEFAULT["unet"]
    with pytest.raises(KeyboardInterrupt):
        T.train(seed=0, out=tmp_path, minutes=minutes, evaluate=False, glyph_limit=5, threads=1)
    # The judge and VAE stages had finished, but nothing was moved into place and the partial folder is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judges", "train_report.json"]
    assert (tmp_path / "judges" / "judge.json").read_text() == "{}"
    assert json.loads((tmp_path / "train_report.json").read_text()) == {"old": True}


@pytest.mark.parametrize("threads", [1, 2])
def test_training_stage_is_deterministic(monkeypatch, threads):
    """Two runs of a stage from the same seed and thread count give bit-identical weights (CPU)."""
    from quantkit.reference import train as T
    from quantkit.reference.train import train_vae

    monkeypatch.setitem(T.BATCH, "vae", 8)  # small batches: the check is about seeding, not quality
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = train_vae(seed=3, steps=2, log={}).state_dict()
        b = train_vae(seed=3, steps=2, log={}).state_dict()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_rejects_bad_thread_and_worker_counts(tmp_path):
    from quantkit.reference.train import main, train

    with pytest.raises(ValueError, match="threads"):
        train(out=tmp_path, threads=0)
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "a-file")])
    assert exc.value.code == 2


def test_transformer_layers_moves_the_weights_to_the_content_layers(tmp_path):
    from quantkit.models.layers import CONTENT_PATTERNS, role_of
    from quantkit.reference.train import main

    def content_share(unet):
        layers = (torch.nn.Linear, torch.nn.Conv2d)
        sizes = {n: m.weight.numel() for n, m in unet.named_modules() if isinstance(m, layers)}
        return sum(v for n, v in sizes.items() if role_of(n, CONTENT_PATTERNS) == "content") / sum(sizes.values())

    assert M.build_unet().config.transformer_layers_per_block == 1  # the committed model
    one, four = content_share(M.build_unet()), content_share(M.build_unet(transformer_layers=4))
    assert 0.15 < one < 0.2 and 0.4 < four < 0.45  # the shares the help text and docs quote
    with pytest.raises(ValueError, match="transformer_layers"):
        M.build_unet(transformer_layers=0)
    with pytest.raises(SystemExit) as exc:
        main(["--transformer-layers", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_logsnr_shift_moves_every_timestep_and_keeps_zero_terminal_snr():
    base = M.build_scheduler().alphas_cumprod.double()
    assert "trained_betas" not in M.scheduler_config(1.0)
    for shift in (0.65, 2.0):
        ab = M.build_scheduler(shift).alphas_cumprod.double()
        inner = slice(10, -1)  # float32 alpha_bar: its logit is coarse where alpha_bar is within 1e-4 of 1
        moved = (torch.logit(ab[inner]) - torch.logit(base[inner]))
        assert torch.allclose(moved, torch.full_like(moved, 2 * np.log(shift)), atol=1e-3)
        assert float(ab[-1]) < 1e-6 and float(ab[0]) > 0.99
    assert float(M.build_scheduler(0.65).alphas_cumprod[249]) < float(base[249])  # noisier last 4-step timestep
    with pytest.raises(ValueError, match="positive"):
        M.scheduler_config(0.0)


def test_train_smoke_with_a_shifted_schedule_saves_it(tmp_path):
    # also the cross-attention-only ablation: no pooled text embedding in the saved UNet
    from diffusers import StableDiffusionPipeline

    from quantkit.reference.train import DEFAULT_MINUTES, STEPS_AT_DEFAULT, train

    minutes = DEFAULT_MINUTES * 2 / STEPS_AT_DEFAULT["unet"]
    log = train(seed=0, out=tmp_path, minutes=minutes, evaluate=False, glyph_limit=5, logsnr_shift=0.8, threads=1,
                pooled_text=False, transformer_layers=2)
    assert log["logsnr_shift"] == 0.8 and log["threads_per_worker"] == 1 and log["pooled_text"] is False
    assert log["transformer_layers"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "digits-pipeline"))
    assert pipe.unet.config.transformer_layers_per_block == 2
    assert any(".transformer_blocks.1." in n for n, _ in pipe.unet.named_parameters())
    assert pipe.unet.config.addition_embed_type is None and getattr(pipe.unet, "add_embedding", None) is None
    assert not any(n.startswith("add_embedding") for n, _ in pipe.unet.named_parameters())
    saved = json.loads((tmp_path / "digits-pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["trained_betas"] == M.scheduler_config(0.8)["trained_betas"]
