"""Triton kernels of resident weights (quantkit.ops.triton_gemm.resident_*) against the reference, bit for bit.

They run on a CUDA GPU with Triton (sm_90+, where they are used). Without one, they run on the CPU under Triton's
interpreter when Triton is installed and ``TRITON_INTERPRET=1`` is set (a slow, exact check of the kernels' logic
on a development machine); otherwise the module is skipped with the reason. Activation codes come from the
reference quantizer here, so only the kernels are under test (test_cuda_kernels.py covers the whole path on a
GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from quantkit.formats import WeightFormat, pack, quantize_weight
from quantkit.ops import reference, resident, triton_gemm

if triton_gemm.triton is None:
    pytest.skip("Triton is not installed (CUDA builds of torch ship it): the resident kernels need it",
                allow_module_level=True)
if triton_gemm.available():
    DEV = "cuda"
    os.environ.setdefault("QUANTKIT_TRITON_TUNE", "0")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEV = "cpu"
    os.environ["QUANTKIT_TRITON_TUNE"] = "0"
    from triton.runtime import interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):  # Triton 3.6's interpreter calls int() on 1-element arrays (NumPy 2.4
        _patch_tensor(tensor, scope)  # refuses): loop bounds read from kernel arguments need a scalar
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
else:
    pytest.skip("no sm_90+ GPU for the Triton kernels, and TRITON_INTERPRET=1 is not set for the CPU interpreter "
                "(tests/ops/test_triton_build.py runs this module under it)", allow_module_level=True)


def dev(t):
    """``t`` on the kernels' device (None stays None)."""
    return None if t is None else t.to(DEV)


@pytest.fixture(autouse=True)
def _four_bit_kernels(monkeypatch):
    """4-bit layers on the 4-bit kernels (swapped-operand / pointer), so they stay covered: the default widening per
    call (QUANTKIT_TRITON_W4=expand) is picked by the tests of it."""
    monkeypatch.setenv("QUANTKIT_TRITON_W4", "auto")


def _weight(n, c, bits, symmetric=True, kernel=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) if kernel is None else (n, c, *kernel)
    codes, scale, zp = quantize_weight(torch.randn(shape, generator=g), WeightFormat(bits, -1, symmetric))
    return pack(codes, bits), scale, zp


def _act(x, dynamic, bits, per_sample_dims=None):
    """Reference qparams and centred int8 codes (q - 128)."""
    xf = x.to(torch.float32)
    if dynamic:
        flat = xf.reshape(xf.shape[0], -1)
        s, zp = reference.act_qparams_from_range(flat.amin(dim=1), flat.amax(dim=1), bits)
        view = (-1,) + (1,) * (x.dim() - 1)
        q = reference.quantize_act(xf, s.view(view), zp.view(view), bits)
    else:
        s, zp = reference.act_qparams_from_range(torch.tensor(-2.5), torch.tensor(3.0), bits)
        s, zp = s.reshape(1), zp.reshape(1)
        q = reference.quantize_act(xf, s, zp, bits)
    return (q.to(torch.int32) - 128).to(torch.int8), s.reshape(-1).float(), zp.reshape(-1).to(torch.int32)


def _w4_linear(m, k, n, symmetric, dynamic, seed=0):
    """A 4-bit resident linear case: (codes, blob, zp, scale, s, azp, bias) and the reference output."""
    qdata, scale, zp = _weight(n, k, 4, symmetric, seed=seed)
    x = (torch.randn(m, k) * 2).half()
    a, s, azp = _act(x, dynamic, 8)
    blob = resident.make(qdata, zp, 4, k)
    bias = torch.randn(n).half()
    in_s, in_zp = (None, None) if dynamic else (s, azp)
    return (a, blob, zp, scale, s, azp, bias), reference.gemm(x, qdata, scale, zp, bias, in_s, in_zp, 4, -1, 8)


LINEAR = [(1, 64, 24, 8, True, False), (37, 130, 72, 8, True, True), (70, 200, 136, 8, True, False),
          (37, 130, 72, 4, True, False), (70, 192, 40, 4, False, True), (5, 96, 24, 4, False, False),
          # more than 64 rows, K % 16 == 0, N % 8 == 0: the copy-engine (TMA) kernel for 8-bit weights; 4-bit
          # weights with more than 128 rows take the swapped-operand kernel; K not a multiple of the tile
          (130, 208, 72, 8, True, False), (200, 320, 136, 8, True, True), (130, 208, 72, 4, False, False),
          (150, 128, 40, 4, True, True)]


