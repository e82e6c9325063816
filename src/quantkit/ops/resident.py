"""The GPU-resident weight layout of the integer layers (what :func:`quantkit.compact` makes of a CUDA layer).

The canonical packed words (:mod:`quantkit.formats.pack`) are the stored form; converting them to the int8 matrix
that the tensor cores multiply on every call costs a pass over the weights per layer call. A *resident* layer holds
instead, in the same number of bytes (plus 16 per row), the form the Triton kernels of
:mod:`quantkit.ops.triton_gemm` read directly:

* GEMM columns: a Linear's in-features in order; a Conv2d's in the implicit-GEMM order ``(ky, kx, c)`` (the
  canonical order is ``(c, ky, kx)``), so a tile of consecutive columns is a run of channels of one tap of an
  NHWC input.
* ``Kp = roundup(K, 64)`` columns; padding columns hold zero (the kernels mask the activations beyond K).
* 8-bit symmetric weights: one int8 per column, the centred value ``code - 128`` (the same byte XOR 0x80).
* 4-bit weights (symmetric, or asymmetric with one zero point per row): two codes per byte, raw (``0..15``). In each
  block of 64 columns, byte ``j`` (0..31) holds column ``j`` in its low nibble and column ``32 + j`` in its high
  nibble, so a kernel unpacks a block into two K = 32 halves with one mask and one shift (no shuffles).
* 4-bit weights may instead be held *widened* (``QUANTKIT_RESIDENT_W4=conv8`` does it for convolutions): the 8-bit
  form above with the centred values ``code - zp`` (within [-15, 15]), read by the 8-bit kernels as a symmetric
  8-bit weight. The integer products are the same, so the output is too (bit for bit); the blob takes twice the
  4-bit bytes, and the 8-bit kernels (the copy-engine convolution) run on it. A blob's width shows in its shape:
  ``row_bytes(8, k)`` bytes per row for a 4-bit weight means widened.
* Symmetric 4-bit linears may instead be held as *signed nibbles* (``QUANTKIT_RESIDENT_W4=cutlass``): ``code - 8``
  as two's-complement int4 (the nibble is ``code ^ 8``), column ``2j`` in the low nibble of byte ``j`` and
  ``2j + 1`` in the high one: the operand CUTLASS's int4 x int8 GEMM reads (:mod:`quantkit.ops.cutlass_gemm`).
  Their tail is 32 bytes instead of 16, which tells the layouts apart by shape (:func:`layout_of`).
* Then 16 bytes of tail: the row sum of the centred weights ``sum_k (code_k - zp)`` as a little-endian int32 (the
  zero-point term of the exact integer product), 12 zero bytes.

The blob is a ``torch.int8`` tensor ``[N, row_bytes]``, a dtype no other form of ``weight_packed`` has (canonical:
int32; the CPU kernels' compact form: uint8). Everything here is plain PyTorch, exact and reversible
(:func:`expand` gives back the canonical words bit for bit) and runs on any device.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from quantkit.formats.pack import pack, unpack

logger = logging.getLogger("quantkit")

__all__ = ["BLOCK", "TAIL", "row_bytes", "s4_row_bytes", "layout_supported", "compact_bits", "held_width",
           "held_signed", "width_of", "layout_of", "kernel_format", "make", "expand", "row_sums", "body"]

BLOCK = 64  # columns per 4-bit nibble block, and the padding unit of K
TAIL = 16  # bytes after each row's body: int32 row sum + 12 zero bytes


def _kp(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def row_bytes(bits: int, k: int) -> int:
    """Bytes per row of the resident blob of a ``bits``-bit weight with ``k`` GEMM columns."""
    return (_kp(k) if bits == 8 else _kp(k) // 2) + TAIL


def s4_row_bytes(k: int) -> int:
    """Bytes per row of a signed-nibble blob (a symmetric 4-bit linear held for CUTLASS) with ``k`` columns."""
    return _kp(k) // 2 + 2 * TAIL


def layout_supported(bits: int, symmetric: bool, per_channel: bool, conv_shape=None, width: int | None = None
                     ) -> bool:
    """Whether a weight format has a resident form of ``width`` bits per code (default ``bits``; 8 for a widened
    4-bit weight): 8-bit symmetric or 4-bit (zero point per row), one scale per row; convolutions with at least 32
    input channels, a multiple of 64 for the 4-bit nibble layout (a nibble block never spans two taps)."""
    width = bits if width is None else width
    if not per_channel or not (bits == 4 or (bits == 8 and symmetric)) or width not in (bits, 8):
        return False
    if conv_shape is not None:
        c = conv_shape[0]
        return c >= 32 and (width == 8 or c % BLOCK == 0)
    return True


@functools.cache
def _warn_mode(mode: str) -> None:
    logger.warning("quantkit: QUANTKIT_RESIDENT_W4=%s is not a mode (choose 1: resident 4-bit layout, the default; "
                   "conv8: as 1 with 4-bit convolutions widened to int8; cutlass: as 1 with symmetric 4-bit linears "
                   "as signed nibbles for the CUTLASS int4 x int8 GEMM; 0: 4-bit layers stay canonical); using 1",
                   mode)


def _w4_mode() -> str:
    mode = os.environ.get("QUANTKIT_RESIDENT_W4", "1")
    if mode not in ("0", "1", "conv8", "cutlass"):
        _warn_mode(mode)
        return "1"
    return mode


def held_width(bits: int, conv: bool) -> int | None:
    """The code width (8 or 4) of the resident form :func:`quantkit.compact` gives a ``bits``-bit layer on a GPU, or
    None where it stays canonical: 8-bit layers always; 4-bit ones as nibbles (``QUANTKIT_RESIDENT_W4=1``, the
    default), or with ``=conv8`` nibbles for linears and convolutions widened to int8 (twice their 4-bit bytes; the
    8-bit copy-engine convolution runs on them without a per-call widening); ``=0`` keeps them canonical.
    On an H100 (SDXL step, docs/results.md) W4A8 took 33.72 ms with the nibbles widened per call
    (:func:`quantkit.ops.triton_gemm.w4_expand_selected`, the default), 37.45 ms with conv8 alone and 43.17 ms on the
    4-bit kernels; with the fusions, 28.28 ms (nibbles) vs 27.89 ms (conv8, +164 MiB peak)."""
    if bits == 8:
        return 8
    mode = _w4_mode()
    if bits != 4 or mode == "0":
        return None
    return 8 if conv and mode == "conv8" else 4


def held_signed(bits: int, conv: bool, symmetric: bool) -> bool:
    """Whether :func:`quantkit.compact` holds a layer as signed nibbles: symmetric 4-bit linears under
    ``QUANTKIT_RESIDENT_W4=cutlass`` where the CUTLASS library can run (:func:`quantkit.ops.cutlass_gemm.usable`;
    elsewhere the nibble layout). Opt-in, not yet measured on a GPU."""
    if not (bits == 4 and not conv and symmetric and _w4_mode() == "cutlass"):
        return False
    from quantkit.ops import cutlass_gemm

    return cutlass_gemm.usable()


def compact_bits() -> tuple[int, ...]:
    """Weight bits that :func:`quantkit.compact` puts in a resident layout on a GPU (:func:`held_width`)."""
    return (8,) if _w4_mode() == "0" else (8, 4)


def width_of(blob: torch.Tensor, bits: int, k: int) -> int:
    """The code width of a resident blob of a ``bits``-bit weight with ``k`` columns: 8 for 8-bit and widened
    4-bit blobs, else 4."""
    return 8 if bits == 8 or blob.shape[1] == row_bytes(8, k) else 4


def layout_of(blob: torch.Tensor, bits: int, k: int) -> str:
    """A resident blob's layout: ``"int8"`` (8-bit and widened 4-bit blobs), ``"nibbles"`` or ``"s4"`` (signed
    nibbles in column order)."""
    if bits == 8 or blob.shape[1] == row_bytes(8, k):
        return "int8"
    return "s4" if blob.shape[1] == s4_row_bytes(k) else "nibbles"


def kernel_format(blob: torch.Tensor, bits: int, w_zero_point, k: int):
    """``(w_bits, w_zero_point)`` for the resident kernels: a widened 4-bit blob is read as a symmetric 8-bit one
    (its values are already centred, its row sums already hold the zero points)."""
    return (8, None) if width_of(blob, bits, k) != bits else (bits, w_zero_point)


def _gemm_order(codes: torch.Tensor, conv_shape) -> torch.Tensor:
    """Canonical columns (c, ky, kx) -> GEMM columns (ky, kx, c); linears unchanged."""
    if conv_shape is None:
        return codes
    c, kh, kw = conv_shape
    return codes.view(-1, c, kh, kw).permute(0, 2, 3, 1).reshape(codes.shape[0], -1)


def _canonical_order(cols: torch.Tensor, conv_shape) -> torch.Tensor:
    if conv_shape is None:
        return cols
    c, kh, kw = conv_shape
    return cols.view(-1, kh, kw, c).permute(0, 3, 1, 2).reshape(cols.shape[0], -1)


def _zero_points(bits: int, w_zero_point: torch.Tensor | None, n: int):
    return 128 if bits == 8 else (8 if w_zero_point is None else w_zero_point.to(torch.int32).reshape(n, 1))


def make(qdata: torch.Tensor, w_zero_point: torch.Tensor | None, bits: int, k: int, conv_shape=None,
         width: int | None = None, signed: bool = False) -> torch.Tensor:
    """The resident blob (int8 ``[N, row_bytes(width, k)]``) of canonical packed words ``qdata`` (int32
    ``[N, words]``), on ``qdata``'s device. ``conv_shape`` = ``(C, kh, kw)`` for a Conv2d weight; ``width=8`` widens
    a 4-bit weight (default: ``bits``); ``signed`` gives a symmetric 4-bit linear's signed nibbles
    (``[N, s4_row_bytes(k)]``)."""
    width = bits if width is None else width
    if bits not in (4, 8) or (bits == 8 and w_zero_point is not None) or width not in (bits, 8):
        raise ValueError("the resident layout takes 8-bit symmetric or 4-bit weights (4-bit ones 4 or 8 bits wide)")
    if signed and (bits != 4 or width != 4 or w_zero_point is not None or conv_shape is not None):
        raise ValueError("signed nibbles hold symmetric 4-bit linear weights only")
    codes = _gemm_order(unpack(qdata, bits, k), conv_shape).to(torch.int32)  # [N, K] in GEMM order
    n = codes.shape[0]
    zp = _zero_points(bits, w_zero_point, n)
    wsum = (codes - zp).sum(dim=1, dtype=torch.int32)
    kp = _kp(k)
    padded = torch.zeros(n, kp, dtype=torch.int32, device=qdata.device)
    if width == 8:
        padded[:, :k] = codes - zp
        data = padded.to(torch.int8)
    elif signed:
        padded[:, :k] = codes ^ 8  # two's-complement int4 of code - 8; padding columns 0
        data = (padded[:, 0::2] | (padded[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    else:
        padded[:, :k] = codes
        blocks = padded.view(n, kp // BLOCK, 2, BLOCK // 2)
        data = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2)
        data = data.to(torch.uint8).view(torch.int8)  # the byte pattern, as int8
    tail = torch.zeros(n, 2 * TAIL if signed else TAIL, dtype=torch.int8, device=qdata.device)
    tail[:, :4] = wsum.view(n, 1).contiguous().view(torch.int8)
    return torch.cat([data, tail], dim=1).contiguous()


def body(blob: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The weight bytes of a blob (int8 ``[N, Kp]`` or ``[N, Kp / 2]``), a view; ``bits`` is the blob's code width
    (:func:`width_of`)."""
    return blob[:, : row_bytes(bits, k) - TAIL]


