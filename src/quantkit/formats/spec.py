"""The canonical packed layout of quantized layers, written down once.

Everything that reads or writes quantized tensors (export, the loader, the reference ops, native kernels
through ``csrc/include/quantkit/format.h``, the tests) follows this module.

Uniform integer weights of a layer with original shape ``weight_shape`` (``[O, I]`` for Linear,
``[O, I, kh, kw]`` for Conv2d, flattened to ``[O, K]`` with ``K = I*kh*kw`` in PyTorch's own order):

====================  =========  =====================================  =====================================
tensor                dtype      shape                                  meaning
====================  =========  =====================================  =====================================
``weight_packed``     int32      ``[O, ceil(K / (32 // bits))]``        unsigned codes, value ``j`` of a word
                                                                        in bits ``[j*bits, (j+1)*bits)``
                                                                        (least-significant first along K);
                                                                        3-bit packs 10 values per word and
                                                                        leaves the top 2 bits zero; padding
                                                                        codes at the end of a row are zero
``weight_scale``      float16    ``[O, G]``, ``G = 1`` per channel or   dequantized ``w = (code - zp) * scale``
                                 ``K / group_size``
``weight_zero_point`` uint8      ``[O, G]``                             asymmetric only; symmetric formats use
                                                                        the implicit ``zp = 2**(bits-1)``
``weight_shape``      int64      ``[2]`` or ``[4]``                     the original weight shape
``input_scale``       float32    ``[1]``                                static activation scale (per tensor)
``input_zero_point``  int32      ``[1]``                                static activation zero point
``prefix_output``     float      ``[P, O]``                             BOS-aware layers only: the FP outputs
                                                                        of the ``P`` prompt-invariant leading
                                                                        tokens (MixDQ), concatenated back at
                                                                        run time; the codes see tokens ``P:``
====================  =========  =====================================  =====================================

Codebook weights (JLCM, :class:`CodebookFormat`; weight-only): ``W[r] ~ E[group(r)][idx]`` with ``E`` the
group's codebook of ``2**bits`` fp16 codewords. Rows of a group are stored contiguously (sorted by group, in
original order within a group), which is the stable sort of ``weight_row_group``:

========================  =========  =================================  ==========================================
tensor                    dtype      shape                              meaning
========================  =========  =================================  ==========================================
``weight_codes``          int32      ``[O, ceil(K / (32 // bits))]``    codeword indices, packed exactly like
                                                                        ``weight_packed``; row ``i`` is the
                                                                        ``i``-th row of the group-sorted order
``weight_codebook``       float16    ``[G, 2**bits]`` (``[1, 2**bits]``  codewords, ascending within a row; one per
                                     when shared)                       group, or one shared by all groups
``weight_scale``          float16    ``[G]``                            shared codebook only: group ``g`` uses
                                                                        ``weight_scale[g] * weight_codebook[0]``
                                                                        (product rounded once, in fp32)
``weight_row_group``      int32      ``[1, ceil(O / (32 // gbits))]``   group of each *original* row, packed with
                                                                        ``gbits = 2, 3, 4 or 8`` (smallest with
                                                                        ``2**gbits >= G``): it encodes the row
                                                                        permutation (its stable argsort) and the
                                                                        group boundaries (its histogram) in
                                                                        ``gbits`` bits per row
``weight_shape``          int64      ``[2]`` or ``[4]``                 the original weight shape
========================  =========  =================================  ==========================================

``G = min(groups, O)``. Decoding (the reference gather, :func:`quantkit.formats.pack.dequantize_codebook`):
stored row ``i`` belongs to group ``g_i`` (the ``i``-th smallest of ``weight_row_group``), its values are
``E[g_i][codes[i]]``, and it is row ``perm[i]`` of the original weight, ``perm = argsort(row_group, stable)``.

Activations are quantized asymmetrically to unsigned codes ``q = clamp(round(x / s) + zp, 0, 2**bits - 1)``.
Dynamic activations are quantized per token (per row of the flattened ``[M, K]`` input) for Linear and per
sample for Conv2d, at run time, and store nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ACT_BITS",
    "FORMAT_VERSION",
    "WEIGHT_BITS",
    "ActFormat",
    "CODEBOOK_BITS",
    "CodebookFormat",
    "LayerScheme",
    "WeightFormat",
    "bits_per_weight",
    "format_bits_per_weight",
    "group_id_bits",
    "stored_bits_per_weight",
    "side_bits",
    "values_per_word",
    "weight_format_from_dict",
]

FORMAT_VERSION = 1
WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
CODEBOOK_BITS = (2, 3, 4)


def values_per_word(bits: int) -> int:
    """Number of ``bits``-wide codes stored in one int32 word (3-bit: 10, the rest: ``32 // bits``)."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {list(WEIGHT_BITS)}, got {bits}")
    return 32 // bits


def stored_bits_per_weight(bits: int) -> float:
    """Bits one ``bits``-wide code occupies in ``weight_packed`` (3-bit: 3.2); codes alone, scales not counted."""
    return 32 / values_per_word(bits)


@dataclass(frozen=True)
class WeightFormat:
    """Uniform integer weight format of one layer.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: number of consecutive input elements sharing one scale; -1 = one per output channel.
        symmetric: symmetric codes with an implicit zero point ``2**(bits-1)``; otherwise a stored uint8 one.
    """

    bits: int
    group_size: int = -1
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {list(WEIGHT_BITS)}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {self.group_size}")

    @property
    def name(self) -> str:
        """Short name used in plans and tables, e.g. ``w4``, ``w4g64``, ``w8asym``."""
        name = f"w{self.bits}"
        if self.group_size > 0:
            name += f"g{self.group_size}"
        if not self.symmetric:
            name += "asym"
        return name

    def num_groups(self, in_features: int) -> int:
        """Groups per output row; raises ``ValueError`` when ``group_size`` does not divide the row."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide the layer's input size {in_features}; "
                "pick a divisor or use group_size: -1 (per channel)"
            )
        return in_features // self.group_size

    def qdata_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of ``weight_packed`` for a ``[out_features, in_features]`` (flattened) weight."""
        return out_features, math.ceil(in_features / values_per_word(self.bits))

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of ``weight_scale`` (and ``weight_zero_point``)."""
        return out_features, self.num_groups(in_features)

    def tensor_specs(self, weight_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every weight tensor this format stores for a layer."""
        out_features, in_features = weight_shape[0], math.prod(weight_shape[1:])
        specs = {
            "weight_packed": (self.qdata_shape(out_features, in_features), torch.int32),
            "weight_scale": (self.scale_shape(out_features, in_features), torch.float16),
            "weight_shape": ((len(weight_shape),), torch.int64),
        }
        if not self.symmetric:
            specs["weight_zero_point"] = (self.scale_shape(out_features, in_features), torch.uint8)
        return specs

    def to_dict(self) -> dict:
        """Arguments as written in ``quantization_config`` (compressed-tensors vocabulary)."""
        return {
            "num_bits": self.bits,
            "symmetric": self.symmetric,
            "strategy": "channel" if self.group_size == -1 else "group",
            "group_size": None if self.group_size == -1 else self.group_size,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> WeightFormat:
        """Inverse of :meth:`to_dict`."""
        group = d.get("group_size")
        return cls(bits=int(d["num_bits"]), group_size=-1 if group in (None, -1) else int(group),
                   symmetric=bool(d.get("symmetric", True)))


def group_id_bits(groups: int) -> int:
    """Packing width of a row-group id: the smallest of 2, 3, 4, 8 with ``2**bits >= groups``."""
    for b in (2, 3, 4, 8):
        if groups <= (1 << b):
            return b
    raise ValueError(f"at most 256 row groups are supported, got {groups}")


@dataclass(frozen=True)
class CodebookFormat:
    """JLCM codebook weight format of one layer (weight-only; see the module docstring for the tensors).

    Args:
        bits: index width, 2, 3 or 4 (codebooks of 4, 8 or 16 entries).
        groups: number of output-row groups ``G`` (capped at the number of rows of a layer).
        shared: one codebook shared by every group, each group with its own fp16 scale (the cheaper variant of
            the paper); otherwise one codebook per group.
    """

    bits: int
    groups: int = 8
    shared: bool = False

    def __post_init__(self) -> None:
        if self.bits not in CODEBOOK_BITS:
            raise ValueError(f"codebook index bits must be one of {list(CODEBOOK_BITS)}, got {self.bits}")
        if not 1 <= self.groups <= 256:
            raise ValueError(f"codebook groups must be in [1, 256], got {self.groups}")

    # Uniform-format attributes that generic code (plans, validation) reads: no K-groups, no zero point.
    group_size = -1
    symmetric = True

    @property
    def name(self) -> str:
        """Short name, e.g. ``cb3g8`` (per-group codebooks) or ``cb2g16s`` (shared codebook, group scales)."""
        return f"cb{self.bits}g{self.groups}" + ("s" if self.shared else "")

    @property
    def codebook_size(self) -> int:
        """Codewords per codebook, ``2**bits``."""
        return 1 << self.bits

    def row_groups(self, out_features: int) -> int:
        """``G`` for a layer with ``out_features`` rows."""
        return min(self.groups, out_features)

    def num_groups(self, in_features: int) -> int:
        """Scale groups along the input dimension: always 1 (kept for code shared with uniform formats)."""
        return 1

    def tensor_specs(self, weight_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every weight tensor this format stores for a layer."""
        out_features, in_features = weight_shape[0], math.prod(weight_shape[1:])
        g = self.row_groups(out_features)
        specs = {
            "weight_codes": ((out_features, math.ceil(in_features / values_per_word(self.bits))), torch.int32),
            "weight_codebook": ((1 if self.shared else g, self.codebook_size), torch.float16),
            "weight_row_group": ((1, math.ceil(out_features / values_per_word(group_id_bits(g)))), torch.int32),
            "weight_shape": ((len(weight_shape),), torch.int64),
        }
        if self.shared:
            specs["weight_scale"] = ((g,), torch.float16)
        return specs

    def to_dict(self) -> dict:
        """Arguments as written in ``quantization_config``."""
        return {"format": "codebook", "num_bits": self.bits, "groups": self.groups, "shared_codebook": self.shared,
                "strategy": "codebook", "symmetric": True, "group_size": None}

    @classmethod
    def from_dict(cls, d: Mapping) -> CodebookFormat:
        """Inverse of :meth:`to_dict`."""
        return cls(bits=int(d["num_bits"]), groups=int(d.get("groups", 8)), shared=bool(d.get("shared_codebook")))


def weight_format_from_dict(d: Mapping) -> WeightFormat | CodebookFormat:
    """A weight format from its ``quantization_config`` arguments (uniform unless ``format: codebook``)."""
    if d.get("format") == "codebook":
        return CodebookFormat.from_dict(d)
    return WeightFormat.from_dict(d)


@dataclass(frozen=True)
class ActFormat:
    """Activation (layer input) quantization of one layer.

    Args:
        bits: code width, 2 to 8.
        dynamic: compute scale and zero point at run time (per token for Linear, per sample for Conv2d)
            instead of using the static per-tensor calibration values.
    """

    bits: int
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise ValueError(f"activation bits must be one of {list(ACT_BITS)}, got {self.bits}")

    @property
    def name(self) -> str:
        """Short name, e.g. ``a8`` or ``a8dyn``."""
        return f"a{self.bits}" + ("dyn" if self.dynamic else "")

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the stored activation tensors (none when dynamic)."""
        if self.dynamic:
            return {}
        return {"input_scale": ((1,), torch.float32), "input_zero_point": ((1,), torch.int32)}

    def to_dict(self) -> dict:
        """Arguments as written in ``quantization_config``."""
        return {
            "num_bits": self.bits,
            "symmetric": False,
            "strategy": "token" if self.dynamic else "tensor",
            "dynamic": self.dynamic,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ActFormat:
        """Inverse of :meth:`to_dict`."""
        return cls(bits=int(d["num_bits"]), dynamic=bool(d.get("dynamic", False)))


@dataclass(frozen=True)
class LayerScheme:
    """What one layer becomes: a weight format, optionally an activation format (None = 16-bit), and for
    BOS-aware text-embedding layers the number of prompt-invariant leading tokens kept in floating point."""

    weight: WeightFormat | CodebookFormat
    act: ActFormat | None = None
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.weight, CodebookFormat) and (self.act is not None or self.prefix_tokens):
            raise ValueError("codebook (JLCM) weight formats are weight-only: activations must be null (16-bit)")

    @property
    def is_codebook(self) -> bool:
        """Whether the weight is a JLCM codebook format."""
        return isinstance(self.weight, CodebookFormat)

    @property
    def name(self) -> str:
        """E.g. ``w4g64-a8``, ``w8-a16`` or ``w8-a8-bos`` (one FP prefix token)."""
        name = f"{self.weight.name}-{self.act.name if self.act else 'a16'}"
        if self.prefix_tokens:
            name += "-bos" if self.prefix_tokens == 1 else f"-pre{self.prefix_tokens}"
        return name

    def tensor_specs(self, weight_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Every quantized tensor this layer stores (bias excluded); dtype None = the layer's float dtype."""
        specs: dict = self.weight.tensor_specs(weight_shape)
        if self.act is not None:
            specs.update(self.act.tensor_specs())
        if self.prefix_tokens:
            specs["prefix_output"] = ((self.prefix_tokens, weight_shape[0]), None)
        return specs


def bits_per_weight(tensors: Mapping[str, torch.Tensor], num_weights: int) -> float:
    """Everything a layer stores for its weight, in bits per original weight element.

    Counts packed codes, scales, zero points, shape records and any other tensor passed (codebooks, group
    boundaries, permutations); the one size function shared by every backend. Pass the layer's tensors without
    its bias and activation parameters.
    """
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return 8.0 * total / num_weights


def _spec_tensors(fmt: WeightFormat | CodebookFormat, weight_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The tensors a layer of ``weight_shape`` stores in ``fmt``, as meta tensors (shapes and dtypes only)."""
    return {name: torch.empty(shape, dtype=dtype, device="meta")
            for name, (shape, dtype) in fmt.tensor_specs(tuple(weight_shape)).items()}


def side_bits(fmt: WeightFormat | CodebookFormat, weight_shape: tuple[int, ...]) -> int:
    """Bits a layer of ``weight_shape`` stores in ``fmt`` besides its packed codes (``weight_packed`` or
    ``weight_codes``): scales, zero points, codebooks, the shape record. For a uniform format it does not depend on
    the bit-width."""
    return sum(8 * t.numel() * t.element_size() for name, t in _spec_tensors(fmt, weight_shape).items()
               if name not in ("weight_packed", "weight_codes"))


def format_bits_per_weight(fmt: WeightFormat | CodebookFormat, weight_shape: tuple[int, ...]) -> float:
    """:func:`bits_per_weight` of a layer of ``weight_shape`` in ``fmt``, from the format's tensor specs alone."""
    return bits_per_weight(_spec_tensors(fmt, weight_shape), math.prod(weight_shape))