@pytest.mark.parametrize("m,k,n,bits,symmetric,dynamic", LINEAR)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_resident_linear_equals_reference(m, k, n, bits, symmetric, dynamic, dtype):
    qdata, scale, zp = _weight(n, k, bits, symmetric)
    bias = torch.randn(n).to(dtype)
    x = (torch.randn(m, k) * 2).to(dtype)
    a, s, azp = _act(x, dynamic, 8)
    blob = resident.make(qdata, zp, bits, k)
    got = triton_gemm.resident_linear(dev(a), dev(blob), dev(zp), dev(scale), dev(s), dev(azp), dev(bias), bits,
                                      dtype)
    assert triton_gemm.tma_supported(m, n, k, a, dtype, bits) == (bits == 8 and m > 64 and k % 16 == 0)
    assert triton_gemm.w4_swap_selected(m) == (m > 128)
    in_s, in_zp = (None, None) if dynamic else (s, azp)
    want = reference.gemm(x, qdata, scale, zp, bias, in_s, in_zp, bits, -1, 8)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("bits", [8, 4])
def test_every_tma_tile_config_equals_reference(bits):
    """Each tile shape the autotuner may pick for the copy-engine kernel (split epilogue or not, 256-row tiles)."""
    m, k, n = 300, 336, 264  # no dimension a multiple of any tile
    qdata, scale, zp = _weight(n, k, bits, symmetric=bits == 8, seed=1)
    x = (torch.randn(m, k) * 2).half()
    a, s, azp = _act(x, True, 8)
    blob = resident.make(qdata, zp, bits, k)
    bias = torch.randn(n).half()
    want = reference.gemm(x, qdata, scale, zp, bias, None, None, bits, -1, 8)
    ws, wzp = triton_gemm._resident_args(dev(blob), dev(zp), dev(scale), bits, k)
    flags = dict(W_BITS=bits, HAS_WZP=zp is not None, PER_ROW=True, HAS_BIAS=True, enable_fp_fusion=False)
    for cfg in triton_gemm._tma_configs(bits):
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEV)
        triton_gemm._launch_resident_tma(dev(a), dev(blob), ws, wzp, y, dev(scale), dev(s), dev(azp), dev(bias), m,
                                         n, k, bits, flags, config=cfg)
        assert torch.equal(y.cpu(), want), cfg


def test_w4_pointer_kernel_past_128_rows_equals_reference(monkeypatch):
    """QUANTKIT_TRITON_W4=pointer keeps 4-bit linears of more than 128 rows on the pointer kernel (the default
    there is the swapped-operand one)."""
    monkeypatch.setenv("QUANTKIT_TRITON_W4", "pointer")
    m, k, n = 150, 128, 40
    assert not triton_gemm.w4_swap_selected(m)
    args, want = _w4_linear(m, k, n, False, True)
    got = triton_gemm.resident_linear(*map(dev, args), 4, torch.float16)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4_swapped_operand_kernel_equals_reference(symmetric, monkeypatch):
    """The 4-bit swapped-operand kernel forced (QUANTKIT_TRITON_W4=swap) through resident_linear, every tile
    config, M from 1 row (tiles mostly past the rows) to several tiles, K not a multiple of the 64-column block."""
    monkeypatch.setenv("QUANTKIT_TRITON_W4", "swap")
    for m, k, n, dynamic in ((1, 208, 72, False), (37, 128, 40, True), (300, 336, 264, True)):
        args, want = _w4_linear(m, k, n, symmetric, dynamic, seed=m)
        a, blob, zp, scale, s, azp, bias = args
        assert torch.equal(triton_gemm.resident_linear(*map(dev, args), 4, torch.float16).cpu(), want)
        ws, wzp = triton_gemm._resident_args(dev(blob), dev(zp), dev(scale), 4, k)
        flags = dict(HAS_WZP=zp is not None, PER_ROW=dynamic, HAS_BIAS=True, enable_fp_fusion=False)
        for cfg in triton_gemm._swap_configs():
            y = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEV)
            triton_gemm._launch_w4_swap(dev(a), dev(blob), ws, wzp, y, dev(scale), dev(s), dev(azp), dev(bias), m, n,
                                        k, flags, config=cfg)
            assert torch.equal(y.cpu(), want), cfg


CONV = [  # (B, C, H, W, N, kernel, stride, padding, dilation, bits, symmetric, dynamic)
    (1, 32, 9, 7, 24, (3, 3), (1, 1), (1, 1), (1, 1), 8, True, False),
    (2, 40, 8, 8, 20, (3, 3), (2, 2), (1, 1), (1, 1), 8, True, True),
    (1, 64, 6, 10, 16, (3, 3), (1, 1), (2, 2), (2, 2), 4, True, False),
    (2, 128, 5, 5, 24, (1, 1), (1, 1), (0, 0), (1, 1), 4, False, True),
    (1, 64, 7, 7, 8, (3, 1), (1, 2), (1, 0), (1, 1), 8, True, False),
]


@pytest.mark.parametrize("case", CONV)
def test_resident_conv_equals_reference(case):
    b, c, h, w, n, ks, st, pd, dl, bits, symmetric, dynamic = case
    qdata, scale, zp = _weight(n, c, bits, symmetric, kernel=ks)
    bias = torch.randn(n).half()
    x = (torch.randn(b, c, h, w) * 2).half()
    a, s, azp = _act(x, dynamic, 8)
    xq = a.permute(0, 2, 3, 1).contiguous()  # NHWC codes
    blob = resident.make(qdata, zp, bits, c * ks[0] * ks[1], (c, *ks))
    got = triton_gemm.resident_conv2d(dev(xq), dev(blob), dev(zp), dev(scale), dev(s), dev(azp), dev(bias), bits, ks,
                                      st, pd, dl, torch.float16)
    in_s, in_zp = (None, None) if dynamic else (s, azp)
    want = reference.conv2d(x, qdata, scale, zp, bias, in_s, in_zp, bits, -1, 8, list(ks), list(st), list(pd),
                            list(dl))
    assert got.shape == want.shape
    assert torch.equal(got.cpu(), want)


