"""CUDA kernels (csrc/cuda) against the plain-PyTorch reference, on a GPU.

Integer paths (int8 tensor cores) must equal the reference bit for bit, including odd shapes that exercise the
padding of M, K and N; the weight-only GEMV is compared within float rounding (its sum order differs) and its
dequantized weights exactly. Also: opcheck, CUDA graph capture and torch.compile. Skipped without a CUDA GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import quantkit.ops  # noqa: F401  (defines the ops, loads the kernels)
from quantkit.formats import WeightFormat, pack, quantize_weight
from quantkit.formats.spec import ActFormat, LayerScheme
from quantkit.nn.modules import quantize_module
from quantkit.ops import cuda, reference, resident, select_op, triton_gemm
from tests.helpers import replayed

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the CUDA kernels can only be tested on one (CI compiles them: test_cuda_build.py)",
                allow_module_level=True)
if not cuda.cuda_status()["loaded"]:
    pytest.skip(f"quantkit CUDA kernels not loaded: {cuda.cuda_status()['error']}", allow_module_level=True)

DEV = "cuda"
os.environ.setdefault("QUANTKIT_TRITON_TUNE", "0")  # fixed Triton tiles: no autotuning per test shape


def _weight(out_f, in_f, bits, group_size=-1, symmetric=True, kernel=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (out_f, in_f) if kernel is None else (out_f, in_f, *kernel)
    codes, scale, zp = quantize_weight(torch.randn(shape, generator=g), WeightFormat(bits, group_size, symmetric))
    return pack(codes, bits), scale, zp


def _static(lo=-2.5, hi=3.0, bits=8):
    s, zp = reference.act_qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits)
    return s.reshape(1), zp.reshape(1)


def _to(t, device):
    return None if t is None else t.to(device)


def _op(w_bits, act_bits, conv):
    wf = WeightFormat(w_bits)
    act = None if act_bits >= 16 else ActFormat(act_bits)
    return select_op(LayerScheme(wf, act), conv=conv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_act_static_and_dynamic_equal_reference(dtype, bits):
    x = (torch.randn(37, 130) * 3).to(dtype)
    s, zp = _static(bits=bits)
    got = torch.ops.quantkit.quantize_act(x.to(DEV), s.to(DEV), zp.to(DEV), bits)
    assert torch.equal(got.cpu(), reference.quantize_act(x, s, zp, bits))
    codes, scale, zpd = torch.ops.quantkit.quantize_act_dynamic(x.to(DEV), bits)
    ref = reference.quantize_act_dynamic(x, bits)
    assert torch.equal(codes.cpu(), ref[0])
    assert torch.equal(scale.cpu(), ref[1])
    assert torch.equal(zpd.cpu(), ref[2])


LINEAR_SHAPES = [(1, 64, 8), (5, 100, 50), (17, 320, 24), (77, 96, 130), (300, 256, 64), (260, 1288, 136)]
WEIGHTS = [(8, True), (4, True), (4, False), (3, True), (2, False)]
# The integer linears run on cuBLASLt, or opt-in on Triton (Hopper + Triton: symmetric 8-bit and 4-bit weights).
ENGINES = ["cublaslt"] + (["triton"] if triton_gemm.available() else [])


@pytest.fixture(params=ENGINES)
def engine(request):
    previous = cuda.set_gemm_engine(request.param)
    yield request.param
    cuda.set_gemm_engine(previous)


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wfmt", WEIGHTS, ids=lambda w: f"w{w[0]}{'' if w[1] else 'asym'}")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_linear_integer_path_equals_reference(shape, wfmt, dynamic, engine):
    m, k, n = shape
    w_bits, symmetric = wfmt
    qdata, scale, zp = _weight(n, k, w_bits, symmetric=symmetric)
    bias = torch.randn(n)
    on_triton = engine == "triton" and (w_bits == 4 or (w_bits == 8 and symmetric))
    for dtype, act_bits in ((torch.float16, 8), (torch.bfloat16, 8), (torch.float32, 4)):
        x = (torch.randn(m, k) * 2).to(dtype)
        s, zpx = (None, None) if dynamic else _static(bits=act_bits)
        b = bias if dtype == torch.float16 else bias.to(dtype)  # fp16 activations with an fp32 bias, too
        args = (qdata, scale, zp, b, s, zpx, w_bits, -1, act_bits)
        path = cuda.cuda_path(x.to(DEV), scale, zp, s, w_bits, -1, act_bits, k, conv=False)
        assert path == ("triton" if on_triton else "int8")
        got = _op(w_bits, act_bits, False)(x.to(DEV), *(_to(a, DEV) if torch.is_tensor(a) else a for a in args))
        want = reference.gemm(x, *args)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want), f"{dtype} act_bits={act_bits}: max diff {(got.cpu() - want).abs().max()}"


def test_gemm_engine_choice():
    _, scale, _ = _weight(64, 128, 8)
    x = torch.randn(4, 128, device=DEV)
    assert cuda.cuda_path(x, scale, None, None, 8, -1, 8, 128, conv=False) == "int8"  # cuBLASLt by default
    previous = cuda.set_gemm_engine("triton")
    try:
        want = "triton" if triton_gemm.available() else "int8"
        assert cuda.cuda_path(x, scale, None, None, 8, -1, 8, 128, conv=False) == want
        assert cuda.cuda_path(x, scale, None, None, 8, -1, 8, 128, conv=True) == "int8"  # convolutions: cuBLASLt
    finally:
        cuda.set_gemm_engine(previous)
    with pytest.raises(ValueError, match="unknown CUDA GEMM engine"):
        cuda.set_gemm_engine("cutlass")


CONV_CASES = [
    # (B, C, H, W, O, kernel, stride, padding, dilation)
    (1, 4, 9, 7, 8, 3, 1, 1, 1),  # C % 16 != 0, K = 36 padded to 40, O = 8 padded to 24
    (2, 32, 8, 8, 40, 3, 2, 1, 1),  # vectorised im2col, stride 2
    (1, 16, 6, 6, 5, 1, 1, 0, 1),  # 1x1 with B*H*W % 8 != 0 (im2col path)
    (2, 16, 8, 8, 24, 1, 1, 0, 1),  # 1x1 direct path
    (1, 16, 10, 10, 16, 3, 1, 2, 2),  # dilation
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("wfmt", [(8, True), (4, True), (4, False)], ids=["w8", "w4", "w4asym"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_conv_integer_path_equals_reference(case, wfmt, dynamic):
    b, c, h, w, o, kk, st, pad, dil = case
    w_bits, symmetric = wfmt
    qdata, scale, zp = _weight(o, c, w_bits, symmetric=symmetric, kernel=(kk, kk))
    bias = torch.randn(o)
    geometry = ([kk, kk], [st, st], [pad, pad], [dil, dil])
    for dtype in (torch.float16, torch.float32):
        x = (torch.randn(b, c, h, w) * 2).to(dtype)
        s, zpx = (None, None) if dynamic else _static()
        args = (qdata, scale, zp, bias.to(dtype), s, zpx, w_bits, -1, 8, *geometry)
        got = _op(w_bits, 8, True)(x.to(DEV), *(_to(a, DEV) if torch.is_tensor(a) else a for a in args))
        want = reference.conv2d(x, *args)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got.cpu(), want), f"{dtype}: max diff {(got.cpu() - want).abs().max()}"


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, -1, True), (4, 32, False), (3, -1, True), (8, 64, True),
                                                       (2, 16, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_kernel_equals_reference(bits, group_size, symmetric, dtype):
    qdata, scale, zp = _weight(48, 192, bits, group_size, symmetric)
    got = torch.ops.quantkit_cuda.dequant(qdata.to(DEV), scale.to(DEV), _to(zp, DEV), bits, 192, dtype)
    want = reference.dequantize_packed(qdata, scale, zp, bits, group_size, 192, dtype)
    assert torch.equal(got.cpu(), want)


# (K, N, group size): groups of 32 / 64 / whole rows, N not a multiple of a block's columns, K = 200 and group
# length 40 (not multiples of 32: the word-at-a-time kernel). The one-round kernel (v3, the default up to 4M codes)
# takes 8 lanes per column for rows of <= 8 chunks of 32 codes, else 32, and up to 8 chunks per lane and round: 40
# chunks -> 2 per lane (lanes 0-7 two, the rest one), 128 -> 4, 20 and 11 -> 1 (idle lanes), 88 -> 4 (3 used), 160
# -> 8 (5 used), 8 -> 8 lanes, 288 -> two rounds of 8. Weights past 4M codes (4096 x 1100) take v2 by default;
# fp16 with N >= 4096 (640 x 4100, a column tail) takes the tensor-core kernel, bf16 / fp32 there take v3.
_GEMV_SHAPES = [(1280, 333, -1), (1280, 333, 64), (1280, 333, 32), (1280, 2500, 64), (4096, 70, 128),
                (200, 51, -1), (320, 64, 8), (640, 100, 64), (352, 77, 32), (2816, 90, 64), (5120, 40, -1),
                (256, 48, 64), (9216, 20, 64), (4096, 1100, 64), (640, 4100, 64)]
# Each kernel forced (QUANTKIT_GEMV, read by the C++ launcher at each call) where the size rule picks another: v2
# with its three K splits, v3 on a large weight and on a wide fp16 one. tc (fp16 only; bf16 falls back to the
# default): K in blocks of 128 codes over 5-8 warps (a remainder loop where K / 128 is not a multiple of 4 x warps:
# 1280, 2816, 640), column tails (333 = 20 x 16 + 13), odd row counts (the MMA's unused columns repeat the last
# row), groups of 32 (a scale per chunk), 4 warps for many columns (5000 -> 313 blocks), 24 KB of staged
# activations (K = 12288), K = 128 (one k-block: the remainder loop alone).
_GEMV_FORCED = [("v2", 1, 1280, 333, 64), ("v2", 4, 1280, 2500, 64), ("v2", 3, 4096, 70, 128),
                ("v2", 2, 5120, 40, -1), ("v3", 1, 4096, 1100, 64), ("v3", 4, 4096, 1100, -1),
                ("v3", 2, 640, 4100, 64),
                ("tc", 1, 1280, 333, 64), ("tc", 2, 4096, 1100, -1), ("tc", 1, 12288, 700, 128),
                ("tc", 3, 2816, 90, 64), ("tc", 4, 640, 40, 32), ("tc", 1, 4096, 5000, 64),
                ("tc", 1, 128, 17, -1)]


@pytest.mark.parametrize("engine,rows,k,n,group_size", _GEMV_FORCED)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_gemv_forced_kernel_matches_reference_within_rounding(engine, rows, k, n, group_size, symmetric,
                                                                   dtype, monkeypatch):
    monkeypatch.setenv("QUANTKIT_GEMV", engine)
    test_w4a16_gemv_matches_reference_within_rounding(rows, k, n, group_size, symmetric, dtype)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k,n,group_size", _GEMV_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w4a16_gemv_matches_reference_within_rounding(rows, k, n, group_size, symmetric, dtype):
    qdata, scale, zp = _weight(n, k, 4, group_size, symmetric)
    bias = torch.randn(n).to(dtype)
    x = (torch.randn(rows, k) * 4).to(dtype)
    assert cuda.cuda_path(x.to(DEV), scale, zp, None, 4, group_size, 16, k, conv=False) == "gemv"
    got = torch.ops.quantkit.gemm_w4a16(x.to(DEV), qdata.to(DEV), scale.to(DEV), _to(zp, DEV), bias.to(DEV), None,
                                        None, 4, group_size, 16).float().cpu()
    # Oracle: the reference's dequantized weights, products summed in float64. The kernel uses the exact weights
    # (c - zp) * scale and fp32 sums: at most half an output-dtype ulp per weight away, plus fp32 rounding.
    w = reference.dequantize_packed(qdata, scale, zp, 4, group_size, k, dtype).double()
    want = x.double() @ w.t() + bias.double()
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -17}[dtype]
    tol = (x.double().abs() @ w.abs().t() + bias.double().abs()) * ulp
    assert ((got.double() - want).abs() <= tol).all()


def test_weight_only_large_m_is_bit_identical_to_reference_on_gpu():
    qdata, scale, zp = _weight(96, 320, 4, 64, True)
    x = torch.randn(3, 40, 320, dtype=torch.float16, device=DEV)
    args = (qdata.to(DEV), scale.to(DEV), None, None, None, None, 4, 64, 16)
    got = torch.ops.quantkit.gemm_w4a16(x, *args)
    assert torch.equal(got, reference.gemm(x, *args))
    wq, ws, wz = _weight(24, 16, 4, -1, True, kernel=(3, 3))
    xc = torch.randn(2, 16, 9, 9, dtype=torch.float16, device=DEV)
    cargs = (wq.to(DEV), ws.to(DEV), None, None, None, None, 4, -1, 16, [3, 3], [1, 1], [1, 1], [1, 1])
    assert torch.equal(torch.ops.quantkit.conv2d_w4a16(xc, *cargs), reference.conv2d(xc, *cargs))


def test_unsupported_formats_fall_back_to_the_reference():
    # Grouped 4-bit weights with activations cannot use one int8 product: the reference runs, on the GPU.
    qdata, scale, zp = _weight(40, 128, 4, 32, True)
    x = torch.randn(20, 128, dtype=torch.float16)
    assert cuda.cuda_path(x, scale, zp, None, 4, 32, 8, 128, conv=False) == "reference"
    args = (qdata.to(DEV), scale.to(DEV), None, None, None, None, 4, 32, 8)
    got = torch.ops.quantkit.gemm_w4a8(x.to(DEV), *args)
    # The same reference code on the same device (CPU and GPU may sum the group partials in another order).
    assert torch.equal(got, reference.gemm(x.to(DEV), *args))


def _quant_linear(k=320, n=640, w_bits=8, dynamic=False, dtype=torch.float16):
    lin = nn.Linear(k, n).to(DEV, dtype)
    scheme = LayerScheme(WeightFormat(w_bits), ActFormat(8, dynamic=dynamic))
    return quantize_module(lin, scheme, act_range=None if dynamic else (-3.0, 4.0))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_opcheck(dynamic):
    q = _quant_linear(dynamic=dynamic)
    x = torch.randn(2, 77, 320, dtype=torch.float16, device=DEV)
    torch.library.opcheck(q._op, q._op_args(x))
    qdata, scale, _ = _weight(24, 16, 4, kernel=(3, 3))
    s, zp = (None, None) if dynamic else _static()
    xc = torch.randn(1, 16, 12, 12, dtype=torch.float16, device=DEV)
    torch.library.opcheck(torch.ops.quantkit.conv2d_w4a8.default,
                          (xc, qdata.to(DEV), scale.to(DEV), None, None, _to(s, DEV), _to(zp, DEV), 4, -1, 8,
                           [3, 3], [1, 1], [1, 1], [1, 1]))
    qdata, scale, _ = _weight(64, 256, 4, 64)
    torch.library.opcheck(torch.ops.quantkit.gemm_w4a16.default,
                          (torch.randn(1, 256, dtype=torch.float16, device=DEV), qdata.to(DEV), scale.to(DEV), None,
                           None, None, None, 4, 64, 16))


def test_cuda_graph_capture_replays_exactly():
    q = _quant_linear(w_bits=4)
    static_x = torch.randn(64, 320, dtype=torch.float16, device=DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q(static_x)  # warm-up outside capture (cuBLASLt heuristics, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = q(static_x)
    for seed in range(3):
        new_x = torch.randn(64, 320, dtype=torch.float16, device=DEV, generator=torch.Generator(DEV).manual_seed(seed))
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, q(new_x))


def test_torch_compile_keeps_the_kernels():
    q = _quant_linear(w_bits=8, dynamic=True)
    conv = nn.Conv2d(32, 48, 3, padding=1).to(DEV, torch.float16)
    qc = quantize_module(conv, LayerScheme(WeightFormat(4), ActFormat(8)), act_range=(-3.0, 3.0))

    def f(x, img):
        return q(x), qc(img)

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 77, 320, dtype=torch.float16, device=DEV)
    img = torch.randn(2, 32, 16, 16, dtype=torch.float16, device=DEV)
    got = compiled(x, img)
    want = f(x, img)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- GPU-resident layers (quantkit.compact on CUDA: the Triton kernels of quantkit.ops.resident blobs) ----------

needs_resident = pytest.mark.skipif(not cuda.resident_ok(torch.device(DEV)),
                                    reason="GPU-resident layers need Triton and an sm_90+ GPU")

RESIDENT_LAYERS = [  # (layer, scheme, input shape)
    ("lin", LayerScheme(WeightFormat(8), ActFormat(8)), (3, 77, 320)),
    ("lin", LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True)), (130, 200)),
    ("lin", LayerScheme(WeightFormat(4), ActFormat(8)), (1, 320)),
    ("lin", LayerScheme(WeightFormat(4, -1, symmetric=False), ActFormat(8, dynamic=True)), (2, 65, 320)),
    ("conv3", LayerScheme(WeightFormat(8), ActFormat(8)), (2, 64, 17, 15)),
    ("conv3s2", LayerScheme(WeightFormat(8), ActFormat(8, dynamic=True)), (2, 64, 16, 16)),
    ("conv3", LayerScheme(WeightFormat(4), ActFormat(8)), (1, 64, 12, 20)),
    ("conv1", LayerScheme(WeightFormat(4, -1, symmetric=False), ActFormat(7)), (2, 64, 9, 9)),
    # 64-wide rows: a 4-bit stride-1 convolution the copy-engine kernel can take (conv8, expand)
    ("conv3", LayerScheme(WeightFormat(4, -1, symmetric=False), ActFormat(8)), (1, 64, 4, 64)),
]


def _resident_layer(kind, scheme, shape, dtype):
    torch.manual_seed(0)
    c = shape[-1] if kind == "lin" else shape[1]
    layer = {"lin": lambda: nn.Linear(c, 136), "conv3": lambda: nn.Conv2d(c, 40, 3, padding=1),
             "conv3s2": lambda: nn.Conv2d(c, 40, 3, stride=2, padding=1),
             "conv1": lambda: nn.Conv2d(c, 24, 1)}[kind]().to(DEV, dtype)
    rng = None if scheme.act.dynamic else (-3.0, 4.0)
    return quantize_module(layer, scheme, act_range=rng)


# Every layer with 4-bit layers in the nibble layout; the 4-bit layers again with convolutions widened to int8
# (conv8) and with nibbles widened per call (expand); the modes change nothing for 8-bit layers.
_RESIDENT_CASES = ([("1", "auto", *case) for case in RESIDENT_LAYERS]  # auto: 4-bit layers on the 4-bit kernels
                   + [(mode, kernel, *case) for mode, kernel in (("conv8", "auto"), ("1", "expand"))
                      for case in RESIDENT_LAYERS if case[1].weight.bits == 4])


@needs_resident
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w4_mode,w4_kernel,kind,scheme,shape", _RESIDENT_CASES)
def test_compacted_gpu_layer_equals_the_canonical_one(kind, scheme, shape, dtype, w4_mode, w4_kernel, monkeypatch):
    from quantkit.nn import compact

    monkeypatch.setenv("QUANTKIT_RESIDENT_W4", w4_mode)
    monkeypatch.setenv("QUANTKIT_TRITON_W4", w4_kernel)

    q = _resident_layer(kind, scheme, shape, dtype)
    x = (torch.randn(shape, device=DEV) * 2).to(dtype)
    args = [_to(t, "cpu") if isinstance(t, torch.Tensor) else t for t in q._op_args(x)]  # the CPU reference
    if kind == "lin":
        want = reference.gemm(*args).to(DEV)
    else:
        want = reference.conv2d(*args, list(q.kernel_size), list(q.stride), list(q.padding), list(q.dilation)).to(DEV)
    assert torch.equal(q(x), want)  # the canonical GPU path
    canonical = {k: v.clone() for k, v in q.state_dict().items()}
    assert compact(q) > 0 and q.is_compact and q.weight_packed.dtype == torch.int8
    cols = math.prod(q._weight_shape[1:])
    widened = w4_mode == "conv8" and kind != "lin" and scheme.weight.bits == 4
    assert resident.width_of(q.weight_packed, scheme.weight.bits, cols) == (8 if widened else scheme.weight.bits)
    assert torch.equal(q(x), want)
    assert all(torch.equal(v, canonical[k]) for k, v in q.state_dict().items())
    q.cpu()  # leaving the GPU gives the canonical codes back
    assert not q.is_compact and torch.equal(q.weight_packed, canonical["weight_packed"].cpu())


@needs_resident
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_conv_quantization_through_the_op_equals_reference(dtype, monkeypatch):
    """By default (QUANTKIT_TRITON_CONV_QUANT unset) a resident 3x3 W8A8 convolution with static activations
    quantizes its float input straight into the bordered NHWC codes of the copy-engine kernel; the layer's output is
    the reference's."""
    from quantkit.nn import compact

    monkeypatch.delenv("QUANTKIT_TRITON_CONV_QUANT", raising=False)
    q = _resident_layer("conv3", LayerScheme(WeightFormat(8), ActFormat(8)), (1, 64, 16, 32), dtype)
    x = (torch.randn(1, 64, 16, 32, device=DEV) * 2).to(dtype)
    args = [_to(t, "cpu") if isinstance(t, torch.Tensor) else t for t in q._op_args(x)]
    want = reference.conv2d(*args, [3, 3], [1, 1], [1, 1], [1, 1]).to(DEV)
    compact(q)
    assert triton_gemm._conv_tma_shape_ok(1, 64, 40, 8, (1, 1), (1, 1), 16, 32, dtype)
    assert torch.equal(q(x), want)


