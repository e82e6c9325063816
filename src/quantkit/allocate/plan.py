"""The bit plan file: written by ``quantkit allocate``, edited by people, read (and validated) by ``export``.

Format (``schema_version: 1``)::

    # quantkit bit plan (MixDQ allocation). ...
    schema_version: 1
    solver: pulp
    content_weight: 0.5
    candidates:
      weights: {content: [2, 4, 8], quality: [4, 8]}
      activations: {content: [4, 8], quality: [4, 8]}
    budget: {weight_bits: 4.0, weight_mb: null, act_bits: 8.0, max_bops: null, protect_top_percent: 1.0}
    achieved: {weight_bits: 3.9961, weight_mb: 1.172, act_bits: 8.0, bops: 1572864000}
    objective: -0.412345
    layers:
      conv_in: {weights: {bits: 8}, activations: {bits: 8}}  # quality
      down.0.attn2.to_k: {weights: {bits: 2}, activations: {bits: 8}}  # content
      mid.attn1.to_out.0: null  # quality, FP16
      "re:up\\..*\\.ff\\..*": {weights: {bits: 4}, activations: null}

A layer entry is ``null`` (the whole layer stays FP16) or a mapping with ``weights`` and ``activations``, each
``{bits: N}`` or ``null`` (that side stays 16 bit; a missing side counts as ``null``). Keys are exact layer names
or regexes prefixed with ``re:`` (exact names win over regexes, then the first matching regex wins, as in
torchao ``FqnToConfig``). ``budget``, ``achieved`` and ``objective`` record how the plan was made; they are not
re-checked after edits (:func:`quantkit.allocate.evaluate` recomputes them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import yaml

from quantkit.allocate.problem import (
    ACT_CANDIDATES,
    KINDS,
    ROLES,
    WEIGHT_CANDIDATES,
    AllocationError,
    _check_candidates,
)
from quantkit.allocate.solve import Achieved, Allocation, Budget, LayerBits

__all__ = ["PLAN_SCHEMA_VERSION", "PlanError", "plan_to_yaml", "read_plan", "resolve_layers", "write_plan"]

PLAN_SCHEMA_VERSION = 1
_TOP_KEYS = ("schema_version", "solver", "content_weight", "candidates", "budget", "achieved", "objective", "layers")
_LAYER_KEYS = ("weights", "activations")
_SIDE_KEYS = ("bits",)

_HEADER = """\
# quantkit bit plan (MixDQ integer-program allocation), schema_version 1.
# layers: one entry per layer (exact name, or a regex prefixed with "re:"):
#   {weights: {bits: N}, activations: {bits: N}}; null keeps the whole layer FP16,
#   weights: null / activations: null keeps just that side in 16 bit.
# Bits must be among `candidates` for the layer's group. budget/achieved/objective record how the plan
# was made and are not re-checked after edits. MB = 2**20 bytes (codes, scales, zero points).
"""


class PlanError(AllocationError):
    """A plan file that cannot be used; the message names the file, the layer and the fix."""


def _yaml_key(name: str) -> str:
    """``name`` as a YAML mapping key: plain when that reads back unchanged, else a quoted (JSON) string."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name) and yaml.safe_load(f"{name}: 0") == {name: 0}:
        return name
    return json.dumps(name)


def _side(bits: int | None) -> str:
    return "null" if bits is None else f"{{bits: {bits}}}"


def _layer_line(fqn: str, bits: LayerBits, role: str | None, protected: bool) -> str:
    value = "null" if bits.is_fp16 else f"{{weights: {_side(bits.weights)}, activations: {_side(bits.activations)}}}"
    notes = [n for n in (role, "FP16 (protected)" if protected else None) if n]
    return f"  {_yaml_key(fqn)}: {value}" + (f"  # {', '.join(notes)}" if notes else "")


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def plan_to_yaml(allocation: Allocation) -> str:
    """The plan file's text for ``allocation`` (see the module docstring)."""
    a = allocation.achieved
    meta = {
        "schema_version": PLAN_SCHEMA_VERSION,
        "solver": allocation.solver,
        "content_weight": allocation.content_weight,
        "candidates": {
            "weights": {r: list(b) for r, b in allocation.weight_candidates.items()},
            "activations": {r: list(b) for r, b in allocation.act_candidates.items()},
        },
        "budget": asdict(allocation.budget),
        "achieved": None if a is None else {
            "weight_bits": _round(a.weight_bits, 4), "weight_mb": _round(a.weight_mb, 3),
            "act_bits": _round(a.act_bits, 4), "bops": int(round(a.bops)),
        },
        "objective": _round(allocation.objective, 6),
    }
    body = yaml.safe_dump(meta, sort_keys=False, default_flow_style=None, width=120)
    protected = set(allocation.protected)
    lines = [_layer_line(f, b, allocation.roles.get(f), f in protected) for f, b in allocation.layers.items()]
    return _HEADER + body + "layers:\n" + "\n".join(lines) + "\n"


