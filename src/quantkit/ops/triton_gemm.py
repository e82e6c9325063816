"""Opt-in Hopper int8 GEMM engine of the CUDA integer linears, in Triton (CUDA builds of torch ship it).

Why it exists: ``at::_int_mm`` (cuBLASLt) runs int8 on H100/H200 no faster than fp16 cuBLAS on SDXL shapes, needs
the weights converted to a plain int8 matrix on every call (or a second copy), and writes an int32 product that a
separate epilogue kernel reads back. Triton compiles ``tl.dot`` on int8 tiles to Hopper's ``wgmma``, this kernel
reads the canonical packed weights directly (8-bit codes as bytes, 4-bit codes unpacked in registers), and runs
the epilogue on the accumulator:

    y = T(((float(acc + (128 - zp_m) * wsum_n) * w_scale_n) * s_m) + bias_n)

the reference's fp32 order (``enable_fp_fusion=False`` keeps every multiply and add separately rounded), so the
result equals :func:`quantkit.ops.reference.gemm` bit for bit. ``acc`` is the product of the activation codes as
int8 (q - 128; ``quantkit_cuda::quantize_act_s8``) with the centred weight ``wc = code - zp_w``, ``wsum`` its row
sums, computed in the same pass. One activation-quantization kernel and this GEMM are the whole layer.

Measured on an H200 (docs/results.md): exact, but the in-loop weight conversion keeps the GEMM at 0.28-0.52x of
fp16, slower than cuBLASLt, so it is not the default (``QUANTKIT_CUDA_GEMM=triton`` selects it).

The resident kernels (:func:`resident_linear`, :func:`resident_conv2d`) read the GPU-resident layout of
:mod:`quantkit.ops.resident` instead (what compacting a layer on the GPU makes: centred int8 codes or split
nibbles, row sums in the blob): no conversion for 8-bit weights, the same epilogue, and convolutions as an implicit
GEMM over NHWC codes. They run every compacted layer; on an H200 they took the SDXL W8A8 step from 0.63x to
0.74-0.77x of FP16 (docs/results.md). Resident 8-bit linears with more than 64 rows take
:func:`_resident_tma_kernel` instead (tiles moved by Hopper's copy engine, a persistent grid; the same product and
epilogue): 0.68-1.21x of fp16 cuBLAS per GEMM. Stride-1 8-bit convolutions take :func:`_resident_conv_tma_kernel`
(1.2-2.1x faster than the pointer kernel; the step 0.84x of FP16), and resident 4-bit linears with more than 128
rows :func:`_resident_w4_swap_kernel` (weights as wgmma's register operand; 1.19-1.47x faster GEMMs).
"""

from __future__ import annotations

import functools
import os

import torch

from quantkit.ops import cutlass_gemm

try:  # Triton comes with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None
    tl = None

__all__ = ["available", "int8_linear", "resident_linear", "resident_conv2d"]


@functools.cache
def available() -> bool:
    """Whether the Triton engine can run here: Triton importable and a Hopper (sm_90) or newer GPU (the only cards
    it was built and measured for)."""
    return triton is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# Tiles of the element-wise kernels: (names of the block constexprs, [(block sizes..., num_warps), ...]). The first
