// W8A8 linear on Hopper with CUTLASS 3.x: warp-specialised TMA/wgmma int8 GEMM with the exact quantkit epilogue.
//
// The default engine of resident 8-bit linears on Hopper where this library loads or builds (QUANTKIT_INT8_GEMM,
// src/quantkit/ops/cutlass_gemm.py): on an H200 1.04-1.46x faster than the Triton kernels on SDXL's shapes.
// A standalone shared library (no torch headers), built by nvcc for sm_90a with the CUTLASS headers of the
// `nvidia-cutlass` wheel and called through ctypes with raw device pointers on the caller's stream.
//
// Operands, as the resident kernels of src/quantkit/ops/triton_gemm.py read them:
//   A  [M, K] int8 row-major: the activation codes as int8 (q - 128), K a multiple of 16 (TMA alignment);
//   B  the resident blob [N, row_bytes] int8 (src/quantkit/ops/resident.py): centred weight codes, K-major with
//      leading dimension row_bytes (columns past K are zero, the tail is never read);
//   zw [N] int32: (128 - zp) * wsum_n, the static activation zero point's term (wsum_n: the blob's row sums);
//   w_scale [N] fp32, s: one fp32 activation scale (device pointer), bias [N] fp32 or null.
// Output D [M, N] fp16 or bf16 row-major:
//   y = T(((float(acc + zw_n) * w_scale_n) * s) + bias_n)
// exactly as quantkit.ops.reference.gemm (quant_gemm.hpp).
#include "quant_gemm.hpp"

using namespace cute;

namespace {

template <class ElementD, class TileShape, class ClusterShape, class MainSchedule, class EpiSchedule>
struct W8A8Static {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // B[k, n] at n * ldb + k: the blob's rows
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using EVT = typename quantkit_cutlass::QuantEpilogue<ElementD, TileShape, true>::EVT;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, LayoutD, kAlignD, ElementD, LayoutD, kAlignD, EpiSchedule, EVT>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB, LayoutB, kAlignAB,
      int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const void* a, const void* b, int64_t ldb, const int32_t* zw,
                                            const float* w_scale, const float* s, const float* bias, void* d,
                                            int m, int n, int k, int sm_count) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
    cute::get<0>(sb) = ldb;  // the blob's row pitch, not K
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(a), sa, static_cast<const ElementB*>(b), sb},
        {{}, nullptr, sd, static_cast<ElementD*>(d), sd}};
    quantkit_cutlass::QuantEpilogue<ElementD, TileShape, true>::set(args, zw, w_scale, s, bias);
    args.hw_info.sm_count = sm_count;
    return args;
  }

  static int run(const void* a, const void* b, int64_t ldb, const int32_t* zw, const float* w_scale, const float* s,
                 const float* bias, void* d, int m, int n, int k, int sm_count, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    return quantkit_cutlass::run<Gemm>(arguments(a, b, ldb, zw, w_scale, s, bias, d, m, n, k, sm_count), workspace,
                                       workspace_bytes, stream);
  }

  static int implementable(int64_t ldb, int m, int n, int k, int sm_count) {
    return quantkit_cutlass::implementable<Gemm>(
        arguments(nullptr, nullptr, ldb, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, sm_count));
  }

  static size_t workspace(int m, int n, int k, int sm_count) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, k, nullptr, nullptr, nullptr, nullptr, nullptr, m, n,
                                              k, sm_count));
  }
};

using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpiWS = cutlass::epilogue::TmaWarpSpecialized;
// config 0: 128x128x128 tiles, clusters of two along M (the weight tile multicast); config 1: 64x128x128, for
// M <= 128 where a 128-row tile would be half empty.
template <class D>
using Cfg0 = W8A8Static<D, Shape<_128, _128, _128>, Shape<_2, _1, _1>, Pingpong, EpiWS>;
template <class D>
using Cfg1 = W8A8Static<D, Shape<_64, _128, _128>, Shape<_1, _1, _1>, Pingpong, EpiWS>;

}  // namespace

extern "C" {

// Return codes: quant_gemm.hpp. out_dtype 0: fp16, 1: bf16.
int quantkit_cutlass_w8a8_static(int out_dtype, int config, const void* a, const void* b, int64_t ldb,
                                 const int32_t* zw, const float* w_scale, const float* s, const float* bias, void* d,
                                 int m, int n, int k, int sm_count, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
#define QK_RUN(C) C::run(a, b, ldb, zw, w_scale, s, bias, d, m, n, k, sm_count, workspace, workspace_bytes, stream)
  if (out_dtype == 0 && config == 0) return QK_RUN(Cfg0<cutlass::half_t>);
  if (out_dtype == 0 && config == 1) return QK_RUN(Cfg1<cutlass::half_t>);
  if (out_dtype == 1 && config == 0) return QK_RUN(Cfg0<cutlass::bfloat16_t>);
  if (out_dtype == 1 && config == 1) return QK_RUN(Cfg1<cutlass::bfloat16_t>);
#undef QK_RUN
  return 6;
}

// 0 where CUTLASS can run this shape and B pitch (its host-side alignment rules; no GPU needed), else 1; 6 for an
// unknown dtype/config.
int quantkit_cutlass_w8a8_can_implement(int out_dtype, int config, int64_t ldb, int m, int n, int k, int sm_count) {
  if (out_dtype == 0 && config == 0) return Cfg0<cutlass::half_t>::implementable(ldb, m, n, k, sm_count);
  if (out_dtype == 0 && config == 1) return Cfg1<cutlass::half_t>::implementable(ldb, m, n, k, sm_count);
  if (out_dtype == 1 && config == 0) return Cfg0<cutlass::bfloat16_t>::implementable(ldb, m, n, k, sm_count);
  if (out_dtype == 1 && config == 1) return Cfg1<cutlass::bfloat16_t>::implementable(ldb, m, n, k, sm_count);
  return 6;
}

// Workspace bytes the call above needs (the persistent tile scheduler's); (size_t)-1 for an unknown config.
size_t quantkit_cutlass_w8a8_workspace(int out_dtype, int config, int m, int n, int k, int sm_count) {
  if (out_dtype == 0 && config == 0) return Cfg0<cutlass::half_t>::workspace(m, n, k, sm_count);
  if (out_dtype == 0 && config == 1) return Cfg1<cutlass::half_t>::workspace(m, n, k, sm_count);
  if (out_dtype == 1 && config == 0) return Cfg0<cutlass::bfloat16_t>::workspace(m, n, k, sm_count);
  if (out_dtype == 1 && config == 1) return Cfg1<cutlass::bfloat16_t>::workspace(m, n, k, sm_count);
  return static_cast<size_t>(-1);
}

}  // extern "C"
