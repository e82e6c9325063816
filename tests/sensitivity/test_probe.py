"""The measurement probe and the cache on toy models: deployed numerics, restoring, BOS, counting, torn lines."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.calibrate.artifact import CalibrationArtifact
from quantkit.calibrate.observers import OBSERVERS
from quantkit.formats.spec import ActFormat, LayerScheme, WeightFormat
from quantkit.nn.modules import quantize_module
from quantkit.ops.reference import act_qparams_from_range
from quantkit.sensitivity.cache import MeasurementCache, measure_key
from quantkit.sensitivity.probe import SensitivityProbe, WorkItem, fake_quant_act


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_fake_quant_matches_deployed_activations(conv, dynamic):
    """Activation fake quantization + dequantized weights == the deployed W8A8 module (same quantizer)."""
    layer = nn.Conv2d(6, 5, 3, padding=1) if conv else nn.Linear(24, 7)
    x = torch.randn(2, 6, 5, 5) * 3 if conv else torch.randn(2, 4, 24) * 3
    lo, hi = x.min(), x.max()
    q = quantize_module(layer, LayerScheme(WeightFormat(8), ActFormat(8, dynamic)), None if dynamic else (lo, hi))
    if dynamic:
        xq = fake_quant_act(x, 8, per_row=not conv)
    else:
        scale, zp = act_qparams_from_range(lo, hi, 8)
        xq = fake_quant_act(x, 8, scale, zp)
    w = q.dequantized_weight()
    ref = F.conv2d(xq, w, layer.bias, padding=1) if conv else F.linear(xq, w, layer.bias)
    with torch.inference_mode():
        torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)


class Toy(nn.Module):
    """``x [B, T, 16] -> proj -> attn2.to_k``: a text-projection name, so BOS-aware rules apply."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.attn2 = nn.Module()
        self.attn2.to_k = nn.Linear(16, 8)

    def forward(self, x, scale=1.0):
        return self.attn2.to_k(self.proj(x)) * scale


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = Toy().eval()
    steps, observers, prefix = [], {}, OBSERVERS["prefix"]()
    for name in ("proj", "attn2.to_k"):
        obs = observers[name] = OBSERVERS["minmax"](channel_dim=-1)
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, obs=obs: obs.update(a[0]))
    model.attn2.to_k.register_forward_pre_hook(lambda m, a: prefix.update(a[0]))
    bos = torch.randn(1, 1, 16) * 40  # a prompt-invariant outlier first token, as CLIP's BOS
    with torch.inference_mode():
        for _ in range(3):
            x = torch.cat([bos.expand(4, 1, 16), torch.randn(4, 9, 16)], dim=1)
            steps.append({"args": [x], "kwargs": {"scale": 2.0}, "output": model(x, scale=2.0)})
    model._forward_pre_hooks.clear()
    model.proj._forward_pre_hooks.clear()
    model.attn2.to_k._forward_pre_hooks.clear()
    stats = {name: obs.state() for name, obs in observers.items()}
    stats["attn2.to_k"].update(prefix.state())
    return model, CalibrationArtifact(stats=stats, steps=steps, manifest={})


def test_probe_measures_and_restores(toy):
    model, art = toy
    originals = {n: model.get_submodule(n) for n in ("proj", "attn2.to_k")}
    with SensitivityProbe(model, art) as probe:
        sizes = probe.layer_sizes(["proj", "attn2.to_k"])
        assert sizes["proj"] == {"num_weights": 256, "act_elements": 10 * 16, "macs": 10 * 16 * 16}
        assert sizes["attn2.to_k"] == {"num_weights": 128, "act_elements": 10 * 16, "macs": 10 * 16 * 8}
        probe.prepare_sqnr_reference()
        res = {(k, b): probe.measure(WorkItem("proj", "quality", k, b, "sqnr"))
               for k in ("weights", "activations") for b in (4, 8)}
        assert all(r["evaluations"] == 3 for r in res.values())  # one per recorded step
        assert res["weights", 8]["value"] > res["weights", 4]["value"] + 15
        assert res["activations", 8]["value"] > res["activations", 4]["value"] + 15
        assert probe.evaluations == 1 + 3 + 4 * 3
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert not model._forward_hooks and not model.proj._forward_pre_hooks  # counter and act hooks removed
    with torch.inference_mode():
        torch.testing.assert_close(model(*art.steps[0]["args"], **art.steps[0]["kwargs"]), art.steps[0]["output"])


