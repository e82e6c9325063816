// Shared declarations of the PyTorch-facing CPU code (ops.cpp, repack.cpp, registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "quantkit/cpu_kernels.h"

namespace quantkit {
namespace cpu {

// ---- instruction set selection -------------------------------------------------------------------------------
bool cpu_has_avx2_fma();         // CPUID + OS support for YMM state
bool avx2_compiled();            // the AVX2 translation unit is part of this build
const KernelTable& kernels();    // the table in use
std::string isa();               // "avx2" or "scalar"
// "auto" (default: avx2 when available), "avx2" or "scalar"; QUANTKIT_CPU_ISA sets the initial value.
void set_isa(const std::string& name);

// Panel layout of an integer weight for the integer-activation kernels: 4 (nibbles) for 4-bit codes, 7 (W8Q,
// vpmaddubsw) for 8-bit codes with activations of at most 7 bits when `codes_fit_u7`, else 8 (k-pairs, vpmaddwd).
inline int cpu_layout(int64_t w_bits, int64_t act_bits, bool codes_fit_u7) {
  if (w_bits == 4) return 4;
  return (w_bits == 8 && act_bits <= 7 && codes_fit_u7) ? 7 : 8;
}

// ---- repacked weights ------------------------------------------------------------------------------------------
enum class KOrder : int { kLinear = 0, kConv = 1 };

// A repacked weight. All of it (header, K map, per-segment arrays, panels) lives in one uint8 tensor, the
// "CPU kernel layout" blob [n, ceil(bytes / n)]: the cache holds blobs, and a compacted module holds its blob in
// place of the canonical packed codes (src/quantkit/nn/modules.py); `from_blob` reads one back without copying.
//   header (kBlobHeaderBytes) | seg_off int64[groups + 1] | kmap int32[kp] | wzp int32, swc int32, scale f32
//   [npanels][nseg][kNR] | panels (npanels * panel_bytes); every section 64-byte aligned.
struct PackedWeight {
  PanelWeight view;          // what the kernels read (points into `blob`)
  int w_bits = 0;            // bits of the canonical codes
  int layout_bits = 0;       // 4 (nibble panels) or 8 (byte panels; also used for 2/3-bit codes)
  int64_t k = 0;             // logical K
  int64_t groups = 0;
  int64_t group_len = 0;     // K / groups
  KOrder order = KOrder::kLinear;
  int64_t conv_c = 0, conv_kh = 1, conv_kw = 1;
  const int64_t* seg_off = nullptr;  // [groups + 1], padded positions
  const int32_t* kmap = nullptr;     // [kp]: padded position -> canonical k, or -1 for padding
  int64_t max_abs_wc = 0;            // max |code - zero point| over the whole weight
  at::Tensor blob;                   // owns everything above
  size_t nbytes() const { return blob.defined() ? blob.nbytes() : 0; }
};

// True when `qdata` is a CPU-kernel-layout blob (uint8) rather than canonical int32 codes.
bool is_blob(const at::Tensor& qdata);
// View of a blob (no copy); checks the magic number and version.
std::shared_ptr<const PackedWeight> from_blob(const at::Tensor& blob);
// The canonical int32 codes [n, words] a blob was made from (exact inverse of the repack).
at::Tensor blob_to_canonical(const at::Tensor& blob);
// Dequantize output rows [n0, n1) of a packed weight into out[(n - n0) * k + kk] (fp32, canonical K order),
// bit for bit as the reference: float(code - zp) * scale.
void dequantize_packed_rows(const PackedWeight& pw, int64_t n0, int64_t n1, float* out);

// Repacked weight for the canonical tensors, from the cache (keyed by storage + version, see repack.cpp); for a
// blob `qdata`, the blob itself (checked against the requested layout; if it was packed for another layout the
// canonical codes are rebuilt and repacked, uncached: correct but slow).
std::shared_ptr<const PackedWeight> get_packed(const at::Tensor& qdata, const at::Tensor& w_scale,
                                               const std::optional<at::Tensor>& w_zero_point, int64_t w_bits,
                                               int layout_bits, int64_t k, KOrder order, int64_t conv_c,
                                               int64_t conv_kh, int64_t conv_kw);

struct CacheInfo {
  int64_t entries = 0, bytes = 0, limit = 0, hits = 0, misses = 0;
};
CacheInfo cache_info();
void cache_clear();
void cache_set_limit(int64_t bytes);
// A blob for these canonical tensors (always a fresh repack, never cached).
at::Tensor make_blob(const at::Tensor& qdata, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero_point,
                     int64_t w_bits, int layout_bits, int64_t k, KOrder order, int64_t conv_c, int64_t conv_kh,
                     int64_t conv_kw);

// Float copies of w_scale [N, G] and the int32 zero point [N, G] (implicit when symmetric).
at::Tensor scale_f32(const at::Tensor& w_scale, int64_t n);
at::Tensor zero_point_i32(const std::optional<at::Tensor>& w_zero_point, const at::Tensor& scale_f32,
                          int64_t w_bits);

// ---- ops ------------------------------------------------------------------------------------------------------
at::Tensor gemm_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& w_scale,
                    const std::optional<at::Tensor>& w_zero_point, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zero_point,
                    int64_t w_bits, int64_t group_size, int64_t act_bits);
at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& w_zero_point, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zero_point,
                      int64_t w_bits, int64_t group_size, int64_t act_bits, at::IntArrayRef kernel_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
at::Tensor quantize_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                            int64_t bits);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_dynamic_cpu(const at::Tensor& x, int64_t bits);
at::Tensor unpack_cpu(const at::Tensor& qdata, int64_t bits, int64_t in_features);
// Diagnostic (tests): the 4-bit weight dequantized from its repacked panels, `panels_per_chunk` panels per
// kernel call, as [N, K] fp32 (must equal the reference's dequantization bit for bit).
at::Tensor dequantize_w4_panels_cpu(const at::Tensor& qdata, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& w_zero_point, int64_t in_features,
                                    int64_t panels_per_chunk);
at::Tensor dequantize_cpu(const at::Tensor& qdata, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& w_zero_point, int64_t w_bits, int64_t in_features,
                          at::ScalarType dtype);

}  // namespace cpu
}  // namespace quantkit
