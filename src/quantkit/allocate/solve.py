"""MixDQ bit allocation as one integer program over both groups, behind a small solver registry.

The program (one binary ``x[i, o]`` per layer ``i`` and option ``o = (weight_bits, act_bits)``)::

    maximise    sum_i sum_o score[i, o] * x[i, o]          score = -w_g * (norm_w[i, wb] + norm_a[i, ab])
    subject to  sum_o x[i, o] = 1                           for every layer
                sum n_i * wb / sum n_i       <= weight budget (average bits; megabytes are converted)
                sum e_i * ab / sum e_i       <= activation budget (average bits, weighted by act_elements)
                sum macs_i * wb * ab         <= max_bops (optional: the one constraint that couples the two)

Without ``max_bops`` the program separates into a weight part and an activation part, which the solver finds on
its own; with it, the pairs make the bit-operation count linear with no product linearisation. Protected
layers have one option, FP16 (16 weight bits and 16 activation bits, counted so in every budget).

Megabytes are MiB: ``MB = (stored bits * num_weights + overhead bits) / 8 / 2**20`` per quantized layer (codes,
then the layer's scales, zero points and shape record), ``16 * num_weights / 8 / 2**20`` per FP16 layer.

Solvers are registered by name: ``"pulp"`` (CBC, bundled with PuLP) and ``"brute"`` (exhaustive, for tiny
problems: the test oracle). A new one is a function ``(program: Program, **options) -> list[int]`` decorated
with ``@register_solver("name")``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from quantkit.allocate.problem import FP16_BITS, AllocationError, AllocationProblem, LayerSpec

__all__ = [
    "BYTES_PER_MB",
    "SOLVERS",
    "Achieved",
    "Allocation",
    "Budget",
    "InfeasibleBudget",
    "LayerBits",
    "Program",
    "allocate",
    "evaluate",
    "get_solver",
    "pareto",
    "SWEEP_KINDS",
    "register_solver",
]

BYTES_PER_MB = 2**20  # "MB" in budgets and reports is MiB
_REL_TOL = 1e-9  # slack on budgets for floating-point sums of exactly-meeting plans


class InfeasibleBudget(AllocationError):
    """A budget below what the candidates allow; the message gives the achievable range.

    Attributes:
        resource: ``"weight_bits"``, ``"weight_mb"``, ``"act_bits"`` or ``"max_bops"``.
        budget: the requested value.
        low: the smallest achievable value (every layer at its lowest candidate, protected ones at 16 bit).
        high: the largest achievable value.
    """

    def __init__(self, message: str, resource: str, budget: float, low: float, high: float):
        super().__init__(message)
        self.resource, self.budget, self.low, self.high = resource, budget, low, high


@dataclass(frozen=True)
class LayerBits:
    """Bits of one layer: ``None`` keeps that side in 16-bit floating point."""

    weights: int | None
    activations: int | None

    @property
    def is_fp16(self) -> bool:
        """Whether the whole layer stays in floating point."""
        return self.weights is None and self.activations is None


@dataclass(frozen=True)
class Budget:
    """The budgets an allocation was asked for (``None`` = unconstrained)."""

    weight_bits: float | None = None
    weight_mb: float | None = None
    act_bits: float | None = None
    max_bops: float | None = None
    protect_top_percent: float = 0.0


@dataclass(frozen=True)
class Achieved:
    """What a plan costs: average weight bits, weight MB (MiB), average activation bits, bit operations."""

    weight_bits: float
    weight_mb: float
    act_bits: float | None
    bops: float


@dataclass
class Allocation:
    """A bit plan: per-layer bits plus where it came from (written to and read from the plan YAML).

    Attributes:
        layers: ``{fqn: LayerBits}`` in model order.
        roles: ``{fqn: role}`` (empty when read from a plan without the problem).
        objective: maximised normalised objective (<= 0; 0 = every layer at its best candidate), or ``None``.
        budget: the requested budgets.
        achieved: the plan's cost, or ``None`` when unknown.
        protected: layers kept in FP16 by protection.
        solver: the solver's registry name.
        content_weight: the weighting knob used.
        weight_candidates: ``{role: bits}`` used.
        act_candidates: ``{role: bits}`` used.
    """

    layers: dict[str, LayerBits]
    roles: dict[str, str] = field(default_factory=dict)
    objective: float | None = None
    budget: Budget = field(default_factory=Budget)
    achieved: Achieved | None = None
    protected: tuple[str, ...] = ()
    solver: str | None = None
    content_weight: float = 0.5
    weight_candidates: dict[str, tuple[int, ...]] = field(default_factory=dict)
    act_candidates: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        parts = []
        if self.achieved is not None:
            a = self.achieved
            parts.append(f"W {a.weight_bits:.2f} bits avg ({a.weight_mb:.2f} MB)")
            parts.append("A 16 (not allocated)" if a.act_bits is None else f"A {a.act_bits:.2f} bits avg")
            parts.append(f"{a.bops:.3e} BOPs")
        if self.objective is not None:
            parts.append(f"objective {self.objective:.4f}")
        parts.append(f"{sum(b.is_fp16 for b in self.layers.values())} FP16 layers of {len(self.layers)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Program:
    """A multiple-choice program: pick one option per item, maximise the total score, keep usage within caps.

    Attributes:
        scores: per item, ``[n_options]`` scores.
        usage: per item, ``[n_options, n_resources]`` resource use.
        caps: ``[n_resources]`` upper bounds on the summed usage.
    """

    scores: Sequence[np.ndarray]
    usage: Sequence[np.ndarray]
    caps: np.ndarray


SOLVERS: dict[str, Callable[..., list[int]]] = {}


def register_solver(name: str) -> Callable:
    """Register a solver ``(program: Program, **options) -> list[int]`` (the chosen option per item) by name."""

    def wrap(fn: Callable[..., list[int]]) -> Callable[..., list[int]]:
        SOLVERS[name] = fn
        return fn

    return wrap


def get_solver(name: str) -> Callable[..., list[int]]:
    """The solver registered as ``name``.

    Raises:
        AllocationError: no such solver (the message lists the registered ones).
    """
    try:
        return SOLVERS[name]
    except KeyError:
        raise AllocationError(f"unknown solver {name!r}; registered solvers: {sorted(SOLVERS)}") from None


@register_solver("pulp")
def solve_pulp(program: Program, *, time_limit: float | None = None, gap_rel: float | None = None,
               msg: bool = False, preprocess: bool = False) -> list[int]:
    """Solve with PuLP and its bundled CBC.

    Args:
        program: the program.
        time_limit: CBC time limit in seconds: the best plan found so far is returned, with a ``RuntimeWarning``
            saying it is not proven optimal. CBC often finds the optimum at once and then spends minutes proving
            it (a 220-layer weight program: optimum after 0.3 s, proof after 95 s).
        gap_rel: relative optimality gap at which CBC stops (default: CBC's, i.e. optimal).
        msg: print CBC's log.
        preprocess: run CBC's MIP preprocessing (Cgl). Off by default: the CBC 2.10.3 bundled with PuLP returns
            "optimal" plans that are not optimal on these multiple-choice knapsacks with it on (found by the
            brute-force tests; known CBC issues coin-or/Cbc.old#21, coin-or/Cbc#283).

    Returns:
        The chosen option index of each item.

    Raises:
        AllocationError: CBC found no feasible plan.
    """
    import pulp  # imported here: the module stays importable, and fast, without it

    lp = pulp.LpProblem("mixdq_bit_allocation", pulp.LpMaximize)
    x = [[pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for j in range(len(s))]
         for i, s in enumerate(program.scores)]
    # Normalised scores are tiny on big models (each layer a small share of its group); CBC's absolute
    # tolerances (reduced-cost fixing, cutoffs) then drop near-optimal branches. A positive scale does not move
    # the optimum, so make the average layer's worst score about 1.
    worst = sum(float(np.max(np.abs(s))) for s in program.scores)
    scale = len(program.scores) / worst if worst > 0 else 1.0
    lp += pulp.lpSum(scale * float(s[j]) * v[j] for s, v in zip(program.scores, x) for j in range(len(v)))
    for i, v in enumerate(x):
        lp += pulp.lpSum(v) == 1, f"one_option_{i}"
    for r, cap in enumerate(program.caps):
        if math.isfinite(cap):
            lp += pulp.lpSum(float(u[j, r]) * v[j] for u, v in zip(program.usage, x) for j in range(len(v))
                             if u[j, r]) <= float(cap), f"budget_{r}"
    options = [] if preprocess else ["preprocess off"]
    lp.solve(pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, gapRel=gap_rel, options=options))
    # A CBC run stopped on time reads back as sol_status IntegerFeasible (a plan) or NoSolutionFound (none yet).
    stopped = time_limit is not None and lp.sol_status in (pulp.LpSolutionIntegerFeasible,
                                                           pulp.LpSolutionNoSolutionFound)
    if stopped and lp.sol_status == pulp.LpSolutionIntegerFeasible:
        warnings.warn(f"CBC stopped at its time limit ({time_limit:g} s): the plan is the best it found, not proven "
                      f"optimal; raise allocation.solver_time_limit_s (or set it to null) to wait for the proof",
                      RuntimeWarning, stacklevel=2)
    if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        within = f" within its time limit ({time_limit:g} s; raise allocation.solver_time_limit_s)" if (
            stopped) else ""
        raise AllocationError(f"CBC found no plan{within} (status: {pulp.LpStatus[lp.status]})")
    return [int(np.argmax([(var.value() or 0.0) for var in v])) for v in x]


@register_solver("brute")
def solve_brute(program: Program, *, max_assignments: int = 2_000_000) -> list[int]:
    """Enumerate every assignment (vectorised); the oracle for tests on tiny problems.

    Args:
        program: the program.
        max_assignments: refuse problems with more assignments than this.

    Returns:
        The chosen option index of each item (the first best one on ties).

    Raises:
        AllocationError: too many assignments, or none within the caps.
    """
    sizes = [len(s) for s in program.scores]
    total = math.prod(sizes)
    if total > max_assignments:
        raise AllocationError(f"brute-force solver: {total} assignments exceed max_assignments={max_assignments}")
    score = np.zeros(1)
    usage = np.zeros((1, len(program.caps)))
    for s, u in zip(program.scores, program.usage):  # C order: the last item varies fastest
        score = (score[:, None] + np.asarray(s)[None, :]).reshape(-1)
        usage = (usage[:, None, :] + np.asarray(u)[None, :, :]).reshape(-1, usage.shape[1])
    feasible = np.all(usage <= program.caps[None, :], axis=1)
    if not feasible.any():
        raise AllocationError("brute-force solver: no assignment within the budgets")
    best = int(np.argmax(np.where(feasible, score, -np.inf)))
    return [int(k) for k in np.unravel_index(best, sizes)]


def _eff(bits: int | None) -> int:
    return FP16_BITS if bits is None else bits


def _stored_bits(problem: AllocationProblem, bits: int | None) -> float:
    """Bits one weight occupies when stored (the ``weight_mb`` budget); FP16 16."""
    if bits is None:
        return float(FP16_BITS)
    return float(problem.stored_bits(bits)) if problem.stored_bits is not None else float(bits)


def _stored_layer_bits(problem: AllocationProblem, layer: LayerSpec, bits: int | None) -> float:
    """Bits a whole layer occupies when stored at ``bits`` (codes, plus its overhead once quantized)."""
    codes = layer.num_weights * _stored_bits(problem, bits)
    return codes if bits is None else codes + layer.overhead_bits


def evaluate(problem: AllocationProblem, layers: Mapping[str, LayerBits]) -> tuple[float, Achieved]:
    """Objective and cost of any plan over ``problem`` (e.g. a hand-edited one).

    The objective uses the problem's normalisation; FP16 sides score 0 (like the best candidate), and bits
    outside the candidate set score from the metric table when it has them.

    Args:
        problem: the problem (its layers must all be in ``layers``).
        layers: ``{fqn: LayerBits}``.

    Returns:
        ``(objective, achieved)``.

    Raises:
        AllocationError: a layer is missing from ``layers``, or has bits with no metric.
    """
    objective = 0.0
    losses = {kind: problem.normalised_losses(kind) for kind in ("weights", "activations")}
    for i, layer in enumerate(problem.layers):
        if layer.fqn not in layers:
            raise AllocationError(f"plan has no entry for layer '{layer.fqn}'")
        chosen = layers[layer.fqn]
        for kind, bits in (("weights", chosen.weights), ("activations", chosen.activations)):
            if bits is None:
                continue
            loss = losses[kind][i]
            if bits not in loss:
                table, cands = layer.metric(kind), problem.candidates(kind, layer)
                if table is None or bits not in table:
                    raise AllocationError(f"layer '{layer.fqn}': no {kind} metric at {bits} bits")
                spread = problem.spread(kind)[layer.role]
                loss = {bits: (max((table[b] for b in cands), default=table[bits]) - table[bits]) / spread}
            objective -= problem.group_weight(layer.role) * loss[bits]
    return objective, _achieved(problem, layers)


def _achieved(problem: AllocationProblem, layers: Mapping[str, LayerBits]) -> Achieved:
    n = np.array([la.num_weights for la in problem.layers], dtype=np.float64)
    e = np.array([la.act_elements for la in problem.layers], dtype=np.float64)
    macs = np.array([la.macs for la in problem.layers], dtype=np.float64)
    wb = np.array([_eff(layers[la.fqn].weights) for la in problem.layers], dtype=np.float64)
    ab = np.array([_eff(layers[la.fqn].activations) for la in problem.layers], dtype=np.float64)
    return Achieved(
        weight_bits=float(n @ wb / n.sum()),
        weight_mb=float(sum(_stored_layer_bits(problem, la, layers[la.fqn].weights) for la in problem.layers)
                        / 8 / BYTES_PER_MB),
        act_bits=float(e @ ab / e.sum()) if e.sum() > 0 else None,
        bops=float(macs @ (wb * ab)),
    )


def _options(problem: AllocationProblem, protected: set[str], side: str) -> tuple[list[list[LayerBits]], list]:
    """Per layer: its options for ``side`` (``"weights"``, ``"activations"`` or ``"pair"``) and their scores.

    A one-sided option leaves the other side ``None``; protected layers have the single option FP16.
    """
    w_loss, a_loss = problem.normalised_losses("weights"), problem.normalised_losses("activations")
    options, scores = [], []
    for i, layer in enumerate(problem.layers):
        if layer.fqn in protected:
            opts = [LayerBits(None, None)]
        else:
            w_cands = problem.candidates("weights", layer) if side != "activations" else (None,)
            a_cands = (problem.candidates("activations", layer) or (None,)) if side != "weights" else (None,)
            opts = [LayerBits(w, a) for w, a in itertools.product(w_cands, a_cands)]
        g = problem.group_weight(layer.role)
        options.append(opts)
        scores.append(np.array([-g * (w_loss[i].get(o.weights, 0.0) + a_loss[i].get(o.activations, 0.0))
                                for o in opts]))
    return options, scores


_UNITS = {
    "weight_bits": ("weight budget", "average bits", "bits", "{:.2f}"),
    "weight_mb": ("weight budget", "MB", "MB (1 MB = 2**20 bytes)", "{:.6g}"),
    "act_bits": ("activation budget", "average bits", "bits", "{:.2f}"),
    "max_bops": ("compute budget", "BOPs", "BOPs", "{:.3e}"),
}


def _infeasible(resource: str, budget: float, low: float, high: float, n_protected: int) -> InfeasibleBudget:
    what, unit, range_unit, fmt = _UNITS[resource]
    prot = f" (and {n_protected} 16-bit protected layers)" if n_protected else ""
    msg = (f"{what} {fmt.format(budget)} {unit} is infeasible: achievable range is {fmt.format(low)}-"
           f"{fmt.format(high)} {range_unit} with these candidates{prot}")
    return InfeasibleBudget(msg, resource, budget, low, high)


def allocate(
    problem: AllocationProblem,
    weight_budget_bits: float | None = None,
    weight_budget_mb: float | None = None,
    act_budget_bits: float | None = None,
    max_bops: float | None = None,
    protect_top_percent: float = 0.0,
    *,
    protect: Iterable[str] = (),
    solver: str = "pulp",
    solver_options: Mapping | None = None,
) -> Allocation:
    """Choose the bits of every layer: maximise the normalised metric within the budgets.

    Args:
        problem: layers, sensitivities, candidates and the content/quality weighting knob.
        weight_budget_bits: parameter-weighted average weight bits (FP16 layers count 16).
        weight_budget_mb: weight codes in MB (MiB, 2**20 bytes); exclusive with ``weight_budget_bits``.
        act_budget_bits: activation-element-weighted average activation bits (16-bit sides count 16).
        max_bops: bit operations ``sum macs * weight_bits * act_bits``.
        protect_top_percent: keep the ``floor(n_g * p / 100)`` most sensitive layers of each group ``g`` in FP16
            (ranked by :meth:`AllocationProblem.sensitivity`).
        protect: more layers to keep in FP16, by name.
        solver: registry name of the solver (``"pulp"``, ``"brute"``).
        solver_options: keyword arguments for the solver (``pulp``: ``time_limit``, ``gap_rel``, ``msg``).

    Returns:
        The allocation, with its objective and achieved averages.

    Raises:
        InfeasibleBudget: a budget below the achievable range (the message gives the range).
        AllocationError: conflicting or invalid arguments, unknown layer names, or a solver failure.
    """
    if weight_budget_bits is not None and weight_budget_mb is not None:
        raise AllocationError("give weight_budget_bits or weight_budget_mb, not both")
    solve_fn = get_solver(solver)
    protect = list(protect)
    unknown = [p for p in protect if p not in problem.roles]
    if unknown:
        raise AllocationError(f"protect names unknown layers {unknown}")
    protected = set(problem.most_sensitive(protect_top_percent)) | set(protect)
    budget = Budget(weight_budget_bits, weight_budget_mb, act_budget_bits, max_bops, protect_top_percent)

    n = np.array([la.num_weights for la in problem.layers], dtype=np.float64)
    e = np.array([la.act_elements for la in problem.layers], dtype=np.float64)
    macs = np.array([la.macs for la in problem.layers], dtype=np.float64)
    if act_budget_bits is not None and e.sum() == 0:
        raise AllocationError("an activation budget needs act_elements on the layers (all are 0)")
    # Each resource: (name, requested value, side it constrains, usage of option o of layer i).
    resources = []
    if weight_budget_bits is not None:
        resources.append(("weight_bits", weight_budget_bits, "weights",
                          lambda i, o: n[i] * _eff(o.weights) / n.sum()))
    if weight_budget_mb is not None:
        resources.append(("weight_mb", weight_budget_mb, "weights",
                          lambda i, o: _stored_layer_bits(problem, problem.layers[i], o.weights) / 8 / BYTES_PER_MB))
    if act_budget_bits is not None:
        resources.append(("act_bits", act_budget_bits, "activations",
                          lambda i, o: e[i] * _eff(o.activations) / e.sum()))
    if max_bops is not None:
        # Scaled by the budget so CBC sees coefficients of order 1, not 1e12.
        resources.append(("max_bops", max_bops, "pair",
                          lambda i, o: macs[i] * _eff(o.weights) * _eff(o.activations) / max(max_bops, 1.0)))

    # Without BOPs the weight and activation parts share nothing: two small programs instead of one of pairs.
    sides = ("pair",) if max_bops is not None else ("weights", "activations")
    programs = {}
    for side in sides:
        options, scores = _options(problem, protected, side)
        res = [r for r in resources if side == "pair" or r[2] == side]
        usage = [np.array([[fn(i, o) for *_, fn in res] for o in opts]).reshape(len(opts), len(res))
                 for i, opts in enumerate(options)]
        caps = np.zeros(len(res))
        for r, (name, value, *_) in enumerate(res):
            scale = max(value, 1.0) if name == "max_bops" else 1.0
            low = sum(u[:, r].min() for u in usage) * scale
            if low > value * (1 + _REL_TOL) + 1e-12:
                high = sum(u[:, r].max() for u in usage) * scale
                raise _infeasible(name, value, low, high, len(protected))
            caps[r] = value / scale * (1 + _REL_TOL) + 1e-12
        programs[side] = (options, Program(scores, usage, caps))

    chosen = {}
    for side, (options, program) in programs.items():
        if all(len(o) == 1 for o in options):  # nothing to choose (e.g. activations not allocated)
            choice = [0] * len(options)
        elif not len(program.caps):
            # No budget on this side: nothing to trade precision for, so every layer keeps its most precise
            # candidate (the program would pick among tied or noise-level scores, e.g. 4-bit activations whose
            # measured loss equals the 8-bit one).
            choice = [int(np.argmax([_eff(getattr(o, side)) for o in opts])) for opts in options]
        else:
            choice = solve_fn(program, **dict(solver_options or {}))
        chosen[side] = [opts[c] for opts, c in zip(options, choice)]
    w_side = chosen.get("pair") or chosen["weights"]
    a_side = chosen.get("pair") or chosen["activations"]
    layers = {la.fqn: LayerBits(w.weights, a.activations) for la, w, a in zip(problem.layers, w_side, a_side)}
    objective, achieved = evaluate(problem, layers)
    return Allocation(
        layers=layers, roles=problem.roles, objective=objective, budget=budget, achieved=achieved,
        protected=tuple(f for f in problem.fqns if f in protected), solver=solver,
        content_weight=problem.content_weight,
        weight_candidates=dict(problem.weight_candidates), act_candidates=dict(problem.act_candidates),
    )


_SWEEP_KINDS = {"weight_bits": "weight_budget_bits", "weight_mb": "weight_budget_mb", "act_bits": "act_budget_bits",
                "max_bops": "max_bops"}
SWEEP_KINDS = tuple(_SWEEP_KINDS)  # the budgets :func:`pareto` (and ``quantkit allocate --sweep``) vary


def pareto(problem: AllocationProblem, budgets: Iterable[float], *, kind: str = "weight_bits",
           skip_infeasible: bool = True, **kwargs) -> list[Allocation]:
    """Sweep one budget: one allocation per value (the objective/cost front).

    Args:
        problem: the problem.
        budgets: values of the swept budget.
        kind: which budget: ``"weight_bits"``, ``"weight_mb"``, ``"act_bits"`` or ``"max_bops"``.
        skip_infeasible: leave out budgets below the achievable range instead of raising.
        **kwargs: the other arguments of :func:`allocate` (fixed over the sweep).

    Returns:
        The allocations in the order of ``budgets`` (each records its budget).

    Raises:
        AllocationError: an unknown ``kind``; :class:`InfeasibleBudget` when ``skip_infeasible`` is false.
    """
    if kind not in _SWEEP_KINDS:
        raise AllocationError(f"unknown sweep kind {kind!r}; valid kinds: {sorted(_SWEEP_KINDS)}")
    out = []
    for value in budgets:
        try:
            out.append(allocate(problem, **{_SWEEP_KINDS[kind]: value}, **kwargs))
        except InfeasibleBudget:
            if not skip_infeasible:
                raise
    return out