def test_probe_applies_a_whole_plan_and_restores(toy):
    model, art = toy
    originals = {n: model.get_submodule(n) for n in ("proj", "attn2.to_k")}
    with SensitivityProbe(model, art) as probe:
        probe.prepare_sqnr_reference()
        for kind, side in (("weights", (4, None)), ("activations", (None, 4))):  # one layer, one side: == measure
            alone = probe.measure(WorkItem("proj", "quality", kind, 4, "sqnr"))["value"]
            with probe.applied({"proj": side}):
                assert probe.replay_sqnr() == pytest.approx(alone, abs=1e-9)
        sqnr = {}
        for bits in (4, 8):
            with probe.applied({"proj": (bits, bits), "attn2.to_k": (bits, bits)}):
                assert model.get_submodule("proj") is not originals["proj"]
                sqnr[bits] = probe.replay_sqnr()
        assert sqnr[8] > sqnr[4] + 15
        with pytest.raises(RuntimeError, match="boom"), probe.applied({"proj": (4, 4), "attn2.to_k": (None, 4)}):
            raise RuntimeError("boom")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert not model.proj._forward_pre_hooks and not model.attn2.to_k._forward_pre_hooks
    with torch.inference_mode():
        torch.testing.assert_close(model(*art.steps[0]["args"], **art.steps[0]["kwargs"]), art.steps[0]["output"])


def test_probe_bos_aware(toy):
    """The verified-invariant outlier token stays FP: 8-bit activations of the text projection barely hurt."""
    model, art = toy
    assert art.prefix_invariant("attn2.to_k")
    item = WorkItem("attn2.to_k", "content", "activations", 8, "sqnr")
    with SensitivityProbe(model, art, bos_aware=True) as probe:
        assert probe.weight_scheme("attn2.to_k", 4).prefix_tokens == 1
        assert probe.weight_scheme("proj", 4).prefix_tokens == 0
        with_bos = probe.measure(item)["value"]
    with SensitivityProbe(model, art, bos_aware=False) as probe:
        assert probe.weight_scheme("attn2.to_k", 4).prefix_tokens == 0
        naive = probe.measure(item)["value"]
    with SensitivityProbe(model, art, act_mode=None) as probe:  # weight-only deployment: no BOS split
        assert probe.weight_scheme("attn2.to_k", 4).prefix_tokens == 0
    assert with_bos > naive + 6


def test_cache_round_trip_and_torn_lines(tmp_path):
    rank0, rank1 = MeasurementCache(tmp_path, "abc"), MeasurementCache(tmp_path, "abc", rank=1)
    rec = {"record": "measure", "fqn": "a", "kind": "weights", "bits": 4, "metric": "sqnr", "value": 30.5,
           "evaluations": 2, "seconds": 0.1}
    rank0.append(rec)
    rank1.append({**rec, "fqn": "b"})
    rank1.append({"record": "sizes", "fqn": "b", "num_weights": 4, "act_elements": 2, "macs": 8})
    with open(rank0.path, "a") as f:
        f.write('{"record": "measure", "fqn": "c", "ki')  # killed mid-write
    MeasurementCache(tmp_path, "abc").append({**rec, "fqn": "d", "value": 1.0})
    MeasurementCache(tmp_path, "other").append({**rec, "fqn": "e"})
    measures, sizes = MeasurementCache(tmp_path, "abc").load()
    assert sorted(k[0] for k in measures) == ["a", "b", "d"]
    assert measures[measure_key("d", "weights", 4, "sqnr")]["value"] == 1.0
    assert sizes == {"b": {"record": "sizes", "fqn": "b", "num_weights": 4, "act_elements": 2, "macs": 8}}
    lines = rank0.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["fqn"] == "d"
    assert [p.name for p in rank0.files()] == ["cache-abc.jsonl", "cache-abc.rank1.jsonl"]


