"""JLCM through the pipeline: YAML -> plan (mixed with uniform layers) -> learn -> export -> reload, bit-exact."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from quantkit import stages
from quantkit.calibrate import load_artifact
from quantkit.config import parse_config
from quantkit.errors import QuantkitError
from quantkit.export.writer import WEIGHTS_NAME, export_pipeline
from quantkit.formats.spec import CodebookFormat, WeightFormat, format_bits_per_weight
from quantkit.integrations.diffusers import load_pipeline
from quantkit.models.layers import find_layers
from quantkit.models.pipeline import denoiser_of, load_fp_pipeline
from quantkit.quantize import quantize_denoiser, resolve_plan
from quantkit.quantize.plan import resolve_learning

QUANT = {
    "backend": "jlcm",
    "weights": {"bits": 3},
    "jlcm": {"groups": 4, "iterations": 4, "eval_every": 2},
    "overrides": [
        {"targets": ["re:.*attn2\\..*"], "weights": {"bits": 8}, "activations": None},
        {"targets": ["re:.*ff\\..*"], "backend": "jlcm", "weights": {"bits": 2},
         "jlcm": {"groups": 2, "shared_codebook": True, "iterations": 3, "update": "ste"}},
    ],
}


def _config(folder):
    return parse_config({"model": str(folder), "quantization": QUANT,
                         "calibration": {"num_prompts": 2, "num_inference_steps": 2, "batch_size": 2}})


def test_yaml_backend_validation():
    with pytest.raises(QuantkitError, match="weight-only"):
        parse_config({"quantization": {"backend": "jlcm", "weights": {"bits": 2}, "activations": {"bits": 8}}})
    with pytest.raises(QuantkitError, match="weights.bits"):
        parse_config({"quantization": {"backend": "jlcm", "weights": {"bits": 8}}})
    with pytest.raises(QuantkitError, match="unknown config key"):
        parse_config({"quantization": {"backend": "jlcm", "weights": {"bits": 2}, "jlcm": {"group": 3}}})


def test_plan_mixes_backends(tiny_pipelines):
    cfg = _config(tiny_pipelines["sd"])
    _, den = denoiser_of(load_fp_pipeline(cfg.model))
    plan = resolve_plan(find_layers(den), cfg.quantization)
    learning = resolve_learning(plan, cfg.quantization)
    kinds = {type(s.weight) for s in plan.values()}
    assert kinds == {CodebookFormat, WeightFormat}
    ff = next(f for f in plan if ".ff." in f)
    assert plan[ff].weight == CodebookFormat(2, 2, True) and learning[ff].update == "ste"
    conv = next(f for f in plan if f.endswith("conv1"))
    assert plan[conv].weight == CodebookFormat(3, 4, False) and learning[conv].iterations == 4
    assert all(f not in learning for f, s in plan.items() if not s.is_codebook)


def test_export_reload_bit_exact(tiny_pipelines, tmp_path):
    cfg = _config(tiny_pipelines["sd"])
    stages.calibrate(cfg, tmp_path / "work")
    art = load_artifact(tmp_path / "work" / "calibration")
    pipe = load_fp_pipeline(cfg.model)
    name, den = denoiser_of(pipe)
    layers = find_layers(den)
    plan = resolve_plan(layers, cfg.quantization)
    quantize_denoiser(den, plan, art, progress=False, learning=resolve_learning(plan, cfg.quantization))
    export_pipeline(pipe, name, plan, tmp_path / "out")
    q = load_pipeline(tmp_path / "out")
    _, qden = denoiser_of(q)
    saved, loaded = den.state_dict(), qden.state_dict()
    cb_keys = [k for k in saved if k.endswith(".weight_codebook")]
    assert cb_keys, "no codebook layer was exported"
    for k, v in saved.items():
        # diffusers widens floating parameters to the load dtype (fp16 -> fp32 is exact); integers stay as stored.
        assert torch.equal(v.to(loaded[k].dtype), loaded[k]), k
        assert v.is_floating_point() == loaded[k].is_floating_point(), k
    with safe_open(str(tmp_path / "out" / name / WEIGHTS_NAME), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in cb_keys)
        assert all(f.get_slice(k).get_dtype() == "I32" for k in f.keys() if k.endswith(("weight_codes",
                                                                                        "weight_row_group")))
    # Format tensors keep their format dtype whatever the export's float_dtype (codebooks are fp16).
    export_pipeline(pipe, name, plan, tmp_path / "out_bf16", float_dtype="bfloat16")
    with safe_open(str(tmp_path / "out_bf16" / name / WEIGHTS_NAME), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in cb_keys)
    step = art.steps[0]
    with torch.inference_mode():
        a = den(*step["args"], **step["kwargs"])[0]
        b = qden(*step["args"], **step["kwargs"])[0]
    assert torch.equal(a, b)
    info = stages.inspect_export(tmp_path / "out")
    for row in info["layers"]:
        fmt = plan[row["name"]].weight
        assert row["bits_per_weight"] == round(format_bits_per_weight(fmt, tuple(row["shape"])), 3), row["name"]
