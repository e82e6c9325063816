"""The plan YAML (round trip, hand edits, validation) and the plots."""

from __future__ import annotations

import pytest
import yaml

from quantkit.allocate import (
    AllocationProblem,
    LayerBits,
    LayerSpec,
    PlanError,
    allocate,
    pareto,
    plan_to_yaml,
    plot_allocation,
    plot_pareto,
    plot_sensitivity,
    read_plan,
    resolve_layers,
    write_plan,
)
from tests.allocate.test_solver import random_problem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def problem() -> AllocationProblem:
    return random_problem(11, n=12)


@pytest.fixture(scope="module")
def alloc(problem):
    return allocate(problem, weight_budget_bits=7.0, act_budget_bits=8.0, protect_top_percent=20.0)


def _write(tmp_path, text: str):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def test_round_trip(tmp_path, problem, alloc):
    path = write_plan(alloc, tmp_path / "out" / "plan.yaml")
    text = path.read_text()
    assert text.startswith("# quantkit bit plan") and "schema_version: 1" in text
    back = read_plan(path, roles=problem.roles, known_layers=problem.fqns)
    assert back.layers == alloc.layers
    assert list(back.layers) == problem.fqns  # model order kept
    assert back.protected == alloc.protected and len(back.protected) == 2
    assert all(back.layers[f] == LayerBits(None, None) for f in back.protected)
    assert back.budget == alloc.budget
    assert back.weight_candidates == alloc.weight_candidates and back.act_candidates == alloc.act_candidates
    assert back.achieved.weight_bits == pytest.approx(alloc.achieved.weight_bits, abs=1e-4)
    assert back.objective == pytest.approx(alloc.objective, abs=1e-6)
    assert back.solver == "pulp" and back.roles == problem.roles


def test_layer_lines_are_one_per_layer_and_commented(alloc):
    text = plan_to_yaml(alloc)
    layer_lines = text.split("layers:\n", 1)[1].splitlines()
    assert len(layer_lines) == len(alloc.layers)
    protected = alloc.protected[0]
    assert any(line.startswith(f"  {protected}: null  # ") and "FP16" in line for line in layer_lines)
    assert "{weights: {bits: " in text and "activations: {bits: " in text


def test_odd_names_round_trip(tmp_path):
    names = ["true", "1.5", "a b", "x: y", "null", "re:up\\..*"]
    alloc = allocate(AllocationProblem(
        [LayerSpec(n, "quality", 10, weight_metric={4: 1.0, 8: 2.0}) for n in names], act_candidates={}))
    back = read_plan(write_plan(alloc, tmp_path / "p.yaml"))
    assert list(back.layers) == names


def test_hand_edits_are_read(tmp_path, problem):
    a, b = problem.fqns[0], problem.fqns[1]
    path = _write(tmp_path, f"""schema_version: 1
layers:
  {a}: {{weights: {{bits: 8}}}}
  {b}: {{weights: null, activations: {{bits: 4}}}}
""")
    plan = read_plan(path)
    assert plan.layers[a] == LayerBits(8, None)  # a missing side is 16 bit
    assert plan.layers[b] == LayerBits(None, 4)
    assert plan.objective is None and plan.achieved is None


@pytest.mark.parametrize("text,match", [
    ("schema_version: 1\nlayers: {}\nbudgets: {}\n", r"unknown keys \['budgets'\]; valid keys: \['schema_version'"),
    ("schema_version: 2\nlayers: {}\n", "schema_version must be 1"),
    ("schema_version: 1\n", "needs a 'layers' mapping"),
    ("schema_version: 1\nlayers:\n  l0: {weight: {bits: 4}}\n",
     r"layer 'l0': unknown keys \['weight'\]; valid keys: \['weights', 'activations'\]"),
    ("schema_version: 1\nlayers:\n  l0: {weights: {bits: 5}}\n", r"layer 'l0': weights bits 5 is not a candidate"),
    ("schema_version: 1\nlayers:\n  l0: {weights: {bits: four}}\n", "layer 'l0': weights bits must be an integer"),
    ("schema_version: 1\nlayers:\n  l0: {activations: {bits: 2}}\n", r"layer 'l0': activations bits 2"),
    ("schema_version: 1\nbudget: {weight_bit: 4}\nlayers: {}\n", r"budget: unknown keys \['weight_bit'\]"),
    ("schema_version: 1\nlayers: [\n", "cannot read the plan"),
])
def test_validation_errors(tmp_path, text, match):
    with pytest.raises(PlanError, match=match):
        read_plan(_write(tmp_path, text))


