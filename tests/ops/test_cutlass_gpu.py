"""The CUTLASS GEMMs (quantkit.ops.cutlass_gemm) against the reference: W8A8 (the default for resident 8-bit linears
on Hopper, QUANTKIT_INT8_GEMM) and the opt-in int4 x int8 GEMM of signed-nibble linears (QUANTKIT_RESIDENT_W4=cutlass).

Needs a Hopper GPU and the CUTLASS library (built from csrc/cuda/cutlass/ with the nvidia-cutlass wheel's headers,
or QUANTKIT_CUTLASS_LIB); skipped with the reason otherwise. tests/ops/test_cuda_build.py compiles the source on
machines without a GPU.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from quantkit.formats import WeightFormat, pack, quantize_weight
from quantkit.formats.spec import ActFormat, LayerScheme
from quantkit.nn.modules import quantize_module
from quantkit.ops import cutlass_gemm, reference, resident, triton_gemm
from tests.helpers import replayed


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: the CUTLASS kernel is built for sm_90a (Hopper)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"not a Hopper GPU ({torch.cuda.get_device_name()}): the CUTLASS kernel is built for sm_90a"
    if not os.environ.get("QUANTKIT_CUTLASS_LIB") and (cutlass_gemm.headers() is None or shutil.which("nvcc") is None):
        return "no CUTLASS library: install nvidia-cutlass and nvcc, or set QUANTKIT_CUTLASS_LIB"
    return None


if _why_skip():
    pytest.skip(_why_skip(), allow_module_level=True)


def _case(m, k, n, bits=8, seed=0, dtype=torch.float16, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    codes, scale, zp = quantize_weight(torch.randn(n, k, generator=g), WeightFormat(bits, -1, bits == 8))
    qdata = pack(codes, bits)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    s, azp = reference.act_qparams_from_range(torch.tensor(-2.5), torch.tensor(3.0), 8)
    s, azp = s.reshape(1).float(), azp.reshape(1).to(torch.int32)
    a = (reference.quantize_act(x.float(), s, azp, 8).to(torch.int32) - 128).to(torch.int8)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    want = reference.gemm(x, qdata, scale, zp, bias, s, azp, bits, -1, 8)
    blob = resident.make(qdata, zp, bits, k)
    return [t.cuda() if t is not None else None for t in (a, blob, zp, scale, s, azp, bias)], want


SHAPES = [(1, 64, 24), (77, 2048, 1280), (128, 640, 640), (129, 208, 72), (300, 336, 264), (4096, 640, 5120)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("config", cutlass_gemm.CONFIGS)
def test_cutlass_linear_equals_reference(m, k, n, dtype, with_bias, config, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CUTLASS_CONFIG", str(config))  # every kernel configuration on every shape
    (a, blob, _, scale, s, azp, bias), want = _case(m, k, n, dtype=dtype, with_bias=with_bias)
    ws, _ = triton_gemm._resident_args(blob, None, scale, 8, k)
    assert cutlass_gemm.supported(m, n, k, a, s, dtype)
    y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    cutlass_gemm.linear(a, blob, ws, scale, s, azp, bias, y, m, n, k)
    assert torch.equal(y.cpu(), want)


def test_resident_linear_dispatches_to_cutlass_and_graphs_capture_it(monkeypatch):
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlass")
    calls = []
    real = cutlass_gemm.linear
    monkeypatch.setattr(cutlass_gemm, "linear", lambda *args: calls.append(args[-3:]) or real(*args))
    (a, blob, zp, scale, s, azp, bias), want = _case(300, 336, 264)

    def run():
        return triton_gemm.resident_linear(a, blob, zp, scale, s, azp, bias, 8, torch.float16)

    assert torch.equal(run().cpu(), want) and calls == [(300, 264, 336)]
    assert torch.equal(replayed(run).cpu(), want)


def test_auto_picks_cutlass_on_hopper_where_the_library_loads(monkeypatch):
    monkeypatch.delenv("QUANTKIT_INT8_GEMM", raising=False)
    assert cutlass_gemm.selected()  # this module runs only where the library is there (see _why_skip)
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "triton")
    calls = []
    monkeypatch.setattr(cutlass_gemm, "linear", lambda *args: calls.append(args))
    (a, blob, zp, scale, s, azp, bias), want = _case(300, 336, 264)
    assert torch.equal(triton_gemm.resident_linear(a, blob, zp, scale, s, azp, bias, 8, torch.float16).cpu(), want)
    assert calls == []


def test_widened_4_bit_layers_take_cutlass_exactly(monkeypatch):
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlass")
    monkeypatch.setenv("QUANTKIT_TRITON_W4", "expand")
    (a, blob, zp, scale, s, azp, bias), want = _case(300, 336, 264, bits=4)
    made, real = [], cutlass_gemm._constant
    monkeypatch.setattr(cutlass_gemm, "_constant", lambda keys, make: real(keys, lambda: made.append(1) or make()))
    counts = []
    for _ in range(3):  # the blob is widened per call; the layer's constants are made on the first call only
        got = triton_gemm.resident_linear(a, blob, zp, scale, s, azp, bias, 4, torch.float16)
        assert torch.equal(got.cpu(), want)
        counts.append(len(made))
    assert counts[0] >= 1 and counts == counts[:1] * 3


def test_dynamic_activations_and_odd_k_keep_the_triton_kernels(monkeypatch):
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "cutlass")
    (a, blob, _, scale, s, azp, bias), _ = _case(130, 72, 40)
    assert cutlass_gemm.supported(130, 40, 72, a, s, torch.float16) is False  # K % 16 != 0
    assert cutlass_gemm.supported(130, 40, 64, a[:, :64].contiguous(), s.repeat(130), torch.float16) is False


def _case_s4(m, k, n, seed=0, dtype=torch.float16, with_bias=True):
    """A symmetric 4-bit linear as signed nibbles (resident.make(..., signed=True)), static activation codes, and
    the reference output."""
    g = torch.Generator().manual_seed(seed)
    codes, scale, zp = quantize_weight(torch.randn(n, k, generator=g), WeightFormat(4))
    qdata = pack(codes, 4)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    s, azp = reference.act_qparams_from_range(torch.tensor(-2.5), torch.tensor(3.0), 8)
    s, azp = s.reshape(1).float(), azp.reshape(1).to(torch.int32)
    a = (reference.quantize_act(x.float(), s, azp, 8).to(torch.int32) - 128).to(torch.int8)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    want = reference.gemm(x, qdata, scale, zp, bias, s, azp, 4, -1, 8)
    blob = resident.make(qdata, zp, 4, k, signed=True)
    return [t.cuda() if t is not None else None for t in (a, blob, scale, s, azp, bias)], want


W4_SHAPES = [(1, 64, 24), (77, 2048, 1280), (128, 640, 640), (300, 320, 264), (4096, 640, 5120)]


@pytest.mark.parametrize("m,k,n", W4_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cutlass_w4a8_equals_reference(m, k, n, dtype, with_bias):
    (a, blob, scale, s, azp, bias), want = _case_s4(m, k, n, dtype=dtype, with_bias=with_bias)
    ws, _ = triton_gemm._resident_args(blob, None, scale, 4, k)
    assert cutlass_gemm.w4_supported(m, n, k, a, blob, s, dtype)
    y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    cutlass_gemm.linear_w4(a, blob, ws, scale, s, azp, bias, y, m, n, k)
    assert torch.equal(y.cpu(), want)


def test_signed_nibble_linear_dispatches_to_cutlass_and_graphs_capture_it(monkeypatch):
    calls = []
    real = cutlass_gemm.linear_w4
    monkeypatch.setattr(cutlass_gemm, "linear_w4", lambda *args: calls.append(args[-3:]) or real(*args))
    (a, blob, scale, s, azp, bias), want = _case_s4(300, 320, 264)

    def run():
        return triton_gemm.resident_linear(a, blob, None, scale, s, azp, bias, 4, torch.float16)

    assert torch.equal(run().cpu(), want) and calls == [(300, 264, 320)]
    assert torch.equal(replayed(run).cpu(), want)
    k = 336  # K % 32 != 0: widened onto the 8-bit kernels instead, still exact
    (a, blob, scale, s, azp, bias), want = _case_s4(40, k, 64)
    assert not cutlass_gemm.w4_supported(40, 64, k, a, blob, s, torch.float16)
    assert torch.equal(triton_gemm.resident_linear(a, blob, None, scale, s, azp, bias, 4, torch.float16).cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantkit_resident_w4_cutlass_holds_symmetric_4_bit_linears_as_signed_nibbles(dtype, monkeypatch):
    """A W4A8 linear moved onto the GPU under QUANTKIT_RESIDENT_W4=cutlass: compacted to signed nibbles, its output
    the canonical layer's bit for bit, its state_dict and the codes it gives back on leaving the GPU canonical."""
    from quantkit.nn import compact

    monkeypatch.setenv("QUANTKIT_RESIDENT_W4", "cutlass")
    q = quantize_module(nn.Linear(640, 1280).to("cuda", dtype), LayerScheme(WeightFormat(4), ActFormat(8)),
                        act_range=(-3.0, 4.0))
    x = (torch.randn(2, 77, 640, device="cuda") * 2).to(dtype)
    want = q(x)  # the canonical GPU path
    canonical = {k: v.clone() for k, v in q.state_dict().items()}
    assert compact(q) > 0 and resident.layout_of(q.weight_packed, 4, 640) == "s4"
    assert torch.equal(q(x), want)
    assert all(torch.equal(v, canonical[k]) for k, v in q.state_dict().items())
    q.cpu()
    assert not q.is_compact and torch.equal(q.weight_packed, canonical["weight_packed"].cpu())
