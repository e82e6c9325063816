"""Quantized drop-in modules: ``QuantLinear`` and ``QuantConv2d``.

They hold the canonical packed tensors of :mod:`quantkit.formats.spec` as non-trainable parameters (diffusers'
offload hooks break on modules that hold only buffers) and execute through the registered ``quantkit::`` ops,
whose native kernels override the reference where they are built.

On the CPU a module can be *compacted* (:func:`compact`, done when an export is loaded on the CPU): its
``weight_packed`` then holds the native kernels' tile layout (a uint8 blob) instead of the canonical codes, so the
weight is in memory once rather than twice (canonical + repacked cache). Everything that reads the weights as
data sees the canonical codes: ``state_dict()``, ``dequantized_weight()``, moving the module to another device
(which expands it first); :func:`expand` converts back explicitly.

On a GPU (Hopper, Triton), :func:`compact` puts 8-bit symmetric and 4-bit per-channel layers with activations of at
most 8 bits into the *resident* layout of :mod:`quantkit.ops.resident` (an int8 blob: centred codes with the row
sums, in the implicit-GEMM column order for convolutions; 4-bit codes as nibbles), which the Triton kernels multiply
directly, again with the canonical codes given back wherever the weights are read as data. Moving a quantized model
onto such a GPU (``pipe.to("cuda")``) compacts it (``QUANTKIT_COMPACT=0`` keeps the canonical codes;
``QUANTKIT_RESIDENT_W4`` picks the 4-bit form, :func:`quantkit.ops.resident.held_width`).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from quantkit.formats.pack import pack, quantize_weight
from quantkit.formats.spec import LayerScheme
from quantkit.ops import reference, select_op

__all__ = ["QuantLinear", "QuantConv2d", "QUANT_MODULES", "quantize_module", "empty_quant_module", "is_quantizable",
           "codebook_module", "compact", "expand"]

# Ops whose native CPU kernels read the tile layout (the others are reference-only and need canonical codes).
_COMPACTABLE_OPS = frozenset(f"{p}_{f}" for p in ("gemm", "conv2d") for f in ("w8a8", "w4a8", "w4a16"))


class _QuantMixin:
    """Shared state of quantized modules: the scheme, the packed tensors and the routing to an op."""

    scheme: LayerScheme

    def _init_tensors(self, weight_shape: tuple[int, ...], bias: bool, dtype, device) -> None:
        self.scheme_name = self.scheme.name
        for name, (shape, tdtype) in self.scheme.tensor_specs(weight_shape).items():
            tdtype = dtype if tdtype is None else tdtype
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=tdtype, device=device),
                                                       requires_grad=False))
        if "weight_zero_point" not in self._parameters:
            self.register_parameter("weight_zero_point", None)
        if self.scheme.is_codebook and "weight_scale" not in self._parameters:
            self.register_parameter("weight_scale", None)  # per-group codebooks: no group scales
        if "input_scale" not in self._parameters:
            self.register_parameter("input_scale", None)
            self.register_parameter("input_zero_point", None)
        if "prefix_output" not in self._parameters:
            self.register_parameter("prefix_output", None)
        out_features = weight_shape[0]
        bias_t = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.register_parameter("bias", bias_t if bias else None)
        self._op = select_op(self.scheme, conv=isinstance(self, QuantConv2d))

    def _fill_tensors(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        """Copy already-computed stored tensors (e.g. a learned codebook weight) into the parameters."""
        with torch.no_grad():
            for name, (shape, _) in self.scheme.tensor_specs(self._weight_shape).items():
                if name == "weight_shape":
                    continue
                t = tensors[name]
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"tensor '{name}' has shape {tuple(t.shape)}, the format expects {tuple(shape)}")
                getattr(self, name).copy_(t)
            self.weight_shape.copy_(torch.tensor(self._weight_shape, dtype=torch.int64))
            if bias is not None:
                self.bias.copy_(bias.detach().to(self.bias.dtype))

    def _fill(self, weight: torch.Tensor, bias: torch.Tensor | None, act_range, prefix_input=None) -> None:
        if self.scheme.is_codebook:
            raise ValueError("codebook (JLCM) weights are learned from calibration data, not rounded: use "
                             "quantkit.codebook.quantize_layer")
        codes, scale, zero_point = quantize_weight(weight, self.scheme.weight)
        with torch.no_grad():
            if self.scheme.prefix_tokens:
                if prefix_input is None or prefix_input.shape[0] != self.scheme.prefix_tokens:
                    raise ValueError("a BOS-aware scheme needs the prompt-invariant prefix rows of the input")
                fp = torch.nn.functional.linear(prefix_input.to(weight.dtype), weight, bias)
                self.prefix_output.copy_(fp.to(self.prefix_output.dtype))
            self.weight_packed.copy_(pack(codes, self.scheme.weight.bits))
            self.weight_scale.copy_(scale)
            if zero_point is not None:
                self.weight_zero_point.copy_(zero_point)
            self.weight_shape.copy_(torch.tensor(weight.shape, dtype=torch.int64))
            if bias is not None:
                self.bias.copy_(bias.detach().to(self.bias.dtype))
            act = self.scheme.act
            if act is not None and not act.dynamic:
                if act_range is None:
                    raise ValueError("a static activation format needs a calibrated (min, max) input range")
                lo, hi = act_range
                scale_x, zp_x = reference.act_qparams_from_range(torch.as_tensor(lo), torch.as_tensor(hi), act.bits)
                self.input_scale.copy_(scale_x.reshape(1))
                self.input_zero_point.copy_(zp_x.reshape(1))

    @property
    def act_bits(self) -> int:
        """Activation bits passed to the op (16 = weight-only)."""
        return 16 if self.scheme.act is None else self.scheme.act.bits

    def _op_args(self, x: torch.Tensor) -> tuple:
        w = self.scheme.weight
        if self.scheme.is_codebook:
            return (x, self.weight_codes, self.weight_codebook, self.weight_scale, self.weight_row_group, self.bias,
                    w.bits)
        return (x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias, self.input_scale,
                self.input_zero_point, w.bits, w.group_size, self.act_bits)

    # ---- compact (native CPU tile layout) form ------------------------------------------------------------------

    @property
    def is_compact(self) -> bool:
        """True when ``weight_packed`` holds a kernel layout (CPU tiles: uint8; GPU resident: int8) rather than the
        canonical codes (int32)."""
        w = getattr(self, "weight_packed", None)
        return w is not None and w.dtype in (torch.uint8, torch.int8)

    def can_compact(self) -> bool:
        """Whether :meth:`compact_` would compact this module: on the CPU, native kernels loaded and a supported
        op; on a GPU, a format with a resident layout and the Triton kernels available."""
        if self.scheme.is_codebook or self.is_compact:
            return False
        w = self.weight_packed
        if w.is_meta:
            return False
        if self._resident_here(w):
            return self._resident_format()
        from quantkit.ops import native

        return (native.native_status()["loaded"] and w.device.type == "cpu"
                and self._op.name().split("::")[-1].split(".")[0] in _COMPACTABLE_OPS)

    @staticmethod
    def _resident_here(w: torch.Tensor) -> bool:
        """Whether weights on ``w``'s device compact to the GPU-resident layout."""
        from quantkit.ops import cuda

        return w.device.type == "cuda" and cuda.resident_ok(w.device)

    def _resident_format(self) -> bool:
        from quantkit.ops import resident

        w = self.scheme.weight
        width = resident.held_width(w.bits, self._conv_shape() is not None)
        return (width is not None and self.scheme.act is not None and self.scheme.act.bits <= 8
                and self.weight_scale is not None and self.weight_scale.shape[1] == 1
                and resident.layout_supported(w.bits, self.weight_zero_point is None, True, self._conv_shape(), width))

    def _conv_shape(self):
        return list(self._weight_shape[1:]) if len(self._weight_shape) == 4 else None

    def compact_(self) -> int:
        """Replace the canonical codes by the CPU kernel layout; return the bytes of canonical codes released."""
        from quantkit.ops import native

        if not self.can_compact():
            return 0
        w = self.weight_packed
        if self._resident_here(w):
            from quantkit.ops import resident

            bits, conv = self.scheme.weight.bits, self._conv_shape() is not None
            blob = resident.make(w, self.weight_zero_point, bits, math.prod(self._weight_shape[1:]),
                                 self._conv_shape(), resident.held_width(bits, conv),
                                 resident.held_signed(bits, conv, self.weight_zero_point is None))
            self.weight_packed = nn.Parameter(blob, requires_grad=False)
            return w.numel() * w.element_size()
        blob = native.compact_weight(w, self.weight_scale, self.weight_zero_point, self.scheme.weight.bits,
                                     math.prod(self._weight_shape[1:]), self._conv_shape(), self.act_bits)
        self.weight_packed = nn.Parameter(blob, requires_grad=False)
        return w.numel() * w.element_size()

    def expand_(self) -> None:
        """Back to the canonical codes (a no-op unless compact)."""
        if self.is_compact:
            self.weight_packed = nn.Parameter(self._canonical_packed(), requires_grad=False)

    def _canonical_packed(self) -> torch.Tensor:
        if not self.is_compact:
            return self.weight_packed
        if self.weight_packed.dtype == torch.int8:
            from quantkit.ops import resident

            return resident.expand(self.weight_packed, self.scheme.weight.bits, math.prod(self._weight_shape[1:]),
                                   self._conv_shape(), self.weight_zero_point)
        from quantkit.ops import native

        return native.expand_weight(self.weight_packed)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_compact:  # the saved form is always the canonical one
            destination[prefix + "weight_packed"] = self._canonical_packed()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_compact = self.is_compact
        self.expand_()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_compact:
            self.compact_()

    def _apply(self, fn, recurse=True):
        if self.is_compact:
            w = self.weight_packed
            probe = fn(torch.empty(0, dtype=w.dtype, device=w.device))
            if probe.device != w.device or probe.dtype != w.dtype:
                self.expand_()  # leaving the kernels' device (or converting integers): canonical codes first
        out = super()._apply(fn, recurse)
        w = getattr(self, "weight_packed", None)
        if (w is not None and not self.is_compact and os.environ.get("QUANTKIT_COMPACT", "1") != "0"
                and self._resident_here(w)):
            self.compact_()  # arriving on a GPU (pipe.to("cuda")): the resident layout of the Triton kernels
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight these packed tensors represent, in the original shape."""
        k = math.prod(self._weight_shape[1:])
        if self.scheme.is_codebook:
            w = reference.dequantize_codebook(self.weight_codes, self.weight_codebook, self.weight_scale,
                                              self.weight_row_group, self.scheme.weight.bits, k).to(dtype)
            return w.view(self._weight_shape)
        w = reference.dequantize_packed(self._canonical_packed(), self.weight_scale, self.weight_zero_point,
                                        self.scheme.weight.bits, self.scheme.weight.group_size, k, dtype)
        return w.view(self._weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (read-only view for tools such as PEFT that inspect ``.weight``)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.dequantized_weight(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self._weight_shape)}, scheme={self.scheme.name}"


class QuantLinear(_QuantMixin, nn.Module):
    """``nn.Linear`` with packed integer weights. Exposes ``in_features``, ``out_features`` and ``weight``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: LayerScheme,
                 dtype: torch.dtype = torch.float32, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self._weight_shape = (out_features, in_features)
        scheme.weight.num_groups(in_features)  # validates the group size against the layer
        self._init_tensors(self._weight_shape, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.scheme.prefix_tokens
        if p == 0:
            return self._op(*self._op_args(x))
        # BOS-aware (MixDQ): the prompt-invariant leading tokens use the stored FP outputs; only the remaining
        # tokens go through the quantized op, with an activation scale calibrated without the outlier.
        rest = self._op(*self._op_args(x[..., p:, :]))
        prefix = self.prefix_output.to(rest.dtype).expand(*rest.shape[:-2], p, rest.shape[-1])
        return torch.cat([prefix, rest], dim=-2)


class QuantConv2d(_QuantMixin, nn.Module):
    """``nn.Conv2d`` (groups = 1, zero padding) with packed integer weights flattened to ``[O, C*kh*kw]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, bias: bool,
                 scheme: LayerScheme, dtype: torch.dtype = torch.float32, device=None):
        nn.Module.__init__(self)
        self.in_channels, self.out_channels, self.scheme = in_channels, out_channels, scheme
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.groups = 1
        self._weight_shape = (out_channels, in_channels, *self.kernel_size)
        scheme.weight.num_groups(math.prod(self._weight_shape[1:]))
        self._init_tensors(self._weight_shape, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(*self._op_args(x), list(self.kernel_size), list(self.stride), list(self.padding),
                        list(self.dilation))


QUANT_MODULES = (QuantLinear, QuantConv2d)


def is_quantizable(module: nn.Module) -> bool:
    """Linear layers, and Conv2d layers with groups = 1, zero padding given as numbers."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


def empty_quant_module(module: nn.Module, scheme: LayerScheme, device=None) -> nn.Module:
    """An uninitialised quantized twin of ``module`` (shapes and dtypes only), used when loading."""
    dtype = module.bias.dtype if getattr(module, "bias", None) is not None else torch.float32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, has_bias, scheme, dtype, device)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, has_bias, scheme, dtype, device)
    raise TypeError(f"cannot quantize {type(module).__name__}")


