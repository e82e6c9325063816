"""allocate -> plan YAML -> export: each layer gets its own format, and the export reloads exactly."""

import json
import math

import pytest
from click.testing import CliRunner

import quantkit
from quantkit import stages
from quantkit.cli import cli
from quantkit.config import parse_config
from quantkit.errors import QuantkitError
from quantkit.models.layers import find_layers
from quantkit.models.pipeline import denoiser_of, load_fp_pipeline
from quantkit.nn import QUANT_MODULES


def _fake_table(layers):
    """A synthetic sensitivity table: deeper layers and content layers are more sensitive."""
    rows = []
    for i, la in enumerate(layers):
        if la.role == "content":
            w = {2: 0.90 - 0.002 * i, 4: 0.97, 8: 0.999}
            a = {4: 0.95, 8: 0.999}
        else:
            w = {4: 20.0 + (i % 7), 8: 40.0}
            a = {4: 18.0 + (i % 5), 8: 38.0}
        rows.append({"fqn": la.fqn, "role": la.role, "kind": la.kind, "num_weights": la.num_weights,
                     "weight_shape": list(la.weight_shape),
                     "act_elements": 1000, "macs": la.num_weights * 64, "weights": w, "activations": a,
                     "metric": "ssim" if la.role == "content" else "sqnr"})
    return {"layers": rows}


@pytest.fixture(scope="module")
def setup(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    cfg = parse_config({"model": str(tiny_pipelines["sd"]),
                        "calibration": {"num_prompts": 2, "num_inference_steps": 1, "batch_size": 2}})
    layers = find_layers(denoiser_of(load_fp_pipeline(cfg.model))[1])
    (root / "work" / "analysis").mkdir(parents=True)
    (root / "work" / "analysis" / "sensitivity.json").write_text(json.dumps(_fake_table(layers)))
    return cfg, root, layers


def test_allocate_then_export_mixed(setup, tmp_path):
    cfg, root, layers = setup
    cfg = cfg.model_copy(update={"allocation": cfg.allocation.model_copy(update={"weight_bits": 4.5,
                                                                                  "act_bits": 6.0})})
    plan = stages.allocate(cfg, root / "work", tmp_path / "plan.yaml")
    assert (tmp_path / "plan.png").stat().st_size > 0
    cfg = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"plan": str(plan)})})
    stages.export(cfg, tmp_path / "out", root / "work")
    rows = stages.inspect_export(tmp_path / "out")["layers"]
    formats = {r["format"].split("-")[0] for r in rows}
    assert {"w2", "w4", "w8"} & formats and len(formats) >= 2  # really mixed precision
    nw = {la.fqn: la.num_weights for la in layers}
    avg = sum(nw[r["name"]] * int(r["format"][1]) for r in rows) / sum(nw[r["name"]] for r in rows)
    assert avg <= 4.5 + 1e-6
    pipe = quantkit.load_pipeline(tmp_path / "out")
    assert len([m for m in denoiser_of(pipe)[1].modules() if isinstance(m, QUANT_MODULES)]) == len(rows)


def test_allocate_auto_content_weight(setup, tmp_path):
    # The default content_weight (auto) solves once per grid value, scores the distinct plans by their images
    # and keeps the best; the plan is the one a fixed weight at the chosen value gives.
    import yaml

    cfg, root, _ = setup
    cfg = cfg.model_copy(update={"allocation": cfg.allocation.model_copy(update={"weight_bits": 4.5,
                                                                                  "act_bits": 6.0})})
    assert cfg.allocation.content_weight == "auto"
    plan = stages.allocate(cfg, root / "work", tmp_path / "plan.yaml")
    sweep = json.loads((tmp_path / "plan-content-weight.json").read_text())
    trials = sweep["trials"]
    assert [t["content_weight"] for t in trials] == cfg.allocation.content_weight_grid
    scored = [t for t in trials if t["score"] is not None]
    assert len(scored) >= 2 and all(math.isfinite(t["score"]) for t in scored)
    best = max(scored, key=lambda t: t["score"])
    assert sweep["chosen"] == best["content_weight"]
    layers = yaml.safe_load(plan.read_text())
    assert layers["content_weight"] == sweep["chosen"]
    fixed = cfg.model_copy(update={"allocation": cfg.allocation.model_copy(
        update={"content_weight": sweep["chosen"]})})
    again = stages.allocate(fixed, root / "work", tmp_path / "fixed.yaml")
    assert yaml.safe_load(again.read_text())["layers"] == layers["layers"]
    assert not (tmp_path / "fixed-content-weight.json").exists()  # a fixed weight makes no sweep


