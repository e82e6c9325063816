"""Native CPU kernels (csrc/) against the reference ops: bit-exact building blocks, exact integer accumulation
(per-channel outputs equal the reference bit for bit), numerics with a tolerance table otherwise, opcheck,
dispatch registration, and the repacked-weight cache. Both kernel sets run: AVX2 (when the CPU has it) and
the portable one."""

from __future__ import annotations

import pytest
import torch

import quantkit.ops  # noqa: F401  (defines the ops and loads quantkit._C)
from quantkit.formats import WeightFormat, pack, quantize_weight, unpack
from quantkit.ops import native, reference
from tests.helpers import assert_close_to_reference

SKIP_REASON = (
    f"quantkit._C not loaded ({native.native_status()['error']}); build it with `pip install --no-build-isolation -e .`"
)


NO_NATIVE_NEEDED = {"test_csrc_readme_names_existing_files"}


@pytest.fixture(autouse=True)
def _requires_native(request):
    """Every test here needs the native library, except those in NO_NATIVE_NEEDED."""
    if request.node.originalname not in NO_NATIVE_NEEDED and not native.native_status()["loaded"]:
        pytest.skip(SKIP_REASON)


NATIVE_OPS = (
    "gemm_w8a8",
    "gemm_w4a8",
    "gemm_w4a16",
    "conv2d_w8a8",
    "conv2d_w4a8",
    "conv2d_w4a16",
    "quantize_act",
    "quantize_act_dynamic",
    "unpack",
    # JLCM codebook kernels (csrc/cpu/codebook.cpp; tested in tests/codebook)
    "gemm_codebook",
    "conv2d_codebook",
    "dequantize_codebook",
)


def _isas() -> list[str]:
    feats = native.cpu_features() if native.native_status()["loaded"] else {}
    return ["scalar"] + (["avx2"] if feats.get("avx2_fma") and feats.get("avx2_compiled") else [])


@pytest.fixture(params=_isas())
def isa(request):
    native.set_isa(request.param)
    yield request.param
    native.set_isa("auto")


def _weight(out_f, in_f, bits, group_size=-1, symmetric=True, kernel=None):
    shape = (out_f, in_f) if kernel is None else (out_f, in_f, *kernel)
    codes, scale, zp = quantize_weight(torch.randn(shape), WeightFormat(bits, group_size, symmetric))
    return pack(codes, bits), scale, zp


def _static(x, bits):
    s, z = reference.act_qparams_from_range(x.float().min(), x.float().max(), bits)
    return s.reshape(1), z.reshape(1)


# ---- registration -----------------------------------------------------------------------------------------------


def test_cpu_kernels_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("quantkit::gemm_w8a8", "CPU")
    for name in NATIVE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkit::{name}", "CPU"), name
    assert set(native.kernel_ops("CPU")) == {f"quantkit::{n}" for n in NATIVE_OPS}
    assert native.native_status()["cpu_features"]["isa"] in ("avx2", "scalar")