# Stride 1: the copy-engine convolution (padded codes), tiles of one row's pixels or of whole rows (32- and 16-wide
# rows); C not a multiple of the channel block, several images with a dynamic per-sample zero point, 1x1 and 3x1.
CONV_TMA = [  # (B, C, H, W, N, kernel, padding, dynamic)
    (1, 32, 3, 64, 24, (3, 3), (1, 1), False),
    (1, 32, 4, 32, 24, (3, 3), (1, 1), False),  # 32-wide rows: tiles of 2 or 4 whole rows
    (2, 16, 8, 16, 64, (3, 3), (1, 1), True),
    (2, 48, 2, 128, 128, (3, 3), (1, 1), True),
    (1, 64, 2, 64, 40, (1, 1), (0, 0), False),
    (2, 80, 3, 64, 64, (3, 1), (1, 0), True),
]


@pytest.mark.parametrize("case", CONV_TMA)
def test_tma_conv_equals_reference(case, monkeypatch):
    monkeypatch.delenv("QUANTKIT_TRITON_CONV_TMA", raising=False)  # the default where it applies
    b, c, h, w, n, ks, pd, dynamic = case
    qdata, scale, zp = _weight(n, c, 8, True, kernel=ks, seed=c)
    bias = torch.randn(n).half()
    x = (torch.randn(b, c, h, w) * 2).half()
    a, s, azp = _act(x, dynamic, 8)
    xq = a.permute(0, 2, 3, 1).contiguous()
    blob = resident.make(qdata, zp, 8, c * ks[0] * ks[1], (c, *ks))
    in_s, in_zp = (None, None) if dynamic else (s, azp)
    want = reference.conv2d(x, qdata, scale, zp, bias, in_s, in_zp, 8, -1, 8, list(ks), [1, 1], list(pd), [1, 1])
    ho, wo = want.shape[2], want.shape[3]
    assert triton_gemm.conv_tma_supported(dev(xq), n, 8, ks, (1, 1), pd, (1, 1), ho, wo, torch.float16)
    got = triton_gemm.resident_conv2d(dev(xq), dev(blob), None, dev(scale), dev(s), dev(azp), dev(bias), 8, ks,
                                      (1, 1), pd, (1, 1), torch.float16)
    assert torch.equal(got.cpu(), want)
    xp = triton_gemm.pad_codes(dev(xq), dev(azp), *pd)
    ws, _ = triton_gemm._resident_args(dev(blob), None, dev(scale), 8, c * ks[0] * ks[1])
    flags = dict(PER_ROW=dynamic, HAS_BIAS=True, enable_fp_fusion=False)
    tried = 0
    for cfg in triton_gemm._conv_tma_configs():
        if not triton_gemm._conv_tma_fits(cfg, b, n, ho, wo):
            continue
        y = torch.full((b, n, ho, wo), float("nan"), dtype=torch.float16, device=DEV)
        triton_gemm._launch_conv_tma(xp, dev(blob), ws, dev(scale), dev(s), dev(azp), dev(bias), y, n, c, ho, wo,
                                     ks[0], ks[1], flags, config=cfg)
        assert torch.equal(y.cpu(), want), cfg
        tried += 1
    assert tried >= 1


@pytest.mark.parametrize("case", [  # (B, C, H, W, N, kernel, stride, padding, symmetric, dynamic)
    (1, 64, 2, 64, 40, (3, 3), (1, 1), (1, 1), True, False),  # stride 1: the copy-engine convolution
    (2, 96, 2, 64, 64, (1, 1), (1, 1), (0, 0), False, True),  # 96 channels: no nibble layout, widened fits
    (2, 64, 8, 8, 16, (3, 3), (2, 2), (1, 1), False, False),  # stride 2: the pointer kernel
])
def test_widened_4_bit_conv_equals_the_4_bit_reference(case, monkeypatch):
    """QUANTKIT_RESIDENT_W4=conv8's form: a 4-bit convolution held 8 bits wide runs the 8-bit kernels
    (kernel_format) and gives the 4-bit reference's output bit for bit."""
    monkeypatch.delenv("QUANTKIT_TRITON_CONV_TMA", raising=False)
    b, c, h, w, n, ks, st, pd, symmetric, dynamic = case
    qdata, scale, zp = _weight(n, c, 4, symmetric, kernel=ks, seed=c + n)
    bias = torch.randn(n).half()
    x = (torch.randn(b, c, h, w) * 2).half()
    a, s, azp = _act(x, dynamic, 8)
    xq = a.permute(0, 2, 3, 1).contiguous()
    k = c * ks[0] * ks[1]
    blob = resident.make(qdata, zp, 4, k, (c, *ks), width=8)
    bits, wzp = resident.kernel_format(blob, 4, zp, k)
    in_s, in_zp = (None, None) if dynamic else (s, azp)
    want = reference.conv2d(x, qdata, scale, zp, bias, in_s, in_zp, 4, -1, 8, list(ks), list(st), list(pd), [1, 1])
    ho, wo = want.shape[2], want.shape[3]
    assert triton_gemm.conv_tma_supported(dev(xq), n, bits, ks, st, pd, (1, 1), ho, wo, torch.float16) == (st == (1, 1))
    got = triton_gemm.resident_conv2d(dev(xq), dev(blob), dev(wzp), dev(scale), dev(s), dev(azp), dev(bias), bits, ks,
                                      st, pd, (1, 1), torch.float16)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("n,k,symmetric,kernel", [(37, 100, True, None), (24, 640, False, None),
                                                  (16, 64 * 9, True, (3, 3)), (5, 128, False, (1, 1))])
