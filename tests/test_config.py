"""Every shipped config validates and resolves on the full-size architecture of its family (built on meta)."""

from pathlib import Path

import pytest

from quantkit.config import load_config, parse_config
from quantkit.errors import QuantkitError
from quantkit.models.architectures import build_denoiser
from quantkit.models.layers import find_layers
from quantkit.quantize import resolve_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILY_ARCH = {"sd-turbo": "sd-turbo", "sdxl-turbo": "sdxl", "sd15-lcm": "sd15", "pixart": "pixart"}
SCHEMES = ("w8a8", "w4a8", "w4a16")


def test_every_family_and_scheme_is_shipped():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert "demo" in names
    assert {f"{f}-{s}" for f in FAMILY_ARCH for s in SCHEMES} <= names


@pytest.fixture(scope="module")
def arch_layers():
    return {arch: find_layers(build_denoiser(arch, device="meta")) for arch in set(FAMILY_ARCH.values())}


@pytest.mark.parametrize("family", FAMILY_ARCH)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_config_resolves_on_full_size_architecture(family, scheme, arch_layers):
    cfg = load_config(CONFIGS / f"{family}-{scheme}.yaml")
    layers = arch_layers[FAMILY_ARCH[family]]
    plan = resolve_plan(layers, cfg.quantization)
    assert len(plan) == len(layers)  # everything quantized, nothing silently dropped
    bits = {s.weight.bits for s in plan.values()}
    assert max(bits) == 8 if scheme == "w8a8" else 4 in bits
    assert all((s.act is None) == (scheme == "w4a16") for s in plan.values())


def test_cpu_w8a7_config_resolves():
    cfg = load_config(CONFIGS / "sd-turbo-w8a7-cpu.yaml")
    plan = resolve_plan(find_layers(build_denoiser("sd-turbo", device="meta")), cfg.quantization)
    assert {(s.weight.bits, s.act.bits) for s in plan.values()} == {(8, 7)}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    assert load_config(path).model


def test_demo_config_validates():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.model.startswith("builtin:")


def test_cli_style_overrides():
    cfg = load_config(CONFIGS / "sd-turbo-w8a8.yaml", {"model": "/models/my-sd-turbo"})
    assert cfg.model == "/models/my-sd-turbo"


@pytest.mark.parametrize("data,match", [
    ({"quantization": {"weights": {"bits": 5}}}, "weight bits must be one of"),
    ({"quantization": {"activations": {"bits": 1}}}, "activation bits must be one of"),
    ({"quantization": {"weights": {"group_size": 0}}}, "group_size must be -1"),
    ({"calibration": {"num_prompts": 0}}, "calibration.num_prompts"),
    ({"allocation": {"weight_candidates": {"content": [5, 8]}}}, r"drawn from \[2, 3, 4, 8\]"),
    ({"allocation": {"act_candidates": {"quality": [1, 8]}}}, r"drawn from \[2, 3, 4, 5, 6, 7, 8\]"),
    ({"schema_version": 7}, "unsupported schema_version 7"),
    ({"calibraton": {}}, "did you mean 'calibration'"),
    ({"quantization": {"targets": ["re:(unclosed"]}}, r"'quantization.targets': invalid regex 're:\(unclosed'"),
    ({"quantization": {"ignore": ["re:[a"]}}, r"'quantization.ignore': invalid regex"),
    ({"quantization": {"overrides": [{"targets": ["re:*x"], "weights": {"bits": 4}}]}},
     r"'quantization.overrides.0.targets': invalid regex"),
    ([1, 2], "must be a mapping"),
    ({"device": "tpu"}, r"invalid value for 'device': device 'tpu' is not cpu, cuda or cuda:N"),
    ({"analysis": {"device": "gpu0"}}, r"'analysis.device': device 'gpu0' is not cpu"),
    ({"allocation": {"solver_time_limit_s": 0}}, r"'allocation.solver_time_limit_s'"),
])
def test_invalid_configs(data, match):
    with pytest.raises(QuantkitError, match=match):
        parse_config(data, "x.yaml")


def test_device_resolution(monkeypatch):
    import torch

    from quantkit.models.pipeline import resolve_device

    assert parse_config({"device": "cuda:1"}).device == "cuda:1"  # checked when a stage runs, not when parsed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(QuantkitError, match="no CUDA device; ask for cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda")  # the GPU by default when there is one
    with pytest.raises(QuantkitError, match="only 1 GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("limit,expected", [(None, {"time_limit": 120.0}), (30, {"time_limit": 30.0}),
                                            ("null", {"time_limit": None})])
def test_solver_time_limit_reaches_the_solver(monkeypatch, tmp_path, limit, expected):
    import quantkit.allocate
    from quantkit.stages import _solve_plan

    seen = {}

    def fake_allocate(problem, **kwargs):
        seen.update(kwargs)
        return "plan"

    monkeypatch.setattr(quantkit.allocate, "allocate", fake_allocate)
    alloc = {"content_weight": 0.5, "weight_bits": 4.0}
    if limit is not None:
        alloc["solver_time_limit_s"] = None if limit == "null" else limit
    assert _solve_plan(parse_config({"allocation": alloc}, "x.yaml"), tmp_path, object()) == ("plan", None)
    assert seen["solver"] == "pulp" and seen["solver_options"] == expected
    monkeypatch.setattr(quantkit.allocate, "allocate", lambda problem, **kw: seen.update(other=kw) or "plan")
    _solve_plan(parse_config({"allocation": {**alloc, "solver": "brute"}}, "x.yaml"), tmp_path, object())
    assert seen["other"]["solver_options"] == {}  # other solvers take no time limit
