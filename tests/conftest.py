"""Shared fixtures: a fixed seed, the device list, and tiny pipelines built once per session."""

from __future__ import annotations

import pytest
import torch

import quantkit  # noqa: F401  (registers ops and the diffusers integration)
from quantkit.testing.tiny import TINY_KINDS, build_tiny

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Folders of the tiny pipelines: {"sd": Path, "sdxl": Path, "pixart": Path, "lcm": Path}."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny(kind, root / kind) for kind in TINY_KINDS}
