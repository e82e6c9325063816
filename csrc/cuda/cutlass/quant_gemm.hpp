// What the CUTLASS GEMMs of this folder share (w8a8_sm90.cu, w4a8_sm90.cu): quantkit's exact epilogue as an
// epilogue visitor tree, its arguments, and the host-side calls with their return codes.
//
//   y = T(((float(acc + zw_n) * w_scale_n) * s) + bias_n),   zw_n = (128 - zp) * wsum_n
//
// every operation rounded on its own, the fp32 order of quantkit.ops.reference.gemm (the library is compiled with
// --fmad=false so that nvcc contracts no multiply-add), so the result equals the reference bit for bit. zw [n]
// int32, w_scale [n] fp32, bias [n] fp32 or null are per output channel; s is one fp32 (a device pointer).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace quantkit_cutlass {

namespace fusion = cutlass::epilogue::fusion;

// The epilogue tree. kChannelsAlongN: the output channels are the GEMM's N mode (a row broadcast: W8A8, D = y);
// else its M mode (a column broadcast: W4A8, computed swapped, D = y^T).
template <class ElementD, class TileShape, bool kChannelsAlongN>
struct QuantEpilogue {
  static constexpr auto kRN = cutlass::FloatRoundStyle::round_to_nearest;
  template <class E>
  using PerChannel = std::conditional_t<kChannelsAlongN, fusion::Sm90RowBroadcast<0, TileShape, E, E>,
                                        fusion::Sm90ColBroadcast<0, TileShape, E, E>>;
  using T = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, int32_t, int32_t, kRN>, fusion::Sm90AccFetch,
                            PerChannel<int32_t>>;                                                   // acc + zw
  using Y1 = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRN>, T, PerChannel<float>>;
  using Y2 = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRN>, Y1,
                             fusion::Sm90ScalarBroadcast<float>>;                                   // * s
  using EVT = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, ElementD, float, kRN>, Y2, PerChannel<float>>;

  // the tree's arguments, in its nesting: y = Y2 + bias, Y2 = Y1 * s, Y1 = T * w_scale, T = acc + zw
  template <class Arguments>
  static void set(Arguments& args, const int32_t* zw, const float* w_scale, const float* s, const float* bias) {
    args.epilogue.thread = {{{{{}, {zw}, {}}, {w_scale}, {}}, {{}, {s}}, {}}, {bias}, {}};
  }
};

// Return codes of the library's entries: 0 on success; 1: shape not implementable (alignment), 2: initialisation
// failed, 3: launch failed, 4: workspace too small, 5: a CUDA error, 6: unknown dtype/config.
template <class Gemm>
int run(const typename Gemm::Arguments& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Gemm gemm;
  if (Gemm::get_workspace_size(args) > workspace_bytes) return 4;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 3;
  return cudaGetLastError() == cudaSuccess ? 0 : 5;
}

template <class Gemm>
int implementable(const typename Gemm::Arguments& args) {
  return Gemm::can_implement(args) == cutlass::Status::kSuccess ? 0 : 1;
}

}  // namespace quantkit_cutlass