def write_plan(allocation: Allocation, path: str | Path) -> Path:
    """Write ``allocation`` as a plan YAML file.

    Args:
        allocation: the plan (from :func:`quantkit.allocate.allocate`, or edited).
        path: output file; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_to_yaml(allocation), encoding="utf-8")
    return path


def _check_keys(d: object, valid: Iterable[str], where: str) -> Mapping:
    valid = list(valid)
    if not isinstance(d, Mapping):
        raise PlanError(f"{where} must be a mapping with keys {valid}, got {type(d).__name__}")
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise PlanError(f"{where}: unknown keys {unknown}; valid keys: {valid}")
    return d


def _bits(side: object, fqn: str, kind: str, allowed: set[int], group: str) -> int | None:
    if side is None:
        return None
    bits = _check_keys(side, _SIDE_KEYS, f"layer '{fqn}' {kind}").get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise PlanError(f"layer '{fqn}': {kind} bits must be an integer, got {bits!r}")
    if bits not in allowed:
        raise PlanError(f"layer '{fqn}': {kind} bits {bits} is not a candidate ({group} candidates: {sorted(allowed)});"
                        f" use one of them, or {kind}: null to keep it in 16 bit")
    return bits


def _layer(entry: object, fqn: str, cands: Mapping[str, Mapping[str, tuple]], roles: Mapping[str, str]) -> LayerBits:
    if entry is None:
        return LayerBits(None, None)
    entry = _check_keys(entry, _LAYER_KEYS, f"layer '{fqn}'")
    role = roles.get(fqn)
    out = []
    for kind in KINDS:
        if role is not None:
            allowed, group = set(cands[kind][role]), role
        else:
            allowed, group = {b for r in ROLES for b in cands[kind][r]}, "all"
        out.append(_bits(entry.get(kind), fqn, kind, allowed, group))
    return LayerBits(*out)


def resolve_layers(allocation: Allocation, fqns: Iterable[str]) -> dict[str, LayerBits]:
    """Per-layer bits for the model's layers ``fqns``: exact names first, then the first matching ``re:`` key.

    Layers that no key selects are left out.

    Raises:
        PlanError: an invalid regex.
    """
    exact = {k: v for k, v in allocation.layers.items() if not k.startswith("re:")}
    patterns = []
    for key, value in allocation.layers.items():
        if key.startswith("re:"):
            try:
                patterns.append((re.compile(key[3:]), value))
            except re.error as exc:
                raise PlanError(f"plan key '{key}' is not a valid regex: {exc}") from None
    out = {}
    for fqn in fqns:
        if fqn in exact:
            out[fqn] = exact[fqn]
            continue
        for pattern, value in patterns:
            if pattern.fullmatch(fqn):
                out[fqn] = value
                break
    return out


def _validate_names(allocation: Allocation, known: list[str]) -> None:
    known_set = set(known)
    for key in allocation.layers:
        if key.startswith("re:"):
            if not resolve_layers(Allocation({key: allocation.layers[key]}), known):
                raise PlanError(f"plan key '{key}' matches no layer of this model (regexes match full names)")
        elif key not in known_set:
            raise PlanError(f"plan names layer '{key}', which is not a quantizable layer of this model "
                            f"({len(known)} layers, e.g. '{known[0] if known else '(none)'}')")
    missing = [f for f in known if f not in resolve_layers(allocation, known)]
    if missing:
        raise PlanError(f"plan has no entry for {len(missing)} layers, e.g. '{missing[0]}'; add them (null = FP16)")


def read_plan(path: str | Path, *, roles: Mapping[str, str] | None = None,
              known_layers: Iterable[str] | None = None) -> Allocation:
    """Read and validate a plan file (``yaml.safe_load`` only).

    Args:
        path: the plan YAML.
        roles: ``{fqn: role}`` of the model's layers; with it, bits are checked against the layer's own group's
            candidates, without it against the union of both groups'.
        known_layers: the model's layer names; with them, unknown names, regexes matching nothing and layers
            without an entry are errors.

    Returns:
        The plan as an :class:`Allocation` (``protected`` = the layers whose entry is ``null``).

    Raises:
        PlanError: unreadable YAML, a wrong schema version, unknown keys (the message lists the valid ones),
            bits outside the candidates (naming the layer), or names that do not fit ``known_layers``.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError(f"{path}: cannot read the plan: {exc}") from None
    try:
        allocation = _parse(data, roles or {})
        if known_layers is not None:
            _validate_names(allocation, list(known_layers))
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None
    return allocation


def _parse(data: object, roles: Mapping[str, str]) -> Allocation:
    data = _check_keys(data, _TOP_KEYS, "plan")
    if data.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise PlanError(f"schema_version must be {PLAN_SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    if not isinstance(data.get("layers"), Mapping):
        raise PlanError("plan needs a 'layers' mapping {layer name: {weights: {bits: N}, activations: {bits: N}}}")
    try:
        raw = _check_keys(data.get("candidates") or {}, KINDS, "candidates")
        # A missing section means MixDQ's defaults; an explicit null (activations) means none.
        cands = {"weights": _check_candidates(raw.get("weights", WEIGHT_CANDIDATES), "weights"),
                 "activations": _check_candidates(raw.get("activations", ACT_CANDIDATES) or {}, "activations")}
        budget = Budget(**_check_keys(data.get("budget") or {}, Budget.__dataclass_fields__, "budget"))
        achieved = data.get("achieved")
        if achieved is not None:
            achieved = Achieved(**_check_keys(achieved, Achieved.__dataclass_fields__, "achieved"))
    except TypeError as exc:  # a required field of achieved is missing
        raise PlanError(str(exc)) from None
    except AllocationError as exc:
        raise PlanError(str(exc)) from None
    content_weight = data.get("content_weight")
    content_weight = 0.5 if content_weight is None else content_weight
    if isinstance(content_weight, bool) or not isinstance(content_weight, (int, float)):
        raise PlanError(f"content_weight must be a number in [0, 1], got {content_weight!r}")
    layers = {str(k): _layer(v, str(k), cands, roles) for k, v in data["layers"].items()}
    return Allocation(
        layers=layers, roles={f: roles[f] for f in layers if f in roles}, objective=data.get("objective"),
        budget=budget, achieved=achieved, protected=tuple(f for f, b in layers.items() if b.is_fp16),
        solver=data.get("solver"), content_weight=float(content_weight),
        weight_candidates=cands["weights"], act_candidates=cands["activations"],
    )