@needs_resident
def test_fused_attention_projections_on_resident_weights():
    """quantkit.fuse on a GPU-resident self-attention: the one to_qkv projection equals to_q / to_k / to_v bit for
    bit (one quantization, one GEMM with the rows concatenated), and the attention output follows."""
    from diffusers.models.attention_processor import Attention

    from quantkit.nn import fuse

    torch.manual_seed(0)
    attn = Attention(320, heads=5, dim_head=64).eval()
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, quantize_module(getattr(attn, name), LayerScheme(WeightFormat(8), ActFormat(8)),
                                            act_range=(-3.0, 3.0)))
    attn.to(DEV, torch.float16)
    assert attn.to_q.weight_packed.dtype == torch.int8  # resident
    x = torch.randn(2, 256, 320, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        separate = [getattr(attn, n)(x) for n in ("to_q", "to_k", "to_v")]
        want = attn(x)
        assert fuse(attn) == 1
        assert torch.equal(attn.to_qkv(x), torch.cat(separate, dim=-1))
        torch.testing.assert_close(attn(x), want, rtol=0, atol=2e-3)


def _w4a8_transformer_block(fused: bool = True):
    """A diffusers BasicTransformerBlock (GEGLU, cross-attention) with every linear W4A8 (asymmetric weights, static
    activations), resident in fp16 on the GPU and (``fused``) fused."""
    from diffusers.models.attention import BasicTransformerBlock

    from quantkit.nn import fuse

    torch.manual_seed(0)
    block = BasicTransformerBlock(128, 4, 32, cross_attention_dim=64, activation_fn="geglu").eval()
    w4 = LayerScheme(WeightFormat(4, -1, symmetric=False), ActFormat(8))
    for name, m in list(block.named_modules()):
        for child, layer in list(m.named_children()):
            if isinstance(layer, nn.Linear):
                setattr(m, child, quantize_module(layer, w4, act_range=(-4.0, 4.0)))
    block.to(DEV, torch.float16)
    assert block.ff.net[2].weight_packed.dtype == torch.int8  # resident
    if fused:
        fuse(block)
    return block


@needs_resident
def test_loaded_models_fuse_at_their_first_gpu_call():
    """fuse_on_first_gpu_call (what loading an export arranges): the first forward on the GPU fuses the block (the
    GEGLU kernel, one q/k/v projection), and that call already gives what the explicitly fused twin gives."""
    from quantkit.nn.fuse import fuse_on_first_gpu_call

    block = _w4a8_transformer_block(fused=False)
    twin = _w4a8_transformer_block(fused=True)
    assert fuse_on_first_gpu_call(block)
    x = torch.randn(1, 130, 128, device=DEV, dtype=torch.float16)
    enc = torch.randn(1, 77, 64, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        got = block(x, encoder_hidden_states=enc)
        want = twin(x, encoder_hidden_states=enc)
    assert "forward" in block.ff.__dict__ and hasattr(block.attn1, "to_qkv") and not block._forward_pre_hooks
    assert torch.equal(got, want)


@needs_resident
@pytest.mark.parametrize("w4_kernel", ["auto", "expand"])  # expand: 4-bit layers widened per call inside the graph
def test_compacted_layers_under_cuda_graph_compile_and_opcheck(w4_kernel, monkeypatch):
    from quantkit.nn import compact

    monkeypatch.setenv("QUANTKIT_RESIDENT_W4", "1")
    monkeypatch.setenv("QUANTKIT_TRITON_W4", w4_kernel)

    w4 = LayerScheme(WeightFormat(4, -1, symmetric=False), ActFormat(8))
    layers = [  # (layer, input): 8-bit linear, 4-bit convolution on the pointer kernel, and two 4-bit layers that
        # the 8-bit copy-engine kernels take under expand (130 rows; 64-wide output rows of one image)
        (_resident_layer("lin", LayerScheme(WeightFormat(8), ActFormat(8)), (64, 320), torch.float16), (64, 320)),
        (_resident_layer("conv3", LayerScheme(WeightFormat(4), ActFormat(8)), (2, 64, 16, 16), torch.float16),
         (2, 64, 16, 16)),
        (_resident_layer("lin", w4, (130, 320), torch.float16), (130, 320)),
        (_resident_layer("conv3", w4, (1, 64, 4, 64), torch.float16), (1, 64, 4, 64)),
    ]
    inputs = []
    for layer, shape in layers:
        compact(layer)
        inputs.append(torch.randn(shape, dtype=torch.float16, device=DEV))
        extra = ([3, 3], [1, 1], [1, 1], [1, 1]) if len(shape) == 4 else ()  # the convolutions' geometry
        torch.library.opcheck(layer._op, (*layer._op_args(inputs[-1]), *extra))

    def run(*xs):
        return tuple(layer(x_) for (layer, _), x_ in zip(layers, xs))

    want = run(*inputs)
    assert all(torch.equal(s_, w_) for s_, w_ in zip(replayed(lambda: run(*inputs)), want))
    compiled = torch.compile(run, fullgraph=True)
    got = compiled(*inputs)
    assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want))


