"""``quantkit bench``: each pipeline measured in its own process on the denoiser's real inputs (no timing asserts)."""

import json

import pytest
import yaml
from click.testing import CliRunner

from quantkit.bench import bench
from quantkit.cli import cli
from quantkit.errors import QuantkitError


@pytest.fixture(scope="module")
def w8a8_export(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = root / "w8a8.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_pipelines["sd"]),
                                   "calibration": {"num_prompts": 2, "num_inference_steps": 1, "batch_size": 2}}))
    assert CliRunner().invoke(cli, ["export", str(cfg), "--out", str(root / "w8a8")]).exit_code == 0
    return root / "w8a8"


def test_bench_measures_fp_and_export_on_the_captured_inputs(tiny_pipelines, w8a8_export, tmp_path):
    out = tmp_path / "b"
    res = bench(str(tiny_pipelines["sd"]), [str(w8a8_export)], out, device="cpu", steps=3, warmup=1,
                batch_size=2, guidance_scale=7.5)
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(res))
    assert list(res["pipelines"]) == ["FP", "w8a8"] and res["device"] == "cpu"
    for r in res["pipelines"].values():
        assert r["steps"] == 3 and r["step_ms"] > 0
        assert r["step_ms_quartiles"][0] <= r["step_ms"] <= r["step_ms_quartiles"][1]
        assert r["peak_mib"] > 0 and r["rss_mib"] > 0
        assert r["denoiser_batch"] == 4  # 2 prompts, doubled by classifier-free guidance
    fp, q = res["pipelines"]["FP"], res["pipelines"]["w8a8"]
    assert fp["speedup_vs_fp"] == 1.0 and q["speedup_vs_fp"] == pytest.approx(fp["step_ms"] / q["step_ms"])
    table = (out / "table.md").read_text()
    assert "| FP |" in table and "| w8a8 |" in table and "own process" in table


def test_bench_cli_without_guidance_and_its_errors(tiny_pipelines, w8a8_export, tmp_path):
    r = CliRunner().invoke(cli, ["bench", "--reference", str(tiny_pipelines["sd"]), "--quantized", str(w8a8_export),
                                 "--device", "cpu", "--steps", "2", "--warmup", "0", "--guidance-scale", "0",
                                 "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert res["pipelines"]["w8a8"]["denoiser_batch"] == 1
    again = CliRunner().invoke(cli, ["bench", "--reference", "x", "--quantized", "y", "--out", str(tmp_path / "b")])
    assert again.exit_code == 2 and "already exists" in again.output  # before any measuring
    bad = CliRunner().invoke(cli, ["bench", "--reference", str(tmp_path / "nope"), "--quantized", str(w8a8_export),
                                   "--device", "cpu"])
    assert bad.exit_code == 2 and "model folder not found" in bad.output and "Traceback" not in bad.output
    with pytest.raises(QuantkitError, match="not one of float32"):
        bench("x", ["y"], dtype="int8")


def test_rounds_alternate_the_order_and_take_medians(monkeypatch, tmp_path):
    """The aggregation over rounds, on recorded fake measurements (the children are tested above)."""
    import quantkit.bench as qb

    calls = []
    fake = {"FP": [100.0, 120.0, 110.0], "q": [50.0, 70.0, 40.0]}

    def run_child(job):
        label = "FP" if job["spec"] == "fp-spec" else "q"
        calls.append(label)
        ms = fake[label][sum(1 for c in calls if c == label) - 1]
        return {"step_ms": ms, "step_ms_quartiles": [ms - 1, ms + 1], "peak_mib": ms * 10, "rss_mib": ms,
                "steps": 2}

    monkeypatch.setattr(qb, "_run_child", run_child)
    res = qb.bench("fp-spec", ["q-spec"], device="cpu", rounds=3, labels=["q"])
    assert calls == ["FP", "q", "q", "FP", "FP", "q"]
    fp, q = res["pipelines"]["FP"], res["pipelines"]["q"]
    assert fp["rounds_step_ms"] == [100.0, 120.0, 110.0] and fp["step_ms"] == 110.0
    assert q["step_ms"] == 50.0 and q["step_ms_quartiles"] == [39.0, 71.0] and q["peak_mib"] == 700.0
    assert q["speedup_vs_fp"] == pytest.approx(2.2) and q["peak_vs_fp"] == pytest.approx(700 / 1200)
    assert "median of 3 rounds" in qb.markdown_table(res)
