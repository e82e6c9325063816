"""``quantkit analyze`` on the tiny SD pipeline: table contents, caching, resuming, two processes.

A subset of the tiny UNet's layers (both groups, Linear and Conv2d, a BOS-aware text projection) keeps every
run to a few seconds; the two-process test starts ``torchrun`` exactly as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from quantkit.config import parse_config
from quantkit.errors import QuantkitError
from quantkit.models.pipeline import load_fp_pipeline
from quantkit.sensitivity.analyze import AnalysisSettings, analyze, parse_analysis_settings
from quantkit.stages import calibrate

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = [
    "conv_in",
    r"re:down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.(attn1\.to_q|attn2\.to_k|attn2\.to_v|ff\.net\.2)",
    r"re:down_blocks\.0\.resnets\.0\.conv1",
    "conv_out",
]
SETTINGS = {"layers": LAYERS, "device": "cpu"}  # CPU (and gloo under torchrun) on GPU machines too
CONTENT = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
           "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"}


def _metrics(table: dict) -> list[dict]:
    """The measured part of a table (per-layer costs are timings and differ between runs)."""
    return [{k: v for k, v in la.items() if k != "cost"} for la in table["layers"]]


@pytest.fixture(scope="module")
def one_thread():
    # The test machine is shared: one thread per process avoids oversubscription (and makes the single-process
    # run bit-comparable with torchrun's ranks, which torchrun also starts with one thread each).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def job(tiny_pipelines, tmp_path_factory, one_thread):
    """Config, calibrated workdir and the loaded FP pipeline."""
    root = tmp_path_factory.mktemp("analyze")
    data = {"model": str(tiny_pipelines["sd"]), "calibration": {"num_prompts": 2, "num_inference_steps": 1}}
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    cfg = parse_config(data)
    workdir = root / "work"
    calibrate(cfg, workdir)
    return {"config": cfg, "config_path": config_path, "workdir": workdir, "root": root,
            "pipe": load_fp_pipeline(cfg.model)}


def _fresh_workdir(job, name: str) -> Path:
    """A workdir holding only a copy of the calibration."""
    workdir = job["root"] / name
    shutil.copytree(job["workdir"] / "calibration", workdir / "calibration")
    return workdir


@pytest.fixture(scope="module")
def first(job):
    records = []
    path = analyze(job["config"], job["workdir"], SETTINGS, pipe=job["pipe"], progress=False,
                   on_item=records.append)
    return {"path": path, "table": json.loads(path.read_text()), "records": records}


def test_table_shape_and_contents(job, first):
    table = first["table"]
    assert first["path"] == job["workdir"] / "analysis" / "sensitivity.json"
    assert (job["workdir"] / "analysis" / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    fqns = [la["fqn"] for la in table["layers"]]
    assert fqns[0] == "conv_in" and fqns[-1] == "conv_out" and len(fqns) == 7  # model order
    settings = AnalysisSettings()
    denoiser = job["pipe"].unet
    for la in table["layers"]:
        role = "content" if la["fqn"] in CONTENT else "quality"
        assert la["role"] == role and la["metric"] == {"content": "ssim", "quality": "sqnr"}[role]
        module = denoiser.get_submodule(la["fqn"])
        assert la["kind"] == ("conv" if isinstance(module, torch.nn.Conv2d) else "linear")
        assert sorted(map(int, la["weights"])) == settings.weight_candidates[role]
        assert sorted(map(int, la["activations"])) == settings.act_candidates[role]
        assert la["num_weights"] == module.weight.numel()
        if la["kind"] == "linear":
            assert la["act_elements"] % module.in_features == 0
            assert la["macs"] == la["act_elements"] * module.out_features
        for value in [*la["weights"].values(), *la["activations"].values()]:
            if role == "content":
                assert -1.0 <= value <= 1.0
            else:
                assert 0.0 < value <= 120.0
        n_items = len(la["weights"]) + len(la["activations"])
        assert la["cost"]["evaluations"] == n_items  # 1 step, 2 prompts in one batch: one evaluation per item
        assert la["cost"]["seconds"] > 0
    conv_in = table["layers"][0]  # 4 x 16 x 16 latent in, 32 x 16 x 16 out, 3x3 kernel
    assert conv_in["act_elements"] == 4 * 16 * 16 and conv_in["macs"] == 32 * 16 * 16 * 4 * 9
    cost = table["cost"]
    assert cost["total_items"] == cost["computed_items"] == len(first["records"]) == 3 * 5 + 4 * 4
    assert cost["cached_items"] == 0 and cost["world_size"] == 1
    # items + 1 sizes step + FP images (1 batch x 1 step) + the FP SQNR reference (1 step)
    assert cost["run_evaluations"] == cost["total_items"] + 3
    assert cost["per_metric"]["ssim"]["items"] == 15 and cost["per_metric"]["sqnr"]["items"] == 16
    resolved = table["settings"]["resolved"]
    assert resolved["ssim_prompts"] == 2 and resolved["sqnr_steps"] == 1 and resolved["activations"] == "static"


def test_more_bits_more_fidelity(first):
    layers = first["table"]["layers"]
    for kind, lo, hi in (("weights", "4", "8"), ("activations", "4", "8")):
        better = [la[kind][hi] > la[kind][lo] for la in layers if la["role"] == "quality"]
        assert sum(better) >= 0.8 * len(better), kind
        not_worse = [la[kind][hi] >= la[kind][lo] for la in layers if la["role"] == "content"]
        assert sum(not_worse) >= 0.6 * len(not_worse), kind
    content = [la for la in layers if la["role"] == "content"]
    assert sum(la["weights"]["8"] >= la["weights"]["2"] for la in content) >= 2


def test_cached_rerun_does_no_work(job, first):
    path = analyze(job["config"], job["workdir"], SETTINGS, pipe=job["pipe"], progress=False,
                   on_item=lambda rec: pytest.fail("a cached re-run measured something"))
    table = json.loads(path.read_text())
    cost = table["cost"]
    assert cost["run_evaluations"] == 0 and cost["computed_items"] == 0
    assert cost["cached_items"] == cost["total_items"] == first["table"]["cost"]["total_items"]
    assert table["layers"] == first["table"]["layers"]  # per-layer costs are the cached ones too
    assert cost["measured_evaluations"] == first["table"]["cost"]["measured_evaluations"]


def test_subset_reuses_the_cache(job, first):
    subset = {**SETTINGS, "layers": ["conv_in"], "act_candidates": {"quality": [8]}}
    path = analyze(job["config"], job["workdir"], subset, pipe=job["pipe"], progress=False)
    table = json.loads(path.read_text())
    assert table["cost"]["run_evaluations"] == 0
    (row,) = table["layers"]
    assert row["weights"] == first["table"]["layers"][0]["weights"]
    assert row["activations"] == {"8": first["table"]["layers"][0]["activations"]["8"]}


def test_interrupted_run_resumes(job, first):
    workdir = _fresh_workdir(job, "interrupted")

    class Stop(Exception):
        pass

    seen = []

    def stop_after_seven(rec):
        seen.append(rec)
        if len(seen) == 7:
            raise Stop

    with pytest.raises(Stop):
        analyze(job["config"], workdir, SETTINGS, pipe=job["pipe"], progress=False, on_item=stop_after_seven)
    assert not (workdir / "analysis" / "sensitivity.json").exists()
    (cache_file,) = (workdir / "analysis").glob("cache-*.jsonl")
    with open(cache_file, "a") as f:
        f.write('{"record": "measure", "fqn": "conv_in", "ki')  # a write torn by a kill
    path = analyze(job["config"], workdir, SETTINGS, pipe=job["pipe"], progress=False)
    table = json.loads(path.read_text())
    assert table["cost"]["cached_items"] == 7
    assert table["cost"]["computed_items"] == table["cost"]["total_items"] - 7
    assert _metrics(table) == _metrics(first["table"])


def test_weight_only_config_skips_activations(job):
    cfg = job["config"].model_copy(update={"quantization": job["config"].quantization.model_copy(
        update={"activations": None})})
    path = analyze(cfg, _fresh_workdir(job, "weight-only"), {**SETTINGS, "layers": ["conv_out"]}, pipe=job["pipe"],
                   progress=False)
    (row,) = json.loads(path.read_text())["layers"]
    assert row["activations"] == {} and sorted(row["weights"]) == ["4", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(job, first):
    workdir = _fresh_workdir(job, "two-procs")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(REPO / "tests" / "sensitivity" / "run_analyze.py"),
           str(job["config_path"]), str(workdir), json.dumps(SETTINGS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((workdir / "analysis" / "sensitivity.json").read_text())
    assert _metrics(table) == _metrics(first["table"])  # identical values, not just close
    cost = table["cost"]
    assert cost["world_size"] == 2 and cost["computed_items"] == cost["total_items"]
    assert [r["items"] for r in cost["ranks"]] == [16, 15]  # round-robin over 31 items
    assert len(list((workdir / "analysis").glob("cache-*.jsonl"))) == 2  # one file per rank


def test_settings_validation():
    s = parse_analysis_settings({"weight_candidates": {"content": [2, 3, 4, 8]}, "act_candidates": {"content": []}})
    assert s.weight_candidates == {"content": [2, 3, 4, 8], "quality": [4, 8]}
    assert s.act_candidates == {"content": [], "quality": [4, 8]}
    assert parse_analysis_settings(None) == AnalysisSettings()
    with pytest.raises(QuantkitError, match="unknown key 'ssim_prompt'"):
        parse_analysis_settings({"ssim_prompt": 4})
    with pytest.raises(QuantkitError, match="weight_candidates"):
        parse_analysis_settings({"weight_candidates": {"quality": [5]}})
    with pytest.raises(QuantkitError, match="content_patterns"):
        parse_analysis_settings({"content_patterns": ["("]})
    assert AnalysisSettings(content_patterns=[r"\.attn1\."]).role_of("down.attn1.to_q") == "content"


def test_unknown_layer_pattern(job):
    with pytest.raises(QuantkitError, match="analysis.layers: 're:nope.*' matches none"):
        analyze(job["config"], job["workdir"], {**SETTINGS, "layers": ["re:nope.*"]}, pipe=job["pipe"], progress=False)


def test_cfg_sqnr_needs_a_guided_calibration(job):
    """The fixture calibrates without guidance (guidance_scale 1): a clear error before any measurement."""
    workdir = _fresh_workdir(job, "cfg-unguided")
    with pytest.raises(QuantkitError, match="classifier-free guidance"):
        analyze(job["config"], workdir, {**SETTINGS, "content_metric": "cfg_sqnr"}, pipe=job["pipe"], progress=False)
    assert not (workdir / "analysis" / "sensitivity.json").exists()


def test_cfg_sqnr_content_metric_on_a_guided_calibration(job):
    data = {"model": job["config"].model,
            "calibration": {"num_prompts": 2, "num_inference_steps": 1, "guidance_scale": 3.0}}
    cfg = parse_config(data)
    workdir = job["root"] / "cfg-guided"
    calibrate(cfg, workdir)
    settings = {**SETTINGS, "layers": [r"re:down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_v",
                                       "conv_out"], "content_metric": "cfg_sqnr"}
    path = analyze(cfg, workdir, settings, pipe=job["pipe"], progress=False)
    rows = {la["fqn"]: la for la in json.loads(path.read_text())["layers"]}
    to_v = rows["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert to_v["role"] == "content" and to_v["metric"] == "cfg_sqnr"
    assert rows["conv_out"]["metric"] == "sqnr"
    assert to_v["weights"]["8"] > to_v["weights"]["4"] > to_v["weights"]["2"]  # dB: more bits, less noise
    assert all(-120.0 <= v <= 120.0 for v in to_v["activations"].values())