# tile is the one measured before tuning and the one taken with QUANTKIT_TRITON_TUNE=0 (tests); tests run every tile.
ELEMENTWISE_TILES = {
    "geglu": (("BM", "BH"), [(32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (8, 512, 4)]),
    "pad": (("BW", "BC"), [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (128, 64, 8), (16, 128, 4)]),
    "widen": (("BR", "NB"), [(16, 8, 4), (32, 8, 4), (16, 16, 8), (32, 16, 8), (8, 8, 4)]),
}


def _launch_elementwise(name: str, kernel, tuned, grid, args: tuple, flags: dict, tile: int | None) -> None:
    """Launch the element-wise kernel ``name``: on tile ``tile`` of :data:`ELEMENTWISE_TILES` (tests), on the first
    where autotuning is off (``QUANTKIT_TRITON_TUNE=0``) or a CUDA graph is being captured (tuning would time
    launches inside the capture), else through ``tuned`` (tuned once per shape)."""
    if (tile is None and os.environ.get("QUANTKIT_TRITON_TUNE", "1") != "0"
            and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
        tuned[grid](*args, **flags)
        return
    names, tiles = ELEMENTWISE_TILES[name]
    *blocks, warps = tiles[tile or 0]
    kernel[grid](*args, **flags, **dict(zip(names, blocks)), num_warps=warps)


if triton is not None:

    def _tile_configs(name: str):
        names, tiles = ELEMENTWISE_TILES[name]
        return [triton.Config(dict(zip(names, tile[:-1])), num_warps=tile[-1]) for tile in tiles]

    def _configs():
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
                for bm, bn, bk, stages, warps in [(128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (64, 128, 128, 4, 4),
                                                  (128, 128, 64, 5, 4)]]

    @triton.jit
    def _tile_offsets(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column offsets of this program's output tile; programs walk GROUP_M row tiles per column
        tile, so consecutive programs share weight tiles in L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        return pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)

    @triton.jit
    def _int8_linear_kernel(a_ptr, w_ptr, wzp_ptr, y_ptr, wscale_ptr, s_ptr, zp_ptr, bias_ptr, M, N, K,
                            stride_am, stride_wn, stride_ym, W_BITS: tl.constexpr, HAS_WZP: tl.constexpr,
                            PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, GROUP_M: tl.constexpr):
        offs_m, offs_n = _tile_offsets(M, N, BM, BN, GROUP_M)
        offs_k = tl.arange(0, BK)
        mmask = offs_m < M
        nmask = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        if W_BITS == 8:  # the packed int32 words read as bytes: code k of row n at byte n * stride_wn + k
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
            wzp = 128
        else:  # int32 words of eight 4-bit codes along K
            offs_kw = tl.arange(0, BK // 8)
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :]
            if HAS_WZP:
                wzp = tl.load(wzp_ptr + offs_n, mask=nmask, other=0).to(tl.int32)[:, None]
            else:
                wzp = 8
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        wsum = tl.zeros((BN,), dtype=tl.int32)
        for k0 in range(0, K, BK):
            kmask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0)
            if W_BITS == 8:
                codes = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=128).to(tl.int32)
                w_ptrs += BK
            else:
                kwmask = offs_kw < (K - k0 + 7) // 8
                words = tl.load(w_ptrs, mask=nmask[:, None] & kwmask[None, :], other=0)
                w_ptrs += BK // 8
                c0 = words & 15
                c1 = (words >> 4) & 15
                c2 = (words >> 8) & 15
                c3 = (words >> 12) & 15
                c4 = (words >> 16) & 15
                c5 = (words >> 20) & 15
                c6 = (words >> 24) & 15
                c7 = (words >> 28) & 15
                # code t of word kw -> column 8 * kw + t: nested joins interleave (0,4),(2,6) | (1,5),(3,7)
                codes = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
                codes = tl.reshape(codes, (BN, BK))
            wc = tl.where(nmask[:, None] & kmask[None, :], codes - wzp, 0)
            wsum += tl.sum(wc, axis=1)
            acc = tl.dot(a, tl.trans(wc.to(tl.int8)), acc, out_dtype=tl.int32)
            a_ptrs += BK
        wscale = tl.load(wscale_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if PER_ROW:
            zc = 128 - tl.load(zp_ptr + offs_m, mask=mmask, other=0).to(tl.int32)
            s = tl.load(s_ptr + offs_m, mask=mmask, other=0.0).to(tl.float32)
            t = acc + zc[:, None] * wsum[None, :]
            y = (t.to(tl.float32) * wscale[None, :]) * s[:, None]
        else:
            zc = 128 - tl.load(zp_ptr).to(tl.int32)
            s = tl.load(s_ptr).to(tl.float32)
            t = acc + zc * wsum[None, :]
            y = (t.to(tl.float32) * wscale[None, :]) * s
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    # Tile shapes are tuned once per (M, N, K, format) on first use; QUANTKIT_TRITON_TUNE=0 takes a fixed tile
    # instead (no benchmarking at first call: tests, or a first call inside CUDA-graph capture).
    _int8_linear_tuned = triton.autotune(configs=_configs(),
                                         key=["M", "N", "K", "W_BITS", "HAS_WZP", "PER_ROW", "HAS_BIAS"])(
        _int8_linear_kernel)


    # ---- resident weights (quantkit.ops.resident): centred int8 / split-nibble 4-bit, row sums in the blob --------

    @triton.jit
    def _act_qparams(zp_ptr, s_ptr, rows, mask, BM: tl.constexpr, PER_ROW: tl.constexpr):
        """Each tile row's activation zero point (int32) and scale (fp32): ``rows`` indexes them when they are
        per row / per sample (dynamic), else the one static pair is broadcast."""
        if PER_ROW:
            zp_row = tl.load(zp_ptr + rows, mask=mask, other=128).to(tl.int32)
            s_row = tl.load(s_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        else:
            zp_row = tl.load(zp_ptr).to(tl.int32) + tl.zeros((BM,), dtype=tl.int32)
            s_row = tl.load(s_ptr).to(tl.float32) + tl.zeros((BM,), dtype=tl.float32)
        return zp_row, s_row

    @triton.jit
    def _epilogue(acc, zp_row, s_row, ws_ptr, stride_ws, wscale_ptr, bias_ptr, offs_n, nmask,
                  HAS_BIAS: tl.constexpr, SWAPPED: tl.constexpr):
        """The float output of an int32 tile, in the reference's fp32 order:
        ``((float(acc + (128 - zp_m) * wsum_n) * w_scale_n) * s_m) + bias_n``. ``acc`` is ``[BM, BN]``, or
        ``[BN, BM]`` with ``SWAPPED`` (weights as the left operand)."""
        wsum = tl.load(ws_ptr + offs_n * stride_ws, mask=nmask, other=0)
        wscale = tl.load(wscale_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if SWAPPED:
            t_ = acc + (128 - zp_row)[None, :] * wsum[:, None]
            y = (t_.to(tl.float32) * wscale[:, None]) * s_row[None, :]
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        else:
            t_ = acc + (128 - zp_row)[:, None] * wsum[None, :]
            y = (t_.to(tl.float32) * wscale[None, :]) * s_row[:, None]
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        return y


    def _resident_configs(bits):
        shapes = ([(128, 128, 64, 4, 4), (128, 128, 128, 4, 8), (128, 256, 64, 3, 8), (128, 256, 64, 4, 8),
                   (256, 128, 64, 3, 8), (64, 128, 64, 4, 4)]
                  if bits == 8 else [(128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4)])
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
                for bm, bn, bk, st, wp in shapes]

    def _prune_small_m(configs, named_args, **kwargs):
        if named_args["M"] > 64:
            return configs
        small = [c for c in configs if c.kwargs["BM"] == 64]
        return small or configs

    def _quick_bench(kernel_call, quantiles):  # tuning cost bounded: every UNet shape is tuned once, at load
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    # Geometry arguments are not specialized (a value of 1 or a multiple of 16 would compile another variant per
    # layer shape); C, K, N and the strides are, for aligned vector loads.
    @triton.jit(do_not_specialize=["M", "H", "W", "HO", "WO", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "TAPS"])
    def _resident_kernel(a_ptr, w_ptr, ws_ptr, wzp_ptr, y_ptr, wscale_ptr, s_ptr, zp_ptr, bias_ptr,
                         M, N, K, stride_am, stride_w, stride_ws, stride_ym,
                         C, H, W, HO, WO, KW, SH, SW, PH, PW, DH, DW, TAPS,
                         W_BITS: tl.constexpr, HAS_WZP: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                         IS_CONV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        offs_m, offs_n = _tile_offsets(M, N, BM, BN, GROUP_M)
        mmask = offs_m < M
        nmask = offs_n < N
        hw = HO * WO
        if IS_CONV:  # rows are output pixels (b, oh, ow); the input is NHWC int8 codes (q - 128)
            bidx = offs_m // hw
            r = offs_m % hw
            ih0 = (r // WO) * SH - PH
            iw0 = (r % WO) * SW - PW
            par = bidx
        else:
            par = offs_m
        zp_row, s_row = _act_qparams(zp_ptr, s_ptr, par, mmask, BM, PER_ROW)
        if HAS_WZP:
            wzp = tl.load(wzp_ptr + offs_n, mask=nmask, other=0).to(tl.int32)[:, None]
        else:
            wzp = 8
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        if W_BITS == 8:
            offs_k = tl.arange(0, BK)
        else:
            offs_k = tl.arange(0, BK // 2)  # one 64-column nibble block per step: two K = 32 halves
        # One flat loop over (tap, channel block) steps (a linear is one tap of K columns), so Triton pipelines it.
        ksteps = tl.cdiv(C, BK) if IS_CONV else tl.cdiv(K, BK)
        cols = C if IS_CONV else K
        if not IS_CONV:
            inside = mmask
            a_row = offs_m * stride_am
        for it in range(0, TAPS * ksteps):
            if IS_CONV:
                t = it // ksteps
                c0 = (it % ksteps) * BK
                ih = ih0 + (t // KW) * DH
                iw = iw0 + (t % KW) * DW
                inside = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_row = ((bidx * H + ih) * W + iw) * C
                pad = (zp_row - 128)[:, None]  # zero padding is the code of 0.0
                kbase = t * C
            else:
                c0 = it * BK
                kbase = 0
            if W_BITS == 8:
                kcol = kbase + c0 + offs_k
                if EVEN_K:  # no column masks: loads stay 16-byte vectors
                    a = tl.load(a_ptr + a_row[:, None] + (c0 + offs_k)[None, :], mask=inside[:, None], other=0)
                    if IS_CONV:
                        a = tl.where(~inside[:, None], pad, a).to(tl.int8)
                    w = tl.load(w_ptr + offs_n[:, None] * stride_w + kcol[None, :], mask=nmask[:, None], other=0)
                else:
                    cmask = (c0 + offs_k) < cols
                    a = tl.load(a_ptr + a_row[:, None] + (c0 + offs_k)[None, :],
                                mask=inside[:, None] & cmask[None, :], other=0)
                    if IS_CONV:
                        a = tl.where((~inside[:, None]) & cmask[None, :], pad, a).to(tl.int8)
                    w = tl.load(w_ptr + offs_n[:, None] * stride_w + kcol[None, :],
                                mask=nmask[:, None] & (kcol < K)[None, :], other=0)
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            else:
                if EVEN_K:
                    cm_lo = offs_k >= 0
                    cm_hi = offs_k >= 0
                else:
                    cm_lo = (c0 + offs_k) < cols
                    cm_hi = (c0 + BK // 2 + offs_k) < cols
                a_lo = tl.load(a_ptr + a_row[:, None] + (c0 + offs_k)[None, :],
                               mask=inside[:, None] & cm_lo[None, :], other=0)
                a_hi = tl.load(a_ptr + a_row[:, None] + (c0 + BK // 2 + offs_k)[None, :],
                               mask=inside[:, None] & cm_hi[None, :], other=0)
                if IS_CONV:
                    a_lo = tl.where((~inside[:, None]) & cm_lo[None, :], pad, a_lo).to(tl.int8)
                    a_hi = tl.where((~inside[:, None]) & cm_hi[None, :], pad, a_hi).to(tl.int8)
                kbyte = (kbase + c0) // 2 + offs_k
                b = tl.load(w_ptr + offs_n[:, None] * stride_w + kbyte[None, :],
                            mask=nmask[:, None] & cm_lo[None, :], other=0).to(tl.int32) & 0xFF
                lo = tl.where(cm_lo[None, :], (b & 15) - wzp, 0).to(tl.int8)
                hi = tl.where(cm_hi[None, :], (b >> 4) - wzp, 0).to(tl.int8)
                acc = tl.dot(a_lo, tl.trans(lo), acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, tl.trans(hi), acc, out_dtype=tl.int32)
        y = _epilogue(acc, zp_row, s_row, ws_ptr, stride_ws, wscale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS, False)
        if IS_CONV:  # NCHW output: pixels of one channel are contiguous
            y_ptrs = y_ptr + (bidx * N * hw + r)[:, None] + offs_n[None, :] * hw
        else:
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    _RESIDENT_KEY = ["M", "N", "K", "C", "TAPS", "W_BITS", "HAS_WZP", "PER_ROW", "HAS_BIAS", "IS_CONV"]
    # EVEN_K: every step's columns are inside the layer (K, or C for a convolution, a multiple of BK).
    _resident_heur = triton.heuristics(
        {"EVEN_K": lambda a: (a["C"] if a["IS_CONV"] else a["K"]) % a["BK"] == 0})(_resident_kernel)
    _resident_tuned = {bits: triton.autotune(configs=_resident_configs(bits), key=_RESIDENT_KEY,
                                             prune_configs_by={"early_config_prune": _prune_small_m},
                                             do_bench=_quick_bench)(_resident_heur) for bits in (8, 4)}


    # ---- resident linears through the copy engine (TMA): persistent, tile loads by tensor descriptors ----------

    @triton.jit
    def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
        group = GROUP_M * num_n
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (tile % group) % size_m, (tile % group) // size_m

    @triton.jit
    def _resident_tma_kernel(a_desc, w_desc, y_desc, ws_ptr, wzp_ptr, wscale_ptr, s_ptr, zp_ptr, bias_ptr, M, N, K,
                             stride_ws, W_BITS: tl.constexpr, HAS_WZP: tl.constexpr, PER_ROW: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, EPI_SPLIT: tl.constexpr):
        """The resident linear of :func:`_resident_kernel` (same product, same epilogue, bit for bit) with every
        tile moved by the copy engine: ``a_desc`` the activation codes ``[M, K]``, ``w_desc`` the blob's weight
        bytes ``[N, Kp]`` (8-bit) or ``[N, Kp / 2]`` (4-bit), ``y_desc`` the output ``[M, N]``; out-of-range rows and
        columns read as zero and are not written. A persistent grid of ``NUM_SMS`` programs walks the output tiles;
        the tile loop and the K loop are one flattened, software-pipelined loop, so the next tile's loads overlap
        this tile's epilogue."""
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        ksteps = tl.cdiv(K, BK)
        tile_c = start - NUM_SMS  # a second counter for the epilogue (Triton's pipeliner wants them separate)
        for tile in tl.range(start, num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            for ki in range(ksteps):
                if W_BITS == 8:
                    a = a_desc.load([pid_m * BM, ki * BK])
                    w = w_desc.load([pid_n * BN, ki * BK])
                    acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
                else:  # one 64-column nibble block per BK = 64 step: low nibbles columns 0..31, high 32..63
                    a_lo = a_desc.load([pid_m * BM, ki * BK])
                    a_hi = a_desc.load([pid_m * BM, ki * BK + BK // 2])
                    b = w_desc.load([pid_n * BN, ki * (BK // 2)]).to(tl.int32) & 0xFF
                    offs_n = pid_n * BN + tl.arange(0, BN)
                    if HAS_WZP:
                        wzp = tl.load(wzp_ptr + offs_n, mask=offs_n < N, other=0).to(tl.int32)[:, None]
                    else:
                        wzp = 8
                    lo = ((b & 15) - wzp).to(tl.int8)
                    hi = ((b >> 4) - wzp).to(tl.int8)
                    # columns past K: activations read as zero, so whatever the weight holds there adds nothing
                    acc = tl.dot(a_lo, lo.T, acc, out_dtype=tl.int32)
                    acc = tl.dot(a_hi, hi.T, acc, out_dtype=tl.int32)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile_of(tile_c, num_m, num_n, GROUP_M)
            offs_m = pid_m * BM + tl.arange(0, BM)
            offs_n = pid_n * BN + tl.arange(0, BN)
            mmask = offs_m < M
            nmask = offs_n < N
            zp_row, s_row = _act_qparams(zp_ptr, s_ptr, offs_m, mmask, BM, PER_ROW)
            y = _epilogue(acc, zp_row, s_row, ws_ptr, stride_ws, wscale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS,
                          False)
            y = y.to(y_desc.dtype)
            if EPI_SPLIT:  # two half-width stores: half the epilogue's shared memory, one more pipeline stage
                y0, y1 = tl.split(tl.permute(tl.reshape(y, (BM, 2, BN // 2)), (0, 2, 1)))
                y_desc.store([pid_m * BM, pid_n * BN], y0)
                y_desc.store([pid_m * BM, pid_n * BN + BN // 2], y1)
            else:
                y_desc.store([pid_m * BM, pid_n * BN], y)

    def _tma_configs(bits):
        # small-grid shapes (M = 1024 by N = 1280 is 80 tiles of 128 x 128 for 132 SMs) want the 64-wide tiles
        shapes = ([(128, 128, 128, 4, 8, False), (128, 256, 128, 3, 8, True), (128, 128, 64, 5, 4, False),
                   (128, 256, 64, 4, 8, True), (256, 128, 64, 4, 8, True), (128, 128, 128, 3, 4, True),
                   (64, 128, 128, 4, 4, False), (128, 64, 128, 4, 4, False)]
                  if bits == 8 else [(128, 128, 64, 4, 8, False), (128, 256, 64, 3, 8, True),
                                     (128, 128, 64, 5, 4, True)])
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "EPI_SPLIT": split}, num_stages=st,
                              num_warps=wp, pre_hook=_set_blocks)
                for bm, bn, bk, st, wp, split in shapes]

    def _set_blocks(nargs):
        """Tile shapes of the descriptors for the config being launched (autotuning tries several)."""
        bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
        nargs["a_desc"].block_shape = [bm, bk if nargs["W_BITS"] == 8 else bk // 2]
        nargs["w_desc"].block_shape = [bn, bk if nargs["W_BITS"] == 8 else bk // 2]
        nargs["y_desc"].block_shape = [bm, bn // 2 if nargs["EPI_SPLIT"] else bn]

    @triton.jit
    def _resident_conv_tma_kernel(a_desc, w_desc, y_desc, ws_ptr, wscale_ptr, s_ptr, zp_ptr, bias_ptr, M, N, C,
                                  HO, WO, HP, WP, KW, TAPS, stride_ws, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                                  NUM_SMS: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr):
        """The resident 8-bit convolution (stride 1, dilation 1) of :func:`_resident_kernel`, with every tile moved
        by the copy engine. ``a_desc`` views the *padded* NHWC codes as ``[B * HP, WP, C]`` (the border holds the
        code of 0.0, so no masks) in boxes of ``[ROWS, BW, BK]``: a tile of BM = ROWS * BW output pixels is either a
        run of BW pixels of one output row (ROWS = 1, ``WO % BM == 0``) or ROWS whole rows (BW = WO), and its
        activations for one tap are one box. ``w_desc``: the blob's weight bytes ``[N, Kp]`` in (ky, kx, c) column
        order; ``y_desc``: the NCHW output as ``[B * N, HO * WO]``, written transposed. Channel blocks past C read
        zero activations, so the next tap's weights they meet add nothing. Same product and epilogue as the pointer
        kernel, bit for bit."""
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        cb = tl.cdiv(C, BK)
        hw = HO * WO
        tile_c = start - NUM_SMS
        for tile in tl.range(start, num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            m0 = pid_m * BM
            b = m0 // hw
            oh = (m0 % hw) // WO
            ow0 = m0 % WO
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            for it in range(TAPS * cb):
                t = it // cb
                c0 = (it % cb) * BK
                a = tl.reshape(a_desc.load([b * HP + oh + t // KW, ow0 + t % KW, c0]), (BM, BK))
                w = w_desc.load([pid_n * BN, t * C + c0])
                acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile_of(tile_c, num_m, num_n, GROUP_M)
            m0 = pid_m * BM
            b = m0 // hw
            offs_n = pid_n * BN + tl.arange(0, BN)
            nmask = offs_n < N
            sample = b + tl.zeros((BM,), dtype=tl.int32)  # per-sample qparams: the whole tile is one image
            zp_row, s_row = _act_qparams(zp_ptr, s_ptr, sample, sample >= 0, BM, PER_ROW)
            y = _epilogue(acc, zp_row, s_row, ws_ptr, stride_ws, wscale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS,
                          False)
            y_desc.store([b * N + pid_n * BN, m0 % hw], tl.trans(y.to(y_desc.dtype)))

    def _conv_tma_configs():
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp,
                              pre_hook=_set_conv_blocks)
                for bm, bn, bk, st, wp in [(128, 128, 64, 4, 4), (128, 128, 128, 4, 8), (128, 64, 64, 5, 4),
                                           (64, 128, 64, 5, 4), (128, 256, 64, 3, 8), (64, 64, 64, 5, 4)]]

    def _conv_box(bm: int, wo: int) -> tuple[int, int]:
        """``(ROWS, BW)`` of a BM-pixel tile for output rows WO wide."""
        bw = min(bm, wo)
        return bm // bw, bw

    def _set_conv_blocks(nargs):
        rows, bw = _conv_box(nargs["BM"], nargs["WO"])
        nargs["a_desc"].block_shape = [rows, bw, nargs["BK"]]
        nargs["w_desc"].block_shape = [nargs["BN"], nargs["BK"]]
        nargs["y_desc"].block_shape = [nargs["BN"], nargs["BM"]]

    def _conv_tma_fits(cfg, b: int, n: int, ho: int, wo: int) -> bool:
        """A tile is a run of one output row or whole rows of one image (a box of the padded codes), and (several
        images) the transposed store stays in its image."""
        bm = cfg.kwargs["BM"]
        rows_ok = wo % bm == 0 or (bm % wo == 0 and ho % (bm // wo) == 0)
        return rows_ok and (b == 1 or n % cfg.kwargs["BN"] == 0)

    def _prune_conv(configs, named_args, **kwargs):
        b = named_args["M"] // (named_args["HO"] * named_args["WO"])
        return [c for c in configs if _conv_tma_fits(c, b, named_args["N"], named_args["HO"], named_args["WO"])]

    _conv_heur = triton.heuristics({"ROWS": lambda a: _conv_box(a["BM"], a["WO"])[0],
                                    "BW": lambda a: _conv_box(a["BM"], a["WO"])[1]})(_resident_conv_tma_kernel)
    _resident_conv_tma_tuned = triton.autotune(
        configs=_conv_tma_configs(), key=["M", "N", "C", "HO", "WO", "TAPS", "PER_ROW", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_conv}, do_bench=_quick_bench)(_conv_heur)

    @triton.jit
    def _resident_w4_swap_kernel(a_desc, w_desc, y_desc, ws_ptr, wzp_ptr, wscale_ptr, s_ptr, zp_ptr, bias_ptr, M, N,
                                 K, stride_ws, HAS_WZP: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 BM: tl.constexpr, BN: tl.constexpr, NUM_SMS: tl.constexpr):
        """The resident 4-bit linear with the operands swapped: ``y^T = W a^T``. The unpacked weight tile is the
        left operand, which Hopper's wgmma takes from registers, so the nibbles go from the copy engine's tile to
        the tensor cores without the trip back through shared memory that the right operand needs (the cost of the
        4-bit kernels above); the activation codes are the right operand, from shared memory. Each 64-column
        nibble block is two K = 32 products (low nibbles: columns 0..31, high: 32..63). Same integer product and
        the same epilogue, element by element, as :func:`_resident_kernel` (tile transposed: ``[BN, BM]``)."""
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        ksteps = tl.cdiv(K, 64)
        tile_c = start - NUM_SMS
        for tile in tl.range(start, num_m * num_n, NUM_SMS, flatten=True):
            pid_n, pid_m = _tile_of(tile, num_n, num_m, 8)  # weight-row tiles grouped: activations reused in L2
            acc = tl.zeros((BN, BM), dtype=tl.int32)
            for ki in range(ksteps):
                b = w_desc.load([pid_n * BN, ki * 32]).to(tl.int32) & 0xFF
                if HAS_WZP:
                    offs_n = pid_n * BN + tl.arange(0, BN)
                    wzp = tl.load(wzp_ptr + offs_n, mask=offs_n < N, other=0).to(tl.int32)[:, None]
                else:
                    wzp = 8
                lo = ((b & 15) - wzp).to(tl.int8)
                hi = ((b >> 4) - wzp).to(tl.int8)
                a_lo = a_desc.load([pid_m * BM, ki * 64])
                a_hi = a_desc.load([pid_m * BM, ki * 64 + 32])
                # columns past K: activations read as zero, so whatever the weight holds there adds nothing
                acc = tl.dot(lo, a_lo.T, acc, out_dtype=tl.int32)
                acc = tl.dot(hi, a_hi.T, acc, out_dtype=tl.int32)
            tile_c += NUM_SMS
            pid_n, pid_m = _tile_of(tile_c, num_n, num_m, 8)
            offs_m = pid_m * BM + tl.arange(0, BM)
            offs_n = pid_n * BN + tl.arange(0, BN)
            mmask = offs_m < M
            nmask = offs_n < N
            zp_row, s_row = _act_qparams(zp_ptr, s_ptr, offs_m, mmask, BM, PER_ROW)
            y = _epilogue(acc, zp_row, s_row, ws_ptr, stride_ws, wscale_ptr, bias_ptr, offs_n, nmask, HAS_BIAS,
                          True)
            y_desc.store([pid_m * BM, pid_n * BN], tl.trans(y.to(y_desc.dtype)))

    def _swap_configs():
        return [triton.Config({"BM": bm, "BN": bn}, num_stages=st, num_warps=wp, pre_hook=_set_swap_blocks)
                for bm, bn, st, wp in [(128, 128, 4, 4), (64, 128, 4, 4), (128, 128, 3, 8), (256, 128, 3, 8),
                                       (32, 128, 4, 4)]]

    def _set_swap_blocks(nargs):
        nargs["a_desc"].block_shape = [nargs["BM"], 32]
        nargs["w_desc"].block_shape = [nargs["BN"], 32]
        nargs["y_desc"].block_shape = [nargs["BM"], nargs["BN"]]

    _resident_w4_swap_tuned = triton.autotune(configs=_swap_configs(), key=["M", "N", "K", "HAS_WZP", "PER_ROW",
                                                                             "HAS_BIAS"],
                                              do_bench=_quick_bench)(_resident_w4_swap_kernel)

    _TMA_KEY = ["M", "N", "K", "W_BITS", "HAS_WZP", "PER_ROW", "HAS_BIAS"]
    _resident_tma_tuned = {bits: triton.autotune(configs=_tma_configs(bits), key=_TMA_KEY, do_bench=_quick_bench)(
        _resident_tma_kernel) for bits in (8, 4)}

    @triton.jit
    def _static_codes(v, s_ptr, zp_ptr, QMAX: tl.constexpr):
        """int8 codes (q - 128) of fp32 ``v`` by the reference quantizer, ``clamp(round(v / s) + zp, 0, QMAX)``:
        IEEE division, round half to even through 1.5 * 2**23 (exact for |v / s| <= 512; larger values clamp
        anyway), the scale read as fp32 whatever its dtype (``module.to(torch.float16)`` casts it)."""
        t = tl.minimum(tl.maximum(tl.math.div_rn(v, tl.load(s_ptr).to(tl.float32)), -512.0), 512.0)
        r = (t + 12582912.0) - 12582912.0
        code = tl.minimum(tl.maximum(r + tl.load(zp_ptr).to(tl.float32), 0.0), QMAX)
        return (code.to(tl.int32) - 128).to(tl.int8)

    @triton.jit
    def _geglu_quant_kernel(p_ptr, q_ptr, s_ptr, zp_ptr, M, H, stride_p, QMAX: tl.constexpr, BM: tl.constexpr,
                            BH: tl.constexpr):
        """int8 codes (q - 128) of ``p[:, :H] * gelu(p[:, H:])`` under one static scale, each step rounded as
        PyTorch's CUDA kernels round it: gelu in fp32 (``x * 0.5 * (1 + erf(x / sqrt(2)))``) rounded to p's dtype,
        the product in fp32 rounded to p's dtype, then the reference quantizer (``round(v / s) + zp``, clamped)."""
        dt = p_ptr.dtype.element_ty
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        mask = (rows[:, None] < M) & (cols[None, :] < H)
        base = p_ptr + rows[:, None].to(tl.int64) * stride_p + cols[None, :]
        hid = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(base + H, mask=mask, other=0.0).to(tl.float32)
        gelu = ((gate * 0.5) * (1.0 + tl.math.erf(gate * 0.7071067811865476))).to(dt)
        v = (hid * gelu.to(tl.float32)).to(dt).to(tl.float32)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], _static_codes(v, s_ptr, zp_ptr, QMAX),
                 mask=mask)

    @triton.jit
    def _quant_pad_nhwc_kernel(x_ptr, q_ptr, s_ptr, zp_ptr, stats_ptr, gamma_ptr, beta_ptr, C, H, W, PH, PW, HP, WP,
                               CPG, G, QMAX: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, BW: tl.constexpr,
                               BC: tl.constexpr):
        """Padded NHWC int8 codes (q - 128) ``[B, H + 2 PH, W + 2 PW, C]`` of NCHW ``x`` under one static scale, the
        border holding the code of 0.0: one program per padded row and tile of (column, channel). With NORM, of
        ``group_norm(x)`` instead, and with SILU of ``silu(group_norm(x))`` (:func:`quantize_pad_nhwc`; ``stats``
        holds each (sample, group)'s mean and 1 / std), each step rounded to x's dtype as PyTorch's CUDA kernels
        round it: the norm as ``x * a + b`` with ``a = rstd * gamma``, ``b = beta - a * mean`` in fp32, then
        ``y / (1 + exp(-y))``."""
        row = tl.program_id(0)  # b * HP + hp
        b, hp = row // HP, row % HP
        wp = tl.program_id(1) * BW + tl.arange(0, BW)
        cc = tl.program_id(2) * BC + tl.arange(0, BC)
        h, w = hp - PH, wp - PW
        inside = ((h >= 0) & (h < H) & (w >= 0) & (w < W))[:, None] & (cc[None, :] < C)
        src = x_ptr + ((b * C + cc[None, :]).to(tl.int64) * H + h) * W + w[:, None]
        x = tl.load(src, mask=inside, other=0.0)
        v = x.to(tl.float32)
        if NORM:
            cmask = cc < C
            sg = (b * G + cc // CPG) * 2
            mean = tl.load(stats_ptr + sg, mask=cmask, other=0.0)
            rstd = tl.load(stats_ptr + sg + 1, mask=cmask, other=0.0)
            a = rstd * tl.load(gamma_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
            bb = tl.load(beta_ptr + cc, mask=cmask, other=0.0).to(tl.float32) - a * mean
            y = tl.fma(v, a[None, :], bb[None, :]).to(x.dtype).to(tl.float32)
            if SILU:
                y = tl.math.div_rn(y, 1.0 + tl.exp(-y)).to(x.dtype).to(tl.float32)
            v = tl.where(inside, y, 0.0)  # the border is the convolution's zero padding of the normalized input
        dst = q_ptr + (row.to(tl.int64) * WP + wp[:, None]) * C + cc[None, :]
        tl.store(dst, _static_codes(v, s_ptr, zp_ptr, QMAX), mask=(wp[:, None] < WP) & (cc[None, :] < C))

    @triton.jit
    def _gn_partial_kernel(x_ptr, part_ptr, L, CHUNK, S, BLOCK: tl.constexpr):
        """Partial sums of one chunk of one (sample, group)'s span of NCHW ``x`` (contiguous: ``L`` values), shifted
        by the span's first value against cancellation: ``sum(v - x0)``, ``sum((v - x0)^2)`` in fp32."""
        gid = tl.program_id(0)
        base = x_ptr + gid.to(tl.int64) * L
        shift = tl.load(base).to(tl.float32)
        start = tl.program_id(1) * CHUNK
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            off = i + tl.arange(0, BLOCK)
            m = (off < CHUNK) & (start + off < L)
            d = tl.where(m, tl.load(base + start + off, mask=m, other=0.0).to(tl.float32) - shift, 0.0)
            acc += d
            acc2 += d * d
        out = part_ptr + (gid * S + tl.program_id(1)) * 2
        tl.store(out, tl.sum(acc, axis=0))
        tl.store(out + 1, tl.sum(acc2, axis=0))

    @triton.jit
    def _gn_finalize_kernel(x_ptr, part_ptr, stats_ptr, L, S, eps, BS: tl.constexpr):
        """One (sample, group)'s mean and ``1 / sqrt(var + eps)`` (biased variance, as GroupNorm) from the partial
        sums of :func:`_gn_partial_kernel`."""
        gid = tl.program_id(0)
        k = tl.arange(0, BS)
        part = part_ptr + (gid * S + k) * 2
        s1 = tl.sum(tl.load(part, mask=k < S, other=0.0), axis=0)
        s2 = tl.sum(tl.load(part + 1, mask=k < S, other=0.0), axis=0)
        n = L * 1.0  # fp32 (L may arrive as the constant 1, which Triton specializes)
        dm = tl.math.div_rn(s1, n)
        var = tl.maximum(tl.math.div_rn(s2, n) - dm * dm, 0.0)
        shift = tl.load(x_ptr + gid.to(tl.int64) * L).to(tl.float32)
        tl.store(stats_ptr + gid * 2, shift + dm)
        tl.store(stats_ptr + gid * 2 + 1, tl.math.div_rn(1.0, tl.sqrt_rn(var + eps)))

    @triton.jit
    def _widen_w4_kernel(src_ptr, zp_ptr, dst_ptr, N, K, HALF, stride_src, stride_dst, HAS_WZP: tl.constexpr,
                         BR: tl.constexpr, NB: tl.constexpr):
        """A 4-bit nibble blob's rows as the 8-bit layout of ``code - zp`` (:func:`widen_w4`): byte ``j`` of a
        64-column block holds column ``j`` (low nibble) and ``32 + j`` (high); padding columns (``>= K``) get 0;
        the program of the first block tile also copies the row's 16-byte tail (the row sums are the same in both
        forms). A program takes BR rows x NB blocks, as [BR, NB, 32] tiles (contiguous 32-byte runs)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        blk = tl.program_id(1) * NB + tl.arange(0, NB)
        j = tl.arange(0, 32)
        rmask = rows < N
        r64 = rows[:, None, None].to(tl.int64)
        mask = rmask[:, None, None] & (blk[None, :, None] < HALF // 32) & (j[None, None, :] < 32)
        src = src_ptr + r64 * stride_src + blk[None, :, None] * 32 + j[None, None, :]
        byte = tl.load(src, mask=mask, other=0).to(tl.int32) & 0xFF
        if HAS_WZP:
            zp = tl.load(zp_ptr + rows, mask=rmask, other=0).to(tl.int32)[:, None, None]
        else:
            zp = 8
        col = blk[None, :, None] * 64 + j[None, None, :]
        out = dst_ptr + r64 * stride_dst + col
        tl.store(out, tl.where(col < K, (byte & 15) - zp, 0).to(tl.int8), mask=mask)
        tl.store(out + 32, tl.where(col + 32 < K, (byte >> 4) - zp, 0).to(tl.int8), mask=mask)
        if tl.program_id(1) == 0:
            t = tl.arange(0, 16)
            r2 = rows[:, None].to(tl.int64)
            tail = tl.load(src_ptr + r2 * stride_src + HALF + t[None, :], mask=rmask[:, None], other=0)
            tl.store(dst_ptr + r2 * stride_dst + 2 * HALF + t[None, :], tail, mask=rmask[:, None])

    # The element-wise kernels' tiles are tuned too, once per shape, over ELEMENTWISE_TILES (the output does not
    # depend on the tile: each element is computed alone). On an H200 the fixed first tiles ran at 25-40 % of HBM
    # bandwidth in the SDXL step (quantize_pad_nhwc 1.2 ms in 59 calls, geglu_quant 1.0 ms in 70, widen_w4 2.5 ms
    # in 560); larger tiles may do better, unmeasured so far.
    _geglu_quant_tuned = triton.autotune(configs=_tile_configs("geglu"), key=["M", "H"], do_bench=_quick_bench)(
        _geglu_quant_kernel)
    _quant_pad_nhwc_tuned = triton.autotune(configs=_tile_configs("pad"), key=["C", "H", "W", "PH", "PW", "NORM",
                                                                             "SILU"], do_bench=_quick_bench)(
        _quant_pad_nhwc_kernel)
    _widen_w4_tuned = triton.autotune(configs=_tile_configs("widen"), key=["N", "K", "HAS_WZP"],
                                      do_bench=_quick_bench)(_widen_w4_kernel)

@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(t: torch.Tensor) -> int:
    """Programs of a persistent kernel on ``t``'s device: one per SM; under Triton's CPU interpreter (tests) a few,
    each walking several tiles."""
    if not t.is_cuda:
        return 3
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _tma_aligned(m: int, n: int, k: int, a: torch.Tensor, y_dtype: torch.dtype) -> bool:
    """Every row of codes, weights and output 16-byte aligned (descriptor rule: K % 16 for the codes, N * itemsize
    % 16 for the output; blob rows are multiples of 16 bytes by construction)."""
    return (m > 0 and k % 16 == 0 and (n * y_dtype.itemsize) % 16 == 0
            and a.stride(1) == 1 and a.stride(0) == k and a.data_ptr() % 16 == 0)


def tma_supported(m: int, n: int, k: int, a: torch.Tensor, y_dtype: torch.dtype, w_bits: int = 8) -> bool:
    """Whether a resident linear takes the copy-engine kernel: 8-bit weights, rows enough to fill 128-row tiles
    (else the pointer kernel's 64-row tiles waste less), and aligned rows (:func:`_tma_aligned`).

    4-bit weights stay off it: on an H200 the copy-engine variant (exact, and still testable through
    :func:`_launch_resident_tma`) was slower on all 7 SDXL shapes (0.19-0.53x of fp16 vs 0.30-0.62x), since its
    nibbles are unpacked in registers and written back to shared memory before the tensor cores read them
    (:func:`_resident_w4_swap_kernel`, which avoids that trip, takes them above 128 rows; with
    ``QUANTKIT_TRITON_W4=expand`` they are widened to 8 bits first, :func:`w4_expand_selected`).
    ``QUANTKIT_TRITON_TMA=0`` turns the kernel off (side-by-side benchmarks)."""
    if os.environ.get("QUANTKIT_TRITON_TMA", "1") == "0" or w_bits != 8:
        return False
    return m > 64 and _tma_aligned(m, n, k, a, y_dtype)


def conv_tma_supported(xq: torch.Tensor, n: int, w_bits: int, kernel_size, stride, padding, dilation, ho: int,
                       wo: int, y_dtype: torch.dtype) -> bool:
    """Whether a resident convolution takes :func:`_resident_conv_tma_kernel`: 8-bit weights, stride 1, dilation 1,
    C % 16 == 0 and output planes 16-byte aligned (descriptor rules), and a tile config that fits the output
    (tiles are runs of one row or whole rows; the store stays inside one image). The default where it applies
    (``QUANTKIT_TRITON_CONV_TMA=0`` turns it off): on an H200 it was 1.2-2.1x faster than the pointer kernel on
    every SDXL convolution it takes, and the W8A8 SDXL step went from 32.80 to 31.54 ms
    (``benchmarks/results/kernels-cuda-conv-tma.json``, ``unet-cuda-conv-tma.json``)."""
    b, _, _, c = xq.shape
    return xq.is_contiguous() and _conv_tma_shape_ok(b, c, n, w_bits, stride, dilation, ho, wo, y_dtype)


def _conv_tma_shape_ok(b: int, c: int, n: int, w_bits: int, stride, dilation, ho: int, wo: int,
                       y_dtype: torch.dtype) -> bool:
    if os.environ.get("QUANTKIT_TRITON_CONV_TMA", "1") == "0" or w_bits != 8:
        return False
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or c % 16 or (ho * wo * y_dtype.itemsize) % 16:
        return False
    return any(_conv_tma_fits(cfg, b, n, ho, wo) for cfg in _conv_tma_configs())


def pad_codes(xq: torch.Tensor, zp: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """NHWC int8 codes (q - 128) with a border of ``ph`` rows and ``pw`` columns holding the code of 0.0
    (``zp - 128``; ``zp`` one entry, or one per sample): what zero padding of the float input quantizes to.
    Two passes, no host synchronisation (CUDA-graph safe)."""
    if ph == 0 and pw == 0:
        return xq
    b, h, w, c = xq.shape
    xp = torch.empty((b, h + 2 * ph, w + 2 * pw, c), dtype=xq.dtype, device=xq.device)
    fill = (zp.to(torch.int32) - 128).to(xq.dtype).view(-1, 1, 1, 1)
    xp.copy_(fill.expand(b, h + 2 * ph, w + 2 * pw, c))
    xp[:, ph:ph + h, pw:pw + w].copy_(xq)
    return xp


def quantize_pad_nhwc(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, ph: int, pw: int,
                      bits: int = 8, norm: tuple | None = None, silu: bool = True, tile: int | None = None
                      ) -> torch.Tensor:
    """:func:`pad_codes` of the NHWC codes of NCHW ``x`` under one static ``scale`` / ``zero_point``, in one pass
    (the CUDA quantizer's NCHW -> NHWC codes and the two copies of :func:`pad_codes`, fused). ``norm``: a
    ``(groups, eps, weight, bias)`` GroupNorm applied first, followed by SiLU unless ``silu`` is False
    (:func:`groupnorm_silu_stats` computes its statistics). With no border the codes are token-major
    ``[B, H, W, C]``: a linear's input rows. ``tile``: see :func:`_launch_elementwise`."""
    b, c, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    out = torch.empty((b, hp, wp, c), dtype=torch.int8, device=x.device)
    if out.numel():
        if norm is not None:
            groups, eps, gamma, beta = norm
            stats, cpg = groupnorm_silu_stats(x, groups, eps), c // groups
        else:
            groups, gamma, beta, stats, cpg = 1, x, x, x, 1
        grid = lambda meta: (b * hp, triton.cdiv(wp, meta["BW"]), triton.cdiv(c, meta["BC"]))  # noqa: E731
        _launch_elementwise("pad", _quant_pad_nhwc_kernel, _quant_pad_nhwc_tuned, grid,
                            (x, out, scale, zero_point, stats, gamma, beta, c, h, w, ph, pw, hp, wp, cpg, groups),
                            dict(QMAX=float((1 << bits) - 1), NORM=norm is not None, SILU=norm is not None and silu,
                                 enable_fp_fusion=False), tile)
    return out


def groupnorm_silu_stats(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """fp32 ``[B * groups, 2]``: each (sample, group)'s mean and ``1 / sqrt(var + eps)`` of contiguous NCHW ``x``,
    from partial sums over chunks of each group's span (enough programs to fill the GPU where a group is large)."""
    b, c = x.shape[:2]
    span = (c // groups) * x.shape[2] * x.shape[3]
    block = 1024
    chunks = max(1, min(64, triton.cdiv(span, 4 * block)))
    chunk = triton.cdiv(triton.cdiv(span, chunks), block) * block
    chunks = triton.cdiv(span, chunk)
    part = torch.empty((b * groups, chunks, 2), dtype=torch.float32, device=x.device)
    stats = torch.empty((b * groups, 2), dtype=torch.float32, device=x.device)
    _gn_partial_kernel[(b * groups, chunks)](x, part, span, chunk, chunks, BLOCK=block, num_warps=4,
                                             enable_fp_fusion=False)
    _gn_finalize_kernel[(b * groups,)](x, part, stats, span, chunks, float(eps),
                                       BS=max(2, triton.next_power_of_2(chunks)), num_warps=1, enable_fp_fusion=False)
    return stats


def conv_quant_fused_selected() -> bool:
    """Whether resident convolutions on the copy-engine kernel with static activations quantize straight into the
    padded codes (:func:`quantize_pad_nhwc`): the default, ``QUANTKIT_TRITON_CONV_QUANT=0`` turns it off. On an
    H100's SDXL step its 48 calls took 0.73 ms where the CUDA quantizer and the two copies of :func:`pad_codes` took
    about 1.4 ms (``benchmarks/results/unet-cuda-h100-fused.json`` vs ``unet-cuda-h100-default.json``)."""
    return os.environ.get("QUANTKIT_TRITON_CONV_QUANT", "1") != "0"


def resident_conv2d_float(x: torch.Tensor, blob: torch.Tensor, w_zero_point: torch.Tensor | None,
                          w_scale: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, bias: torch.Tensor | None,
                          w_bits: int, kernel_size, stride, padding, dilation, norm: tuple | None = None
                          ) -> torch.Tensor | None:
    """:func:`resident_conv2d` of float NCHW ``x`` with a static activation scale, quantized by
    :func:`quantize_pad_nhwc` for the copy-engine convolution (of ``silu(group_norm(x))`` with ``norm``, see
    there); None where that kernel does not apply (the caller quantizes and calls :func:`resident_conv2d`)."""
    b_, c, h, w = x.shape
    kh, kw = kernel_size
    ph, pw = padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    n = blob.shape[0]
    widen = w_bits == 4 and w4_expand_selected()
    if (not x.is_contiguous() or blob.data_ptr() % 16 or blob.stride(1) != 1 or b_ * ho * wo == 0
            or not _conv_tma_shape_ok(b_, c, n, 8 if widen else w_bits, stride, dilation, ho, wo, x.dtype)):
        return None
    if widen:
        blob, w_zero_point, w_bits = widen_w4(blob, w_zero_point, c * kh * kw), None, 8
    y = torch.empty((b_, n, ho, wo), device=x.device, dtype=x.dtype)
    ws, _ = _resident_args(blob, w_zero_point, w_scale, w_bits, c * kh * kw)
    _conv_tma_into(y, quantize_pad_nhwc(x, s, zp, ph, pw, 8, norm), blob, ws, w_scale, s, zp, bias, kernel_size)
    return y


def _conv_tma_into(y, xp, blob, ws, w_scale, s, zp, bias, kernel_size) -> None:
    """The copy-engine convolution of bordered NHWC codes ``xp`` into the NCHW output ``y``."""
    _, n, ho, wo = y.shape
    flags = dict(PER_ROW=s.numel() > 1, HAS_BIAS=bias is not None, enable_fp_fusion=False)
    _launch_conv_tma(xp, blob, ws, w_scale, s, zp, bias if bias is not None else w_scale, y, n, xp.shape[3], ho, wo,
                     *kernel_size, flags)


def _launch_conv_tma(xp, blob, ws, w_scale, s, zp, bias, y, n, c, ho, wo, kh, kw, flags, config=None):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from quantkit.ops import resident

    b, hp, wp, _ = xp.shape
    m = b * ho * wo
    cols = resident.row_bytes(8, c * kh * kw) - resident.TAIL
    a_desc = TensorDescriptor(xp, [b * hp, wp, c], [wp * c, c, 1], [1, 128, 64])
    w_desc = TensorDescriptor(blob, [n, cols], [blob.stride(0), 1], [128, 64])
    y_desc = TensorDescriptor(y, [b * n, ho * wo], [ho * wo, 1], [128, 128])
    nsm = _persistent_programs(xp)
    args = (a_desc, w_desc, y_desc, ws, w_scale, s, zp, bias, m, n, c, ho, wo, hp, wp, kw, kh * kw, ws.stride(0))
    grid = lambda meta: (min(nsm, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)  # noqa: E731
    if config is not None or os.environ.get("QUANTKIT_TRITON_TUNE", "1") == "0":
        cfg = config or next(c_ for c_ in _conv_tma_configs() if _conv_tma_fits(c_, b, n, ho, wo))
        _set_conv_blocks({"a_desc": a_desc, "w_desc": w_desc, "y_desc": y_desc, "WO": wo, **cfg.kwargs})
        rows, bw = _conv_box(cfg.kwargs["BM"], wo)
        _resident_conv_tma_kernel[grid](*args, **flags, **cfg.kwargs, NUM_SMS=nsm, ROWS=rows, BW=bw,
                                        num_stages=cfg.num_stages, num_warps=cfg.num_warps)
    else:
        _resident_conv_tma_tuned[grid](*args, **flags, NUM_SMS=nsm)


def w4_expand_selected() -> bool:
    """Whether resident 4-bit layers that the 8-bit copy-engine kernels can take (linears of more than 64 rows,
    stride-1 convolutions) are widened per call into a transient 8-bit blob (:func:`widen_w4`, one pass over the
    weights) and run on those kernels. The default (``QUANTKIT_TRITON_W4`` unset or ``expand``); ``=auto`` keeps
    them on the 4-bit kernels (:func:`w4_swap_selected`), as ``=swap`` / ``=pointer`` do. On an H100 the W4A8 SDXL
    step took 33.72 ms this way against 43.17 ms on the 4-bit kernels (the widening itself 3.2 ms of it); the
    transient blob is one layer's weights at one byte each (``benchmarks/results/unet-cuda-h100-w4a8-expand.json``)."""
    return os.environ.get("QUANTKIT_TRITON_W4", "expand") == "expand"


def widen_w4(blob: torch.Tensor, w_zero_point: torch.Tensor | None, k: int, tile: int | None = None) -> torch.Tensor:
    """The 8-bit-wide resident blob (``resident.make(..., width=8)``, bit for bit) of a 4-bit nibble blob with
    ``k`` GEMM columns; ``w_zero_point`` uint8 ``[N, 1]`` or None (symmetric: 8); ``tile``: see
    :func:`_launch_elementwise`."""
    from quantkit.ops import resident

    n = blob.shape[0]
    half = resident.row_bytes(4, k) - resident.TAIL
    out = torch.empty((n, resident.row_bytes(8, k)), dtype=torch.int8, device=blob.device)
    if n:
        zp = w_zero_point.reshape(-1) if w_zero_point is not None else blob
        grid = lambda meta: (triton.cdiv(n, meta["BR"]), triton.cdiv(half // 32, meta["NB"]))  # noqa: E731
        _launch_elementwise("widen", _widen_w4_kernel, _widen_w4_tuned, grid,
                            (blob, zp, out, n, k, half, blob.stride(0), out.stride(0)),
                            dict(HAS_WZP=w_zero_point is not None), tile)
    return out


def widen_s4(blob: torch.Tensor, k: int) -> torch.Tensor:
    """The 8-bit-wide resident blob (``resident.make(..., width=8)``, bit for bit) of a signed-nibble blob
    (``resident.make(..., signed=True)``), in plain PyTorch: the rare calls the CUTLASS int4 GEMM does not take
    (dynamic activations, ``K % 32 != 0``)."""
    from quantkit.ops import resident

    half = resident.row_bytes(4, k) - resident.TAIL
    data = blob[:, :half].to(torch.int16) & 0xFF
    cols = torch.stack([((data & 15) ^ 8) - 8, ((data >> 4) ^ 8) - 8], dim=2).reshape(blob.shape[0], -1)
    return torch.cat([cols.to(torch.int8), blob[:, half:half + resident.TAIL]], dim=1).contiguous()


def w4_swap_selected(m: int) -> bool:
    """Whether a resident 4-bit linear of ``m`` rows takes :func:`_resident_w4_swap_kernel` (the unpacked weights
    stay in registers as wgmma's left operand). Default: more than 128 rows, where it beat the pointer kernel on
    every SDXL shape on an H200 (GEMM 1.19-1.47x faster at 1024-4096 rows; the W4A8 step 46.28 -> 44.44 ms),
    while at 1-77 rows it was 0.87-1.17x as fast (the layers :func:`w4_expand_selected` leaves on the 4-bit kernels,
    or all of them with ``QUANTKIT_TRITON_W4=auto``). ``=swap`` forces it for every size, ``=pointer`` turns it
    off."""
    choice = os.environ.get("QUANTKIT_TRITON_W4", "")
    return choice == "swap" or (choice != "pointer" and m > 128)


def _launch_persistent(kernel, tuned, configs, set_blocks, descs: dict, grid, args: tuple, flags: dict, nsm: int,
                       config=None) -> None:
    """Launch a persistent copy-engine kernel on ``nsm`` programs: with ``config`` (tests), or the first of
    ``configs()`` where autotuning is off (``QUANTKIT_TRITON_TUNE=0``), after ``set_blocks`` gives the tensor
    descriptors ``descs`` that config's block shapes; else through the autotuned ``tuned`` (whose pre-hook does)."""
    if config is not None or os.environ.get("QUANTKIT_TRITON_TUNE", "1") == "0":
        cfg = config or configs()[0]
        set_blocks({**descs, **flags, **cfg.kwargs})
        kernel[grid](*args, **flags, **cfg.kwargs, NUM_SMS=nsm, num_stages=cfg.num_stages, num_warps=cfg.num_warps)
    else:
        tuned[grid](*args, **flags, NUM_SMS=nsm)


def _launch_w4_swap(a, blob, ws, wzp, y, w_scale, s, zp, bias, m, n, k, flags, config=None):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from quantkit.ops import resident

    cols = resident.row_bytes(4, k) - resident.TAIL
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [128, 32])
    w_desc = TensorDescriptor(blob, [n, cols], [blob.stride(0), 1], [128, 32])
    y_desc = TensorDescriptor(y, [m, n], [n, 1], [128, 128])
    nsm = _persistent_programs(a)
    args = (a_desc, w_desc, y_desc, ws, wzp, w_scale, s, zp, bias, m, n, k, ws.stride(0))
    grid = lambda meta: (min(nsm, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)  # noqa: E731
    _launch_persistent(_resident_w4_swap_kernel, _resident_w4_swap_tuned, _swap_configs, _set_swap_blocks,
                       {"a_desc": a_desc, "w_desc": w_desc, "y_desc": y_desc}, grid, args, flags, nsm, config)


def _launch_resident_tma(a, blob, ws, wzp, y, w_scale, s, zp, bias, m, n, k, w_bits, flags, config=None):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from quantkit.ops import resident

    cols = resident.row_bytes(w_bits, k) - resident.TAIL  # Kp (8-bit) or Kp / 2 (4-bit) weight bytes per row
    # Block shapes are placeholders: the config's pre-hook sets them before each launch.
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [128, 64])
    w_desc = TensorDescriptor(blob, [n, cols], [blob.stride(0), 1], [128, 64])
    y_desc = TensorDescriptor(y, [m, n], [n, 1], [128, 128])
    nsm = _persistent_programs(a)
    args = (a_desc, w_desc, y_desc, ws, wzp, w_scale, s, zp, bias, m, n, k, ws.stride(0))
    grid = lambda meta: (min(nsm, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)  # noqa: E731
    _launch_persistent(_resident_tma_kernel, _resident_tma_tuned[w_bits], lambda: _tma_configs(w_bits), _set_blocks,
                       {"a_desc": a_desc, "w_desc": w_desc, "y_desc": y_desc}, grid, args, flags, nsm, config)


def _launch_resident(m, n, args, flags):
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    if os.environ.get("QUANTKIT_TRITON_TUNE", "1") == "0":
        bm = 128 if m > 64 else 64
        _resident_heur[grid](*args, **flags, BM=bm, BN=128, BK=64, GROUP_M=8, num_stages=4, num_warps=4)
    else:
        _resident_tuned[flags["W_BITS"]][grid](*args, **flags)


def _resident_args(blob, w_zero_point, w_scale, bits, k):
    from quantkit.ops import resident

    body = resident.row_bytes(bits, k) - resident.TAIL
    ws = blob.view(torch.int32)[:, body // 4]  # the row sums, a strided view into the tail
    wzp = w_zero_point if w_zero_point is not None else w_scale
    return ws, wzp


def resident_linear(a: torch.Tensor, blob: torch.Tensor, w_zero_point: torch.Tensor | None, w_scale: torch.Tensor,
                    s: torch.Tensor, zp: torch.Tensor, bias: torch.Tensor | None, w_bits: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """``y [M, N]`` of int8 activation codes ``a [M, K]`` (q - 128, unit stride along K) and a resident blob
    (:mod:`quantkit.ops.resident`); other arguments as :func:`int8_linear`. Exact against the reference."""
    from quantkit.ops import resident

    m, k = a.shape
    n = blob.shape[0]
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0:
        return y
    weight = blob  # the layer's own blob (a widened one is made per call)
    if w_bits == 4 and resident.layout_of(blob, 4, k) == "s4":  # signed nibbles (QUANTKIT_RESIDENT_W4=cutlass)
        if cutlass_gemm.w4_supported(m, n, k, a, blob, s, out_dtype):
            ws, _ = _resident_args(blob, None, w_scale, 4, k)
            cutlass_gemm.linear_w4(a, blob, ws, w_scale, s, zp, bias, y, m, n, k)
            return y
        blob, w_zero_point, w_bits = widen_s4(blob, k), None, 8  # any other call: the 8-bit kernels, exactly
    if w_bits == 4 and w4_expand_selected() and tma_supported(m, n, k, a, out_dtype, 8):
        blob, w_zero_point, w_bits = widen_w4(blob, w_zero_point, k), None, 8
    ws, wzp = _resident_args(blob, w_zero_point, w_scale, w_bits, k)
    blob_ok = blob.data_ptr() % 16 == 0 and blob.stride(1) == 1  # descriptor base and row rules (compact makes it so)
    if (w_bits == 8 and blob_ok and blob.stride(0) % 16 == 0 and cutlass_gemm.supported(m, n, k, a, s, out_dtype)
            and cutlass_gemm.selected()):  # Hopper: the CUTLASS GEMM where its library is there, same output
        cutlass_gemm.linear(a, blob, ws, w_scale, s, zp, bias, y, m, n, k, weight)
        return y
    if w_bits == 4 and blob_ok and w4_swap_selected(m) and _tma_aligned(m, n, k, a, out_dtype):
        flags = dict(HAS_WZP=w_zero_point is not None, PER_ROW=s.numel() > 1, HAS_BIAS=bias is not None,
                     enable_fp_fusion=False)
        _launch_w4_swap(a, blob, ws, wzp, y, w_scale, s, zp, bias if bias is not None else w_scale, m, n, k, flags)
        return y
    if blob_ok and tma_supported(m, n, k, a, out_dtype, w_bits):
        flags = dict(W_BITS=w_bits, HAS_WZP=w_zero_point is not None, PER_ROW=s.numel() > 1,
                     HAS_BIAS=bias is not None, enable_fp_fusion=False)
        _launch_resident_tma(a, blob, ws, wzp, y, w_scale, s, zp, bias if bias is not None else w_scale, m, n, k,
                             w_bits, flags)
        return y
    args = (a, blob, ws, wzp, y, w_scale, s, zp, bias if bias is not None else w_scale, m, n, k, a.stride(0),
            blob.stride(0), ws.stride(0), y.stride(0), 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1)
    flags = dict(W_BITS=w_bits, HAS_WZP=w_zero_point is not None, PER_ROW=s.numel() > 1,
                 HAS_BIAS=bias is not None, IS_CONV=False, enable_fp_fusion=False)
    _launch_resident(m, n, args, flags)
    return y


def resident_conv2d(xq: torch.Tensor, blob: torch.Tensor, w_zero_point: torch.Tensor | None, w_scale: torch.Tensor,
                    s: torch.Tensor, zp: torch.Tensor, bias: torch.Tensor | None, w_bits: int, kernel_size, stride,
                    padding, dilation, out_dtype: torch.dtype) -> torch.Tensor:
    """NCHW ``y`` of a convolution (groups = 1) of NHWC int8 codes ``xq [B, H, W, C]`` (q - 128) with a resident
    blob in (ky, kx, c) column order, as an implicit GEMM (no im2col buffer). ``s`` / ``zp``: one entry, or one
    per sample (dynamic). Exact against the reference."""
    b_, h, w, c = xq.shape
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n = blob.shape[0]
    k = c * kh * kw
    y = torch.empty((b_, n, ho, wo), device=xq.device, dtype=out_dtype)
    m = b_ * ho * wo
    if m == 0 or n == 0:
        return y
    if (w_bits == 4 and w4_expand_selected()
            and conv_tma_supported(xq, n, 8, kernel_size, stride, padding, dilation, ho, wo, out_dtype)):
        blob, w_zero_point, w_bits = widen_w4(blob, w_zero_point, k), None, 8
    ws, wzp = _resident_args(blob, w_zero_point, w_scale, w_bits, k)
    if (blob.data_ptr() % 16 == 0 and blob.stride(1) == 1
            and conv_tma_supported(xq, n, w_bits, kernel_size, stride, padding, dilation, ho, wo, out_dtype)):
        _conv_tma_into(y, pad_codes(xq, zp, ph, pw), blob, ws, w_scale, s, zp, bias, kernel_size)
        return y
    args = (xq, blob, ws, wzp, y, w_scale, s, zp, bias if bias is not None else w_scale, m, n, k, 0,
            blob.stride(0), ws.stride(0), 0, c, h, w, ho, wo, kw, sh, sw, ph, pw, dh, dw, kh * kw)
    flags = dict(W_BITS=w_bits, HAS_WZP=w_zero_point is not None, PER_ROW=s.numel() > 1,
                 HAS_BIAS=bias is not None, IS_CONV=True, enable_fp_fusion=False)
    _launch_resident(m, n, args, flags)
    return y


def geglu_quant(p: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int = 8,
                tile: int | None = None) -> torch.Tensor:
    """int8 codes (q - 128) ``[M, H]`` of diffusers' GEGLU gating of ``p [M, 2H]`` (the projection's output:
    ``p[:, :H] * gelu(p[:, H:])``) quantized with a static per-tensor ``scale`` / ``zero_point``, in one pass: bit
    for bit what the unfused GELU, multiply and activation quantization give on CUDA (each rounded to ``p``'s
    dtype as PyTorch does), without writing the gated activations. Inner stride 1. ``tile``: see
    :func:`_launch_elementwise`."""
    m, two_h = p.shape
    h = two_h // 2
    if two_h % 2 or p.stride(1) != 1:
        raise ValueError("geglu_quant takes a row-major [M, 2H] projection output")
    out = torch.empty((m, h), dtype=torch.int8, device=p.device)
    if m and h:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(h, meta["BH"]))  # noqa: E731
        _launch_elementwise("geglu", _geglu_quant_kernel, _geglu_quant_tuned, grid,
                            (p, out, scale, zero_point, m, h, p.stride(0)),
                            dict(QMAX=float((1 << bits) - 1), enable_fp_fusion=False), tile)
    return out


def int8_linear(a: torch.Tensor, qdata: torch.Tensor, w_zero_point: torch.Tensor | None, w_scale: torch.Tensor,
                s: torch.Tensor, zp: torch.Tensor, bias: torch.Tensor | None, w_bits: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``y [M, N]`` of int8 activation codes ``a [M, K]`` (q - 128, row-major) and a canonical packed weight.

    ``qdata`` int32 ``[N, words]`` of 8-bit symmetric (zero point 128) or 4-bit codes (zero point 8, or
    ``w_zero_point`` uint8 ``[N, 1]``); ``w_scale`` fp16 ``[N, 1]``; ``s`` / ``zp`` the activation scale (float)
    and zero point (integer) with one entry, or one per row (dynamic); ``bias`` any float dtype ``[N]`` or None.
    """
    m, k = a.shape
    n = qdata.shape[0]
    if w_bits not in (4, 8) or (w_bits == 8 and w_zero_point is not None):
        raise ValueError("the Triton int8 engine takes symmetric 8-bit or 4-bit weights")
    w = qdata.view(torch.uint8) if w_bits == 8 else qdata
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    args = (a, w, w_zero_point if w_zero_point is not None else w_scale, y, w_scale, s, zp,
            bias if bias is not None else w_scale, m, n, k, a.stride(0), w.stride(0), y.stride(0))
    flags = dict(W_BITS=w_bits, HAS_WZP=w_zero_point is not None, PER_ROW=s.numel() > 1,  # one row: forms agree
                 HAS_BIAS=bias is not None, enable_fp_fusion=False)
    if os.environ.get("QUANTKIT_TRITON_TUNE", "1") == "0":
        bm = 128 if m > 64 else 64
        _int8_linear_kernel[grid](*args, **flags, BM=bm, BN=128, BK=128, GROUP_M=8, num_stages=4,
                                  num_warps=8 if bm == 128 else 4)
    else:
        _int8_linear_tuned[grid](*args, **flags)
    return y
