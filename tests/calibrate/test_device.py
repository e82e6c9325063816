"""The stages on a GPU: calibration, analysis, run and eval with ``device: cuda`` agree with the CPU.

Calibration statistics and recorded denoiser I/O must not depend on where the pipeline ran (the artifact is
always on the CPU), and a GPU analysis must rank the same layers as the CPU one.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from quantkit import stages
from quantkit.calibrate.artifact import load_artifact
from quantkit.cli import cli
from quantkit.config import parse_config

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the stages' GPU path can only run on one", allow_module_level=True)


def _cfg(model, device, **extra):
    data = {"model": str(model), "device": device,
            "quantization": {"weights": {"bits": 4}, "activations": {"bits": 8}},
            "calibration": {"num_prompts": 4, "num_inference_steps": 2, "batch_size": 2},
            "evaluation": {"num_images": 2}, **extra}
    return parse_config(data)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "pixart", "lcm"])
def test_calibration_on_the_gpu_matches_the_cpu(kind, tiny_pipelines, tmp_path):
    arts = {}
    for dev in ("cpu", "cuda"):
        stages.calibrate(_cfg(tiny_pipelines[kind], dev), tmp_path / dev)
        arts[dev] = load_artifact(tmp_path / dev / "calibration")
    cpu, gpu = arts["cpu"], arts["cuda"]
    assert cpu.stats.keys() == gpu.stats.keys() and len(cpu.steps) == len(gpu.steps)
    for fqn, s in cpu.stats.items():
        for k in ("ema_min", "ema_max", "channel_absmax"):
            torch.testing.assert_close(gpu.stats[fqn][k], s[k], rtol=2e-2, atol=2e-3, msg=f"{fqn}.{k}")
    for a, b in zip(cpu.steps, gpu.steps):
        assert b["output"].device.type == "cpu"
        torch.testing.assert_close(b["output"], a["output"], rtol=2e-2, atol=2e-3)


def test_analysis_run_and_eval_on_the_gpu(tiny_pipelines, tmp_path):
    cfg = _cfg(tiny_pipelines["sd"], "cuda", analysis={"layers": ["re:.*attn2.to_k", "conv_in"], "ssim_prompts": 2,
                                                          "batch_size": 2})
    table = json.loads(stages.analyze(cfg, tmp_path / "w", progress=False).read_text())
    assert table["cost"]["device"].startswith("cuda") and len(table["layers"]) == 2
    metrics = stages.run(cfg, tmp_path / "out", tmp_path / "w")
    assert metrics["image_psnr_db"] > 10 and metrics["denoiser_sqnr_db"] > 5
    r = CliRunner().invoke(cli, ["eval", "--reference", str(tiny_pipelines["sd"]), "--quantized",
                                 str(tmp_path / "out"), "--num-images", "2", "--steps", "2", "--device", "cuda",
                                 "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert res["device"].startswith("cuda") and res["pipelines"]["out"]["psnr_db"] > 10

