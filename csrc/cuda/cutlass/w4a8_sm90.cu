// W4A8 linear on Hopper with CUTLASS 3.x: int4 weights x int8 activations, the weights converted to int8 in
// registers (CUTLASS's mixed-input mainloop), int32 accumulation, the exact quantkit epilogue of w8a8_sm90.cu.
//
// Opt-in (QUANTKIT_RESIDENT_W4=cutlass, src/quantkit/ops/cutlass_gemm.py): 4-bit linears otherwise widen their
// nibbles to int8 on every call (2.5 ms of the SDXL W4A8 step on an H200) to run the 8-bit GEMM. CUTLASS converts the
// narrow operand through the register file, so it must be the GEMM's A operand: the product is computed swapped,
//   D^T [N, M] = W [N, K] . X [M, K]^T,
// with D^T column-major, which is y [M, N] row-major. Operands:
//   W  the signed-nibble resident blob [N, row_bytes] (src/quantkit/ops/resident.py, layout "s4"): code - 8 as
//      two's-complement int4, column 2j in the low nibble of byte j, K-major with leading dimension 2 * row_bytes
//      (in int4 elements; columns past K are zero, the tail is never read); K a multiple of 32 (TMA alignment);
//   X  [M, K] int8: the activation codes (q - 128);
//   zw [N] int32, w_scale [N] fp32, s (one fp32, device pointer), bias [N] fp32 or null: as in w8a8_sm90.cu, but
//      broadcast along the GEMM's rows (the output channels are its M mode here).
// Output y: the epilogue of quant_gemm.hpp, equal to quantkit.ops.reference.gemm bit for bit.
#include "quant_gemm.hpp"

using namespace cute;

namespace {

template <class ElementD, class TileShape>
struct W4A8Static {
  using ClusterShape = Shape<_1, _1, _1>;
  using ElementA = cutlass::int4b_t;
  using ElementB = int8_t;
  using LayoutA = cutlass::layout::RowMajor;     // W [N, K], K-major
  using LayoutB = cutlass::layout::ColumnMajor;  // X^T: element (k, m) at m * K + k
  using LayoutD = cutlass::layout::ColumnMajor;  // D^T [N, M] column-major = y [M, N] row-major
  static constexpr int kAlignA = 32;             // 128 bits of int4
  static constexpr int kAlignB = 16;
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using EVT = typename quantkit_cutlass::QuantEpilogue<ElementD, TileShape, false>::EVT;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative, EVT>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // m, n, k: the linear's tokens, output channels and input channels; lda: the blob's row pitch in int4 elements
  static typename Gemm::Arguments arguments(const void* w, int64_t lda, const void* x, const int32_t* zw,
                                            const float* w_scale, const float* s, const float* bias, void* d,
                                            int m, int n, int k, int sm_count) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(n, k, 1));
    cute::get<0>(sa) = lda;  // the blob's row pitch, not K
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(m, k, 1));
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(n, m, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {static_cast<const ElementA*>(w), sa, static_cast<const ElementB*>(x), sb},
        {{}, nullptr, sd, static_cast<ElementD*>(d), sd}};
    quantkit_cutlass::QuantEpilogue<ElementD, TileShape, false>::set(args, zw, w_scale, s, bias);
    args.hw_info.sm_count = sm_count;
    return args;
  }

  static int run(const void* w, int64_t lda, const void* x, const int32_t* zw, const float* w_scale, const float* s,
                 const float* bias, void* d, int m, int n, int k, int sm_count, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    return quantkit_cutlass::run<Gemm>(arguments(w, lda, x, zw, w_scale, s, bias, d, m, n, k, sm_count), workspace,
                                       workspace_bytes, stream);
  }

  static int implementable(int64_t lda, int m, int n, int k, int sm_count) {
    return quantkit_cutlass::implementable<Gemm>(
        arguments(nullptr, lda, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, sm_count));
  }

  static size_t workspace(int m, int n, int k, int sm_count) {
    return Gemm::get_workspace_size(arguments(nullptr, k, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m,
                                              n, k, sm_count));
  }
};

// One configuration: 128 output channels x 128 tokens x 128 K per tile, two consumer warp groups (cooperative).
template <class D>
using W4Cfg0 = W4A8Static<D, Shape<_128, _128, _128>>;

}  // namespace

// return F(W4Cfg<D>) for the (out_dtype, config) pair of the caller's arguments
#define QK_W4_DISPATCH(F)                                                   \
  if (out_dtype == 0 && config == 0) return F(W4Cfg0<cutlass::half_t>);     \
  if (out_dtype == 1 && config == 0) return F(W4Cfg0<cutlass::bfloat16_t>);

extern "C" {

// y [m, n] of int8 activation codes x [m, k] and a signed-nibble blob w (row pitch lda int4 elements); return codes
// as quantkit_cutlass_w8a8_static's.
int quantkit_cutlass_w4a8_static(int out_dtype, int config, const void* x, const void* w, int64_t lda,
                                 const int32_t* zw, const float* w_scale, const float* s, const float* bias, void* d,
                                 int m, int n, int k, int sm_count, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
#define QK_RUN(C) C::run(w, lda, x, zw, w_scale, s, bias, d, m, n, k, sm_count, workspace, workspace_bytes, stream)
  QK_W4_DISPATCH(QK_RUN)
#undef QK_RUN
  return 6;
}

int quantkit_cutlass_w4a8_can_implement(int out_dtype, int config, int64_t lda, int m, int n, int k, int sm_count) {
#define QK_IMPLEMENTABLE(C) C::implementable(lda, m, n, k, sm_count)
  QK_W4_DISPATCH(QK_IMPLEMENTABLE)
#undef QK_IMPLEMENTABLE
  return 6;
}

size_t quantkit_cutlass_w4a8_workspace(int out_dtype, int config, int m, int n, int k, int sm_count) {
#define QK_WORKSPACE(C) C::workspace(m, n, k, sm_count)
  QK_W4_DISPATCH(QK_WORKSPACE)
#undef QK_WORKSPACE
  return static_cast<size_t>(-1);
}

}  // extern "C"