def quantize_module(module: nn.Module, scheme: LayerScheme, act_range=None,
                    prefix_input: torch.Tensor | None = None) -> nn.Module:
    """Round-to-nearest quantization of a Linear/Conv2d into its packed twin.

    Args:
        module: the float layer.
        scheme: weight (and activation) format.
        act_range: calibrated ``(min, max)`` of the layer input, required for static activation formats (for
            BOS-aware layers: the range of the tokens after the prefix).
        prefix_input: ``[prefix_tokens, in_features]``, the prompt-invariant leading input rows (BOS-aware only).
    """
    if scheme.is_codebook:
        raise ValueError(f"scheme {scheme.name} is a codebook (JLCM) format: it is learned from calibration data "
                         "with quantkit.codebook.quantize_layer, not rounded")
    if scheme.prefix_tokens and not isinstance(module, nn.Linear):
        raise ValueError("BOS-aware (prefix_tokens) schemes apply to Linear layers only")
    q = empty_quant_module(module, scheme, device=module.weight.device)
    q._fill(module.weight, module.bias, act_range, prefix_input)
    return q.train(module.training)


def codebook_module(module: nn.Module, scheme: LayerScheme, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The quantized twin of ``module`` holding a learned codebook weight (``tensors`` named as in the spec).

    Raises:
        ValueError: ``scheme`` is not a codebook scheme, or a tensor does not have the format's shape.
    """
    if not scheme.is_codebook:
        raise ValueError(f"codebook_module needs a codebook scheme, got {scheme.name}")
    q = empty_quant_module(module, scheme, device=module.weight.device)
    q._fill_tensors(tensors, module.bias)
    return q.train(module.training)


def compact(model: nn.Module) -> int:
    """Compact every quantized layer of ``model`` that runs on the native CPU kernels, or on the GPU's Triton
    integer kernels (see the module docstring).

    Returns:
        Bytes of canonical codes released (0 when no layer has a kernel layout here).
    """
    freed = 0
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            freed += m.compact_()
    return freed


def expand(model: nn.Module) -> None:
    """Undo :func:`compact`: every quantized layer holds the canonical codes again."""
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            m.expand_()
