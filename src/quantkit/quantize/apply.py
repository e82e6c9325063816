"""Apply a plan to a denoiser: swap each planned Linear/Conv2d for its packed quantized twin."""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from quantkit.calibrate.artifact import CalibrationArtifact
from quantkit.errors import QuantkitError
from quantkit.formats.spec import LayerScheme
from quantkit.nn.modules import empty_quant_module, quantize_module

__all__ = ["set_submodule", "quantize_denoiser", "swap_empty"]


def set_submodule(root: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace the submodule at ``fqn`` (keeps the original names, which LoRA keys depend on)."""
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _quantize_codebooks(denoiser: nn.Module, plan: dict[str, LayerScheme], calibration: CalibrationArtifact | None,
                        learning: dict | None, progress: bool) -> dict[str, nn.Module]:
    """Learn every codebook (JLCM) layer of ``plan`` on the FP denoiser; returns the quantized twins (not swapped)."""
    from quantkit.codebook import collect_grams, quantize_layer

    fqns = [f for f, s in plan.items() if s.is_codebook]
    if not fqns:
        return {}
    if calibration is None or not calibration.steps:
        raise QuantkitError("codebook (jlcm) layers are learned on calibration data; run quantkit calibrate with "
                            "this config first")
    grams = collect_grams(denoiser, fqns, calibration.steps)
    out = {}
    for fqn in tqdm(fqns, desc="jlcm", unit="layer", disable=not progress):
        stats = calibration.stats.get(fqn, {})
        settings = (learning or {}).get(fqn)
        out[fqn], _ = quantize_layer(denoiser.get_submodule(fqn), plan[fqn], grams.pop(fqn), settings,
                                     stats.get("channel_sqmean"))
    return out


def quantize_denoiser(denoiser: nn.Module, plan: dict[str, LayerScheme], calibration: CalibrationArtifact | None,
                      progress: bool = True, learning: dict | None = None) -> nn.Module:
    """Quantize every planned layer in place (round-to-nearest, or JLCM learning for codebook layers).

    Codebook layers are learned first, all on the inputs of the FP denoiser (recorded calls of the calibration
    artifact replayed through it), then every layer is swapped.

    Args:
        learning: ``{fqn: quantkit.codebook.LearnSettings}`` for codebook layers (defaults when missing); see
            :func:`quantkit.quantize.plan.resolve_learning`.

    Raises:
        QuantkitError: a static activation format is planned for a layer with no calibration statistics, or
            codebook layers are planned without calibration data.
    """
    learned = _quantize_codebooks(denoiser, plan, calibration, learning, progress)
    for fqn, scheme in tqdm(plan.items(), desc="quantize", unit="layer", disable=not progress):
        if fqn in learned:
            set_submodule(denoiser, fqn, learned[fqn])
            continue
        module = denoiser.get_submodule(fqn)
        act_range = prefix = None
        if scheme.act is not None and not scheme.act.dynamic:
            if calibration is None or fqn not in calibration.stats:
                raise QuantkitError(f"layer '{fqn}' needs calibrated activation statistics; re-run quantkit calibrate "
                                    "with this config (or use dynamic activations)")
            act_range = calibration.act_range(fqn, skip_prefix=scheme.prefix_tokens > 0)
        if scheme.prefix_tokens:
            prefix = calibration.prefix_rows(fqn)
        set_submodule(denoiser, fqn, quantize_module(module, scheme, act_range, prefix))
    return denoiser


def swap_empty(denoiser: nn.Module, plan: dict[str, LayerScheme]) -> nn.Module:
    """Swap planned layers for uninitialised quantized twins on the layers' device (``meta`` while loading)."""
    for fqn, scheme in plan.items():
        try:
            module = denoiser.get_submodule(fqn)
        except AttributeError:
            raise QuantkitError(f"quantization_config names layer '{fqn}', which this model does not have") from None
        device = next(iter(module.parameters())).device
        set_submodule(denoiser, fqn, empty_quant_module(module, scheme, device=device))
    return denoiser
