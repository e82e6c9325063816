"""BOS-aware text-embedding quantization (MixDQ): exact prefix rows, a scale without the outlier, and the
calibration check that the prefix really is prompt-invariant."""

import torch

from quantkit import stages
from quantkit.calibrate import load_artifact
from quantkit.calibrate.observers import PrefixObserver
from quantkit.config import parse_config
from quantkit.formats import ActFormat, LayerScheme, WeightFormat
from quantkit.nn import quantize_module
from quantkit.sensitivity.metrics import sqnr


def _text_batch(outlier: float = 800.0):
    """Text embeddings [B, T, D] whose first (BOS) row is identical for every prompt and a large outlier."""
    x = torch.randn(6, 16, 32)
    x[:, 0] = torch.linspace(-outlier, outlier, 32)
    return x


def test_prefix_observer_reports_outlier_and_invariance():
    obs = PrefixObserver()
    x = _text_batch()
    obs.update(x[:3])
    obs.update(x[3:])
    st = obs.state()
    assert st["token_absmax"][0] == 800.0 and st["token_absmax"][1:].max() < 10
    assert st["prefix_max_dev"].item() == 0.0
    assert st["rest_ema_max"].item() < 10  # the scale of the remaining tokens excludes the outlier
    x2 = x.clone()
    x2[0, 0, 0] += 1.0  # a prompt-dependent first token is detected
    obs2 = PrefixObserver()
    obs2.update(x2)
    assert obs2.state()["prefix_max_dev"].item() == 1.0


def test_bos_aware_layer_is_exact_on_prefix_and_beats_naive_scale():
    lin = torch.nn.Linear(32, 24)
    x = _text_batch()
    ref = lin(x).detach()
    naive = quantize_module(lin, LayerScheme(WeightFormat(8), ActFormat(8)), (x.min(), x.max()))
    rest = x[:, 1:]
    bos = quantize_module(lin, LayerScheme(WeightFormat(8), ActFormat(8), prefix_tokens=1),
                          (rest.min(), rest.max()), prefix_input=x[0, :1])
    with torch.no_grad():
        y_naive, y_bos = naive(x), bos(x)
    torch.testing.assert_close(y_bos[:, 0], ref[:, 0], rtol=1e-6, atol=1e-4)  # the stored FP outputs
    gain = sqnr(ref[:, 1:], y_bos[:, 1:]) - sqnr(ref[:, 1:], y_naive[:, 1:])
    assert gain > 20.0, gain  # an 800-vs-3 outlier costs the naive per-tensor scale > 20 dB on other tokens


def test_calibration_verifies_bos_and_export_uses_it(tiny_pipelines, tmp_path):
    cfg = parse_config({"model": str(tiny_pipelines["sd"]),
                        "quantization": {"weights": {"bits": 8}, "activations": {"bits": 8}},
                        "calibration": {"num_prompts": 3, "num_inference_steps": 1, "batch_size": 2}})
    stages.calibrate(cfg, tmp_path / "w")
    art = load_artifact(tmp_path / "w" / "calibration")
    report = art.manifest["text_token_report"]
    assert report["first_token_prompt_invariant"] is True  # CLIP is causal: BOS output is prompt-invariant
    assert len(report["token_absmax"]) == 16
    stages.export(cfg, tmp_path / "out", tmp_path / "w")
    layers = stages.inspect_export(tmp_path / "out")["layers"]
    kv = [r for r in layers if ".attn2.to_k" in r["name"] or ".attn2.to_v" in r["name"]]
    assert kv and all(r["format"].endswith("-bos") for r in kv)
    assert not any(r["format"].endswith("-bos") for r in layers if r not in kv)


def test_non_causal_text_encoder_gets_no_bos(tiny_pipelines, tmp_path):
    # PixArt's T5 encoder is bidirectional and has no BOS: the first row depends on the prompt.
    cfg = parse_config({"model": str(tiny_pipelines["pixart"]),
                        "quantization": {"weights": {"bits": 8}, "activations": {"bits": 8}},
                        "calibration": {"num_prompts": 3, "num_inference_steps": 1, "batch_size": 3}})
    stages.calibrate(cfg, tmp_path / "w")
    art = load_artifact(tmp_path / "w" / "calibration")
    assert art.manifest["text_token_report"]["first_token_prompt_invariant"] is False
