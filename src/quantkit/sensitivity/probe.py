"""One-layer-at-a-time sensitivity measurements (MixDQ): the probe that quantizes a layer, measures, restores.

Weights are quantized exactly as deployed (:func:`quantkit.nn.modules.quantize_module` with a weight-only
scheme); activations are fake-quantized by a forward pre-hook with the reference activation quantizer
(:mod:`quantkit.ops.reference`) and the calibrated range, weights left in floating point. Two metrics:

* ``sqnr``: SQNR (dB) of the denoiser output against the recorded FP outputs, over every calibration step,
  replayed batched as recorded (one denoiser evaluation per step);
* ``ssim``: mean SSIM of the final decoded images against the FP images, with the calibration prompts,
  per-prompt seeds, steps and guidance (one denoiser evaluation per step and per prompt batch);
* ``cfg_sqnr``: SQNR (dB) of the text-conditional direction ``eps(x, c) - eps(x, empty)`` (what classifier-free
  guidance amplifies, so what carries the prompt into the image) against its FP value, over every calibration
  step. Needs a calibration run with classifier-free guidance: each recorded step then holds the unconditional
  half of the batch first; that structure is verified (every first-half text embedding the same, in every step),
  not assumed. Same cost as ``sqnr``.

The probe needs only a denoiser and a :class:`~quantkit.calibrate.artifact.CalibrationArtifact` for ``sqnr`` and
``cfg_sqnr`` (a full pipeline only for ``ssim``), so it runs unchanged on a bare full-size UNet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from quantkit.calibrate.artifact import CalibrationArtifact, move_tensors
from quantkit.formats.spec import LayerScheme, WeightFormat
from quantkit.models.layers import is_text_kv
from quantkit.models.pipeline import generate
from quantkit.nn.modules import quantize_module
from quantkit.ops.reference import act_qparams_from_range, quantize_act
from quantkit.quantize.apply import set_submodule
from quantkit.sensitivity.metrics import MAX_DB, ssim

__all__ = ["KINDS", "METRICS", "SQNR_METRICS", "WorkItem", "ImageTask", "SensitivityProbe", "fake_quant_act"]

KINDS = ("weights", "activations")
METRICS = ("sqnr", "ssim", "cfg_sqnr")
SQNR_METRICS = ("sqnr", "cfg_sqnr")  # measured in dB


@dataclass(frozen=True)
class WorkItem:
    """One measurement: ``fqn`` quantized on one side (``kind``) at ``bits``, judged by ``metric``."""

    fqn: str
    role: str
    kind: str  # "weights" | "activations"
    bits: int
    metric: str  # "sqnr" | "ssim" | "cfg_sqnr"

    @property
    def key(self) -> tuple[str, str, int, str]:
        """Cache identity (see :func:`quantkit.sensitivity.cache.measure_key`)."""
        return (self.fqn, self.kind, int(self.bits), self.metric)


@dataclass
class ImageTask:
    """How the SSIM images are generated: the calibration prompts and sampling settings, batched.

    Prompt ``i`` uses the seed ``seed + i`` whatever the batching (as in calibration).
    """

    pipe: object
    prompts: list[str]
    num_inference_steps: int
    guidance_scale: float | None
    seed: int
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    reference: np.ndarray | None = field(default=None, repr=False)  # FP images [N, H, W, 3] in [0, 1]

    def generate(self) -> np.ndarray:
        """Images ``[N, H, W, 3]`` (float32 in [0, 1]) of every prompt with the pipeline as it is now."""
        out = []
        for b in range(0, len(self.prompts), self.batch_size):
            imgs = generate(self.pipe, self.prompts[b:b + self.batch_size], self.num_inference_steps,
                            self.guidance_scale, self.seed + b, self.height, self.width)
            out.append(np.ascontiguousarray(imgs, dtype=np.float32))
        return np.concatenate(out, axis=0)


def fake_quant_act(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                   zero_point: torch.Tensor | None = None, per_row: bool = True) -> torch.Tensor:
    """Quantize-dequantize a layer input with the reference activation quantizer.

    Args:
        x: the input.
        bits: activation bits.
        scale: static per-tensor scale (from :func:`~quantkit.ops.reference.act_qparams_from_range` of the
            calibrated range); ``None`` = dynamic, as deployed: per token (row of the flattened ``[M, K]``
            input) when ``per_row``, else per sample (Conv2d).
        zero_point: static zero point (with ``scale``).
        per_row: dynamic granularity, see above.
    """
    if scale is None:
        xf = x.to(torch.float32)
        if per_row:
            lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
        else:
            dims = tuple(range(1, xf.dim()))
            lo, hi = xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)
        scale, zero_point = act_qparams_from_range(lo, hi, bits)
    codes = quantize_act(x, scale, zero_point, bits)
    return ((codes.to(torch.float32) - zero_point.to(torch.float32)) * scale.to(torch.float32)).to(x.dtype)


def _drop_repacked_weights() -> None:
    # Native CPU kernels cache a repacked copy of each quantized weight they run; every measurement builds a
    # new quantized layer, so without this a full-size analysis would fill the cache with dead layers.
    from quantkit.ops import native

    clear = getattr(native, "clear_cache", None)
    if clear is not None:
        clear()


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


class SensitivityProbe:
    """Quantizes one layer of a denoiser at a time, measures the damage, and restores the layer.

    Args:
        denoiser: the floating-point UNet/transformer (modified in place during a measurement only).
        calibration: recorded steps (for ``sqnr`` and the size hooks) and activation statistics.
        weight_group_size: weight format group size (-1 = per output channel, MixDQ).
        weight_symmetric: symmetric weight codes (MixDQ).
        act_mode: how the config deploys activations: ``"static"`` (per tensor, calibrated range),
            ``"dynamic"`` (per token / per sample at run time) or ``None`` (16 bit; activation items are then
            still measurable, statically).
        bos_aware: keep the verified prompt-invariant first text token of cross-attention ``to_k``/``to_v`` in
            floating point, with the activation range calibrated without it, where static activations are
            deployed (as :func:`quantkit.quantize.plan.apply_bos` does).
        images: how to generate SSIM images (needed only for ``ssim`` items).
        device: where the denoiser runs (recorded inputs are moved there once).

    Counts every denoiser forward in :attr:`evaluations`. Use as a context manager (or call :meth:`close`)
    to remove the counting hook.
    """

    def __init__(self, denoiser: nn.Module, calibration: CalibrationArtifact, *, weight_group_size: int = -1,
                 weight_symmetric: bool = True, act_mode: str | None = "static", bos_aware: bool = True,
                 images: ImageTask | None = None, device: torch.device | str | None = None):
        self.denoiser = denoiser
        self.calibration = calibration
        self.weight_group_size = weight_group_size
        self.weight_symmetric = weight_symmetric
        if act_mode not in ("static", "dynamic", None):
            raise ValueError(f"act_mode must be 'static', 'dynamic' or None, got {act_mode!r}")
        self.act_mode = act_mode
        self.act_dynamic = act_mode == "dynamic"
        self.bos_aware = bos_aware
        self.images = images
        if device is None:
            device = next(denoiser.parameters()).device
        self.device = torch.device(device)
        self.steps = [{"args": move_tensors(s["args"], self.device), "kwargs": move_tensors(s["kwargs"], self.device),
                       "output": s["output"]} for s in calibration.steps]
        self.reference_outputs: list[torch.Tensor] | None = None
        self._guidance_half: int | None = None
        self.evaluations = 0
        self._hook = denoiser.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.evaluations += 1

    def close(self) -> None:
        """Remove the evaluation counter from the denoiser."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> SensitivityProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what is deployed -------------------------------------------------------------------------------------

    def prefix_tokens(self, fqn: str, static_act: bool) -> int:
        """1 where MixDQ's BOS-aware quantization applies to ``fqn`` (static activations only), else 0."""
        if not (self.bos_aware and static_act and is_text_kv(fqn)):
            return 0
        return 1 if self.calibration.prefix_invariant(fqn) else 0

    def weight_scheme(self, fqn: str, bits: int) -> LayerScheme:
        """The weight-only scheme a layer is measured with (the prefix kept as a W-A8 deployment keeps it)."""
        return LayerScheme(WeightFormat(bits, self.weight_group_size, self.weight_symmetric), None,
                           self.prefix_tokens(fqn, static_act=self.act_mode == "static"))

    def has_act_stats(self, fqn: str) -> bool:
        """Whether calibration observed the layer's input (needed for static activation items)."""
        return self.act_dynamic or fqn in self.calibration.stats

    # -- measurements -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def layer_sizes(self, fqns: list[str]) -> dict[str, dict[str, int]]:
        """``{fqn: {num_weights, act_elements, macs}}`` per denoiser call and per sample, from one replayed step.

        ``act_elements`` is the number of input elements the layer reads, ``macs`` its multiply-accumulates
        (summed if a layer runs several times per call). Costs one denoiser evaluation.
        """
        sizes = {f: {"num_weights": 0, "act_elements": 0, "macs": 0} for f in fqns}
        step = self.steps[0]
        batch = int(step["output"].shape[0])
        handles = []

        def hook(module, args, output, fqn):
            x = args[0]
            s = sizes[fqn]
            s["act_elements"] += x.numel()
            if isinstance(module, nn.Linear):
                s["macs"] += x.numel() * module.out_features
            else:  # Conv2d, groups = 1: every output element reads C * kh * kw inputs
                s["macs"] += output.numel() * math.prod(module.weight.shape[1:])

        for fqn in fqns:
            module = self.denoiser.get_submodule(fqn)
            sizes[fqn]["num_weights"] = int(module.weight.numel())
            handles.append(module.register_forward_hook(lambda m, a, o, fqn=fqn: hook(m, a, o, fqn)))
        try:
            self.denoiser(*step["args"], **step["kwargs"])
        finally:
            for h in handles:
                h.remove()
        for s in sizes.values():
            s["act_elements"] //= batch
            s["macs"] //= batch
        return sizes

    @torch.inference_mode()
    def prepare_sqnr_reference(self) -> None:
        """Replay every calibration step once in floating point and keep the outputs as the SQNR reference.

        The recorded outputs would do too, but they came from another run (other batch code paths, thread
        counts or kernels): their tiny differences would put a noise floor (about 120 dB on CPU) under every
        measurement. Costs one denoiser evaluation per step.
        """
        self.reference_outputs = [_output_tensor(self.denoiser(*s["args"], **s["kwargs"])).to("cpu", torch.float64)
                                  for s in self.steps]

    def guidance_half(self) -> int:
        """Check that every recorded step is a classifier-free-guidance batch, unconditional half first, and
        return the half size of the first step.

        Verified, not assumed: the calibration ran with ``guidance_scale`` > 1 (its manifest), and on the text
        embeddings, in every step the batch is even, every row of the first half equals one and the same
        unconditional embedding (across all steps), and the second half differs from it.

        Raises:
            ValueError: the calibration was not run with guidance (``guidance_scale`` <= 1, or a pipeline without
                classifier-free guidance), so ``cfg_sqnr`` cannot be measured.
        """
        if self._guidance_half is not None:
            return self._guidance_half
        hint = ("cfg_sqnr needs a calibration run with classifier-free guidance (calibration.guidance_scale > 1) "
                "whose steps batch the unconditional prompts first; use content_metric: ssim or sqnr otherwise")
        guidance = (self.calibration.manifest.get("calibration") or {}).get("guidance_scale")
        if guidance is None or float(guidance) <= 1.0:
            raise ValueError(f"{hint} (this calibration ran with guidance_scale {guidance})")
        uncond = None
        for step in self.steps:
            ehs = step["kwargs"].get("encoder_hidden_states")
            if ehs is None and len(step["args"]) > 2:
                ehs = step["args"][2]
            n = step["output"].shape[0]
            if not isinstance(ehs, torch.Tensor) or n < 2 or n % 2 or ehs.shape[0] != n:
                raise ValueError(f"{hint} (a recorded step has batch {n} without paired text embeddings)")
            first, second = ehs[: n // 2], ehs[n // 2:]
            uncond = first[:1] if uncond is None else uncond
            if not torch.equal(first, uncond.expand_as(first)):
                raise ValueError(f"{hint} (the first half of a step's text embeddings is not one unconditional "
                                 "embedding)")
            if torch.equal(second, uncond.expand_as(second)):
                raise ValueError(f"{hint} (a step's conditional half equals the unconditional embedding)")
        self._guidance_half = self.steps[0]["output"].shape[0] // 2 if self.steps else 0
        return self._guidance_half

    @staticmethod
    def _direction(out: torch.Tensor) -> torch.Tensor:
        """``cond - uncond`` of a guidance batch (unconditional half first)."""
        h = out.shape[0] // 2
        return out[h:] - out[:h]

    @torch.inference_mode()
    def replay_sqnr(self, guidance_direction: bool = False) -> float:
        """SQNR (dB) of the denoiser's output over every calibration step, against the FP outputs; with
        ``guidance_direction``, of the conditional-minus-unconditional output instead (``cfg_sqnr``).

        The reference is :meth:`prepare_sqnr_reference`'s replay when it ran, else the recorded outputs.
        """
        if guidance_direction:
            self.guidance_half()
        signal = noise = 0.0
        for i, step in enumerate(self.steps):
            out = _output_tensor(self.denoiser(*step["args"], **step["kwargs"])).to("cpu", torch.float64)
            ref = self.reference_outputs[i] if self.reference_outputs is not None else step["output"].to(torch.float64)
            if guidance_direction:
                out, ref = self._direction(out), self._direction(ref)
            signal += ref.pow(2).sum().item()
            noise += (out - ref).pow(2).sum().item()
        if noise == 0:
            return MAX_DB
        if signal == 0:
            return -MAX_DB
        return min(MAX_DB, 10.0 * math.log10(signal / noise))

    def reference_images(self) -> np.ndarray:
        """Generate the FP images of the SSIM prompts (call with no layer quantized)."""
        if self.images is None:
            raise ValueError("SSIM measurements need an ImageTask (a full pipeline and prompts)")
        return self.images.generate()

    def image_ssim(self) -> float:
        """Mean SSIM of the images generated now against the FP reference images."""
        if self.images is None or self.images.reference is None:
            raise ValueError("SSIM measurements need an ImageTask with reference (FP) images")
        test = self.images.generate()
        ref = self.images.reference
        return float(np.mean([ssim(torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(ref, test)]))

    def _metric(self, metric: str) -> float:
        if metric == "sqnr":
            return self.replay_sqnr()
        if metric == "ssim":
            return self.image_ssim()
        if metric == "cfg_sqnr":
            return self.replay_sqnr(guidance_direction=True)
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")

    def _act_hook(self, fqn: str, bits: int, conv: bool):
        prefix = self.prefix_tokens(fqn, static_act=not self.act_dynamic)
        scale = zero_point = None
        if not self.act_dynamic:
            lo, hi = self.calibration.act_range(fqn, skip_prefix=prefix > 0)
            scale, zero_point = act_qparams_from_range(torch.as_tensor(lo), torch.as_tensor(hi), bits)
            scale, zero_point = scale.to(self.device), zero_point.to(self.device)

        def hook(module, args):
            x = args[0]
            if prefix:  # BOS-aware: the leading tokens stay floating point, the rest use the range without them
                x = torch.cat([x[..., :prefix, :], fake_quant_act(x[..., prefix:, :], bits, scale, zero_point)],
                              dim=-2)
            else:
                x = fake_quant_act(x, bits, scale, zero_point, per_row=not conv)
            return (x, *args[1:])

        return hook

    @contextmanager
    def applied(self, plan: Mapping[str, tuple[int | None, int | None]]) -> Iterator[None]:
        """Run the denoiser with a whole bit plan applied: ``{fqn: (weight_bits, act_bits)}``, ``None`` = 16 bit.

        Weights are quantized as deployed and activations fake-quantized, exactly as :meth:`measure` does for
        one layer; everything is restored on exit. A layer whose input range was not calibrated keeps 16-bit
        activations (as the export does).
        """
        swapped: dict[str, nn.Module] = {}
        handles = []
        try:
            for fqn, (wbits, abits) in plan.items():
                module = self.denoiser.get_submodule(fqn)
                conv = isinstance(module, nn.Conv2d)
                if wbits is not None:
                    scheme = self.weight_scheme(fqn, wbits)
                    prefix = self.calibration.prefix_rows(fqn) if scheme.prefix_tokens else None
                    with torch.inference_mode():
                        set_submodule(self.denoiser, fqn, quantize_module(module, scheme, None, prefix))
                    swapped[fqn] = module
                if abits is not None and self.has_act_stats(fqn):
                    handles.append(self.denoiser.get_submodule(fqn).register_forward_pre_hook(
                        self._act_hook(fqn, abits, conv)))
            yield
        finally:
            for h in handles:
                h.remove()
            for fqn, module in swapped.items():
                set_submodule(self.denoiser, fqn, module)
            if swapped:
                _drop_repacked_weights()

    @torch.inference_mode()
    def measure(self, item: WorkItem) -> dict:
        """Quantize ``item.fqn`` on one side at ``item.bits``, measure ``item.metric``, restore the layer.

        Returns:
            ``{"value", "evaluations", "seconds"}``.
        """
        if item.kind not in KINDS:
            raise ValueError(f"unknown kind {item.kind!r}; choose one of {list(KINDS)}")
        start_evals, t0 = self.evaluations, time.perf_counter()
        module = self.denoiser.get_submodule(item.fqn)
        if item.kind == "weights":
            scheme = self.weight_scheme(item.fqn, item.bits)
            prefix = self.calibration.prefix_rows(item.fqn) if scheme.prefix_tokens else None
            set_submodule(self.denoiser, item.fqn, quantize_module(module, scheme, None, prefix))
            try:
                value = self._metric(item.metric)
            finally:
                set_submodule(self.denoiser, item.fqn, module)
                _drop_repacked_weights()
        else:
            handle = module.register_forward_pre_hook(self._act_hook(item.fqn, item.bits,
                                                                     isinstance(module, nn.Conv2d)))
            try:
                value = self._metric(item.metric)
            finally:
                handle.remove()
        return {"value": float(value), "evaluations": self.evaluations - start_evals,
                "seconds": round(time.perf_counter() - t0, 6)}
