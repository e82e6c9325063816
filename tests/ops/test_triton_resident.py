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
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
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
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
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
    qdata, scale, zp = _weight(n, k, 4, False)
    x = (torch.randn(m, k) * 2).half()
    a, s, azp = _act(x, True, 8)
    blob = resident.make(qdata, zp, 4, k)
    bias = torch.randn(n).half()
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    got = triton_gemm.resident_linear(dev(a), dev(blob), dev(zp), dev(scale), dev(s), dev(azp), dev(bias), 4,
                                      torch.float16)
    assert torch.equal(got.cpu(), reference.gemm(x, qdata, scale, zp, bias, None, None, 4, -1, 8))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4_swapped_operand_kernel_equals_reference(symmetric, monkeypatch):
    """The 4-bit swapped-operand kernel forced (QUANTKIT_TRITON_W4=swap) through resident_linear, every tile
    config, M from 1 row (tiles mostly past the rows) to several tiles, K not a multiple of the 64-column block."""
    monkeypatch.setenv("QUANTKIT_TRITON_W4", "swap")
    for m, k, n, dynamic in ((1, 208, 72, False), (37, 128, 40, True), (300, 336, 264, True)):
        qdata, scale, zp = _weight(n, k, 4, symmetric, seed=m)
        x = (torch.randn(m, k) * 2).half()
        a, s, azp = _act(x, dynamic, 8)
        blob = resident.make(qdata, zp, 4, k)
        bias = torch.randn(n).half()
        in_s, in_zp = (None, None) if dynamic else (s, azp)
        want = reference.gemm(x, qdata, scale, zp, bias, in_s, in_zp, 4, -1, 8)
        dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
        assert torch.equal(triton_gemm.resident_linear(dev(a), dev(blob), dev(zp), dev(scale), dev(s), dev(azp),
                                                       dev(bias), 4, torch.float16).cpu(), want)
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
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
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
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
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

