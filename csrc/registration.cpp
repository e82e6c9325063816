// Registers the CPU kernels for ops whose schemas live in src/quantkit/ops/library.py, and a small Python module
// (quantkit._C) for diagnostics and the repack cache. No op is defined here: C++ only adds device kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/internal.h"
#include "quantkit/format.h"

namespace qc = quantkit::cpu;

// JLCM codebook kernels (cpu/codebook.cpp).
namespace quantkit {
namespace cpu {
at::Tensor gemm_codebook_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                             const std::optional<at::Tensor>& w_scale, const at::Tensor& row_group,
                             const std::optional<at::Tensor>& bias, int64_t bits);
at::Tensor conv2d_codebook_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                               const std::optional<at::Tensor>& w_scale, const at::Tensor& row_group,
                               const std::optional<at::Tensor>& bias, int64_t bits, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
at::Tensor dequantize_codebook_cpu(const at::Tensor& codes, const at::Tensor& codebook,
                                   const std::optional<at::Tensor>& w_scale, const at::Tensor& row_group, int64_t bits,
                                   int64_t in_features);
}  // namespace cpu
}  // namespace quantkit

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("gemm_w8a8", &qc::gemm_cpu);
  m.impl("gemm_w4a8", &qc::gemm_cpu);
  m.impl("gemm_w4a16", &qc::gemm_cpu);
  m.impl("conv2d_w8a8", &qc::conv2d_cpu);
  m.impl("conv2d_w4a8", &qc::conv2d_cpu);
  m.impl("conv2d_w4a16", &qc::conv2d_cpu);
  m.impl("quantize_act", &qc::quantize_act_cpu);
  m.impl("quantize_act_dynamic", &qc::quantize_act_dynamic_cpu);
  m.impl("unpack", &qc::unpack_cpu);
  m.impl("gemm_codebook", &qc::gemm_codebook_cpu);
  m.impl("conv2d_codebook", &qc::conv2d_codebook_cpu);
  m.impl("dequantize_codebook", &qc::dequantize_codebook_cpu);
}

namespace {

py::dict cpu_features() {
  py::dict d;
  d["avx2_fma"] = qc::cpu_has_avx2_fma();
  d["avx2_compiled"] = qc::avx2_compiled();
  d["isa"] = qc::isa();
  return d;
}

py::dict cache_info() {
  const qc::CacheInfo info = qc::cache_info();
  py::dict d;
  d["entries"] = info.entries;
  d["bytes"] = info.bytes;
  d["limit"] = info.limit;
  d["hits"] = info.hits;
  d["misses"] = info.misses;
  return d;
}

// K order and convolution geometry of a weight from the optional conv_shape (C, kh, kw).
struct Geometry {
  qc::KOrder order = qc::KOrder::kLinear;
  int64_t c = 0, kh = 1, kw = 1;
};

Geometry geometry(const char* fn, int64_t in_features, const std::optional<std::vector<int64_t>>& conv_shape) {
  Geometry g;
  if (!conv_shape.has_value()) return g;
  TORCH_CHECK(conv_shape->size() == 3, "quantkit.", fn, ": conv_shape must be (C, kh, kw)");
  const auto& s = *conv_shape;
  TORCH_CHECK(s[0] * s[1] * s[2] == in_features, "quantkit.", fn, ": C*kh*kw != in_features");
  g.order = qc::KOrder::kConv;
  g.c = s[0];
  g.kh = s[1];
  g.kw = s[2];
  return g;
}

// Repack a weight now (at load time) instead of on its first call; returns the bytes held by the cache.
int64_t prepare(const at::Tensor& qdata, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero_point,
                int64_t w_bits, int64_t in_features, std::optional<std::vector<int64_t>> conv_shape, int64_t act_bits) {
  TORCH_CHECK(qdata.device().is_cpu(), "quantkit.prepare: qdata must be on the CPU");
  const Geometry g = geometry("prepare", in_features, conv_shape);
  const auto p = qc::get_packed(qdata, w_scale, w_zero_point, w_bits, qc::cpu_layout(w_bits, act_bits, true),
                                in_features, g.order, g.c, g.kh, g.kw);
  return static_cast<int64_t>(p->nbytes());
}

// The CPU-kernel-layout blob of a weight (see cpu/internal.h), for a module to hold in place of its canonical codes.
at::Tensor compact(const at::Tensor& qdata, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero_point,
                   int64_t w_bits, int64_t in_features, std::optional<std::vector<int64_t>> conv_shape,
                   int64_t act_bits) {
  TORCH_CHECK(qdata.device().is_cpu() && qdata.scalar_type() == at::kInt && qdata.dim() == 2,
              "quantkit.compact: qdata must be the canonical int32 [out, words] codes on the CPU");
  TORCH_CHECK(quantkit::format::valid_weight_bits(static_cast<int>(w_bits)), "quantkit.compact: bad w_bits ", w_bits);
  TORCH_CHECK(qdata.size(1) * quantkit::format::values_per_word(static_cast<int>(w_bits)) >= in_features,
              "quantkit.compact: qdata cannot hold ", in_features, " codes per row");
  const Geometry g = geometry("compact", in_features, conv_shape);
  return qc::make_blob(qdata, w_scale, w_zero_point, w_bits, qc::cpu_layout(w_bits, act_bits, true), in_features,
                       g.order, g.c, g.kh, g.kw);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "quantkit native CPU kernels (ops are reached through torch.ops.quantkit)";
  m.def("cpu_features", &cpu_features, "CPU feature detection and the kernel ISA in use");
  m.def("set_isa", &qc::set_isa, "Select the kernel ISA: 'auto', 'avx2' or 'scalar'");
  m.def("cache_info", &cache_info, "Repacked-weight cache statistics");
  m.def("cache_clear", &qc::cache_clear, "Drop every repacked weight");
  m.def("cache_set_limit", &qc::cache_set_limit, "Cache budget in bytes (LRU eviction beyond it)");
  m.def("prepare", &prepare, "Repack a weight into the CPU layout ahead of its first call", py::arg("qdata"),
        py::arg("w_scale"), py::arg("w_zero_point"), py::arg("w_bits"), py::arg("in_features"),
        py::arg("conv_shape") = py::none(), py::arg("act_bits") = 8);
  m.def("compact", &compact, "The CPU-kernel-layout (uint8) copy of a canonical weight", py::arg("qdata"),
        py::arg("w_scale"), py::arg("w_zero_point"), py::arg("w_bits"), py::arg("in_features"),
        py::arg("conv_shape") = py::none(), py::arg("act_bits") = 8);
  m.def("expand", &qc::blob_to_canonical, "The canonical int32 codes of a CPU-kernel-layout weight",
        py::arg("blob"));
  m.def("dequantize_w4_panels", &qc::dequantize_w4_panels_cpu,
        "Diagnostic: a 4-bit weight dequantized from its repacked panels (as compacted weights are), [N, K] fp32",
        py::arg("qdata"), py::arg("w_scale"), py::arg("w_zero_point"), py::arg("in_features"),
        py::arg("panels_per_chunk") = 1);
  m.attr("FORMAT_VERSION") = quantkit::format::kFormatVersion;
}
