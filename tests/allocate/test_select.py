"""``content_weight: auto``: one program per grid value, duplicates skipped, the best-scoring plan kept."""

from __future__ import annotations

import pytest

from quantkit.allocate import AllocationError, AllocationProblem, LayerBits, LayerSpec, allocate
from quantkit.allocate.select import choose_content_weight
from tests.allocate.test_solver import random_problem

GRID = [0.0, 0.01, 0.05, 0.2, 0.5, 0.8, 1.0]


def _solve(p):
    return allocate(p, weight_budget_bits=3.5, act_budget_bits=5.0)


def _content_bits(alloc) -> int:
    return sum(b.weights + b.activations for f, b in alloc.layers.items() if alloc.roles[f] == "content")


@pytest.mark.parametrize("seed", range(4))
def test_keeps_the_best_scoring_plan_and_scores_each_distinct_plan_once(seed):
    problem = random_problem(seed, n=8)
    calls = []

    def score(alloc):
        calls.append(alloc)
        return _content_bits(alloc)  # a score that prefers plans giving content layers more bits

    chosen, trials = choose_content_weight(problem, GRID, _solve, score)
    assert [t.content_weight for t in trials] == GRID
    keys = {tuple(sorted(a.layers.items())) for a in calls}
    assert len(keys) == len(calls) >= 2  # several distinct plans on this problem, none scored twice
    assert sum(t.score is not None for t in trials) == len(calls)
    for t in trials:  # a repeated plan points at the earlier grid value that produced it
        assert (t.score is None) == (t.same_as is not None)
        if t.same_as is not None:
            assert t.same_as < t.content_weight
            assert _solve(problem.with_content_weight(t.content_weight)).layers == \
                _solve(problem.with_content_weight(t.same_as)).layers
    best = max(t.score for t in trials if t.score is not None)
    first_best = next(t.content_weight for t in trials if t.score == best)
    assert chosen.content_weight == first_best  # ties go to the earlier grid value
    assert _content_bits(chosen) == best
    assert chosen.layers == _solve(problem.with_content_weight(first_best)).layers


def test_one_distinct_plan_needs_no_images():
    layers = [LayerSpec(f"blocks.{i}.{name}", role, num_weights=100 * (i + 1), act_elements=10,
                        weight_metric={2: 0.1 * i, 4: 1.0, 8: 2.0}, act_metric={4: 1.0, 8: 2.0})
              for i, (name, role) in enumerate([("attn2.to_k", "content"), ("conv1", "quality")] * 2)]
    problem = AllocationProblem(layers)
    grid = [0.2, 0.5, 0.8]  # (0 would leave the content layers' bits free: any plan is then optimal)

    def solve(p):  # budgets that fit every layer at 8 bits: the best plan whatever the weighting
        return allocate(p, weight_budget_bits=8.0, act_budget_bits=8.0)

    def score(alloc):
        raise AssertionError("a single distinct plan must not be scored")

    chosen, trials = choose_content_weight(problem, grid, solve, score)
    assert chosen.content_weight == 0.2
    assert all(b == LayerBits(8, 8) for b in chosen.layers.values())
    assert [t.score for t in trials] == [None] * 3
    assert [t.same_as for t in trials] == [None, 0.2, 0.2]


@pytest.mark.parametrize("grid", [[], [1.5], [-0.1, 0.5]])
def test_bad_grid(grid):
    with pytest.raises(AllocationError, match="content_weight_grid"):
        choose_content_weight(random_problem(0), grid, _solve, lambda a: 0.0)
