"""Per-layer sensitivity plot of a sensitivity table (PNG, matplotlib's Agg renderer, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["plot_sensitivity_table"]

_ROLES = ("content", "quality")
_LABELS = {"sqnr": "SQNR (dB)", "ssim": "SSIM", "cfg_sqnr": "guidance-direction SQNR (dB)"}


def plot_sensitivity_table(table: Mapping, path: str | Path) -> Path:
    """Metric per layer at each candidate bit width: a content and a quality row, weights and activations columns.

    Args:
        table: a sensitivity table (``sensitivity.json`` as written by :func:`quantkit.sensitivity.analyze`).
        path: output PNG (written atomically).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    layers = table["layers"]
    n = max([sum(la["role"] == r for la in layers) for r in _ROLES] + [1])
    fig = Figure(figsize=(min(6.0 + 0.08 * n, 30.0) * 2, 6.4), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    all_bits = sorted({int(b) for la in layers for k in ("weights", "activations") for b in la.get(k) or {}})
    color = {b: f"C{i % 10}" for i, b in enumerate(all_bits)}  # one colour per bit width in every panel
    for row, role in enumerate(_ROLES):
        group = [la for la in layers if la["role"] == role]
        metrics = sorted({la["metric"] for la in group})
        for col, kind in enumerate(("weights", "activations")):
            ax = axes[row][col]
            bits = sorted({int(b) for la in group for b in la.get(kind) or {}})
            for b in bits:
                pts = [(j, la[kind][str(b)]) for j, la in enumerate(group) if str(b) in (la.get(kind) or {})]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=0.8, color=color[b],
                        label=f"{'W' if kind == 'weights' else 'A'}{b}")
            ax.set_title(f"{role} layers ({len(group)}), {kind}", fontsize=9)
            ax.set_ylabel(" / ".join(_LABELS.get(m, m) for m in metrics) or "metric")
            ax.set_xlabel("layer index within the group (model order)")
            if bits:
                ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path