def test_bits_checked_against_the_layers_group(tmp_path):
    # 2 bits is a content candidate only: accepted without roles, refused for a quality layer.
    path = _write(tmp_path, "schema_version: 1\nlayers:\n  q: {weights: {bits: 2}, activations: {bits: 8}}\n")
    assert read_plan(path).layers["q"] == LayerBits(2, 8)
    with pytest.raises(PlanError, match=r"layer 'q': weights bits 2 is not a candidate \(quality candidates: \[4, 8\]"):
        read_plan(path, roles={"q": "quality"})
    # Editing the candidates in the file widens the choice (the low-budget sets).
    path = _write(tmp_path, "schema_version: 1\ncandidates: {weights: {content: [2, 3, 4, 8], quality: [3, 4, 8]}}\n"
                            "layers:\n  q: {weights: {bits: 3}}\n")
    assert read_plan(path, roles={"q": "quality"}).layers["q"] == LayerBits(3, None)


def test_known_layers_and_regex_keys(tmp_path):
    known = ["down.attn2.to_k", "down.ff.net.0", "conv_in"]
    text = ('schema_version: 1\nlayers:\n  conv_in: null\n  "re:down\\\\..*": {weights: {bits: 4}, '
            'activations: {bits: 8}}\n  down.ff.net.0: {weights: {bits: 8}, activations: {bits: 8}}\n')
    plan = read_plan(_write(tmp_path, text), known_layers=known)
    resolved = resolve_layers(plan, known)
    assert resolved == {"down.attn2.to_k": LayerBits(4, 8), "down.ff.net.0": LayerBits(8, 8),
                        "conv_in": LayerBits(None, None)}  # the exact name wins over the regex
    with pytest.raises(PlanError, match="not a quantizable layer of this model"):
        read_plan(_write(tmp_path, "schema_version: 1\nlayers:\n  nope: null\n"), known_layers=known)
    with pytest.raises(PlanError, match="matches no layer"):
        read_plan(_write(tmp_path, "schema_version: 1\nlayers:\n  're:up\\..*': null\n"), known_layers=known)
    with pytest.raises(PlanError, match=r"no entry for 2 layers, e.g. 'down.attn2.to_k'"):
        read_plan(_write(tmp_path, "schema_version: 1\nlayers:\n  conv_in: null\n"), known_layers=known)


def test_written_yaml_is_plain_safe_yaml(alloc):
    data = yaml.safe_load(plan_to_yaml(alloc))
    assert data["schema_version"] == 1 and set(data["layers"]) == set(alloc.layers)
    assert data["budget"]["weight_bits"] == 7.0 and data["budget"]["protect_top_percent"] == 20.0


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plots_are_written(tmp_path, problem, alloc):
    _assert_png(plot_allocation(alloc, tmp_path / "plots" / "allocation.png"))
    _assert_png(plot_sensitivity(problem, tmp_path / "sens_w.png", kind="weights"))
    _assert_png(plot_sensitivity(problem, tmp_path / "sens_a.png", kind="activations"))
    _assert_png(plot_pareto(pareto(problem, [4.0, 5.0, 6.0], protect=[problem.fqns[0]]), tmp_path / "pareto.png"))
    front = pareto(problem, [4.0, 5.0, 6.0])
    _assert_png(plot_pareto(front, tmp_path / "pareto_mb.png", x="weight_mb"))
    with pytest.raises(ValueError, match="unknown cost 'size'"):
        plot_pareto(front, tmp_path / "bad.png", x="size")


def test_plot_of_a_read_plan_without_roles(tmp_path, alloc):
    plan = read_plan(write_plan(alloc, tmp_path / "p.yaml"))
    _assert_png(plot_allocation(plan, tmp_path / "a.png", title="edited"))