def test_widen_w4_equals_the_widened_layout(n, k, symmetric, kernel):
    """The per-call widening kernel (QUANTKIT_TRITON_W4=expand) gives resident.make(..., width=8) bit for bit:
    rows past a 16-row tile, K padded to 64, more than one 256-byte tile per row, the tail's row sums."""
    c = k if kernel is None else k // (kernel[0] * kernel[1])
    qdata, _, zp = _weight(n, c, 4, symmetric, kernel=kernel, seed=n)
    conv_shape = None if kernel is None else (c, *kernel)
    blob = resident.make(qdata, zp, 4, k, conv_shape)
    got = triton_gemm.widen_w4(dev(blob), dev(zp), k).cpu()
    assert torch.equal(got, resident.make(qdata, zp, 4, k, conv_shape, width=8))


def test_switch_defaults_are_the_measured_winners(monkeypatch):
    """Unset, QUANTKIT_TRITON_W4 widens 4-bit layers per call and QUANTKIT_TRITON_CONV_QUANT fuses the convolution
    input quantization (both faster on an H100's SDXL step, docs/results.md); auto / swap / pointer and 0 turn them
    off; the swapped-operand kernel's 128-row rule holds under the default and auto."""
    monkeypatch.delenv("QUANTKIT_TRITON_W4", raising=False)
    monkeypatch.delenv("QUANTKIT_TRITON_CONV_QUANT", raising=False)
    assert triton_gemm.w4_expand_selected() and triton_gemm.conv_quant_fused_selected()
    assert [triton_gemm.w4_swap_selected(m) for m in (128, 129)] == [False, True]
    for choice, swap_at_1, swap_at_200 in (("auto", False, True), ("swap", True, True), ("pointer", False, False)):
        monkeypatch.setenv("QUANTKIT_TRITON_W4", choice)
        assert not triton_gemm.w4_expand_selected(), choice
        assert (triton_gemm.w4_swap_selected(1), triton_gemm.w4_swap_selected(200)) == (swap_at_1, swap_at_200)
    monkeypatch.setenv("QUANTKIT_TRITON_CONV_QUANT", "0")
    assert not triton_gemm.conv_quant_fused_selected()


def test_expand_runs_4_bit_layers_on_the_8_bit_kernels_exactly(monkeypatch):
    """QUANTKIT_TRITON_W4=expand: 4-bit linears of more than 64 rows and stride-1 convolutions are widened per call
    and run the 8-bit copy-engine kernels; fewer rows, and strided convolutions, keep the 4-bit kernels. Every output
    equals the 4-bit reference bit for bit."""
    monkeypatch.setenv("QUANTKIT_TRITON_W4", "expand")
    monkeypatch.delenv("QUANTKIT_TRITON_CONV_TMA", raising=False)
    assert triton_gemm.w4_expand_selected()
    for m, k, n, symmetric, dynamic in ((130, 208, 72, False, False), (200, 320, 136, True, True),
                                        (37, 128, 40, False, True)):
        args, want = _w4_linear(m, k, n, symmetric, dynamic, seed=m)
        got = triton_gemm.resident_linear(*map(dev, args), 4, torch.float16)
        assert torch.equal(got.cpu(), want), (m, k, n)
    for b, c, h, w, n, ks, st, pd, symmetric in ((1, 64, 2, 64, 40, (3, 3), (1, 1), (1, 1), False),
                                                 (2, 64, 8, 8, 16, (3, 3), (2, 2), (1, 1), True)):
        qdata, scale, zp = _weight(n, c, 4, symmetric, kernel=ks, seed=b + n)
        bias = torch.randn(n).half()
        x = (torch.randn(b, c, h, w) * 2).half()
        a, s, azp = _act(x, False, 8)
        xq = a.permute(0, 2, 3, 1).contiguous()
        blob = resident.make(qdata, zp, 4, c * ks[0] * ks[1], (c, *ks))
        want = reference.conv2d(x, qdata, scale, zp, bias, s, azp, 4, -1, 8, list(ks), list(st), list(pd), [1, 1])
        got = triton_gemm.resident_conv2d(dev(xq), dev(blob), dev(zp), dev(scale), dev(s), dev(azp), dev(bias), 4,
                                          ks, st, pd, (1, 1), torch.float16)
        assert torch.equal(got.cpu(), want), (ks, st)
        fused = triton_gemm.resident_conv2d_float(dev(x), dev(blob), dev(zp), dev(scale), dev(s), dev(azp),
                                                  dev(bias), 4, ks, st, pd, (1, 1))
        assert (fused is None) == (st != (1, 1))  # the float-input path: stride 1 only
        assert fused is None or torch.equal(fused.cpu(), want)


