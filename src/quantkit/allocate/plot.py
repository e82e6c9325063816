"""Plots of an allocation, of the sensitivity table and of a Pareto sweep (PNG, matplotlib's Agg renderer).

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``, so no global backend or figure
state is touched (safe in servers, tests and notebooks alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantkit.allocate.problem import FP16_BITS, ROLES, AllocationProblem
from quantkit.allocate.solve import Allocation

__all__ = ["ROLE_COLORS", "plot_allocation", "plot_pareto", "plot_sensitivity"]

ROLE_COLORS = {"content": "tab:blue", "quality": "tab:orange", None: "tab:gray"}
_METRIC = {"content": "SSIM", "quality": "SQNR (dB)"}


def _figure(n_rows: int, width: float, height_per_row: float = 2.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 0.6 + height_per_row * n_rows), layout="constrained")
    return fig, fig.subplots(n_rows, 1, sharex=True, squeeze=False)[:, 0]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _bits_panel(ax, bits: Sequence[int | None], colors: Sequence[str], label: str, average: float | None):
    """Bars of one side's bits; returns the average line (or ``None``) for the legend."""
    heights = [FP16_BITS if b is None else b for b in bits]
    bars = ax.bar(range(len(bits)), heights, width=0.9, color=colors, linewidth=0)
    for bar, b in zip(bars, bits):
        if b is None:  # 16-bit sides: hatched and faded, so the quantized bars stand out
            bar.set_alpha(0.35)
            bar.set_hatch("//")
    ax.set_yticks(sorted(set(heights)))
    ax.set_ylim(0, max(heights) * 1.3)  # head room for the legend
    ax.set_ylabel(f"{label} bits")
    if average is None:
        return None
    return ax.axhline(average, color="k", linestyle="--", linewidth=1, label=f"average {average:.2f}")


def plot_allocation(allocation: Allocation, path: str | Path, *, title: str | None = None) -> Path:
    """Bar chart of the chosen weight and activation bits per layer (model order), coloured by role.

    Args:
        allocation: the plan.
        path: output PNG.
        title: figure title (default: the allocation's summary).

    Returns:
        The path written.
    """
    from matplotlib.patches import Patch

    names = list(allocation.layers)
    colors = [ROLE_COLORS.get(allocation.roles.get(n), "tab:gray") for n in names]
    fig, (ax_w, ax_a) = _figure(2, min(4.0 + 0.06 * len(names), 30.0))
    a = allocation.achieved
    w_avg = _bits_panel(ax_w, [allocation.layers[n].weights for n in names], colors, "weight", a and a.weight_bits)
    a_avg = _bits_panel(ax_a, [allocation.layers[n].activations for n in names], colors, "activation",
                        a and a.act_bits)
    ax_a.set_xlabel("layer (model order)")
    handles = [Patch(color=ROLE_COLORS[r], label=r) for r in ROLES]
    handles.append(Patch(facecolor="tab:gray", alpha=0.35, hatch="//", label="16 bit / FP16"))
    ax_w.legend(handles=handles + ([w_avg] if w_avg else []), loc="upper left", ncols=4, fontsize=8)
    if a_avg:
        ax_a.legend(handles=[a_avg], loc="upper left", fontsize=8)
    ax_w.set_title(title or allocation.summary(), fontsize=9)
    return _save(fig, path)


def plot_sensitivity(problem: AllocationProblem, path: str | Path, *, kind: str = "weights") -> Path:
    """Per-layer metric at each candidate bit width: one panel per group (content: SSIM, quality: SQNR).

    Args:
        problem: the problem (its metric tables).
        path: output PNG.
        kind: ``"weights"`` or ``"activations"``.

    Returns:
        The path written.
    """
    fig, axes = _figure(2, 10.0)
    all_bits = sorted({b for la in problem.layers for b in problem.candidates(kind, la)})
    color = {b: f"C{k % 10}" for k, b in enumerate(all_bits)}  # the same colour for a bit width in both panels
    for ax, role in zip(axes, ROLES):
        group = [la for la in problem.layers if la.role == role and problem.candidates(kind, la)]
        bits = sorted({b for la in group for b in problem.candidates(kind, la)})
        for b in bits:
            xs = [j for j, la in enumerate(group) if b in la.metric(kind)]
            ax.plot(xs, [group[j].metric(kind)[b] for j in xs], marker=".", linewidth=0.8, color=color[b],
                    label=f"{b} bit")
        ax.set_title(f"{role} layers ({len(group)}), {kind}", fontsize=9)
        ax.set_ylabel(_METRIC[role])
        if bits:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("layer index within the group (model order)")
    return _save(fig, path)


_PARETO_AXES = {"weight_bits": "average weight bits", "weight_mb": "weight MiB", "act_bits": "average activation bits",
                "bops": "bit operations per step"}


def plot_pareto(allocations: Sequence[Allocation], path: str | Path, x: str = "weight_bits") -> Path:
    """Objective against one achieved cost for a sweep (:func:`quantkit.allocate.pareto`).

    Args:
        allocations: allocations with objective and achieved values.
        path: output PNG.
        x: the cost on the horizontal axis, a field of :class:`Achieved`: ``weight_bits``, ``weight_mb``,
            ``act_bits`` or ``bops``.

    Returns:
        The path written.
    """
    if x not in _PARETO_AXES:
        raise ValueError(f"unknown cost {x!r}: choose one of {', '.join(_PARETO_AXES)}")
    pts = sorted((getattr(al.achieved, x), al.objective) for al in allocations
                 if al.achieved is not None and al.objective is not None and getattr(al.achieved, x) is not None)
    fig, (ax,) = _figure(1, 6.0, 3.6)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set_xlabel(_PARETO_AXES[x])
    ax.set_ylabel("normalised objective (0 = best)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