def test_cli_content_weight_must_be_auto_or_a_number(setup, tmp_path):
    cfg, root, _ = setup
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(cfg.to_yaml())
    for bad, msg in (("half", "neither 'auto' nor a number"), ("1.5", "must be a number in [0, 1] or 'auto'")):
        result = CliRunner().invoke(cli, ["allocate", str(cfg_path), "--workdir", str(root / "work"),
                                          "--weight-bits", "4", "--content-weight", bad])
        assert result.exit_code == 2, result.output
        assert msg in result.stderr


def test_weight_mb_budget_is_the_exported_size(setup, tmp_path):
    # weight_mb counts everything the allocated layers store: codes, scales, zero points, shape records (and 2
    # bytes a weight for layers left in FP16); the plan's figure matches the exported tensors.
    import yaml

    cfg, root, layers = setup
    n = sum(la.num_weights for la in layers)
    quant = cfg.quantization.model_copy(update={"weights": cfg.quantization.weights.model_copy(
        update={"symmetric": False})})
    cfg = cfg.model_copy(update={"quantization": quant, "allocation": cfg.allocation.model_copy(
        update={"weight_mb": 5.0 * n / 8 / 2**20})})
    plan = stages.allocate(cfg, root / "work", tmp_path / "plan.yaml")
    achieved = yaml.safe_load(plan.read_text())["achieved"]["weight_mb"]
    cfg = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"plan": str(plan)})})
    stages.export(cfg, tmp_path / "out", root / "work")
    rows = stages.inspect_export(tmp_path / "out")["layers"]
    quantized = {r["name"]: r for r in rows}
    stored = sum(r["bits_per_weight"] * la.num_weights if (r := quantized.get(la.fqn)) else 16 * la.num_weights
                 for la in layers) / 8 / 2**20
    codes_only = sum(int(r["format"][1]) * la.num_weights if (r := quantized.get(la.fqn)) else 16 * la.num_weights
                     for la in layers) / 8 / 2**20
    assert abs(stored - codes_only) > 0.002  # the scales and zero points are big enough to tell apart
    assert achieved == pytest.approx(stored, abs=6e-4)  # the plan rounds MB to 3 decimals; bpw to 3 too


def test_old_table_without_shapes_counts_codes_and_says_so(setup, tmp_path, caplog):
    cfg, _, layers = setup
    table = _fake_table(layers)
    for row in table["layers"]:
        del row["weight_shape"]
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "sensitivity.json").write_text(json.dumps(table))
    cfg = cfg.model_copy(update={"allocation": cfg.allocation.model_copy(update={"weight_bits": 6.0})})
    with caplog.at_level("WARNING", logger="quantkit"):
        stages.allocate(cfg, tmp_path, tmp_path / "plan.yaml")
    assert "counts packed codes only" in caplog.text and "re-run quantkit analyze" in caplog.text


def test_cli_allocate_infeasible_budget(setup, tmp_path):
    cfg, root, _ = setup
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(cfg.to_yaml())
    result = CliRunner().invoke(cli, ["allocate", str(cfg_path), "--workdir", str(root / "work"),
                                      "--weight-bits", "1.0", "--plan", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2
    assert "infeasible: achievable range is" in result.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_bad_plan_file(setup, tmp_path):
    cfg, root, _ = setup
    bad = tmp_path / "plan.yaml"
    bad.write_text("schema_version: 1\nlayers:\n  conv_in: {weights: {bitz: 4}}\n")
    cfg = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"plan": str(bad)})})
    with pytest.raises(QuantkitError, match="bitz"):
        stages.export(cfg, tmp_path / "out", root / "work")
    assert not (tmp_path / "out").exists()


def _with_allocation(cfg, **update):
    return cfg.model_copy(update={"allocation": cfg.allocation.model_copy(update=update)})


def test_allocate_sweep_writes_one_plan_per_budget(setup, tmp_path):
    # A Pareto sweep of weight_bits: each feasible value gets the plan a single allocate at that budget gives,
    # infeasible values are recorded with the reason, and a higher budget never lowers the objective.
    import yaml

    cfg, root, _ = setup
    cfg = _with_allocation(cfg, act_bits=6.0, content_weight=0.5)
    path = stages.allocate_sweep(cfg, root / "work", "weight_bits", [1.0, 4.5, 6.0, 8.0], tmp_path / "sw")
    assert path == tmp_path / "sw" / "sweep.json" and (tmp_path / "sw" / "sweep.png").stat().st_size > 0
    rows = json.loads(path.read_text())["values"]
    assert [r["value"] for r in rows] == [1.0, 4.5, 6.0, 8.0]
    assert "achievable range" in rows[0]["infeasible"] and "plan" not in rows[0]
    feasible = rows[1:]
    assert all(r["achieved"]["weight_bits"] <= r["value"] + 1e-6 for r in feasible)
    assert all(r["image_psnr_db"] is None for r in feasible)  # a fixed content weight generates no images
    objectives = [r["objective"] for r in feasible]
    assert objectives == sorted(objectives) and objectives[0] < objectives[-1]
    for r in feasible:
        single = stages.allocate(_with_allocation(cfg, weight_bits=r["value"]), root / "work", tmp_path / "one.yaml")
        assert yaml.safe_load((tmp_path / "sw" / r["plan"]).read_text())["layers"] == \
            yaml.safe_load(single.read_text())["layers"]


