"""The ``quantization_config`` block of an exported component's ``config.json`` (compressed-tensors style).

::

    "quantization_config": {
      "quant_method": "quantkit",
      "format_version": 1,
      "config_groups": {
        "group_0": {"targets": ["down_blocks.0.attentions.0.proj_in", ...],
                    "weights": {"num_bits": 8, "symmetric": true, "strategy": "channel", "group_size": null},
                    "input_activations": {"num_bits": 8, "symmetric": false, "strategy": "tensor", "dynamic": false}}
      },
      "ignore": ["conv_in"]
    }

One group per distinct layer scheme; ``targets`` are exact module names (``re:`` regexes are accepted on read).
BOS-aware groups add ``"prefix_tokens": 1`` (see ``prefix_output`` in :mod:`quantkit.formats.spec`).
Codebook (JLCM) groups have ``"weights": {"format": "codebook", "num_bits": 3, "groups": 8,
"shared_codebook": false, "strategy": "codebook", ...}`` and ``"input_activations": null``.
"""

from __future__ import annotations

from collections.abc import Mapping

from quantkit.errors import QuantkitError
from quantkit.formats.spec import FORMAT_VERSION, ActFormat, LayerScheme, weight_format_from_dict

__all__ = ["QUANT_METHOD", "plan_to_qconfig", "qconfig_to_plan"]

QUANT_METHOD = "quantkit"


def plan_to_qconfig(plan: Mapping[str, LayerScheme], ignore: list[str] | None = None) -> dict:
    """Group a per-layer plan by scheme into the JSON block."""
    by_scheme: dict[LayerScheme, list[str]] = {}
    for fqn, scheme in plan.items():
        by_scheme.setdefault(scheme, []).append(fqn)
    groups = {}
    for i, (scheme, fqns) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[0].name)):
        groups[f"group_{i}"] = {
            "targets": fqns,
            "weights": scheme.weight.to_dict(),
            "input_activations": None if scheme.act is None else scheme.act.to_dict(),
        }
        if scheme.prefix_tokens:
            groups[f"group_{i}"]["prefix_tokens"] = scheme.prefix_tokens
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "config_groups": groups,
            "ignore": list(ignore or [])}


def qconfig_to_plan(qconfig: Mapping, layer_names: list[str] | None = None) -> dict[str, LayerScheme]:
    """Inverse of :func:`plan_to_qconfig`; ``re:`` targets are expanded against ``layer_names``.

    Raises:
        QuantkitError: unknown format version or malformed groups.
    """
    from quantkit.models.layers import match

    version = qconfig.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantkitError(f"quantization_config format_version {version} is not supported "
                            f"(this quantkit reads {FORMAT_VERSION}); upgrade quantkit or re-export")
    plan: dict[str, LayerScheme] = {}
    for gname, group in (qconfig.get("config_groups") or {}).items():
        try:
            weight = weight_format_from_dict(group["weights"])
            act = group.get("input_activations")
            scheme = LayerScheme(weight, None if act is None else ActFormat.from_dict(act),
                                 int(group.get("prefix_tokens", 0)))
            targets = list(group["targets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantkitError(f"quantization_config group '{gname}' is malformed ({exc})") from None
        for t in targets:
            if t.startswith("re:"):
                if layer_names is None:
                    raise QuantkitError(f"quantization_config group '{gname}' uses regex targets; layer names needed")
                for name in layer_names:
                    if match(t, name):
                        plan[name] = scheme
            else:
                plan[t] = scheme
    return plan
