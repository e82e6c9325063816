"""Export -> reload round trips for a UNet (SD), an SDXL-style UNet and a DiT (PixArt) pipeline."""

import json

import diffusers
import pytest
import safetensors.torch
import torch

import quantkit
from quantkit import stages
from quantkit.calibrate import load_artifact
from quantkit.config import parse_config
from quantkit.models.layers import find_layers
from quantkit.models.pipeline import denoiser_of, generate, load_fp_pipeline
from quantkit.nn import QuantConv2d, QuantLinear
from quantkit.ops import native_status
from quantkit.quantize import quantize_denoiser, resolve_plan

MIXED = {
    "weights": {"bits": 4, "group_size": -1},
    "activations": {"bits": 8},
    "overrides": [
        {"targets": ["re:.*attn2\\..*"], "weights": {"bits": 8}, "activations": None},
        {"targets": ["re:.*ff\\..*"], "weights": {"bits": 4, "group_size": 16, "symmetric": False},
         "activations": {"bits": 8, "dynamic": True}},
    ],
}


def _config(folder, quantization=MIXED):
    return parse_config({"model": str(folder), "quantization": quantization,
                         "calibration": {"num_prompts": 2, "num_inference_steps": 1, "batch_size": 2},
                         "evaluation": {"num_images": 2}})


@pytest.fixture(scope="module", params=["sd", "sdxl", "pixart", "lcm"])
def exported(request, tiny_pipelines, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"rt-{kind}")
    cfg = _config(tiny_pipelines[kind])
    stages.calibrate(cfg, root / "work")
    stages.export(cfg, root / "out", root / "work")
    return kind, cfg, root


def _outputs(denoiser, art):
    with torch.inference_mode():
        outs = []
        for step in art.steps:
            o = denoiser(*step["args"], **step["kwargs"])
            outs.append(o[0] if isinstance(o, tuple) else o.sample)
        return outs


def test_reloaded_denoiser_is_bit_identical(exported):
    kind, cfg, root = exported
    art = load_artifact(root / "work" / "calibration")
    fp = load_fp_pipeline(cfg.model)
    _, den = denoiser_of(fp)
    plan = resolve_plan(find_layers(den), cfg.quantization)
    quantize_denoiser(den, plan, art, progress=False)
    expected = _outputs(den, art)

    pipe = diffusers.DiffusionPipeline.from_pretrained(root / "out")  # plain diffusers after `import quantkit`
    name, loaded = denoiser_of(pipe)
    assert type(pipe) is type(fp)
    got = _outputs(loaded, art)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    schemes = {m.scheme.name for m in loaded.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    assert {"w4-a8", "w8-a16", "w4g16asym-a8dyn"} <= schemes
    assert len([m for m in loaded.modules() if isinstance(m, (QuantLinear, QuantConv2d))]) == len(plan)
    # the fusions wait for GPU-resident layers (quantkit.nn.fuse.fuse_on_first_gpu_call): on the CPU nothing fused
    assert "_auto_fuse_handle" in loaded.__dict__ and not any("forward" in m.__dict__ for m in loaded.modules())
    # loading on the CPU compacts the layers the native kernels run (W8 weight-only stays canonical)
    if native_status()["loaded"]:
        compacted = {m.scheme.name for m in loaded.modules() if isinstance(m, (QuantLinear, QuantConv2d))
                     and m.is_compact}
        assert {"w4-a8", "w4g16asym-a8dyn"} <= compacted and "w8-a16" not in compacted
        saved = {}
        for f in (root / "out" / name).glob("*.safetensors"):
            saved.update(safetensors.torch.load_file(f))
        resaved = loaded.state_dict()
        packed = [k for k in saved if k.endswith("weight_packed")]
        assert len(packed) == len(plan)
        assert all(resaved[k].dtype == torch.int32 and torch.equal(saved[k], resaved[k]) for k in packed)

    # component-level loading works too, and quantkit.load_pipeline is the same thing
    cls = type(loaded)
    comp = cls.from_pretrained(root / "out", subfolder=name)
    assert all(torch.equal(a, b) for a, b in zip(expected, _outputs(comp, art)))
    assert type(quantkit.load_pipeline(root / "out")) is type(fp)


def test_export_is_packed_and_generates(exported):
    kind, cfg, root = exported
    pipe = quantkit.load_pipeline(root / "out")
    name, den = denoiser_of(pipe)
    config = json.loads((root / "out" / name / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "quantkit" and qc["format_version"] == 1
    info = stages.inspect_export(root / "out")
    bits: dict[str, float] = {}
    for r in info["layers"]:  # smallest overhead per format (tiny layers pay more for scales and shapes)
        bits[r["format"]] = min(bits.get(r["format"], 99.0), r["bits_per_weight"])
    assert 4.0 < bits["w4-a8"] < 4.7 and 8.0 < bits["w8-a16"] < 8.7
    img = generate(pipe, ["a red cat"], 1, 1.0, 0)
    assert img.shape[-1] == 3 and torch.isfinite(torch.as_tensor(img)).all()
    # the quantized layers keep the attributes PEFT and users read
    lin = next(m for m in den.modules() if isinstance(m, QuantLinear))
    assert lin.weight.shape == (lin.out_features, lin.in_features)


def test_run_writes_metrics_and_grid(tiny_pipelines, tmp_path):
    cfg = _config(tiny_pipelines["sd"], {"weights": {"bits": 8}, "activations": {"bits": 8}})
    metrics = stages.run(cfg, tmp_path / "out", tmp_path / "work")
    assert (tmp_path / "work" / "grid.png").is_file()
    saved = json.loads((tmp_path / "work" / "metrics.json").read_text())
    for key in ("denoiser_sqnr_db", "image_psnr_db", "image_ssim", "size_ratio_vs_fp16"):
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert saved["size_ratio_vs_fp16"] < 0.62  # int8 codes + fp32 bias/norms of a tiny model
    assert 0.0 < saved["image_ssim"] <= 1.0