# ---- bit-exact building blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 33, 100])
def test_unpack_bit_exact(bits, k):
    codes = torch.randint(0, 1 << bits, (5, k), dtype=torch.uint8)
    q = pack(codes, bits)
    out = torch.ops.quantkit.unpack(q, bits, k)
    assert torch.equal(out, unpack(q, bits, k))
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
def test_quantize_act_exact(isa, bits):
    scale = torch.tensor([0.05])
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale  # exact .5 cases: half-to-even
    x = torch.cat([torch.randn(1000) * 3, ties, torch.tensor([0.0, -0.0, 1e30, -1e30])])
    zp = torch.tensor([(1 << bits) // 3], dtype=torch.int32)
    assert torch.equal(torch.ops.quantkit.quantize_act(x, scale, zp, bits), reference.quantize_act(x, scale, zp, bits))
    # broadcast (per-row) scales take the ATen path
    x2 = torch.randn(4, 9)
    s2, z2 = torch.rand(4, 1) + 0.01, torch.randint(0, 1 << bits, (4, 1), dtype=torch.int32)
    assert torch.equal(torch.ops.quantkit.quantize_act(x2, s2, z2, bits), reference.quantize_act(x2, s2, z2, bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_act_dynamic_exact(isa, bits):
    x = torch.randn(6, 37) * torch.logspace(-3, 3, 6).unsqueeze(1)
    x[1] = 0.0  # degenerate range -> scale clamped to 1e-8
    x[2] = x[2].abs()  # range forced to include 0
    x[3] = -x[3].abs()
    for got, want in zip(torch.ops.quantkit.quantize_act_dynamic(x, bits), reference.quantize_act_dynamic(x, bits)):
        assert torch.equal(got, want)


# ---- gemm ------------------------------------------------------------------------------------------------------

# (op, w_bits, act_bits)
GEMM_KINDS = [("gemm_w8a8", 8, 8), ("gemm_w4a8", 4, 8), ("gemm_w4a8", 4, 4), ("gemm_w8a8", 8, 7), ("gemm_w8a8", 8, 5),
              ("gemm_w4a16", 4, 16)]
# (x shape, N, group_size, symmetric, static)
GEMM_CASES = [
    ((1, 72), 37, -1, True, False),  # GEMV, K and N not multiples of the tiles
    ((2, 3, 40), 17, -1, False, True),  # batch > 1 (3-D x), asymmetric, static
    ((33, 136), 50, 8, True, False),  # group-wise, group a multiple of 8
    ((5, 96), 21, 32, False, True),  # group 32, asymmetric, static
    ((7, 60), 19, 12, False, False),  # group not a multiple of 8: padded groups
    ((20, 48), 16, 48, True, False),  # one group == per channel; 20 rows: W4A16 dequant path
]


@pytest.mark.parametrize("op,w_bits,act_bits", GEMM_KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape,n,group_size,symmetric,static", GEMM_CASES, ids=lambda v: str(v))
def test_gemm_matches_reference(isa, op, w_bits, act_bits, shape, n, group_size, symmetric, static):
    x = torch.randn(shape)
    q, s, zp = _weight(n, shape[-1], w_bits, group_size, symmetric)
    isc, izp = _static(x, act_bits) if static and act_bits < 16 else (None, None)
    args = (x, q, s, zp, torch.randn(n), isc, izp, w_bits, group_size, act_bits)
    y = getattr(torch.ops.quantkit, op)(*args)
    ref = reference.gemm(*args)
    if act_bits < 16 and s.shape[1] == 1:
        assert torch.equal(y, ref)  # exact integer accumulation + the reference's epilogue order
    else:
        assert_close_to_reference(y, ref)


@pytest.mark.parametrize("op,w_bits,act_bits", GEMM_KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_half_inputs(op, w_bits, act_bits, dtype):
    x = torch.randn(3, 64).to(dtype)
    q, s, zp = _weight(24, 64, w_bits, 16, False)
    args = (x, q, s, zp, torch.randn(24), None, None, w_bits, 16, act_bits)
    y = getattr(torch.ops.quantkit, op)(*args)
    assert y.dtype == dtype
    assert_close_to_reference(y, reference.gemm(*args))


@pytest.mark.parametrize("w_bits,group_size", [(4, 32), (4, 12), (8, 16), (3, -1), (2, 8)])
def test_weight_only_dequant_path_is_exact(isa, w_bits, group_size):
    # more rows than the fused W4A16 kernel takes: dequantize exactly like the reference, then at::linear
    x = torch.randn(200, 96)
    q, s, zp = _weight(30, 96, w_bits, group_size, False)
    args = (x, q, s, zp, torch.randn(30), None, None, w_bits, group_size, 16)
    assert torch.equal(torch.ops.quantkit.gemm_w4a16(*args), reference.gemm(*args))


# (K, N, group_size, symmetric): K not a multiple of 8 (padding), odd N (partial last panel), groups of 64 / 128,
# groups not a multiple of 8, asymmetric weights; N > 16 * a few panels so that several column chunks run.
W4A16_MANY_ROWS = [
    (100, 37, -1, True),
    (203, 45, -1, False),
    (256, 33, 64, False),
    (384, 19, 128, True),
    (640, 83, 128, False),
    (60, 19, 12, False),
]


@pytest.mark.parametrize("m", [81, 256, 300])
@pytest.mark.parametrize("k,n,group_size,symmetric", W4A16_MANY_ROWS, ids=lambda v: str(v))
def test_w4a16_many_rows_matches_reference(isa, m, k, n, group_size, symmetric):
    x = torch.randn(m, k)
    q, s, zp = _weight(n, k, 4, group_size, symmetric)
    for bias in (torch.randn(n), None):
        args = (x, q, s, zp, bias, None, None, 4, group_size, 16)
        assert_close_to_reference(torch.ops.quantkit.gemm_w4a16(*args), reference.gemm(*args))


def test_w4a16_many_rows_3d_half_and_threads(isa):
    # 3-D input, half-precision input, one thread
    x = torch.randn(2, 150, 136)
    q, s, zp = _weight(70, 136, 4, 8, False)
    args = (x, q, s, zp, torch.randn(70), None, None, 4, 8, 16)
    assert_close_to_reference(torch.ops.quantkit.gemm_w4a16(*args), reference.gemm(*args))
    for dtype in (torch.bfloat16, torch.float16):
        hargs = (x.to(dtype), *args[1:])
        assert_close_to_reference(torch.ops.quantkit.gemm_w4a16(*hargs), reference.gemm(*hargs))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_close_to_reference(torch.ops.quantkit.gemm_w4a16(*args), reference.gemm(*args))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("panels_per_chunk", [1, 3])
@pytest.mark.parametrize("k,n,group_size,symmetric", W4A16_MANY_ROWS, ids=lambda v: str(v))
def test_w4_panel_dequant_bit_exact(isa, k, n, group_size, symmetric, panels_per_chunk):
    # the many-row W4A16 path's weight: dequantized from the repacked panels, equal to the reference bit for bit
    q, s, zp = _weight(n, k, 4, group_size, symmetric)
    got = native._MODULE.dequantize_w4_panels(q, s, zp, k, panels_per_chunk)
    want = reference.dequantize_packed(q, s, zp, 4, group_size, k, torch.float32)
    assert torch.equal(got, want)


def test_csrc_readme_names_existing_files():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "csrc"
    readme = (root / "README.md").read_text()
    for name in re.findall(r"`([\w/]+\.(?:h|cpp))`", readme):
        assert (root / name).is_file(), name


@pytest.mark.parametrize("k,x_base,act_bits", [(40000, 3.9, 8), (140000, 1.9, 7)], ids=["w8a8", "w8a7"])
def test_gemm_int64_accumulation(isa, k, x_base, act_bits):
    # Sums past int32 must take the exact int64 path: 8-bit x 8-bit over K = 40000 (codes near 255: 40000 * 250 *
    # 255 > 2**31), and 8-bit weights x 7-bit activations (the vpmaddubsw layout) over K = 140000 (codes near 127).
    x = x_base + 0.09 * torch.rand(2, k)
    codes = torch.full((3, k), 255, dtype=torch.uint8)
    codes[1] = 0
    zp = torch.zeros(3, 1, dtype=torch.uint8)
    s = torch.full((3, 1), 1e-3, dtype=torch.float16)
    qmax = (1 << act_bits) - 1
    isc, izp = torch.tensor([(x_base + 0.1) / qmax]), torch.tensor([0], dtype=torch.int32)
    args = (x, pack(codes, 8), s, zp, None, isc, izp, 8, -1, act_bits)
    assert torch.equal(torch.ops.quantkit.gemm_w8a8(*args), reference.gemm(*args))


def test_gemm_odd_static_zero_point(isa):
    x = torch.randn(4, 40)
    q, s, zp = _weight(9, 40, 4, 8, False)
    for z in (-7, 300):  # outside [0, qmax]: allowed by the schema, handled exactly
        args = (x, q, s, zp, None, torch.tensor([0.02]), torch.tensor([z], dtype=torch.int32), 4, 8, 8)
        assert_close_to_reference(torch.ops.quantkit.gemm_w4a8(*args), reference.gemm(*args))
    q8, s8, zp8 = _weight(9, 40, 8, -1, False)
    for z in (-7, 300):  # 8-bit weights, 7-bit activations
        args = (x, q8, s8, zp8, None, torch.tensor([0.02]), torch.tensor([z], dtype=torch.int32), 8, -1, 7)
        assert torch.equal(torch.ops.quantkit.gemm_w8a8(*args), reference.gemm(*args))


def test_gemm_rejects_unsupported_act_bits():
    x = torch.randn(2, 16)
    q, s, _ = _weight(4, 16, 8)
    with pytest.raises(RuntimeError, match="act_bits"):
        torch.ops.quantkit.gemm_w8a8(x, q, s, None, None, None, None, 8, -1, 12)


# ---- conv2d ----------------------------------------------------------------------------------------------------

CONV_KINDS = [("conv2d_w8a8", 8, 8), ("conv2d_w8a8", 8, 7), ("conv2d_w4a8", 4, 8), ("conv2d_w4a8", 4, 4),
              ("conv2d_w4a16", 4, 16)]
# (x shape, out channels, kernel, stride, padding, dilation, group_size, symmetric, static)
CONV_CASES = [
    ((2, 5, 7, 6), 19, 3, 1, 1, 1, -1, True, False),  # 3x3 s1 p1, batch 2, odd sizes, dynamic per sample
    ((1, 8, 9, 9), 17, 3, 2, 1, 1, 24, False, True),  # 3x3 s2 p1, group = 8 channels x 9 taps, static
    ((2, 16, 6, 5), 9, 1, 1, 0, 1, 8, True, False),  # 1x1, group-wise
    ((1, 6, 9, 8), 9, 3, 1, 2, 2, 6, True, True),  # dilation 2, group not made of whole taps
    ((1, 4, 9, 8), 33, 3, 2, 0, 1, -1, False, False),  # conv_in-like 4 channels, no padding
    ((1, 24, 8, 8), 20, 3, 1, 1, 1, -1, True, True),  # channel count a multiple of 8
    ((1, 13, 9, 7), 11, 3, 1, 1, 1, -1, True, True),  # 8 channels + 5 more, 63 pixels (7 past a block of 8)
    ((2, 16, 23, 21), 18, 1, 1, 0, 1, -1, True, False),  # 483 pixels: two pixel chunks of the NHWC quantization
]


@pytest.mark.parametrize("op,w_bits,act_bits", CONV_KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape,o,ks,st,pd,dl,group_size,symmetric,static", CONV_CASES, ids=lambda v: str(v))
def test_conv2d_matches_reference(isa, op, w_bits, act_bits, shape, o, ks, st, pd, dl, group_size, symmetric, static):
    x = torch.randn(shape)
    q, s, zp = _weight(o, shape[1], w_bits, group_size, symmetric, kernel=(ks, ks))
    isc, izp = _static(x, act_bits) if static and act_bits < 16 else (None, None)
    args = (x, q, s, zp, torch.randn(o), isc, izp, w_bits, group_size, act_bits, [ks, ks], [st, st], [pd, pd], [dl, dl])
    y = getattr(torch.ops.quantkit, op)(*args)
    ref = reference.conv2d(*args)
    if act_bits < 16 and s.shape[1] == 1:
        assert torch.equal(y, ref)
    else:
        assert_close_to_reference(y, ref)


def test_conv2d_channels_last_bf16_and_odd_zero_point(isa):
    x = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last)
    q, s, zp = _weight(10, 8, 4, kernel=(3, 3))
    base = (q, s, zp, torch.randn(10))
    geo = ([3, 3], [1, 1], [1, 1], [1, 1])
    for xi in (x, x.to(torch.bfloat16)):
        args = (xi, *base, None, None, 4, -1, 8, *geo)
        assert_close_to_reference(torch.ops.quantkit.conv2d_w4a8(*args), reference.conv2d(*args))
    # a zero point outside [0, 255] cannot fill padding as a uint8 code: the 16-bit layout takes over
    args = (x, *base, torch.tensor([0.05]), torch.tensor([-3], dtype=torch.int32), 4, -1, 8, *geo)
    assert_close_to_reference(torch.ops.quantkit.conv2d_w4a8(*args), reference.conv2d(*args))


# ---- opcheck ---------------------------------------------------------------------------------------------------


def _opcheck_samples():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 40)
    xc = torch.randn(1, 8, 6, 5)
    out = []
    for name, bits, act in [("gemm_w8a8", 8, 8), ("gemm_w4a8", 4, 8), ("gemm_w4a16", 4, 16)]:
        q, s, zp = _weight(11, 40, bits, 8, False)
        isc, izp = _static(x, act) if act < 16 else (None, None)
        out.append((name, (x, q, s, zp, torch.randn(11), isc, izp, bits, 8, act)))
    for name, bits, act in [("conv2d_w8a8", 8, 8), ("conv2d_w4a8", 4, 8), ("conv2d_w4a16", 4, 16)]:
        q, s, zp = _weight(7, 8, bits, kernel=(3, 3))
        out.append((name, (xc, q, s, zp, None, None, None, bits, -1, act, [3, 3], [2, 2], [1, 1], [1, 1])))
    scale, zp = _static(x, 8)
    out += [
        ("quantize_act", (x, scale, zp, 8)),
        ("quantize_act_dynamic", (x.reshape(-1, 40), 6)),
        ("unpack", (_weight(5, 40, 4)[0], 4, 40)),
    ]
    from tests.ops.samples import codebook_samples  # JLCM codebook kernels

    return out + codebook_samples()


def test_opcheck_covers_every_native_op():
    assert {n for n, _ in _opcheck_samples()} == set(NATIVE_OPS)


@pytest.mark.parametrize("name,args", _opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_cpu(name, args):
    torch.library.opcheck(getattr(torch.ops.quantkit, name).default, args)


# ---- repacked-weight cache ---------------------------------------------------------------------------------------


def test_cache_follows_in_place_writes_and_frees():
    native.clear_cache()
    x = torch.randn(3, 64)
    q, s, zp = _weight(20, 64, 8)
    assert native.prepare(q, s, zp, 8, 64) > 0
    before = native.cache_info()
    args = (x, q, s, zp, None, None, None, 8, -1, 8)
    assert torch.equal(torch.ops.quantkit.gemm_w8a8(*args), reference.gemm(*args))
    assert native.cache_info()["hits"] == before["hits"] + 1
    q2, _, _ = _weight(20, 64, 8)
    with torch.no_grad():
        q.copy_(q2)  # bumps the version counter: the next call must repack
    assert torch.equal(torch.ops.quantkit.gemm_w8a8(*args), reference.gemm(*args))
    entries = native.cache_info()["entries"]
    del q, s, zp, args
    assert native.cache_info()["entries"] == entries - 1  # the freed weight's entry is swept


def test_prepare_from_layer_tensors():
    native.clear_cache()
    q, s, zp = _weight(12, 8, 4, -1, False, kernel=(3, 3))
    tensors = {
        "weight_packed": q,
        "weight_scale": s,
        "weight_zero_point": zp,
        "weight_shape": torch.tensor([12, 8, 3, 3]),
    }
    assert native.prepare(tensors, w_bits=4) > 0
    x = torch.randn(1, 8, 5, 5)
    args = (x, q, s, zp, None, None, None, 4, -1, 8, [3, 3], [1, 1], [1, 1], [1, 1])
    hits = native.cache_info()["hits"]
    assert torch.equal(torch.ops.quantkit.conv2d_w4a8(*args), reference.conv2d(*args))
    assert native.cache_info()["hits"] == hits + 1  # the call used the prepared conv layout