class Guided(nn.Module):
    """``eps(x, c) = image(x) + text(c)``: an image branch and a text branch that only meet in the sum, so the
    guidance direction ``eps(x, c) - eps(x, empty) = text(c) - text(empty)`` does not depend on the image branch."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(8, 8)
        self.text = nn.Linear(6, 8)

    def forward(self, x, encoder_hidden_states):
        return self.image(x) + self.text(encoder_hidden_states).mean(dim=1)


GUIDED = {"calibration": {"guidance_scale": 3.0}}  # the manifest of a calibration run with guidance


def _guided_steps(model, uncond, cfg=True, n=3, half=2):
    steps = []
    with torch.inference_mode():
        for _ in range(n):
            x = torch.randn(half, 8).repeat(2, 1)  # the same latents in both halves, as a guidance batch
            first = uncond.expand(half, -1, -1) if cfg else torch.randn(half, 5, 6)
            ehs = torch.cat([first, torch.randn(half, 5, 6)])
            steps.append({"args": [x], "kwargs": {"encoder_hidden_states": ehs},
                          "output": model(x, encoder_hidden_states=ehs)})
    return steps


def test_cfg_sqnr_sees_only_the_guidance_direction():
    torch.manual_seed(0)
    model = Guided().eval()
    uncond = torch.randn(1, 5, 6)
    art = CalibrationArtifact(stats={}, steps=_guided_steps(model, uncond), manifest=GUIDED)
    with SensitivityProbe(model, art) as probe:
        assert probe.guidance_half() == 2
        probe.prepare_sqnr_reference()
        image = {m: probe.measure(WorkItem("image", "quality", "weights", 4, m))["value"] for m in ("sqnr", "cfg_sqnr")}
        text = {m: probe.measure(WorkItem("text", "content", "weights", 4, m))["value"] for m in ("sqnr", "cfg_sqnr")}
        # by hand: SQNR of (cond - uncond) with the text branch's weights quantized
        with probe.applied({"text": (4, None)}), torch.inference_mode():
            sig = noise = 0.0
            for i, s in enumerate(probe.steps):
                out = model(*s["args"], **s["kwargs"]).double()
                ref = probe.reference_outputs[i]
                d, dr = out[2:] - out[:2], ref[2:] - ref[:2]
                sig += dr.pow(2).sum().item()
                noise += (d - dr).pow(2).sum().item()
    assert image["sqnr"] < 60 and image["cfg_sqnr"] > 100  # the image branch leaves the direction intact
    assert text["cfg_sqnr"] < 60
    assert text["cfg_sqnr"] == pytest.approx(10 * math.log10(sig / noise), abs=1e-9)


@pytest.mark.parametrize("case", ["no_guidance", "no_pairs", "odd_batch", "cond_equals_uncond"])
def test_cfg_sqnr_refuses_a_calibration_without_guidance(case):
    torch.manual_seed(0)
    model = Guided().eval()
    uncond = torch.randn(1, 5, 6)
    steps = _guided_steps(model, uncond, cfg=case != "no_pairs")
    if case == "odd_batch":
        steps[1] = {k: (v[:3] if k == "output" else v) for k, v in steps[1].items()}
    if case == "cond_equals_uncond":
        ehs = uncond.expand(4, -1, -1).clone()
        steps[2] = {"args": steps[2]["args"], "kwargs": {"encoder_hidden_states": ehs},
                    "output": steps[2]["output"]}
    manifest = {"calibration": {"guidance_scale": 1.0}} if case == "no_guidance" else GUIDED
    art = CalibrationArtifact(stats={}, steps=steps, manifest=manifest)
    with SensitivityProbe(model, art) as probe, pytest.raises(ValueError, match="classifier-free guidance"):
        probe.measure(WorkItem("text", "content", "weights", 4, "cfg_sqnr"))
