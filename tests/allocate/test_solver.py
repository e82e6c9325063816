"""The integer program against exhaustive enumeration, budgets, protection and the solver registry."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantkit.allocate import (
    BYTES_PER_MB,
    LOW_BUDGET_ACT_CANDIDATES,
    LOW_BUDGET_WEIGHT_CANDIDATES,
    SOLVERS,
    AllocationError,
    AllocationProblem,
    InfeasibleBudget,
    LayerBits,
    LayerSpec,
    allocate,
    evaluate,
    pareto,
    register_solver,
)
from quantkit.errors import QuantkitError

SRC = Path(__file__).resolve().parents[2] / "src"


def _metric(rng, role: str, bits: int) -> float:
    """A noisy, mostly increasing metric: SSIM-like for content, SQNR-like (dB) for quality."""
    if role == "content":
        return 1.0 - rng.uniform(0.05, 0.6) / bits
    return 6.0 * bits + rng.uniform(-4.0, 4.0)


def random_problem(seed: int, n: int = 6, roles: tuple[str, ...] = ("content", "quality"), acts: bool = True,
                   **kwargs) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        role = roles[i % len(roles)]
        layers.append(LayerSpec(
            f"blocks.{i}.{'attn2.to_k' if role == 'content' else 'conv1'}", role,
            num_weights=int(rng.integers(100, 5000)), act_elements=int(rng.integers(10, 2000)),
            macs=int(rng.integers(1_000, 100_000)),
            weight_metric={b: _metric(rng, role, b) for b in (2, 3, 4, 8)},
            act_metric={b: _metric(rng, role, b) for b in (3, 4, 8)} if acts else None,
        ))
    return AllocationProblem(layers, **kwargs)


def exhaustive_best(problem: AllocationProblem, weight_bits=None, act_bits=None, max_bops=None) -> float:
    """The best objective over every assignment within the budgets, written independently of the solver."""
    w_loss, a_loss = problem.normalised_losses("weights"), problem.normalised_losses("activations")
    n = [la.num_weights for la in problem.layers]
    e = [la.act_elements for la in problem.layers]
    per_layer = []
    for i, la in enumerate(problem.layers):
        g = problem.group_weight(la.role)
        a_cands = problem.candidates("activations", la) or (16,)
        per_layer.append([(w, a, -g * (w_loss[i][w] + a_loss[i].get(a, 0.0)))
                          for w in problem.candidates("weights", la) for a in a_cands])
    best = -math.inf
    for combo in itertools.product(*per_layer):
        if weight_bits is not None and sum(ni * c[0] for ni, c in zip(n, combo)) > weight_bits * sum(n) + 1e-9:
            continue
        if act_bits is not None and sum(ei * c[1] for ei, c in zip(e, combo)) > act_bits * sum(e) + 1e-9:
            continue
        if max_bops is not None and sum(la.macs * c[0] * c[1] for la, c in zip(problem.layers, combo)) > max_bops:
            continue
        best = max(best, sum(c[2] for c in combo))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budget", [2.3, 3.0, 4.5, 6.0, 7.9])
def test_ilp_matches_exhaustive_weights_only(seed, budget):
    # 6 layers x 3 candidates {2, 4, 8}: the ILP optimum equals the best of the 3^6 assignments.
    problem = random_problem(seed, roles=("content",), acts=False)
    alloc = allocate(problem, weight_budget_bits=budget)
    assert alloc.objective == pytest.approx(exhaustive_best(problem, weight_bits=budget), abs=1e-7)
    assert alloc.achieved.weight_bits <= budget + 1e-9
    assert all(b.activations is None for b in alloc.layers.values())


def dynamic_programming_best(problem: AllocationProblem, budget: float) -> float:
    """Exact weights-only optimum by dynamic programming over the total bit count (small integer sizes)."""
    n = [la.num_weights for la in problem.layers]
    cap = int(math.floor(budget * sum(n) + 1e-9))
    loss = problem.normalised_losses("weights")
    best = np.full(cap + 1, -np.inf)  # best[c]: best score of the layers so far using exactly c bits
    best[0] = 0.0
    for i, la in enumerate(problem.layers):
        new = np.full(cap + 1, -np.inf)
        for bits, value in loss[i].items():
            w = n[i] * bits
            if w <= cap:
                new[w:] = np.maximum(new[w:], best[:cap + 1 - w] - problem.group_weight(la.role) * value)
        best = new
    return float(best.max())


@pytest.mark.parametrize("seed,budget", [(1, 6.2), (2, 4.4)])
def test_ilp_exact_on_many_layers(seed, budget):
    # 400 layers: each layer's normalised score is tiny, which made CBC's absolute tolerances stop early
    # before the objective was rescaled (these two cases were off by ~5e-6). DP is the exact oracle here.
    rng = np.random.default_rng(seed)
    layers = [LayerSpec(la.fqn, la.role, int(rng.integers(1, 20)), weight_metric=la.weight_metric)
              for la in random_problem(seed, n=400, acts=False).layers]
    problem = AllocationProblem(layers, act_candidates={})
    alloc = allocate(problem, weight_budget_bits=budget)
    assert alloc.objective == pytest.approx(dynamic_programming_best(problem, budget), abs=1e-9)


@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("budget", [2.5, 3.3])
def test_ilp_matches_exhaustive_low_budget_candidates(seed, budget):
    # The project's low-budget sets: weights {2, 3, 4, 8} (4^6 assignments).
    problem = random_problem(seed, acts=False, weight_candidates=LOW_BUDGET_WEIGHT_CANDIDATES,
                             act_candidates=LOW_BUDGET_ACT_CANDIDATES)
    alloc = allocate(problem, weight_budget_bits=budget)
    assert alloc.objective == pytest.approx(exhaustive_best(problem, weight_bits=budget), abs=1e-7)
    assert set(b.weights for b in alloc.layers.values()) <= {2, 3, 4, 8}


@pytest.mark.parametrize("seed,wb,ab,bops_frac,cw", [
    (0, 4.0, 6.0, None, 0.5),
    (1, 5.0, 5.0, 0.5, 0.5),
    (2, None, None, 0.3, 0.8),
    (3, 4.5, 7.0, 0.4, 0.2),
])
def test_joint_program_matches_exhaustive(seed, wb, ab, bops_frac, cw):
    # Both groups (content {2,4,8}, quality {4,8}) x activations {4,8}, with the coupling BOPs constraint.
    problem = random_problem(seed, content_weight=cw)
    lo = sum(la.macs * min(problem.candidates("weights", la)) * 4 for la in problem.layers)
    hi = sum(la.macs * 64 for la in problem.layers)
    max_bops = None if bops_frac is None else lo + bops_frac * (hi - lo)
    expected = exhaustive_best(problem, weight_bits=wb, act_bits=ab, max_bops=max_bops)
    for solver in ("pulp", "brute"):
        alloc = allocate(problem, weight_budget_bits=wb, act_budget_bits=ab, max_bops=max_bops, solver=solver)
        assert alloc.objective == pytest.approx(expected, abs=1e-7), solver
        if max_bops is not None:
            assert alloc.achieved.bops <= max_bops * (1 + 1e-9)
        if ab is not None:
            assert alloc.achieved.act_bits <= ab + 1e-9


def test_bops_constraint_binds():
    problem = random_problem(7)
    free = allocate(problem, weight_budget_bits=6.0)
    tight = allocate(problem, weight_budget_bits=6.0, max_bops=0.5 * free.achieved.bops)
    assert tight.achieved.bops <= 0.5 * free.achieved.bops * (1 + 1e-9)
    assert tight.objective <= free.objective + 1e-12
    bops = sum(la.macs * (b.weights or 16) * (b.activations or 16)
               for la, b in zip(problem.layers, tight.layers.values()))
    assert tight.achieved.bops == pytest.approx(bops)


def test_infeasible_budget_reports_range():
    problem = random_problem(0, roles=("content",), acts=False)
    with pytest.raises(InfeasibleBudget) as info:
        allocate(problem, weight_budget_bits=1.5)
    msg = str(info.value)
    assert "weight budget 1.50 average bits is infeasible: achievable range is 2.00-8.00 bits" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, QuantkitError)
    assert (info.value.low, info.value.high) == pytest.approx((2.0, 8.0))
    with pytest.raises(InfeasibleBudget, match=r"activation budget 3.00 average bits .* 4.00-8.00 bits"):
        allocate(random_problem(0), act_budget_bits=3.0)
    with pytest.raises(InfeasibleBudget, match=r"compute budget .* BOPs is infeasible"):
        allocate(random_problem(0), max_bops=10.0)


def test_infeasible_range_counts_protected_layers():
    problem = random_problem(1, n=10, roles=("content",), acts=False)
    with pytest.raises(InfeasibleBudget, match=r"and 1 16-bit protected layers") as info:
        allocate(problem, weight_budget_bits=2.0, protect_top_percent=10.0)
    assert info.value.low > 2.0


def test_mb_budget_counts_packed_bytes_of_3_bit_codes():
    # 3-bit codes are stored 10 to a 32-bit word: 3.2 bits each on disk, which weight_mb must count.
    from quantkit.formats.spec import stored_bits_per_weight

    problem = random_problem(5, acts=False, weight_candidates={"content": [3, 8], "quality": [3, 8]},
                             stored_bits=stored_bits_per_weight)
    n = sum(la.num_weights for la in problem.layers)
    alloc = allocate(problem, weight_budget_mb=3.2 * n / 8 / BYTES_PER_MB)
    assert all(b.weights == 3 for b in alloc.layers.values())  # exactly the all-3-bit size fits
    assert alloc.achieved.weight_mb == pytest.approx(3.2 * n / 8 / BYTES_PER_MB)
    assert alloc.achieved.weight_bits == pytest.approx(3.0)
    with pytest.raises(InfeasibleBudget):
        allocate(problem, weight_budget_mb=3.1 * n / 8 / BYTES_PER_MB)


def test_mb_budget_counts_each_layers_overhead():
    # Scales, zero points and shape records are stored too: a quantized layer adds its overhead_bits to the size,
    # a layer left in FP16 does not.
    import dataclasses

    base = random_problem(4, acts=False, weight_candidates={"content": [4, 8], "quality": [4, 8]})
    layers = [dataclasses.replace(la, overhead_bits=16 * (i + 1) * 1000) for i, la in enumerate(base.layers)]
    problem = dataclasses.replace(base, layers=layers)
    n = sum(la.num_weights for la in layers)
    extra = sum(la.overhead_bits for la in layers)
    all4 = (4 * n + extra) / 8 / BYTES_PER_MB
    alloc = allocate(problem, weight_budget_mb=all4)
    assert all(b.weights == 4 for b in alloc.layers.values())
    assert alloc.achieved.weight_mb == pytest.approx(all4)
    with pytest.raises(InfeasibleBudget):  # the codes alone would fit, the overhead does not
        allocate(problem, weight_budget_mb=all4 - 8 / 8 / BYTES_PER_MB)
    fp = evaluate(problem, {la.fqn: LayerBits(None, None) for la in layers})[1]
    assert fp.weight_mb == pytest.approx(16 * n / 8 / BYTES_PER_MB)
    assert LayerSpec.from_dict(layers[0].to_dict()) == layers[0]


def test_budget_above_range_takes_best_bits():
    problem = random_problem(2, acts=False)
    alloc = allocate(problem, weight_budget_bits=100.0)
    assert alloc.objective == pytest.approx(0.0, abs=1e-12)  # every layer at its best candidate


def test_mb_budget_matches_average_bits():
    problem = random_problem(3)
    n = sum(la.num_weights for la in problem.layers)
    mb = 3.5 * n / 8 / BYTES_PER_MB
    by_mb = allocate(problem, weight_budget_mb=mb)
    by_bits = allocate(problem, weight_budget_bits=3.5)
    assert BYTES_PER_MB == 2**20
    assert by_mb.objective == pytest.approx(by_bits.objective, abs=1e-9)
    assert by_mb.achieved.weight_mb <= mb * (1 + 1e-9)
    assert by_mb.achieved.weight_mb == pytest.approx(by_mb.achieved.weight_bits * n / 8 / 2**20)
    with pytest.raises(InfeasibleBudget, match=r"MB is infeasible.*1 MB = 2\*\*20 bytes"):
        allocate(problem, weight_budget_mb=mb / 4)
    with pytest.raises(AllocationError, match="not both"):
        allocate(problem, weight_budget_bits=4, weight_budget_mb=mb)


def _protection_problem() -> AllocationProblem:
    # Layer 3 (content) and layer 6 (quality) lose the most at their lowest candidate.
    layers = []
    for i in range(10):
        role = "content" if i < 5 else "quality"
        drop = 5.0 if i in (3, 6) else 1.0
        wm = {2: 1 - 0.1 * drop, 4: 1 - 0.02 * drop, 8: 1.0} if role == "content" else {4: 40 - 10 * drop, 8: 40.0}
        layers.append(LayerSpec(f"l{i}", role, num_weights=100, act_elements=10, macs=1000, weight_metric=wm,
                                act_metric={4: wm[4], 8: wm[8]}))
    return AllocationProblem(layers)


def test_protect_top_percent_keeps_most_sensitive_in_fp16():
    problem = _protection_problem()
    alloc = allocate(problem, weight_budget_bits=6.0, act_budget_bits=8.0, protect_top_percent=20.0)
    assert alloc.protected == ("l3", "l6")
    assert alloc.layers["l3"] == LayerBits(None, None) and alloc.layers["l6"].is_fp16
    # Protected layers count as 16 bits in the budget.
    expected = sum((b.weights or 16) for b in alloc.layers.values()) / 10
    assert alloc.achieved.weight_bits == pytest.approx(expected)
    assert alloc.achieved.weight_bits <= 6.0 + 1e-9
    assert problem.most_sensitive(10.0) == []  # floor(5 * 10 %) = 0 per group
    with pytest.raises(AllocationError, match="protect_top_percent"):
        allocate(problem, protect_top_percent=150)


def test_protect_by_name():
    problem = _protection_problem()
    alloc = allocate(problem, weight_budget_bits=8.0, protect=["l0"])
    assert alloc.protected == ("l0",)
    with pytest.raises(AllocationError, match="unknown layers"):
        allocate(problem, protect=["nope"])


def test_normalisation_and_knob():
    layers = [
        LayerSpec("c0", "content", 100, weight_metric={2: 0.5, 4: 0.9, 8: 1.0}),
        LayerSpec("c1", "content", 100, weight_metric={2: 0.9, 4: 0.95, 8: 0.99}),
        LayerSpec("q0", "quality", 100, weight_metric={4: 20.0, 8: 50.0}),
    ]
    problem = AllocationProblem(layers, act_candidates={})
    w = problem.normalised_losses("weights")
    spread_c = 0.5 + 0.09
    assert w[0] == pytest.approx({2: 0.5 / spread_c, 4: 0.1 / spread_c, 8: 0.0})
    assert w[1][2] == pytest.approx(0.09 / spread_c)
    assert w[2] == pytest.approx({4: 1.0, 8: 0.0})
    assert problem.spread("weights") == pytest.approx({"content": spread_c, "quality": 30.0})
    # A budget that lets exactly one group keep high bits: the knob decides which.
    content_first = allocate(problem.with_content_weight(0.9), weight_budget_bits=16 / 3)
    quality_first = allocate(problem.with_content_weight(0.1), weight_budget_bits=16 / 3)
    assert content_first.layers["q0"].weights == 4 and quality_first.layers["q0"].weights == 8
    objective, achieved = evaluate(problem.with_content_weight(0.1), quality_first.layers)
    assert objective == pytest.approx(quality_first.objective) and achieved == quality_first.achieved


def test_problem_validation_names_the_layer():
    with pytest.raises(AllocationError, match=r"'q0' \(quality\) has no weights metric at \[4\]"):
        AllocationProblem([LayerSpec("q0", "quality", 10, weight_metric={8: 1.0})])
    with pytest.raises(AllocationError, match="role must be one of"):
        LayerSpec("x", "other", 10)
    with pytest.raises(AllocationError, match="appears twice"):
        spec = LayerSpec("x", "quality", 10, weight_metric={4: 1.0, 8: 2.0})
        AllocationProblem([spec, spec], act_candidates={})
    problem = random_problem(0)
    assert AllocationProblem.from_dict(problem.to_dict()) == problem


def test_pareto_sweep_is_monotone():
    problem = random_problem(5)
    fronts = pareto(problem, [2.0, 3.2, 4.0, 5.0, 8.0], act_budget_bits=8.0)
    assert [a.budget.weight_bits for a in fronts] == [3.2, 4.0, 5.0, 8.0]  # 2.0 is infeasible: skipped
    objectives = [a.objective for a in fronts]
    assert objectives == sorted(objectives)
    with pytest.raises(InfeasibleBudget):
        pareto(problem, [1.0], skip_infeasible=False)


def test_solver_registry():
    with pytest.raises(AllocationError, match="registered solvers"):
        allocate(random_problem(0), solver="nope")

    @register_solver("lowest")
    def lowest(program, **_):
        return [int(np.argmin([u.sum() for u in usage])) for usage in program.usage]

    try:
        alloc = allocate(random_problem(0), weight_budget_bits=8.0, solver="lowest")
        assert alloc.solver == "lowest"
        assert alloc.achieved.weight_bits < 4.0
    finally:
        del SOLVERS["lowest"]


def test_allocator_imports_no_torch():
    code = (
        "import sys, types; pkg = types.ModuleType('quantkit'); pkg.__path__ = [sys.argv[1] + '/quantkit'];"
        "sys.modules['quantkit'] = pkg; import quantkit.allocate; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(SRC)], check=True, timeout=60)


def test_objective_values_noise_energy_and_db():
    from quantkit.allocate import objective_values

    assert objective_values("sqnr", {4: 10.0, 8: 20.0}) == pytest.approx({4: -0.1, 8: -0.01})
    assert objective_values("sqnr", {"4": "30"}, "db") == {4: 30.0}
    assert objective_values("ssim", {2: 0.9, 8: 0.999}) == {2: 0.9, 8: 0.999}
    with pytest.raises(AllocationError, match="sqnr_objective must be one of"):
        objective_values("sqnr", {4: 1.0}, "decibels")


@pytest.mark.parametrize("objective,expected_low", [("db", "sensitive"), ("noise_energy", "robust")])
def test_noise_energy_objective_spares_the_layer_that_really_degrades(objective, expected_low):
    """Two equal layers, room for one at 2 bits. In dB the robust layer loses more (115 -> 68 dB, noise 2e-7)
    than the sensitive one (59 -> 14 dB, noise 4 %), so MixDQ's dB sum sends the sensitive one to 2 bits; the
    noise-energy objective sends the robust one."""
    from quantkit.allocate import objective_values

    tables = {"robust": {2: 68.0, 8: 115.0}, "sensitive": {2: 14.0, 8: 59.0}}
    layers = [LayerSpec(name, "quality", num_weights=1000, weight_metric=objective_values("sqnr", t, objective))
              for name, t in tables.items()]
    problem = AllocationProblem(layers, weight_candidates={"content": (2, 8), "quality": (2, 8)},
                                act_candidates={"content": (), "quality": ()})
    result = allocate(problem, weight_budget_bits=5.0)
    low = [fqn for fqn, bits in result.layers.items() if bits.weights == 2]
    assert low == [expected_low]


@pytest.mark.parametrize("solver", ["pulp", "brute"])
def test_a_side_without_a_budget_keeps_its_most_precise_candidate(solver):
    """Only a weight budget: activations are not traded, even where 4 bits measured as well as 8 (saturated SQNR)
    or, by measurement noise, better."""
    layers = [
        LayerSpec("a.conv1", "quality", num_weights=1000, act_elements=100, macs=1000,
                  weight_metric={4: 20.0, 8: 45.0}, act_metric={4: 120.0, 8: 120.0}),      # a tie at the cap
        LayerSpec("b.conv1", "quality", num_weights=1000, act_elements=100, macs=1000,
                  weight_metric={4: 25.0, 8: 50.0}, act_metric={4: 61.0, 8: 60.0}),        # 4 bits "better"
        LayerSpec("c.attn2.to_k", "content", num_weights=1000, act_elements=100, macs=1000,
                  weight_metric={2: 0.9, 4: 0.99, 8: 1.0}, act_metric={4: 0.999, 8: 0.998}),
    ]
    problem = AllocationProblem(layers)
    alloc = allocate(problem, weight_budget_bits=6.0, solver=solver)
    assert {f: b.activations for f, b in alloc.layers.items()} == {"a.conv1": 8, "b.conv1": 8, "c.attn2.to_k": 8}
    assert alloc.achieved.weight_bits <= 6.0 + 1e-9 and alloc.achieved.act_bits == 8.0
    # with an activation budget the program trades them again
    traded = allocate(problem, weight_budget_bits=6.0, act_budget_bits=6.0, solver=solver)
    assert traded.achieved.act_bits <= 6.0 + 1e-9


def _patched_cbc(monkeypatch, sol_status: int, status: int | None = None):
    """CBC as it reads back when stopped on time: the real solve, then the status of a stopped run."""
    import pulp

    real = pulp.LpProblem.solve

    def solve(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        self.sol_status = sol_status
        if status is not None:
            self.status = status
        return out

    monkeypatch.setattr(pulp.LpProblem, "solve", solve)


def test_time_limit_keeps_the_plan_and_warns_only_when_cbc_stopped(monkeypatch):
    import warnings

    import pulp

    problem = random_problem(3)
    exact = allocate(problem, weight_budget_bits=4.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # solved to optimality within the limit: no warning
        limited = allocate(problem, weight_budget_bits=4.5, solver_options={"time_limit": 60})
    assert limited.layers == exact.layers
    _patched_cbc(monkeypatch, pulp.LpSolutionIntegerFeasible)
    with pytest.warns(RuntimeWarning, match="time limit .*not proven optimal.*solver_time_limit_s"):
        stopped = allocate(problem, weight_budget_bits=4.5, solver_options={"time_limit": 60})
    assert stopped.layers == exact.layers  # the plan CBC read back is kept


def test_time_limit_without_a_plan_names_the_setting(monkeypatch):
    import pulp

    _patched_cbc(monkeypatch, pulp.LpSolutionNoSolutionFound, pulp.LpStatusNotSolved)
    with pytest.raises(AllocationError, match=r"no plan within its time limit \(60 s; raise "
                                              r"allocation.solver_time_limit_s\)"):
        allocate(random_problem(3), weight_budget_bits=4.5, solver_options={"time_limit": 60})
    with pytest.raises(AllocationError, match=r"found no plan \(status"):  # no limit: no advice about one
        allocate(random_problem(3), weight_budget_bits=4.5)