def test_allocate_sweep_auto_content_weight(setup, tmp_path):
    cfg, root, _ = setup
    cfg = _with_allocation(cfg, weight_bits=4.5)
    assert cfg.allocation.content_weight == "auto"
    path = stages.allocate_sweep(cfg, root / "work", "act_bits", [5.0, 7.0])
    assert path == root / "work" / "sweep-act_bits" / "sweep.json"
    rows = json.loads(path.read_text())["values"]
    assert all(r["content_weight"] in cfg.allocation.content_weight_grid for r in rows)
    # the images that chose each plan's content weight give its score (absent only when the grid made one plan)
    assert any(r["image_psnr_db"] is not None for r in rows)
    assert all(math.isfinite(r["image_psnr_db"]) for r in rows if r["image_psnr_db"] is not None)
    assert all(r["achieved"]["act_bits"] <= r["value"] + 1e-6 for r in rows)


def test_allocate_sweep_errors(setup, tmp_path):
    cfg, root, _ = setup
    with pytest.raises(QuantkitError, match="unknown sweep budget 'bits'"):
        stages.allocate_sweep(cfg, root / "work", "bits", [4.0], tmp_path / "a")
    with pytest.raises(QuantkitError, match="no feasible value in the sweep of weight_bits: .*achievable range"):
        stages.allocate_sweep(_with_allocation(cfg, content_weight=0.5), root / "work", "weight_bits", [0.5, 1.0],
                              tmp_path / "b")
    assert not (tmp_path / "b" / "sweep.json").exists()


def test_cli_allocate_sweep(setup, tmp_path):
    cfg, root, _ = setup
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(_with_allocation(cfg, content_weight=0.5).to_yaml())
    base = ["allocate", str(cfg_path), "--workdir", str(root / "work"), "--act-bits", "6"]
    result = CliRunner().invoke(cli, [*base, "--sweep", "weight_bits=1,4.5,8"])
    assert result.exit_code == 0, result.output
    assert "infeasible: " in result.output and "plan-weight_bits-4.5.yaml" in result.output
    assert (root / "work" / "sweep-weight_bits" / "plan-weight_bits-8.yaml").is_file()
    for bad, msg in (("bits=4", "is not KIND=V1,V2,..."), ("weight_bits=a,b", "is not a comma-separated list"),
                     ("weight_bits=", "gives no values")):
        result = CliRunner().invoke(cli, [*base, "--sweep", bad])
        assert result.exit_code == 2 and msg in result.stderr, result.output
    result = CliRunner().invoke(cli, [*base, "--sweep", "weight_bits=4", "--plan", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2 and "a --sweep writes one plan per value" in result.stderr


def test_a_weight_budget_replaces_the_configs_other_one(setup, tmp_path):
    # weight_bits and weight_mb are exclusive: --weight-mb (or a weight_mb sweep) on a config that sets weight_bits
    # allocates under the MiB budget alone, instead of failing with "not both"
    import yaml

    cfg, root, layers = setup
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(_with_allocation(cfg, weight_bits=8.0, content_weight=0.5).to_yaml())
    mb = 5.0 * sum(la.num_weights for la in layers) / 8 / 2**20
    base = ["allocate", str(cfg_path), "--workdir", str(root / "work")]
    result = CliRunner().invoke(cli, [*base, "--weight-mb", f"{mb:.6f}", "--plan", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert plan["achieved"]["weight_mb"] <= mb + 1e-3 and plan["achieved"]["weight_bits"] < 8.0
    result = CliRunner().invoke(cli, [*base, "--sweep", f"weight_mb={mb:.6f},{2 * mb:.6f}"])
    assert result.exit_code == 0, result.output
    rows = json.loads((root / "work" / "sweep-weight_mb" / "sweep.json").read_text())["values"]
    assert [r["achieved"]["weight_mb"] <= r["value"] + 1e-3 for r in rows] == [True, True]
    result = CliRunner().invoke(cli, [*base, "--weight-mb", "1", "--weight-bits", "4"])
    assert result.exit_code == 2 and "give --weight-bits or --weight-mb, not both" in result.stderr
