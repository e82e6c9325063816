"""MixDQ bit allocation: one integer program over content and quality layers (plain NumPy/PuLP, no torch).

Typical use::

    from quantkit.allocate import AllocationProblem, LayerSpec, allocate, write_plan, plot_allocation

    problem = AllocationProblem(layers)                     # LayerSpec per layer, MixDQ candidate sets
    plan = allocate(problem, weight_budget_bits=4.0, act_budget_bits=8.0, protect_top_percent=1.0)
    write_plan(plan, "plan.yaml")
    plot_allocation(plan, "plan.png")
"""

from quantkit.allocate.plan import PLAN_SCHEMA_VERSION, PlanError, plan_to_yaml, read_plan, resolve_layers, write_plan
from quantkit.allocate.plot import plot_allocation, plot_pareto, plot_sensitivity
from quantkit.allocate.problem import (
    ACT_CANDIDATES,
    FP16_BITS,
    LOW_BUDGET_ACT_CANDIDATES,
    LOW_BUDGET_WEIGHT_CANDIDATES,
    ROLES,
    SQNR_OBJECTIVES,
    WEIGHT_CANDIDATES,
    AllocationError,
    AllocationProblem,
    LayerSpec,
    objective_values,
)
from quantkit.allocate.solve import (
    BYTES_PER_MB,
    SOLVERS,
    SWEEP_KINDS,
    Achieved,
    Allocation,
    Budget,
    InfeasibleBudget,
    LayerBits,
    Program,
    allocate,
    evaluate,
    get_solver,
    pareto,
    register_solver,
)

__all__ = [
    "ACT_CANDIDATES",
    "BYTES_PER_MB",
    "FP16_BITS",
    "LOW_BUDGET_ACT_CANDIDATES",
    "LOW_BUDGET_WEIGHT_CANDIDATES",
    "PLAN_SCHEMA_VERSION",
    "ROLES",
    "SQNR_OBJECTIVES",
    "SOLVERS",
    "SWEEP_KINDS",
    "WEIGHT_CANDIDATES",
    "Achieved",
    "Allocation",
    "AllocationError",
    "AllocationProblem",
    "Budget",
    "InfeasibleBudget",
    "LayerBits",
    "LayerSpec",
    "PlanError",
    "Program",
    "allocate",
    "evaluate",
    "objective_values",
    "get_solver",
    "pareto",
    "plan_to_yaml",
    "plot_allocation",
    "plot_pareto",
    "plot_sensitivity",
    "read_plan",
    "register_solver",
    "resolve_layers",
    "write_plan",
]