def row_sums(blob: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The stored row sums, int32 ``[N]`` (a copy); ``bits`` is the blob's code width."""
    off = row_bytes(bits, k) - TAIL
    return blob[:, off:off + 4].contiguous().view(torch.int32).reshape(-1)


def expand(blob: torch.Tensor, bits: int, k: int, conv_shape=None, w_zero_point: torch.Tensor | None = None
           ) -> torch.Tensor:
    """The canonical packed words a :func:`make` blob was made from (exact); a widened 4-bit blob needs the
    layer's ``w_zero_point`` (None: symmetric)."""
    if (blob.dtype != torch.int8 or blob.dim() != 2 or blob.shape[1] not in
            {row_bytes(bits, k), *((row_bytes(8, k), s4_row_bytes(k)) if bits == 4 else ())}):
        raise ValueError(f"not a resident {bits}-bit blob for K = {k}: {blob.dtype} {tuple(blob.shape)}")
    n = blob.shape[0]
    width = width_of(blob, bits, k)
    data = body(blob, width, k).to(torch.int32)
    if width == 8:
        codes = data + _zero_points(bits, w_zero_point, n)
    elif layout_of(blob, bits, k) == "s4":
        data = data & 0xFF
        codes = torch.stack([(data & 15) ^ 8, (data >> 4) ^ 8], dim=2).reshape(n, -1)
    else:
        data = data & 0xFF
        codes = torch.stack([data.view(n, -1, BLOCK // 2) & 15, data.view(n, -1, BLOCK // 2) >> 4], dim=2)
        codes = codes.reshape(n, -1)
    codes = _canonical_order(codes[:, :k].contiguous(), conv_shape)
    return pack(codes, bits)
