"""The input of MixDQ bit allocation: layers, their per-candidate sensitivity, and the normalisation of metrics.

Plain Python/NumPy (no torch), so the allocator is testable alone.

Every layer belongs to one of two groups (MixDQ's metric decoupling, the roles of ``quantkit.models.layers``):
``content`` layers (cross-attention ``attn2`` and feed-forward ``ff``) are measured by the SSIM of generated images,
``quality`` layers (the rest) by the SQNR (dB) of the denoiser output. Both metrics are *higher is better*, and are
measured one layer at a time, at each candidate bit width, for weights and for activations separately.

Normalisation (how SSIM and dB become comparable). For each group ``g`` and each kind (weights, activations),
with ``M[i, b]`` the metric of layer ``i`` quantized to ``b`` bits and ``B_g`` the group's candidate bits::

    loss[i, b] = max(M[i, b'] for b' in B_g) - M[i, b]       # >= 0: loss relative to the layer's best candidate
    spread_g   = sum_i max(loss[i, b] for b in B_g)          # the whole group at its worst (lowest) candidates
    norm[i, b] = loss[i, b] / spread_g                       # 1.0 = every layer of the group at its worst

and the program maximises ``-sum(w_g * norm[i, b_i])`` over weights and activations, with ``w_content =
content_weight`` and ``w_quality = 1 - content_weight``. So at the default ``content_weight=0.5``, dropping the
whole content group to its lowest bits costs as much as dropping the whole quality group to its lowest bits.
Within one group this is an affine map of each layer's metric, so the optimum of a single-group problem is the
same as MixDQ's raw ``max sum S[i, b]``. The spread is computed over all layers, protected ones included, so it
does not depend on the protection setting; a group whose layers are all indifferent (spread 0) keeps scale 1.

SQNR objective. MixDQ sums SQNR in dB over layers. Decibels do not add: taking one layer from 115 to 70 dB
(negligible noise either way) and another from 59 to 12 dB (6 % noise) cost the same 45 "dB points". quantkit's
default (``sqnr_objective: noise_energy``, :func:`objective_values`) first maps each SQNR value to minus the
relative noise energy it stands for, ``-10**(-SQNR/10)``, which is additive over layers (independent noise adds
in power); SSIM values are used as they are. ``sqnr_objective: db`` keeps MixDQ's published objective. On the
reference model the noise-energy plans beat uniform, random and SQNR-only plans at equal size where the dB plans
lose to uniform (docs/mixdq.md).

Example::

    problem = AllocationProblem([
        LayerSpec("down.0.attn2.to_k", "content", num_weights=655_360, act_elements=1_600, macs=52_428_800,
                  weight_metric={2: 0.61, 4: 0.93, 8: 0.998}, act_metric={4: 0.88, 8: 0.997}),
        LayerSpec("conv_in", "quality", num_weights=11_520, act_elements=16_384, macs=47_185_920,
                  weight_metric={4: 31.5, 8: 47.2}, act_metric={4: 22.0, 8: 40.3}),
    ])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from quantkit.errors import QuantkitError

__all__ = [
    "ACT_CANDIDATES",
    "FP16_BITS",
    "KINDS",
    "LOW_BUDGET_ACT_CANDIDATES",
    "LOW_BUDGET_WEIGHT_CANDIDATES",
    "ROLES",
    "SQNR_OBJECTIVES",
    "WEIGHT_CANDIDATES",
    "AllocationError",
    "AllocationProblem",
    "LayerSpec",
    "objective_values",
]

ROLES = ("content", "quality")
KINDS = ("weights", "activations")
FP16_BITS = 16  # bits counted for a layer (or one side of it) kept in floating point

# MixDQ's defaults: content weights {2, 4, 8}, quality weights {4, 8}, activations {4, 8}.
WEIGHT_CANDIDATES: Mapping[str, tuple[int, ...]] = {"content": (2, 4, 8), "quality": (4, 8)}
ACT_CANDIDATES: Mapping[str, tuple[int, ...]] = {"content": (4, 8), "quality": (4, 8)}
# The project's low-budget sets (W3.x, A4 and below).
LOW_BUDGET_WEIGHT_CANDIDATES: Mapping[str, tuple[int, ...]] = {"content": (2, 3, 4, 8), "quality": (2, 3, 4, 8)}
LOW_BUDGET_ACT_CANDIDATES: Mapping[str, tuple[int, ...]] = {"content": (3, 4, 8), "quality": (3, 4, 8)}


class AllocationError(QuantkitError, ValueError):
    """A bit allocation problem, budget or plan file that cannot be used (the message names the fix)."""


# How SQNR sensitivities enter the objective: relative noise energy (default) or MixDQ's dB.
SQNR_OBJECTIVES = ("noise_energy", "db")


def objective_values(metric: str, values: Mapping[int, float], sqnr_objective: str = "noise_energy"
                     ) -> dict[int, float]:
    """A layer's measured ``{bits: value}`` as the allocator's higher-is-better objective values.

    Args:
        metric: the metric the values were measured with (``"sqnr"`` or ``"cfg_sqnr"`` in dB, or ``"ssim"``).
        values: ``{bits: value}`` from the sensitivity table.
        sqnr_objective: ``"noise_energy"`` maps SQNR ``v`` dB to ``-10**(-v/10)`` (minus the relative noise
            energy, additive over layers) for both dB metrics; ``"db"`` keeps the dB (MixDQ). SSIM values pass
            through unchanged.

    Raises:
        AllocationError: an unknown ``sqnr_objective``.
    """
    if sqnr_objective not in SQNR_OBJECTIVES:
        raise AllocationError(f"sqnr_objective must be one of {list(SQNR_OBJECTIVES)}, got {sqnr_objective!r}")
    if metric in ("sqnr", "cfg_sqnr") and sqnr_objective == "noise_energy":
        return {int(b): -(10.0 ** (-float(v) / 10.0)) for b, v in values.items()}
    return {int(b): float(v) for b, v in values.items()}


def _metric_table(table: Mapping | None, fqn: str, kind: str) -> dict[int, float] | None:
    if table is None:
        return None
    out = {}
    for bits, value in table.items():
        try:
            b, v = int(bits), float(value)
        except (TypeError, ValueError):
            raise AllocationError(f"layer '{fqn}': {kind} metric entry {bits!r}: {value!r} is not "
                                  "<bits>: <number>") from None
        if not math.isfinite(v):
            raise AllocationError(f"layer '{fqn}': {kind} metric at {b} bits is {v}, expected a finite number")
        out[b] = v
    return out


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer as the allocator sees it.

    Args:
        fqn: the layer's full module name (the key of the plan file).
        role: ``"content"`` (metric: SSIM, in [0, 1]) or ``"quality"`` (metric: SQNR in dB); both higher is better.
        num_weights: parameter count (weights the average weight bits and the megabytes).
        act_elements: input activation elements per forward (weights the average activation bits).
        macs: multiply-accumulates per forward (``BOPs = macs * weight_bits * act_bits``).
        weight_metric: ``{bits: metric}`` with only this layer's weights quantized; must cover the role's
            weight candidates (extra bit widths are ignored).
        act_metric: ``{bits: metric}`` with only this layer's input activations quantized, or ``None`` to keep
            this layer's activations in 16 bit (not allocated).
        overhead_bits: bits the layer stores besides its codes once quantized, whatever the bit-width (scales,
            zero points, the shape record); counted by the ``weight_mb`` budget.
    """

    fqn: str
    role: str
    num_weights: int
    act_elements: int = 0
    macs: int = 0
    weight_metric: Mapping[int, float] = field(default_factory=dict)
    act_metric: Mapping[int, float] | None = None
    overhead_bits: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise AllocationError(f"layer '{self.fqn}': role must be one of {list(ROLES)}, got {self.role!r}")
        for name in ("num_weights", "act_elements", "macs", "overhead_bits"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise AllocationError(f"layer '{self.fqn}': {name} must be a non-negative integer, got {value!r}")
        if self.num_weights == 0:
            raise AllocationError(f"layer '{self.fqn}': num_weights must be positive")
        object.__setattr__(self, "weight_metric", _metric_table(self.weight_metric, self.fqn, "weight"))
        object.__setattr__(self, "act_metric", _metric_table(self.act_metric, self.fqn, "activation"))

    def metric(self, kind: str) -> Mapping[int, float] | None:
        """The metric table of ``kind`` (``"weights"`` or ``"activations"``)."""
        return self.weight_metric if kind == "weights" else self.act_metric

    def to_dict(self) -> dict:
        """JSON/YAML-friendly form (inverse of :meth:`from_dict`)."""
        return {
            "fqn": self.fqn, "role": self.role, "num_weights": self.num_weights, "act_elements": self.act_elements,
            "macs": self.macs, "weight_metric": dict(self.weight_metric),
            "act_metric": None if self.act_metric is None else dict(self.act_metric),
            "overhead_bits": self.overhead_bits,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerSpec:
        """Build from a mapping with the field names (metric keys may be strings, as JSON writes them)."""
        valid = {"fqn", "role", "num_weights", "act_elements", "macs", "weight_metric", "act_metric",
                 "overhead_bits"}
        unknown = set(d) - valid
        if unknown:
            raise AllocationError(f"layer spec has unknown keys {sorted(unknown)}; valid keys: {sorted(valid)}")
        return cls(**d)


def _check_candidates(cands: Mapping[str, Sequence[int]], kind: str) -> dict[str, tuple[int, ...]]:
    unknown = set(cands) - set(ROLES)
    if unknown:
        raise AllocationError(f"{kind} candidates: unknown roles {sorted(unknown)}; valid roles: {list(ROLES)}")
    out = {}
    for role in ROLES:
        bits = tuple(sorted({int(b) for b in cands.get(role, ())}))
        if any(b < 1 or b >= FP16_BITS for b in bits):
            raise AllocationError(f"{kind} candidates for {role} layers must be integers in 1..{FP16_BITS - 1} "
                                  f"(FP16 is chosen by protection, not as a candidate), got {list(bits)}")
        if kind == "weights" and not bits:
            raise AllocationError(f"weight candidates for {role} layers are empty")
        out[role] = bits
    return out


@dataclass(frozen=True)
class AllocationProblem:
    """Layers (in model order), candidate bits per group, and the weighting knob between the groups.

    Args:
        layers: the layers, in model order (the plan and the plot keep it).
        weight_candidates: ``{role: bits}``; defaults to MixDQ's content {2, 4, 8}, quality {4, 8}.
        act_candidates: ``{role: bits}``; defaults to {4, 8} for both. An empty set keeps that group's
            activations in 16 bit.
        content_weight: weight of the content group's normalised loss in [0, 1]; the quality group gets
            ``1 - content_weight``.
        stored_bits: bits one weight of a given bit-width occupies when stored, for the ``weight_mb`` budget
            (quantkit's stages pass the packed format's: 3-bit codes take 3.2); default: the bit-width itself.
            A quantized layer's ``overhead_bits`` are added on top.

    Raises:
        AllocationError: duplicate names, a bad role or candidate set, or a metric table missing a candidate.
    """

    layers: Sequence[LayerSpec]
    weight_candidates: Mapping[str, Sequence[int]] = field(default_factory=lambda: dict(WEIGHT_CANDIDATES))
    act_candidates: Mapping[str, Sequence[int]] = field(default_factory=lambda: dict(ACT_CANDIDATES))
    content_weight: float = 0.5
    stored_bits: Callable[[int], float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise AllocationError("the allocation problem has no layers")
        if not 0.0 <= self.content_weight <= 1.0:
            raise AllocationError(f"content_weight must be in [0, 1], got {self.content_weight}")
        object.__setattr__(self, "weight_candidates", _check_candidates(self.weight_candidates, "weights"))
        object.__setattr__(self, "act_candidates", _check_candidates(self.act_candidates, "activations"))
        seen = set()
        for layer in self.layers:
            if layer.fqn in seen:
                raise AllocationError(f"layer '{layer.fqn}' appears twice in the allocation problem")
            seen.add(layer.fqn)
            for kind in KINDS:
                table = layer.metric(kind)
                missing = [b for b in self.candidates(kind, layer) if table is None or b not in table]
                if missing:
                    raise AllocationError(f"layer '{layer.fqn}' ({layer.role}) has no {kind} metric at {missing} "
                                          f"bits; its candidates are {list(self.candidates(kind, layer))}")

    @property
    def fqns(self) -> list[str]:
        """Layer names in model order."""
        return [layer.fqn for layer in self.layers]

    @property
    def roles(self) -> dict[str, str]:
        """``{fqn: role}`` in model order."""
        return {layer.fqn: layer.role for layer in self.layers}

    def candidates(self, kind: str, layer: LayerSpec) -> tuple[int, ...]:
        """Candidate bits of ``layer`` for ``kind``; ``()`` = not allocated (kept in 16 bit)."""
        if kind == "weights":
            return tuple(self.weight_candidates[layer.role])
        if layer.act_metric is None:
            return ()
        return tuple(self.act_candidates[layer.role])

    def group_weight(self, role: str) -> float:
        """The objective weight of a group: ``content_weight`` or ``1 - content_weight``."""
        return self.content_weight if role == "content" else 1.0 - self.content_weight

    def _raw_losses(self, kind: str) -> list[dict[int, float]]:
        raw = []
        for layer in self.layers:
            cands, table = self.candidates(kind, layer), layer.metric(kind)
            best = max((table[b] for b in cands), default=0.0)
            raw.append({b: best - table[b] for b in cands})
        return raw

    def spread(self, kind: str) -> dict[str, float]:
        """``{role: spread_g}``: the sum over the group of each layer's largest loss (1.0 when that sum is 0)."""
        total = {role: 0.0 for role in ROLES}
        for layer, loss in zip(self.layers, self._raw_losses(kind)):
            total[layer.role] += max(loss.values(), default=0.0)
        return {role: v or 1.0 for role, v in total.items()}

    def normalised_losses(self, kind: str) -> list[dict[int, float]]:
        """Per layer ``{bits: loss / spread_g}`` over the layer's candidates (see the module docstring).

        Args:
            kind: ``"weights"`` or ``"activations"``.

        Returns:
            One dict per layer in model order (empty when the layer has no candidates of ``kind``); 0.0 at the
            layer's best candidate, unweighted by ``content_weight``.
        """
        spread = self.spread(kind)
        return [{b: v / spread[layer.role] for b, v in loss.items()}
                for layer, loss in zip(self.layers, self._raw_losses(kind))]

    def sensitivity(self) -> list[float]:
        """Per layer: normalised loss at its worst candidate, weights plus activations (the protection ranking).

        Within a group this orders layers by how much their metric drops from their best to their lowest
        candidate; for SSIM, whose best is close to 1 for every layer, that is the order of the metric at the
        lowest candidate.
        """
        w, a = self.normalised_losses("weights"), self.normalised_losses("activations")
        return [max(wi.values(), default=0.0) + max(ai.values(), default=0.0) for wi, ai in zip(w, a)]

    def most_sensitive(self, top_percent: float) -> list[str]:
        """The ``floor(n_g * top_percent / 100)`` most sensitive layers of each group ``g`` (model order).

        Raises:
            AllocationError: ``top_percent`` outside [0, 100].
        """
        if not 0.0 <= top_percent <= 100.0:
            raise AllocationError(f"protect_top_percent must be in [0, 100], got {top_percent}")
        sens = self.sensitivity()
        chosen = set()
        for role in ROLES:
            idx = [i for i, layer in enumerate(self.layers) if layer.role == role]
            k = math.floor(len(idx) * top_percent / 100.0 + 1e-9)
            # Stable order on ties: the earlier layer wins.
            ranked = sorted(idx, key=lambda i: -sens[i])
            chosen.update(ranked[:k])
        return [self.layers[i].fqn for i in sorted(chosen)]

    def with_content_weight(self, content_weight: float) -> AllocationProblem:
        """A copy with another weighting knob."""
        return replace(self, content_weight=content_weight)

    def to_dict(self) -> dict:
        """JSON/YAML-friendly form (inverse of :meth:`from_dict`)."""
        return {
            "weight_candidates": {r: list(b) for r, b in self.weight_candidates.items()},
            "act_candidates": {r: list(b) for r, b in self.act_candidates.items()},
            "content_weight": self.content_weight,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> AllocationProblem:
        """Build from :meth:`to_dict` output (e.g. a JSON file)."""
        valid = {"layers", "weight_candidates", "act_candidates", "content_weight"}
        unknown = set(d) - valid
        if unknown:
            raise AllocationError(f"allocation problem has unknown keys {sorted(unknown)}; valid keys: {sorted(valid)}")
        kwargs = {k: d[k] for k in valid - {"layers"} if k in d}
        return cls(layers=[LayerSpec.from_dict(x) for x in d.get("layers", ())], **kwargs)

