"""CLIP score and CLIP Frechet distance: against the model's own forward pass, in ``quantkit eval`` and ``run``."""

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.clipscore import clip_scores_from_features, load_clip_scorer
from quantkit.errors import QuantkitError
from quantkit.evaluate import evaluate
from quantkit.testing.tiny import build_tiny_clip

PROMPTS = ["a red cat", "a photo of a dog", "an astronaut riding a horse", "one two three", "a blue digit"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(n=5, h=48, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_score_formula():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [4.0, -3.0]])
    np.testing.assert_allclose(clip_scores_from_features(a, b), [100.0, 100 / np.sqrt(2), 0.0, 0.0])
    with pytest.raises(ValueError, match="differ in shape"):
        clip_scores_from_features(a, b[:2])


def test_scores_match_the_models_own_logits(tiny_clip):
    scorer = load_clip_scorer(str(tiny_clip), batch_size=2)  # batches of 2: batching must not change anything
    imgs = _images()
    got = scorer.scores(imgs, PROMPTS)
    model = scorer.model
    with torch.no_grad():
        px = scorer.processor(images=list(imgs), return_tensors="pt")["pixel_values"]
        tok = scorer.tokenizer(PROMPTS, padding=True, truncation=True, return_tensors="pt")
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
        cos = out.logits_per_image.diagonal().double() / model.logit_scale.exp().double()
    feats_i, feats_t = scorer.image_features(imgs), scorer.text_features(PROMPTS)
    own_cos = (feats_i * feats_t).sum(1) / np.linalg.norm(feats_i, axis=1) / np.linalg.norm(feats_t, axis=1)
    np.testing.assert_allclose(own_cos, cos.numpy(), rtol=1e-5, atol=1e-6)  # embeddings as the model's forward
    np.testing.assert_allclose(got, 100 * cos.clamp(min=0).numpy(), rtol=1e-5, atol=1e-4)
    # float images in [0, 1] (what pipelines return) score as their uint8 rounding
    np.testing.assert_allclose(scorer.scores(imgs.astype(np.float32) / 255, PROMPTS), got, rtol=1e-6, atol=1e-6)


def test_load_errors_are_one_line_with_the_fix(tiny_clip, tmp_path, tiny_pipelines):
    with pytest.raises(QuantkitError, match="CLIP model folder not found"):
        load_clip_scorer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantkitError, match="not a CLIP model folder"):
        load_clip_scorer(str(tmp_path / "empty"))
    with pytest.raises(QuantkitError, match="not a CLIP model \\(model_type None\\)"):
        load_clip_scorer(str(tiny_pipelines["sd"] / "unet"))
    import shutil

    pickled = shutil.copytree(tiny_clip, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would raise")
    with pytest.raises(QuantkitError, match="reads only safetensors") as err:
        load_clip_scorer(str(pickled))
    assert "\n" not in str(err.value)


def test_eval_of_a_pipeline_against_itself(tiny_clip, tiny_pipelines, tmp_path):
    sd = str(tiny_pipelines["sd"])
    res = evaluate(sd, [sd], tmp_path / "e", num_images=6, steps=2, labels=["same"], clip_model=str(tiny_clip))
    fp, same = res["pipelines"]["FP"], res["pipelines"]["same"]
    assert same["clip_score"] == fp["clip_score"] and 0 <= fp["clip_score"] <= 100
    c = same["vs_fp"]["clip_score"]
    assert c["diff"] == 0.0 and c["ci95"] == [0.0, 0.0] and c["p_value"] == 1.0 and c["images"] == 6
    assert same["clip_fd_vs_fp"] == pytest.approx(0.0, abs=1e-6)
    assert res["clip"]["fd_fp_reseeded"] > 1e-3  # other seeds give other images
    assert "CLIP score" in (tmp_path / "e" / "table.md").read_text()


def test_eval_cli_reports_clip_metrics_of_a_quantized_export(tiny_clip, tiny_pipelines, tmp_path):
    cfg = tmp_path / "w4.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_pipelines["sd"]),
                                   "quantization": {"weights": {"bits": 4}, "activations": None}}))
    assert CliRunner().invoke(cli, ["export", str(cfg), "--out", str(tmp_path / "w4")]).exit_code == 0
    r = CliRunner().invoke(cli, ["eval", "--reference", str(tiny_pipelines["sd"]), "--quantized",
                                 str(tmp_path / "w4"), "--num-images", "6", "--steps", "2",
                                 "--clip-model", str(tiny_clip), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "CLIP score paired against FP" in r.output
    res = json.loads((tmp_path / "e" / "metrics.json").read_text())
    fp, q = res["pipelines"]["FP"], res["pipelines"]["w4"]
    c = q["vs_fp"]["clip_score"]
    assert c["diff"] == pytest.approx(q["clip_score"] - fp["clip_score"])
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and 0 <= c["p_value"] <= 1
    assert c["a_higher"] + c["b_higher"] > 0  # 4-bit weights change the images, so the scores move
    assert q["clip_fd_vs_fp"] > 0 and res["clip"]["model"] == str(tiny_clip)
    bad = CliRunner().invoke(cli, ["eval", "--reference", str(tiny_pipelines["sd"]), "--quantized",
                                   str(tmp_path / "w4"), "--clip-model", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "e2")])
    assert bad.exit_code == 2 and "CLIP model folder not found" in bad.output and not (tmp_path / "e2").exists()


def test_run_reports_clip_score_from_the_config(tiny_clip, tiny_pipelines, tmp_path):
    data = {"model": str(tiny_pipelines["sd"]),
            "calibration": {"num_prompts": 2, "num_inference_steps": 1, "batch_size": 2},
            "evaluation": {"num_images": 3, "clip_model": str(tiny_clip)}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(cli, ["run", str(cfg), "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert m["clip_model"] == str(tiny_clip) and 0 <= m["clip_score"] <= 100
    assert m["clip_score_vs_fp"]["diff"] == pytest.approx(m["clip_score"] - m["clip_score_fp"])
    data["evaluation"]["clip_model"] = str(tmp_path / "nope")
    cfg.write_text(yaml.safe_dump(data))
    bad = CliRunner().invoke(cli, ["run", str(cfg), "--out", str(tmp_path / "o2"), "--workdir", str(tmp_path / "w2")])
    assert bad.exit_code == 2 and "CLIP model folder not found" in bad.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / "w2" / "calibration").exists()  # failed first