@needs_resident
def test_moving_a_quantized_model_onto_the_gpu_compacts_8_bit_layers():
    from quantkit.nn import expand
    from quantkit.ops.resident import held_width

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 8 * 8, 40))
    model[0] = quantize_module(model[0], LayerScheme(WeightFormat(8), ActFormat(8)), act_range=(-3.0, 3.0))
    model[2] = quantize_module(model[2], LayerScheme(WeightFormat(4), ActFormat(8)), act_range=(-3.0, 3.0))
    canonical = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 64, 8, 8)
    want = model.to(DEV, torch.float16)(x.to(DEV, torch.float16)).cpu()  # .to() compacts: the 4-bit linear per mode
    w4_held = held_width(4, conv=False)
    assert model[0].is_compact and model[0].weight_packed.dtype == torch.int8
    assert model[2].is_compact == (w4_held is not None)
    model.cpu()
    assert not model[0].is_compact and not model[2].is_compact
    assert all(torch.equal(v, canonical[k]) for k, v in model.state_dict().items() if not v.is_floating_point())
    conv = model[0].to(DEV)  # compact again; the same result as the canonical codes, bit for bit
    img = x.to(DEV, torch.float16)
    got = conv(img)
    assert conv.is_compact
    expand(conv)
    assert torch.equal(got, conv(img)) and want.shape == (2, 40)
