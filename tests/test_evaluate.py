"""``quantkit eval``: FP vs quantized pipelines on the same prompts and seeds, with paired statistics."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit import stages
from quantkit.cli import cli
from quantkit.config import parse_config
from quantkit.evaluate import evaluate


@pytest.fixture(scope="module")
def w3_export(tmp_path_factory):
    """The reference model at W3A8 (visibly hurt: docs/mixdq.md), exported."""
    root = tmp_path_factory.mktemp("eval-w3")
    cfg = parse_config({"model": "builtin:digits",
                        "quantization": {"weights": {"bits": 3}, "activations": {"bits": 8}},
                        "calibration": {"num_prompts": 8, "num_inference_steps": 4, "batch_size": 8},
                        "evaluation": {"num_images": 2}})
    stages.calibrate(cfg, root / "work")
    stages.export(cfg, root / "out", root / "work")
    return root / "out"


def test_eval_of_fp_against_itself_is_a_zero_paired_difference(tmp_path):
    res = evaluate("builtin:digits", ["builtin:digits"], tmp_path / "e", num_images=12, labels=["same"])
    fp, same = res["pipelines"]["FP"], res["pipelines"]["same"]
    assert same["ssim"] == pytest.approx(1.0) and same["psnr_db"] >= 100
    assert same["alignment"] == fp["alignment"] and same["frechet"] == pytest.approx(fp["frechet"])
    for attr in ("digit", "colour", "position", "all"):
        v = same["vs_fp"][attr]
        assert v == {"diff": 0.0, "a_only": 0, "b_only": 0, "p_value": 1.0, "ci95": [0.0, 0.0]}
    assert same["vs_fp"]["frechet"]["ci95"] == [0.0, 0.0]
    assert same["vs_fp"]["images"] == 12


def test_eval_reports_a_quantized_pipeline_paired_against_fp(w3_export, tmp_path):
    out = tmp_path / "e"
    res = evaluate("builtin:digits", [str(w3_export)], out, num_images=24)
    for name in ("metrics.json", "table.md", "grid.png"):
        assert (out / name).is_file()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(res))
    fp, q = res["pipelines"]["FP"], res["pipelines"]["out"]
    assert 10 < q["psnr_db"] < 40 and 0 < q["ssim"] < 1  # W3A8 changes the images
    for attr in ("digit", "colour", "position", "all"):
        v = q["vs_fp"][attr]
        assert v["diff"] == pytest.approx(q["alignment"][attr] - fp["alignment"][attr])
        assert v["diff"] == pytest.approx((v["a_only"] - v["b_only"]) / 24)
        assert v["ci95"][0] <= v["diff"] <= v["ci95"][1] and 0 <= v["p_value"] <= 1
    f = q["vs_fp"]["frechet"]
    assert f["diff"] == pytest.approx(q["frechet"] - fp["frechet"])
    assert f["ci95"][0] <= f["ci95"][1]
    table = (out / "table.md").read_text()
    assert "Paired against FP" in table and "| out |" in table


def test_eval_cli_prints_the_table_and_skips_judges_for_other_prompts(w3_export, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a mat\na dog\n")
    r = CliRunner().invoke(cli, ["eval", "--reference", "builtin:digits", "--quantized", str(w3_export),
                                 "--prompts", str(prompts), "--num-images", "2", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "PSNR vs FP" in r.output and "judge metrics (alignment, Frechet distance) skipped" in r.output
    res = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "vs_fp" not in res["pipelines"]["out"] and np.isfinite(res["pipelines"]["out"]["psnr_db"])
    again = CliRunner().invoke(cli, ["eval", "--reference", "builtin:digits", "--quantized", str(w3_export),
                                     "--num-images", "2", "--out", str(tmp_path / "e")])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_eval_refuses_an_existing_output_before_generating(tmp_path):
    (tmp_path / "e").mkdir()
    r = CliRunner().invoke(cli, ["eval", "--reference", str(tmp_path / "no-model"), "--quantized",
                                 str(tmp_path / "no-model"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.output  # not a model error minutes later
