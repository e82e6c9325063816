"""Choosing the content/quality weighting knob by generating images (``allocation.content_weight: auto``).

The program's two groups are measured in different units (SSIM of images for content layers, relative noise
energy of the denoiser output for quality layers), so no fixed weighting makes them commensurate. MixDQ picks
its budget split between two separate programs by the pixel error of one image; quantkit solves one program per
value of a grid of ``content_weight`` values, drops duplicate plans, generates the analysis prompts' images with
each distinct plan applied (weights quantized as deployed, activations fake-quantized) and keeps the plan whose
images are closest to the floating-point ones (highest mean PSNR). On the reference model the fixed default 0.5
gave the activation budget (A4 average) a plan worse than uniform A4; the chosen weight beats it (docs/mixdq.md).

Plain Python: the solver and the image scoring come in as callables (the stage builds them), so this is testable
without torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quantkit.allocate.problem import AllocationError, AllocationProblem
from quantkit.allocate.solve import Allocation

__all__ = ["WeightTrial", "choose_content_weight"]

logger = logging.getLogger("quantkit")


@dataclass(frozen=True)
class WeightTrial:
    """One grid value: its plan's score (``None`` when it repeats an earlier plan, see ``same_as``)."""

    content_weight: float
    score: float | None
    same_as: float | None = None

    def to_dict(self) -> dict:
        return {"content_weight": self.content_weight, "score": self.score, "same_as": self.same_as}


def choose_content_weight(problem: AllocationProblem, grid: Sequence[float],
                          solve: Callable[[AllocationProblem], Allocation],
                          score: Callable[[Allocation], float]) -> tuple[Allocation, list[WeightTrial]]:
    """Solve at every ``content_weight`` of ``grid`` and keep the plan with the highest ``score``.

    Args:
        problem: the allocation problem (its own ``content_weight`` is ignored).
        grid: the values to try, each in [0, 1]; ties go to the earlier value.
        solve: the program with its budgets, ``problem -> Allocation`` (raises on an infeasible budget).
        score: higher is better, e.g. the mean PSNR of images generated with the plan; called once per distinct
            plan, and not at all when every grid value gives the same plan.

    Returns:
        The chosen allocation (its ``content_weight`` is the chosen value) and one trial per grid value.

    Raises:
        AllocationError: an empty grid or a value outside [0, 1].
    """
    values = [float(v) for v in grid]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise AllocationError(f"content_weight_grid must be a non-empty list of values in [0, 1], got {list(grid)}")
    plans: list[tuple[float, Allocation]] = []
    seen: dict[tuple, float] = {}
    trials: list[WeightTrial | None] = []
    for v in values:
        alloc = solve(problem.with_content_weight(v))
        key = tuple(sorted((f, b.weights, b.activations) for f, b in alloc.layers.items()))
        if key in seen:
            trials.append(WeightTrial(v, None, same_as=seen[key]))
            continue
        seen[key] = v
        plans.append((v, alloc))
        trials.append(None)
    if len(plans) == 1:
        v, alloc = plans[0]
        return alloc, [t if t is not None else WeightTrial(v, None) for t in trials]
    scores = {v: float(score(alloc)) for v, alloc in plans}  # in grid order
    for v, s in scores.items():
        logger.info("allocate: content_weight %g -> score %.3f", v, s)
    best_v = max(scores, key=scores.get)  # max keeps the first of equal scores: ties go to the earlier value
    chosen = dict(plans)[best_v]
    filled = iter(WeightTrial(v, scores[v]) for v, _ in plans)
    return chosen, [t if t is not None else next(filled) for t in trials]
