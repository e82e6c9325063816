// Launchers of the quantkit CUDA kernels (kernels.cu). Plain CUDA runtime types only, no torch headers, so that
// CI compiles kernels.cu with nvcc alone (sm_80 and sm_90) on machines whose torch has no CUDA.
//
// Conventions (the canonical format is src/quantkit/formats/spec.py, mirrored in include/quantkit/format.h):
// * "s8 codes": activation codes q in [0, 2**bits) stored as int8 (q - 128), so that int8 tensor cores can
//   multiply them; the exact integer result is recovered as
//     sum_k (q_k - zp) * wc_k = sum_k (q_k - 128) * wc_k + (128 - zp) * sum_k wc_k,
//   with wc = weight code - weight zero point (int8 for 8-bit symmetric and all 4-bit formats).
// * Row-major matrices; "ld" is the row stride in elements. Padded rows / columns are written as zeros.
// * dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace quantkit {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Static activation quantization of x [M, K] (row stride K) with one scale / zero point (device scalars).
// xor_mask 0x80 writes s8 codes (q - 128); 0 writes the plain uint8 codes. Columns K..ldo-1 get zero.
void quantize_rows_static(DType dt, const void* x, int64_t M, int64_t K, const float* scale, const int32_t* zp,
                          int bits, uint8_t* out, int64_t ldo, uint8_t xor_mask, cudaStream_t stream);

// Dynamic per-row activation quantization (the reference's act_qparams_from_range per row): writes codes like
// quantize_rows_static and the per-row scale (fp32) and zero point (int32).
void quantize_rows_dynamic(DType dt, const void* x, int64_t M, int64_t K, int bits, uint8_t* out, int64_t ldo,
                           uint8_t xor_mask, float* scale_out, int32_t* zp_out, cudaStream_t stream);

// Activation qparams from per-sample (lo, hi) ranges, as the reference computes them (n samples).
void qparams_from_range(const float* lo, const float* hi, int64_t n, int bits, float* scale, int32_t* zp,
                        cudaStream_t stream);

// Quantize an NCHW tensor x [B, C, HW] into s8 codes laid out NHWC [B, HW, C]. scale / zp hold one value, or one
// per sample when per_sample is set.
void quantize_nchw_to_nhwc(DType dt, const void* x, int64_t B, int64_t C, int64_t HW, const float* scale,
                           const int32_t* zp, bool per_sample, int bits, int8_t* out, cudaStream_t stream);

// im2col of s8 NHWC codes into patches [Mp, Kp] (rows m = (b, oy, ox), columns k = (ky, kx, c)); out-of-image
// taps get the code of value 0 (zp - 128, per sample when per_sample), rows >= B*Ho*Wo and columns >= kh*kw*C zero.
void im2col_s8(const int8_t* x, int64_t B, int64_t H, int64_t W, int64_t C, int kh, int kw, int sh, int sw, int ph,
               int pw, int dh, int dw, int64_t Ho, int64_t Wo, const int32_t* zp, bool per_sample, int8_t* out,
               int64_t Mp, int64_t Kp, cudaStream_t stream);

// Canonical packed weight (int32 words, bits in {4, 8}, one scale per row) -> centred int8 [Np, Kp] and the row
// sums of the centred codes (int32 [Np]). conv_c > 0 reorders columns from PyTorch's (c, ky, kx) to (ky, kx, c)
// with khw = kh*kw taps; w_zp (uint8 [N]) may be null (symmetric: 2**(bits-1)).
void weight_to_s8(const int32_t* qdata, int64_t N, int64_t words_per_row, int64_t K, int bits, const uint8_t* w_zp,
                  int64_t conv_c, int64_t khw, int8_t* out, int64_t Np, int64_t Kp, int32_t* wsum,
                  cudaStream_t stream);

// Epilogue of the int8 GEMM, row form: acc [M, ldacc] -> y [M, N] in dtype dt:
//   y = T((float(acc + (128 - zp_m) * wsum_n) * w_scale_n) * s_m + bias_n)     (the reference's fp32 order)
// s / zp have M entries when per_row, else one. The bias is either fp32 (bias_f32) or in dtype dt (bias_x), or
// absent (both null).
void epilogue_rows(DType dt, const int32_t* acc, int64_t ldacc, int64_t M, int64_t N, const int32_t* wsum,
                   const __half* w_scale, const float* s, const int32_t* zp, bool per_row, const float* bias_f32,
                   const void* bias_x, void* y, cudaStream_t stream);

// Epilogue of the transposed convolution GEMM: acc [N, ldacc] with columns m = b*HW + hw -> y [B, N, HW]; s / zp
// per sample when per_sample; bias as in epilogue_rows.
void epilogue_conv(DType dt, const int32_t* acc, int64_t ldacc, int64_t B, int64_t HW, int64_t N,
                   const int32_t* wsum, const __half* w_scale, const float* s, const int32_t* zp, bool per_sample,
                   const float* bias_f32, const void* bias_x, void* y, cudaStream_t stream);

// Packed weight (bits 2/3/4/8, groups of group_len = K / G columns) -> float weight [N, K] in dtype dt, exactly as
// the reference: T(float(code - zp) * float(scale)). w_zp (uint8 [N, G]) null = symmetric.
void dequantize_weight(DType dt, const int32_t* qdata, int64_t N, int64_t words_per_row, int64_t K, int bits,
                       const __half* w_scale, const uint8_t* w_zp, int64_t G, void* out, cudaStream_t stream);

// Weight-only 4-bit GEMV for M <= 4 rows: y [M, N] = x [M, K] . dequant(W)^T + bias, products accumulated in
// fp32 (within rounding of the reference: K % 32 == 0 with group length % 32 == 0 takes the 16-byte-load kernel,
// which uses the exact weights (code - zp) * scale; other shapes dequantize to dtype dt as the reference rounds
// them). G groups per row (K / G must be a multiple of 8); bias (dtype dt, as the reference's bias.to(x.dtype))
// may be null.
void gemv_w4a16(DType dt, const void* x, int64_t M, int64_t K, const int32_t* qdata, int64_t words_per_row,
                const __half* w_scale, const uint8_t* w_zp, int64_t G, const void* bias, int64_t N, void* y,
                cudaStream_t stream);

}  // namespace cuda
}  // namespace quantkit
