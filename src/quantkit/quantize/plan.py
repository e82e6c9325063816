"""Per-layer plans: which scheme each layer of the denoiser gets, resolved from the config (and a bit plan)."""

from __future__ import annotations

from dataclasses import replace

from quantkit.config import LayerGroup, QuantizationSettings
from quantkit.errors import QuantkitError
from quantkit.formats.spec import ActFormat, LayerScheme, WeightFormat
from quantkit.models.layers import LayerInfo, is_text_kv, match, select_layers

__all__ = ["resolve_plan", "resolve_learning", "validate_plan", "apply_bos", "apply_bit_plan"]


def validate_plan(plan: dict[str, LayerScheme], layers: list[LayerInfo]) -> None:
    """Check every planned layer exists and every group size divides its layer.

    Raises:
        QuantkitError: naming the layer and the fix.
    """
    by_name = {layer.fqn: layer for layer in layers}
    for fqn, scheme in plan.items():
        if fqn not in by_name:
            raise QuantkitError(f"plan names layer '{fqn}', which is not a quantizable layer of this model")
        k = by_name[fqn].in_features
        gs = scheme.weight.group_size
        if gs != -1 and k % gs:
            raise QuantkitError(f"group_size {gs} does not divide the input size {k} of layer '{fqn}'; "
                                "use a divisor, group_size: -1, or exclude the layer with an override/ignore")


def apply_bit_plan(plan: dict[str, LayerScheme], layers: list[LayerInfo], path: str) -> dict[str, LayerScheme]:
    """Apply a bit plan file (from ``quantkit allocate``, possibly hand-edited) on top of a resolved plan.

    Each layer the file names takes the file's bits, keeping the rest of its settings (symmetry, group size,
    dynamic activations) from ``plan``; a ``null`` entry, or ``weights: null``, keeps the layer in floating point
    (a layer is executed with quantized weights or not at all).

    Raises:
        QuantkitError: unreadable or invalid plan (from :func:`quantkit.allocate.read_plan`).
    """
    from quantkit.allocate import read_plan, resolve_layers

    names = [layer.fqn for layer in layers]
    bits = resolve_layers(read_plan(path, roles={la.fqn: la.role for la in layers}), names)
    out = dict(plan)
    for fqn, lb in bits.items():
        if fqn not in plan:
            continue
        base = plan[fqn]
        if lb.weights is None:
            del out[fqn]
            continue
        w = WeightFormat(lb.weights, base.weight.group_size, base.weight.symmetric)
        dynamic = base.act.dynamic if base.act is not None else False
        out[fqn] = LayerScheme(w, None if lb.activations is None else ActFormat(lb.activations, dynamic))
    validate_plan(out, layers)
    return out


def resolve_plan(layers: list[LayerInfo], settings: QuantizationSettings) -> dict[str, LayerScheme]:
    """``{fqn: LayerScheme}`` for the selected layers: base settings, then ``overrides`` in order.

    Raises:
        QuantkitError: a target/ignore/override pattern matches no layer, or a group size does not divide a layer.
    """
    selected = select_layers(layers, settings.targets, settings.ignore)
    base = LayerGroup(targets=["re:.*"], backend=settings.backend, weights=settings.weights,
                      activations=settings.activations, jlcm=settings.jlcm).scheme()
    plan = {layer.fqn: base for layer in selected}
    for i, group in enumerate(settings.overrides):
        select_layers(layers, group.targets, [], what=f"overrides[{i}].targets")
        scheme = group.scheme()
        for fqn in plan:
            if any(match(p, fqn) for p in group.targets):
                plan[fqn] = scheme
    validate_plan(plan, layers)
    if settings.plan:
        plan = apply_bit_plan(plan, layers, settings.plan)
    return plan


def resolve_learning(plan: dict[str, LayerScheme], settings: QuantizationSettings) -> dict:
    """``{fqn: LearnSettings}`` of every codebook (JLCM) layer of ``plan``: the ``jlcm`` block of the last
    matching override with ``backend: jlcm``, else the base ``jlcm`` block."""
    out = {}
    for fqn, scheme in plan.items():
        if not scheme.is_codebook:
            continue
        jl = settings.jlcm
        for group in settings.overrides:
            if group.backend == "jlcm" and any(match(p, fqn) for p in group.targets):
                jl = group.jlcm
        out[fqn] = jl.learn_settings()
    return out


def apply_bos(plan: dict[str, LayerScheme], calibration) -> dict[str, LayerScheme]:
    """MixDQ's BOS-aware text-embedding quantization: a new plan where every cross-attention ``to_k``/``to_v``
    with static quantized activations, whose first input token calibration verified as prompt-invariant, keeps
    that token in floating point (``prefix_tokens=1``)."""
    out = dict(plan)
    for fqn, scheme in plan.items():
        static = scheme.act is not None and not scheme.act.dynamic
        if static and is_text_kv(fqn) and calibration is not None and calibration.prefix_invariant(fqn):
            out[fqn] = replace(scheme, prefix_tokens=1)
    return out
