"""YAML configuration: pydantic models that reject unknown keys, one schema version.

Example (``configs/demo.yaml``)::

    schema_version: 1
    model: builtin:tiny-sd
    quantization:
      targets: ["re:.*"]
      ignore: []
      weights: {bits: 8, symmetric: true, group_size: -1}
      activations: {bits: 8, dynamic: false}
    calibration:
      prompts: builtin
      num_prompts: 8
      num_inference_steps: 4
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantkit.errors import QuantkitError
from quantkit.formats.spec import (
    ACT_BITS,
    CODEBOOK_BITS,
    WEIGHT_BITS,
    ActFormat,
    CodebookFormat,
    LayerScheme,
    WeightFormat,
)
from quantkit.models.layers import check_pattern
from quantkit.sensitivity.settings import AnalysisSettings, DeviceSpec

__all__ = [
    "SCHEMA_VERSION",
    "WeightSettings",
    "ActivationSettings",
    "JLCMSettings",
    "LayerGroup",
    "QuantizationSettings",
    "CalibrationSettings",
    "AllocationSettings",
    "EvaluationSettings",
    "ExportSettings",
    "QuantkitConfig",
    "load_config",
    "parse_config",
]

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightSettings(_Strict):
    """Weight quantization: ``bits`` in {2, 3, 4, 8}; ``group_size`` -1 = per output channel."""

    bits: int = 8
    symmetric: bool = True
    group_size: int = -1

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {list(WEIGHT_BITS)}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be -1 (per channel) or a positive divisor of the layer input size")
        return v

    def to_format(self) -> WeightFormat:
        """The packed weight format these settings describe."""
        return WeightFormat(self.bits, self.group_size, self.symmetric)


class ActivationSettings(_Strict):
    """Activation (layer input) quantization: static per-tensor from calibration, or dynamic per token."""

    bits: int = 8
    dynamic: bool = False

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ACT_BITS:
            raise ValueError(f"activation bits must be one of {list(ACT_BITS)} (or set activations: null)")
        return v

    def to_format(self) -> ActFormat:
        """The activation format these settings describe."""
        return ActFormat(self.bits, self.dynamic)


class JLCMSettings(_Strict):
    """JLCM codebook backend (``backend: jlcm``): row groups, codebook sharing and the learning budget.

    ``weights.bits`` (2, 3 or 4) is the index width; ``groups`` output-row groups each get a codebook
    (``shared_codebook: true``: one codebook, a scale per group). ``iterations`` is the learning budget per layer,
    ``update`` the mapping update (``proximal``, or ``ste`` for plain straight-through). Example::

        backend: jlcm
        weights: {bits: 3}
        jlcm: {groups: 8, iterations: 100}
    """

    groups: int = Field(8, ge=1, le=256)
    shared_codebook: bool = False
    iterations: int = Field(100, ge=0)
    lr: float = Field(0.003, ge=0.0)
    update: Literal["proximal", "ste"] = "proximal"
    max_change: float = Field(0.01, gt=0.0, le=1.0)
    radius: int = Field(1, ge=1)
    eval_every: int = Field(5, ge=1)
    patience: int = Field(3, ge=1)
    seed: int = 0

    def learn_settings(self):
        """The :class:`quantkit.codebook.LearnSettings` these describe."""
        from quantkit.codebook.learn import LearnSettings

        return LearnSettings(iterations=self.iterations, lr=self.lr, update=self.update, max_change=self.max_change,
                             radius=self.radius, eval_every=self.eval_every, patience=self.patience, seed=self.seed)


def _check_backend(model):
    """``backend: jlcm`` is weight-only with 2/3/4-bit indices; activations default to null there."""
    if model.backend != "jlcm":
        return model
    if "activations" in model.model_fields_set and model.activations is not None:
        raise ValueError("backend jlcm is weight-only: set activations: null")
    if model.weights.bits not in CODEBOOK_BITS:
        raise ValueError(f"backend jlcm needs weights.bits in {list(CODEBOOK_BITS)} (codebooks of 4, 8 or 16 entries)")
    object.__setattr__(model, "activations", None)
    return model


def _check_patterns(patterns: list[str]) -> list[str]:
    """Layer patterns (names, or ``re:`` regexes): each regex must compile, so a typo fails when the config is
    read rather than after the model has loaded."""
    for p in patterns:
        check_pattern(p)
    return patterns


class LayerGroup(_Strict):
    """Settings for the layers matched by ``targets`` (names or ``re:`` regexes); later groups win.

    ``backend`` is ``uniform`` (integer weights, optional activations) or ``jlcm`` (codebook weights, see
    :class:`JLCMSettings`).
    """

    targets: list[str]
    backend: Literal["uniform", "jlcm"] = "uniform"
    weights: WeightSettings = WeightSettings()
    activations: ActivationSettings | None = ActivationSettings()
    jlcm: JLCMSettings = JLCMSettings()

    _backend = model_validator(mode="after")(_check_backend)
    _patterns = field_validator("targets")(_check_patterns)

    def scheme(self) -> LayerScheme:
        """The layer scheme of this group."""
        if self.backend == "jlcm":
            return LayerScheme(CodebookFormat(self.weights.bits, self.jlcm.groups, self.jlcm.shared_codebook))
        return LayerScheme(self.weights.to_format(), None if self.activations is None else self.activations.to_format())


class QuantizationSettings(_Strict):
    """Which layers of the denoiser are quantized, and how.

    ``targets``/``ignore`` select layers among the denoiser's Conv2d and Linear layers (names or ``re:`` regexes
    matched against the full module name); ``weights``/``activations`` apply to all of them unless an entry of
    ``overrides`` (later entries win) or a bit plan from ``quantkit allocate`` says otherwise. ``backend: jlcm``
    (here or in an override) makes layers codebook-compressed (see :class:`JLCMSettings`). ``bos_aware``
    keeps the prompt-invariant first text token of cross-attention keys/values in floating point (MixDQ) where
    calibration verifies it is invariant.
    """

    targets: list[str] = Field(default_factory=lambda: ["re:.*"])
    ignore: list[str] = Field(default_factory=list)
    backend: Literal["uniform", "jlcm"] = "uniform"
    weights: WeightSettings = WeightSettings()
    activations: ActivationSettings | None = ActivationSettings()
    jlcm: JLCMSettings = JLCMSettings()
    overrides: list[LayerGroup] = Field(default_factory=list)
    bos_aware: bool = True
    plan: str | None = None

    _backend = model_validator(mode="after")(_check_backend)
    _patterns = field_validator("targets", "ignore")(_check_patterns)


class CalibrationSettings(_Strict):
    """Calibration run: prompts (``builtin`` or a text file, one prompt a line), sampling and statistics."""

    prompts: str = "builtin"
    num_prompts: int = Field(8, ge=1)
    num_inference_steps: int = Field(4, ge=1)
    guidance_scale: float = Field(1.0, ge=0.0)
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    height: int | None = None
    width: int | None = None
    ema_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    histogram_bins_per_octave: int = Field(8, ge=1, le=64)


class AllocationSettings(_Strict):
    """MixDQ bit allocation (``quantkit allocate``): candidates per group, budgets and the group weighting.

    Budgets: ``weight_bits`` (parameter-weighted average of the code widths), or ``weight_mb`` (MiB the allocated
    layers store: packed codes, where 3-bit codes take 3.2 bits, 10 to a 32-bit word, plus their scales, zero points
    and shape records; FP16 layers at 2 bytes a weight), and
    ``act_bits`` (average weighted by activation elements); ``max_bops`` optionally bounds compute
    (MACs x weight bits x activation bits). ``protect_top_percent`` keeps the most sensitive layers of each
    group in FP16. ``content_weight`` in [0, 1] trades content (SSIM) against quality (SQNR) layers; ``auto``
    (default) solves once per value of ``content_weight_grid`` and keeps the plan whose images (the analysis
    prompts, plan applied in memory) have the highest mean PSNR against the FP images
    (:mod:`quantkit.allocate.select`).
    ``sqnr_objective``: ``noise_energy`` (default) sums the relative noise energy ``10**(-SQNR/10)`` of the layers,
    ``db`` sums SQNR in dB as MixDQ does (see :mod:`quantkit.allocate.problem`).
    ``solver_time_limit_s`` bounds each program of the ``pulp`` solver: CBC then returns the best plan it found, with
    a warning that it is not proven optimal (``null``: wait for the proof, which can take minutes on a few hundred
    layers although the optimum is usually found in under a second).
    """

    weight_candidates: dict[Literal["content", "quality"], list[int]] = Field(
        default_factory=lambda: {"content": [2, 4, 8], "quality": [4, 8]})
    act_candidates: dict[Literal["content", "quality"], list[int]] = Field(
        default_factory=lambda: {"content": [4, 8], "quality": [4, 8]})
    content_weight: float | Literal["auto"] = "auto"  # range checked by _content_weight
    # Values tried by ``auto``: 0 lets content layers fill the budget wherever cheapest; small values matter most,
    # because the SSIM losses of single layers are tiny next to the quality group's noise energy.
    content_weight_grid: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.01, 0.05, 0.2, 0.5, 0.8], min_length=1)
    weight_bits: float | None = Field(None, gt=0)
    weight_mb: float | None = Field(None, gt=0)
    act_bits: float | None = Field(None, gt=0)
    max_bops: float | None = Field(None, gt=0)
    protect_top_percent: float = Field(0.0, ge=0.0, le=100.0)
    sqnr_objective: Literal["noise_energy", "db"] = "noise_energy"
    solver: str = "pulp"
    solver_time_limit_s: float | None = Field(120.0, gt=0)

    @staticmethod
    def budget_update(kind: str, value: float | None) -> dict[str, float | None]:
        """The field updates that set budget ``kind`` to ``value``: a weight budget (``weight_bits`` or
        ``weight_mb``) replaces the other one, since the program takes one of them."""
        other = {"weight_bits": "weight_mb", "weight_mb": "weight_bits"}.get(kind)
        return {kind: value, **({other: None} if other and value is not None else {})}

    @field_validator("content_weight", mode="before")
    @classmethod
    def _content_weight(cls, v):
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"must be a number in [0, 1] or 'auto', got {v!r}")
        return float(v)

    @field_validator("weight_candidates", "act_candidates")
    @classmethod
    def _cands(cls, v: dict, info) -> dict:
        allowed = WEIGHT_BITS if info.field_name == "weight_candidates" else ACT_BITS
        for role, bits in v.items():
            bad = [b for b in bits if b not in allowed]
            if not bits or bad:
                raise ValueError(f"candidate bits for '{role}' must be a non-empty list drawn from {list(allowed)}")
        return v


class EvaluationSettings(_Strict):
    """Images generated by ``quantkit run`` to compare FP and quantized pipelines."""

    num_images: int = Field(4, ge=1)
    seed: int = 1234
    #: a CLIP model (folder or hub id, safetensors) to report the CLIP score of the FP and quantized images
    #: and their paired difference (``quantkit.clipscore``); None: fidelity metrics only.
    clip_model: str | None = None


class ExportSettings(_Strict):
    """Export options: dtype of the tensors left in floating point (biases, norms, unquantized layers)."""

    float_dtype: Literal["keep", "float16", "bfloat16", "float32"] = "keep"


class QuantkitConfig(_Strict):
    """A whole quantkit job (one YAML file)."""

    schema_version: int = SCHEMA_VERSION
    model: str = "builtin:tiny-sd"
    #: where calibration, analysis and evaluation run the pipelines: ``cpu``, ``cuda``, ``cuda:1``...; None: the
    #: GPU when CUDA is available, else the CPU (``analysis.device`` overrides it for the analysis). Exports are
    #: quantized on the CPU.
    device: DeviceSpec = None
    quantization: QuantizationSettings = QuantizationSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    allocation: AllocationSettings = AllocationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    export: ExportSettings = ExportSettings()

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this quantkit reads schema_version {SCHEMA_VERSION}")
        return v

    def to_yaml(self) -> str:
        """The resolved config as YAML (written into every artifact)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (used to name the alternatives of an unknown key)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        current = None
        for cand in getattr(ann, "__args__", ()) + (ann,):
            for sub in getattr(cand, "__args__", ()) + (cand,):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    current = sub
                    break
            if current is not None:
                break
    return sorted(current.model_fields) if current is not None else []


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(QuantkitConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown config key '{where}'{hint}; valid keys here: {', '.join(valid)}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: invalid value for '{where}': {msg}"


def parse_config(data: Any, source: str = "config") -> QuantkitConfig:
    """Validate a mapping (parsed YAML) into a :class:`QuantkitConfig`.

    Raises:
        QuantkitError: naming the first offending key and the valid alternatives.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QuantkitError(f"{source}: the top level of a config must be a mapping of keys to values")
    try:
        return QuantkitConfig.model_validate(data)
    except ValidationError as err:
        raise QuantkitError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> QuantkitConfig:
    """Read and validate a YAML config file; ``overrides`` maps dotted keys to values (CLI flags).

    Raises:
        QuantkitError: the file is missing, is not YAML, or does not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QuantkitError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if isinstance(data, dict) and overrides:
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return parse_config(data, str(path))