@pytest.mark.parametrize("b,c,h,w,ph,pw", [(2, 48, 7, 9, 1, 1), (1, 80, 5, 33, 1, 0), (1, 130, 4, 4, 0, 0),
                                           (1, 16, 3, 70, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_pad_nhwc_equals_quantize_then_pad(b, c, h, w, ph, pw, dtype):
    """One-pass padded NHWC codes: rows wider than a 32-column tile, channels past a 64-channel tile, no border,
    values past the range (clamped codes): equal to the reference quantizer's codes padded by pad_codes."""
    x = (torch.randn(b, c, h, w) * 3).to(dtype)
    x[0, 0, 0, :2] = torch.tensor([100.0, -100.0]).to(dtype)
    s, zp = reference.act_qparams_from_range(torch.tensor(-2.5), torch.tensor(3.0), 8)
    s, zp = s.reshape(1).to(dtype), zp.reshape(1).to(torch.int32)  # as .to(dtype) leaves a module's scale
    codes = (reference.quantize_act(x, s, zp, 8).to(torch.int32) - 128).to(torch.int8)
    want = triton_gemm.pad_codes(codes.permute(0, 2, 3, 1).contiguous(), zp, ph, pw)
    got = triton_gemm.quantize_pad_nhwc(x.to(DEV), s.to(DEV), zp.to(DEV), ph, pw, 8).cpu()
    assert got.shape == (b, h + 2 * ph, w + 2 * pw, c) and torch.equal(got, want)


@pytest.mark.parametrize("case", [c_ for c_ in CONV_TMA if not c_[-1]])
def test_resident_conv_from_float_equals_reference(case):
    """The fused path (QUANTKIT_TRITON_CONV_QUANT, on by default): float NCHW input quantized straight into the padded
    codes, then the copy-engine convolution; a stride-2 layer is declined (None: the caller's usual path)."""
    b, c, h, w, n, ks, pd, _ = case
    qdata, scale, zp = _weight(n, c, 8, True, kernel=ks, seed=c)
    bias = torch.randn(n).half()
    x = (torch.randn(b, c, h, w) * 2).half()
    _, s, azp = _act(x, False, 8)
    blob = resident.make(qdata, zp, 8, c * ks[0] * ks[1], (c, *ks))
    got = triton_gemm.resident_conv2d_float(dev(x), dev(blob), None, dev(scale), dev(s), dev(azp), dev(bias), 8, ks,
                                            (1, 1), pd, (1, 1))
    want = reference.conv2d(x, qdata, scale, zp, bias, s, azp, 8, -1, 8, list(ks), [1, 1], list(pd), [1, 1])
    assert got is not None and torch.equal(got.cpu(), want)
    assert triton_gemm.resident_conv2d_float(dev(x), dev(blob), None, dev(scale), dev(s), dev(azp), dev(bias), 8, ks,
                                             (2, 2), pd, (1, 1)) is None


def _gn_silu_reference(x, groups, eps, gamma, beta, silu=True):
    """silu(group_norm(x)) rounded as PyTorch's CUDA kernels round it: the norm in fp32 rounded to x's dtype, SiLU
    in fp32 (``v / (1 + exp(-v))``) rounded to x's dtype."""
    y = torch.nn.functional.group_norm(x.float(), groups, gamma.float(), beta.float(), eps).to(x.dtype)
    return (y.float() / (1 + torch.exp(-y.float()))).to(x.dtype) if silu else y


@pytest.mark.parametrize("b,c,h,w,groups,silu", [(2, 64, 6, 10, 32, True), (1, 96, 9, 33, 8, True),
                                                  (1, 64, 40, 40, 4, True), (2, 64, 6, 10, 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_groupnorm_silu_quantize_pad_matches_the_unfused_steps(b, c, h, w, groups, silu, dtype):
    """QUANTKIT_FUSE_GROUPNORM's kernels: the statistics (several chunks per group for the 40x40 case, channel tiles
    spanning groups of 12) equal the group mean and 1 / std, and the fused codes (of the norm alone, or followed by
    SiLU) equal the unfused steps' codes except, rarely, by one (the statistics are summed in another order);
    inputs far from zero mean (the shifted sums keep the variance exact)."""
    torch.manual_seed(c + h)
    eps = 1e-5
    x = (torch.randn(b, c, h, w) * 2 + 30).to(dtype)
    gamma, beta = (torch.randn(c) * 0.5 + 1).to(dtype), (torch.randn(c) * 0.3).to(dtype)
    stats = triton_gemm.groupnorm_silu_stats(dev(x), groups, eps).cpu()
    grouped = x.float().reshape(b * groups, -1).double()
    torch.testing.assert_close(stats[:, 0].double(), grouped.mean(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats[:, 1].double(), 1 / (grouped.var(1, unbiased=False) + eps).sqrt(), rtol=1e-4,
                               atol=0)
    u = _gn_silu_reference(x, groups, eps, gamma, beta, silu)
    _, s, azp = _act(u.float(), False, 8)
    codes = (reference.quantize_act(u.float(), s, azp, 8).to(torch.int32) - 128).to(torch.int8)
    want = triton_gemm.pad_codes(codes.permute(0, 2, 3, 1).contiguous(), azp, 1, 1)
    got = triton_gemm.quantize_pad_nhwc(dev(x), dev(s), dev(azp), 1, 1, 8, norm=(groups, eps, dev(gamma), dev(beta)),
                                        silu=silu).cpu()
    diff = (got.to(torch.int32) - want.to(torch.int32)).abs()
    assert got.shape == want.shape and int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 2e-3
    assert torch.equal(got[:, 0], want[:, 0]) and torch.equal(got[:, :, -1], want[:, :, -1])  # the border


@pytest.mark.parametrize("per_row", [False, True])
def test_signed_nibble_linear_off_cutlass_equals_reference(per_row):
    """A signed-nibble 4-bit linear (QUANTKIT_RESIDENT_W4=cutlass) on a call the CUTLASS int4 GEMM does not take
    (here: no Hopper GPU under the interpreter, or per-row activation scales) runs widened on the 8-bit kernels,
    exactly."""
    m, k, n = 70, 320, 96
    qdata, scale, zp = _weight(n, k, 4, True, seed=5)
    x = (torch.randn(m, k) * 2).half()
    a, s, azp = _act(x, per_row, 8)
    in_s, in_zp = (None, None) if per_row else (s, azp)  # the reference quantizes dynamically by itself
    want = reference.gemm(x, qdata, scale, zp, None, in_s, in_zp, 4, -1, 8)
    blob = resident.make(qdata, zp, 4, k, signed=True)
    got = triton_gemm.resident_linear(dev(a), dev(blob), None, dev(scale), dev(s), dev(azp), None, 4, torch.float16)
    assert torch.equal(got.cpu(), want)


def _tiles(name):  # the tiles besides the first, which the tests above check against the reference
    return range(1, len(triton_gemm.ELEMENTWISE_TILES[name][1]))


@pytest.mark.parametrize("tile", _tiles("pad"))
def test_quantize_pad_nhwc_is_the_same_on_every_tile(tile):
    """Every tile the autotuner may pick gives the codes of the fixed first tile (tested against the reference
    above): plain, and with GroupNorm and SiLU first; channels past every tile size, partial tiles, a border."""
    torch.manual_seed(tile)
    x = (torch.randn(1, 136, 2, 70) * 3).half()
    s, zp = reference.act_qparams_from_range(torch.tensor(-2.5), torch.tensor(3.0), 8)
    s, zp = dev(s.reshape(1).half()), dev(zp.reshape(1).to(torch.int32))
    norm = (8, 1e-5, dev(torch.randn(136).half()), dev(torch.randn(136).half()))
    for kw in ({}, {"norm": norm}, {"norm": norm, "silu": False}):
        want = triton_gemm.quantize_pad_nhwc(dev(x), s, zp, 1, 2, 8, tile=0, **kw)
        assert torch.equal(triton_gemm.quantize_pad_nhwc(dev(x), s, zp, 1, 2, 8, tile=tile, **kw), want)


@pytest.mark.parametrize("tile", _tiles("geglu"))
def test_geglu_quant_is_the_same_on_every_tile(tile):
    torch.manual_seed(tile)
    p = dev((torch.randn(70, 2 * 600) * 2).half())  # rows and columns past every tile size
    s, zp = reference.act_qparams_from_range(torch.tensor(-1.5), torch.tensor(4.0), 8)
    s, zp = dev(s.reshape(1).half()), dev(zp.reshape(1).to(torch.int32))
    assert torch.equal(triton_gemm.geglu_quant(p, s, zp, 8, tile=tile), triton_gemm.geglu_quant(p, s, zp, 8, tile=0))


@pytest.mark.parametrize("tile", _tiles("widen"))
@pytest.mark.parametrize("symmetric", [True, False])
def test_widen_w4_is_the_layout_on_every_tile(tile, symmetric):
    n, k = 37, 64 * 21  # rows and 64-column blocks past every tile size
    qdata, _, zp = _weight(n, k, 4, symmetric, seed=tile)
    blob = resident.make(qdata, zp, 4, k)
    got = triton_gemm.widen_w4(dev(blob), dev(zp), k, tile=tile).cpu()
    assert torch.equal(got, resident.make(qdata, zp, 4, k, width=8))


def test_fused_resnet_block_matches_the_unfused_steps(monkeypatch):
    """quantkit.fuse (its GroupNorm fusion) on a diffusers ResnetBlock2D (W8A8 resident convolutions, a
    float 1x1 shortcut): the block's output equals the unfused steps (GroupNorm, SiLU, the reference convolution, the
    time embedding) up to the rare one-code differences of the fused quantization; unfuse restores the block's own
    forward; with QUANTKIT_FUSE_GROUPNORM=0 it is left alone."""
    from diffusers.models.resnet import ResnetBlock2D

    from quantkit.formats import ActFormat, LayerScheme
    from quantkit.nn import fuse, quantize_module, unfuse
    from quantkit.nn.modules import _QuantMixin

    monkeypatch.setattr(_QuantMixin, "_resident_here", staticmethod(lambda w: w.device.type == DEV))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the float shortcut in full fp32 on a GPU too
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=64, out_channels=96, temb_channels=32, groups=8, eps=1e-5).eval()
    x, temb = torch.randn(1, 64, 4, 32) * 2, torch.randn(1, 32)  # rows of 32: tiles the copy-engine kernel takes
    with torch.no_grad():
        u1 = torch.nn.functional.silu(block.norm1(x))
        h = block.conv1(u1) + block.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None]
        u2 = torch.nn.functional.silu(block.norm2(h))
    w8a8 = LayerScheme(WeightFormat(8), ActFormat(8))
    for name, u in (("conv1", u1), ("conv2", u2)):  # the 1x1 shortcut stays float (it is not on the fused path)
        rng = (float(u.min()), float(u.max()))
        setattr(block, name, quantize_module(getattr(block, name), w8a8, act_range=rng))
    with torch.no_grad():
        want = block(x, temb)  # unfused, canonical codes on the CPU: GroupNorm, SiLU, the exact integer convolutions
        block.to(DEV)  # compacts the convolutions (resident here)
        assert block.conv1.weight_packed.dtype == torch.int8
        monkeypatch.setenv("QUANTKIT_FUSE_GROUPNORM", "0")
        assert fuse(block) == 0  # switched off
        monkeypatch.delenv("QUANTKIT_FUSE_GROUPNORM")  # on by default
        assert fuse(block) == 1
        got = block(x.to(DEV), temb.to(DEV)).cpu()
    err = (got - want).abs()
    assert float(err.max()) < 0.05 * float(want.abs().max()) and float((err > 1e-4).float().mean()) < 0.02
    unfuse(block)
    assert "forward" not in block.__dict__


def test_fused_transformer_input_matches_the_unfused_steps(monkeypatch):
    """quantkit.fuse (its GroupNorm fusion) on a diffusers Transformer2DModel with a linear proj_in (W8A8,
    resident): GroupNorm, the permute to tokens and proj_in's quantization as one quantizer feeding the resident
    linear give the model's unfused output up to the rare one-code differences; unfuse restores the method."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from quantkit.formats import ActFormat, LayerScheme
    from quantkit.nn import fuse, quantize_module, unfuse
    from quantkit.nn.modules import _QuantMixin

    monkeypatch.setattr(_QuantMixin, "_resident_here", staticmethod(lambda w: w.device.type == DEV))
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=64, norm_num_groups=8,
                               cross_attention_dim=48, use_linear_projection=True).eval()
    x, enc = torch.randn(1, 64, 4, 32) * 2 + 1, torch.randn(1, 7, 48)
    with torch.no_grad():
        normed = model.norm(x)
        model.proj_in = quantize_module(model.proj_in, LayerScheme(WeightFormat(8), ActFormat(8)),
                                        act_range=(float(normed.min()), float(normed.max())))
        want = model(x, encoder_hidden_states=enc).sample  # unfused, canonical codes on the CPU
        model.to(DEV)  # compacts proj_in (resident here)
        assert model.proj_in.weight_packed.dtype == torch.int8
        monkeypatch.delenv("QUANTKIT_FUSE_GROUPNORM", raising=False)  # on by default
        assert fuse(model) == 1
        got = model(x.to(DEV), encoder_hidden_states=enc.to(DEV)).sample.cpu()
    err = (got - want).abs()
    assert float(err.max()) < 0.05 * float(want.abs().max()) and float((err > 1e-3).float().mean()) < 0.02
    unfuse(model)
    assert "_operate_on_continuous_inputs" not in model.__dict__


def test_pad_codes_border_is_the_code_of_zero():
    xq = torch.randint(-128, 127, (2, 3, 4, 16), dtype=torch.int8)
    zp = torch.tensor([100, 131], dtype=torch.int32)
    xp = triton_gemm.pad_codes(xq, zp, 1, 2)
    assert xp.shape == (2, 5, 8, 16)
    assert torch.equal(xp[:, 1:4, 2:6], xq)
    border = torch.ones(5, 8, dtype=torch.bool)
    border[1:4, 2:6] = False
    assert (xp[0][border] == -28).all() and (xp[1][border] == 3).all()
    assert triton_gemm.pad_codes(xq, zp, 0, 0) is xq


def _gelu_erf_from_double(gate: torch.Tensor) -> torch.Tensor:
    """fp32 gelu with erf evaluated in double and rounded to fp32 (what the interpreter's erf does; CUDA's erff,
    used by the kernel on a GPU and by PyTorch's gelu there, is checked against PyTorch directly)."""
    import math

    t = gate.float() * 0.7071067811865476
    e = torch.tensor([math.erf(v) for v in t.double().flatten().tolist()], dtype=torch.float32).view_as(t)
    return (gate.float() * 0.5) * (1.0 + e)


# bf16 on the GPU only: Triton's interpreter casts fp32 -> bf16 by truncation, not round-to-nearest-even.
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_geglu_quant_equals_unfused_gelu_multiply_and_quantization(dtype):
    """Fused GEGLU gating + static activation quantization against the unfused steps: rows and columns past the
    tiles (37 x 300), negative / zero / large gates, values past the quantization range (clamped codes)."""
    g = torch.Generator().manual_seed(3)
    m, h = 37, 300
    p = torch.randn(m, 2 * h, generator=g) * 2
    p[0, h:h + 40] = 0.0
    p[1, :20], p[1, h:h + 20] = 40.0, 3.0  # 40 * gelu(3) clamps at the top code
    p[3, :20], p[3, h:h + 20] = -40.0, 3.0  # and at the bottom one
    p[2, h:] = torch.linspace(-9, 9, h)
    p = p.to(dtype)
    s, zp = reference.act_qparams_from_range(torch.tensor(-1.5), torch.tensor(4.0), 8)
    s, zp = s.reshape(1).to(dtype), zp.reshape(1).to(torch.int32)  # a module moved with .to(dtype) casts its scale
    hid, gate = p[:, :h], p[:, h:]
    if DEV == "cuda":
        gelu = torch.nn.functional.gelu(gate.to(DEV)).cpu()
    else:
        gelu = _gelu_erf_from_double(gate).to(dtype)
    y = (hid.float() * gelu.float()).to(dtype)
    want = (reference.quantize_act(y, s, zp, 8).to(torch.int32) - 128).to(torch.int8)
    got = triton_gemm.geglu_quant(p.to(DEV), s.to(DEV), zp.to(DEV), 8).cpu()
    assert got.shape == (m, h) and got.dtype == torch.int8
    assert torch.equal(got, want)
    assert (want == 127).any() and (want == -128).any() and (p[0, h:h + 40] == 0).all()


def test_fused_geglu_feedforward_equals_unfused(monkeypatch):
    """quantkit.fuse on a diffusers FeedForward (GEGLU, W8A8 resident output linear): the fused forward gives the
    unfused block's output bit for bit (on the CPU interpreter, against the unfused steps with the interpreter's
    erf); unfuse restores the block's own forward; blocks it cannot take are left alone."""
    from diffusers.models.attention import FeedForward

    from quantkit.formats import ActFormat, LayerScheme
    from quantkit.nn import fuse, quantize_module, unfuse
    from quantkit.nn.modules import _QuantMixin

    monkeypatch.setattr(_QuantMixin, "_resident_here", staticmethod(lambda w: w.device.type == DEV))
    dtype = torch.float16 if DEV == "cuda" else torch.float32
    torch.manual_seed(0)
    ff = FeedForward(64, mult=2, activation_fn="geglu").eval()
    plain = FeedForward(64, mult=2, activation_fn="gelu").eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        gated = ff.net[0](x)
    rng = (float(gated.min()), float(gated.max()))
    ff.net[2] = quantize_module(ff.net[2], LayerScheme(WeightFormat(8), ActFormat(8)), act_range=rng)
    plain.net[2] = quantize_module(plain.net[2], LayerScheme(WeightFormat(8), ActFormat(8)), act_range=(-1.0, 4.0))
    model = torch.nn.ModuleList([ff, plain]).to(DEV)  # compacts the quantized linears (resident here)
    if dtype != torch.float32:
        model.to(dtype)
    out = ff.net[2]
    assert out.weight_packed.dtype == torch.int8
    xd = x.to(DEV, dtype)
    with torch.no_grad():
        p = ff.net[0].proj(xd)
        h = p.shape[-1] // 2
        if DEV == "cuda":
            want = ff(xd)
        else:  # the unfused steps, gelu's erf as the interpreter evaluates it
            gelu = _gelu_erf_from_double(p[..., h:]).to(dtype)
            y = (p[..., :h].float() * gelu.float()).to(dtype)
            canonical = resident.expand(out.weight_packed, 8, 2 * 64)
            want = reference.gemm(y, canonical, out.weight_scale, None, out.bias, out.input_scale,
                                  out.input_zero_point, 8, -1, 8)
        assert fuse(model) == 1 and fuse(model) == 0  # the GELU block is not a GEGLU one; fusing twice is a no-op
        got = ff(xd)
        assert torch.equal(got.cpu(), want.cpu())
        unfuse(model)
        assert "forward" not in ff.__dict__

