"""Settings of ``quantkit analyze`` (the config's ``analysis:`` section): a pydantic model that rejects unknown keys.

Kept free of :mod:`quantkit.config` imports so that ``config.py`` can embed :class:`AnalysisSettings` as a field.

Example (every key optional; MixDQ defaults shown)::

    analysis:
      layers: ["re:.*"]              # which of the quantized layers to analyse (names or re: regexes)
      ignore: []
      content_patterns: ['(^|\\.)attn2\\.', '(^|\\.)ff\\.']   # regexes (searched in the name) -> content group
      content_metric: ssim           # ssim | sqnr | cfg_sqnr
      quality_metric: sqnr
      weight_candidates: {content: [2, 4, 8], quality: [4, 8]}
      act_candidates: {content: [4, 8], quality: [4, 8]}
      ssim_prompts: 8                # first N calibration prompts (and their seeds) for the SSIM images
      batch_size: 8                  # prompts per pipeline call for the SSIM images
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantkit.errors import QuantkitError
from quantkit.formats.spec import ACT_BITS, WEIGHT_BITS
from quantkit.models.layers import CONTENT_PATTERNS, role_of
from quantkit.models.pipeline import check_device

__all__ = ["ROLES", "AnalysisSettings", "parse_analysis_settings"]

ROLES = ("content", "quality")

Role = Literal["content", "quality"]
Metric = Literal["ssim", "sqnr", "cfg_sqnr"]


def _valid_device(v: str | None) -> str | None:
    if v is not None:
        check_device(v)
    return v


#: An optional device field (the job's ``device``, ``analysis.device``): ``cpu``, ``cuda`` or ``cuda:N``.
DeviceSpec = Annotated[str | None, AfterValidator(_valid_device)]

_DEFAULT_WEIGHT_CANDIDATES = {"content": [2, 4, 8], "quality": [4, 8]}
_DEFAULT_ACT_CANDIDATES = {"content": [4, 8], "quality": [4, 8]}


class AnalysisSettings(BaseModel):
    """Settings of ``quantkit analyze`` (MixDQ defaults). Unknown keys are rejected.

    Attributes:
        layers: which of the config's quantized layers to analyse (exact names or ``re:`` regexes, full match).
        ignore: layers to leave out (same syntax).
        content_patterns: regexes searched in a layer name; a match puts the layer in the content group.
        content_metric: metric of the content group (``ssim`` in MixDQ; ``cfg_sqnr``: SQNR of the guidance
            direction, needs a calibration with classifier-free guidance).
        quality_metric: metric of the quality group (``sqnr`` in MixDQ).
        weight_candidates: weight bit widths per group; a group left out keeps the MixDQ default.
        act_candidates: activation bit widths per group; an empty list skips activation analysis for the group.
        ssim_prompts: how many calibration prompts (the first ones, with their seeds) the SSIM images use.
        batch_size: prompts per pipeline call when generating SSIM images.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: this rank's GPU under torchrun with NCCL, else the
            job's ``device`` (the GPU if CUDA is available, else the CPU).
        num_threads: torch CPU threads for this process (default: leave torch's setting).
        dist_timeout_s: how long ranks wait for each other at a barrier under torchrun.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[str] = Field(default_factory=lambda: ["re:.*"])
    ignore: list[str] = Field(default_factory=list)
    content_patterns: list[str] = Field(default_factory=lambda: list(CONTENT_PATTERNS))
    content_metric: Metric = "ssim"
    quality_metric: Metric = "sqnr"
    weight_candidates: dict[Role, list[int]] = Field(default_factory=lambda: dict(_DEFAULT_WEIGHT_CANDIDATES))
    act_candidates: dict[Role, list[int]] = Field(default_factory=lambda: dict(_DEFAULT_ACT_CANDIDATES))
    ssim_prompts: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    device: DeviceSpec = None
    num_threads: int | None = Field(None, ge=1)
    dist_timeout_s: float = Field(86400.0, gt=0)

    @field_validator("weight_candidates")
    @classmethod
    def _weight_candidates(cls, v: dict) -> dict:
        for role, bits in v.items():
            bad = [b for b in bits if b not in WEIGHT_BITS]
            if not bits or bad:
                raise ValueError(f"weight candidates of '{role}' must be a non-empty list of {list(WEIGHT_BITS)}")
        return {r: sorted(set(v.get(r, _DEFAULT_WEIGHT_CANDIDATES[r]))) for r in ROLES}

    @field_validator("act_candidates")
    @classmethod
    def _act_candidates(cls, v: dict) -> dict:
        for role, bits in v.items():
            bad = [b for b in bits if b not in ACT_BITS]
            if bad:
                raise ValueError(f"activation candidates of '{role}' must be bit widths in {list(ACT_BITS)} "
                                 "(an empty list skips activation analysis)")
        return {r: sorted(set(v.get(r, _DEFAULT_ACT_CANDIDATES[r]))) for r in ROLES}

    @field_validator("content_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regex '{p}': {exc}") from None
        return v

    def role_of(self, fqn: str) -> str:
        """The layer's group under :attr:`content_patterns`."""
        return role_of(fqn, self.content_patterns)

    def metric_of(self, role: str) -> str:
        """The metric that judges a group."""
        return self.content_metric if role == "content" else self.quality_metric


def parse_analysis_settings(data: AnalysisSettings | Mapping | None, source: str = "analysis") -> AnalysisSettings:
    """Validate the ``analysis`` settings (a mapping, e.g. parsed YAML; ``None`` = defaults).

    Raises:
        QuantkitError: naming the first offending key (and the valid keys when it is unknown).
    """
    if isinstance(data, AnalysisSettings):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise QuantkitError(f"{source}: the analysis settings must be a mapping of keys to values")
    try:
        return AnalysisSettings.model_validate(dict(data))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise QuantkitError(f"{source}: unknown key '{where}'; valid keys: "
                                f"{', '.join(AnalysisSettings.model_fields)}") from None
        raise QuantkitError(f"{source}.{where}: {first['msg'].removeprefix('Value error, ')}") from None
