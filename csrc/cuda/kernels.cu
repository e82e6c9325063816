// quantkit CUDA kernels: activation quantization, im2col, weight conversion, GEMM epilogues, weight dequantization
// and the 4-bit weight-only GEMV. The int8 x int8 -> int32 products themselves run on cuBLASLt (through
// at::_int_mm in ops_cuda.cpp); see kernels.h for the conventions and csrc/README.md for the design.
//
// Numerics follow src/quantkit/ops/reference.py operation for operation: IEEE division (__fdiv_rn), round half to
// even (rintf), and separately rounded fp32 multiplies and adds in the reference's order (no FMA contraction), so
// integer paths are bit-identical to the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels.h"

namespace quantkit {
namespace cuda {
namespace {

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

#define QK_DISPATCH(dt, T, ...)     \
  switch (dt) {                     \
    case kF32: {                    \
      using T = float;              \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
    case kF16: {                    \
      using T = __half;             \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
    default: {                      \
      using T = __nv_bfloat16;      \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
  }

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n, int threads = kThreads) {
  int64_t g = (n + threads - 1) / threads;
  if (g > 65535LL * 32) g = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

// Eight consecutive activations as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* v);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float* v) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* v) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    v[2 * j] = f.x, v[2 * j + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* v) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    v[2 * j] = f.x, v[2 * j + 1] = f.y;
  }
}

// Eight floats rounded to T and stored (16 bytes for fp16 / bf16, 32 for fp32); p must be aligned.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v);
template <>
__device__ __forceinline__ void store8<float>(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <>
__device__ __forceinline__ void store8<__half>(__half* p, const float* v) {
  uint4 u;
  __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}
template <>
__device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* p, const float* v) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Bias of output n as fp32: an fp32 bias, or one in the activation dtype (both exact conversions), or none.
template <typename T>
__device__ __forceinline__ float bias_at(const float* bf, const T* bt, int64_t n) {
  return bf != nullptr ? bf[n] : Cvt<T>::to(bt[n]);
}

// The reference's code of one value: clamp(round(v / s) + zp, 0, qmax).
__device__ __forceinline__ int act_code(float v, float s, float zpf, float qmax) {
  float q = __fadd_rn(rintf(__fdiv_rn(v, s)), zpf);
  q = fminf(fmaxf(q, 0.f), qmax);
  return static_cast<int>(q);
}

// The reference's act_qparams_from_range for one (lo, hi).
__device__ __forceinline__ void qparams(float lo, float hi, float qmax, float* s, float* zpf) {
  lo = fminf(lo, 0.f);
  hi = fmaxf(hi, 0.f);
  const float scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), 1e-8f);
  *s = scale;
  *zpf = fminf(fmaxf(rintf(__fdiv_rn(-lo, scale)), 0.f), qmax);
}

template <typename T>
__global__ void k_quant_rows_static(const T* __restrict__ x, int64_t M, int64_t K, const float* __restrict__ scale,
                                    const int32_t* __restrict__ zp, float qmax, uint8_t* __restrict__ out,
                                    int64_t ldo, uint8_t mask) {
  const float s = scale[0];
  const float zpf = static_cast<float>(zp[0]);
  const int64_t total = M * ldo;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / ldo, k = i - m * ldo;
    uint8_t v = 0;
    if (k < K) v = static_cast<uint8_t>(act_code(Cvt<T>::to(x[m * K + k]), s, zpf, qmax)) ^ mask;
    out[i] = v;
  }
}

// K % 8 == 0 and ldo == K: eight values per thread, 2-D grid (rows on y).
template <typename T>
__global__ void k_quant_rows_static_v8(const T* __restrict__ x, int64_t M, int K, const float* __restrict__ scale,
                                       const int32_t* __restrict__ zp, float qmax, uint8_t* __restrict__ out,
                                       uint8_t mask) {
  const float s = scale[0];
  const float zpf = static_cast<float>(zp[0]);
  const int chunks = K / 8;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += gridDim.x * blockDim.x) {
      float v[8];
      load8<T>(x + m * K + c * 8, v);
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        lo |= static_cast<uint32_t>(static_cast<uint8_t>(act_code(v[t], s, zpf, qmax)) ^ mask) << (8 * t);
        hi |= static_cast<uint32_t>(static_cast<uint8_t>(act_code(v[t + 4], s, zpf, qmax)) ^ mask) << (8 * t);
      }
      *reinterpret_cast<uint2*>(out + m * K + c * 8) = make_uint2(lo, hi);
    }
  }
}

__device__ __forceinline__ void block_minmax(float& lo, float& hi) {
  __shared__ float s_lo[32], s_hi[32];
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  lo = lane < nwarps ? s_lo[lane] : INFINITY;
  hi = lane < nwarps ? s_hi[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
}

__device__ __forceinline__ int block_sum(int v) {
  __shared__ int s_v[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  if (lane == 0) s_v[warp] = v;
  __syncthreads();
  v = lane < nwarps ? s_v[lane] : 0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void k_quant_rows_dynamic(const T* __restrict__ x, int64_t K, float qmax, uint8_t* __restrict__ out,
                                     int64_t ldo, uint8_t mask, float* __restrict__ scale_out,
                                     int32_t* __restrict__ zp_out) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = Cvt<T>::to(row[k]);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  block_minmax(lo, hi);
  float s, zpf;
  qparams(lo, hi, qmax, &s, &zpf);
  if (threadIdx.x == 0) {
    scale_out[m] = s;
    zp_out[m] = static_cast<int32_t>(zpf);
  }
  uint8_t* orow = out + m * ldo;
  for (int64_t k = threadIdx.x; k < ldo; k += blockDim.x) {
    orow[k] = k < K ? (static_cast<uint8_t>(act_code(Cvt<T>::to(row[k]), s, zpf, qmax)) ^ mask) : 0;
  }
}

__global__ void k_qparams(const float* __restrict__ lo, const float* __restrict__ hi, int64_t n, float qmax,
                          float* __restrict__ scale, int32_t* __restrict__ zp) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float s, zpf;
  qparams(lo[i], hi[i], qmax, &s, &zpf);
  scale[i] = s;
  zp[i] = static_cast<int32_t>(zpf);
}

// 32x32 tiles: read along HW (coalesced), write along C (coalesced).
template <typename T>
__global__ void k_quant_nchw_to_nhwc(const T* __restrict__ x, int64_t C, int64_t HW, const float* __restrict__ scale,
                                     const int32_t* __restrict__ zp, bool per_sample, float qmax,
                                     int8_t* __restrict__ out) {
  __shared__ uint8_t tile[32][33];
  const int64_t b = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.y) * 32, hw0 = static_cast<int64_t>(blockIdx.x) * 32;
  const float s = scale[per_sample ? b : 0];
  const float zpf = static_cast<float>(zp[per_sample ? b : 0]);
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int64_t c = c0 + j, hw = hw0 + threadIdx.x;
    if (c < C && hw < HW) {
      tile[j][threadIdx.x] = static_cast<uint8_t>(act_code(Cvt<T>::to(x[(b * C + c) * HW + hw]), s, zpf, qmax)) ^ 0x80;
    }
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int64_t hw = hw0 + j, c = c0 + threadIdx.x;
    if (c < C && hw < HW) out[(b * HW + hw) * C + c] = static_cast<int8_t>(tile[threadIdx.x][j]);
  }
}

// VEC bytes per thread (16 when C % 16 == 0, else 1).
template <int VEC>
__global__ void k_im2col(const int8_t* __restrict__ x, int64_t H, int64_t W, int64_t C, int kh, int kw, int sh,
                         int sw, int ph, int pw, int dh, int dw, int64_t Ho, int64_t Wo, int64_t Mtot,
                         const int32_t* __restrict__ zp, bool per_sample, int8_t* __restrict__ out, int64_t Mp,
                         int64_t Kp) {
  const int64_t K = static_cast<int64_t>(kh) * kw * C;
  const int64_t chunks = Kp / VEC;
  const int64_t total = Mp * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / chunks;
    const int64_t kk = (i - m * chunks) * VEC;
    int8_t* dst = out + m * Kp + kk;
    if (m >= Mtot || kk >= K) {
      if constexpr (VEC == 16) {
        *reinterpret_cast<int4*>(dst) = make_int4(0, 0, 0, 0);
      } else {
        *dst = 0;
      }
      continue;
    }
    const int64_t tap = kk / C, c = kk - tap * C;
    const int ky = static_cast<int>(tap / kw), kx = static_cast<int>(tap - static_cast<int64_t>(ky) * kw);
    const int64_t b = m / (Ho * Wo), r = m - b * Ho * Wo;
    const int64_t oy = r / Wo, ox = r - oy * Wo;
    const int64_t iy = oy * sh - ph + static_cast<int64_t>(ky) * dh;
    const int64_t ix = ox * sw - pw + static_cast<int64_t>(kx) * dw;
    if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
      const int8_t* src = x + ((b * H + iy) * W + ix) * C + c;
      if constexpr (VEC == 16) {
        *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(src);
      } else {
        *dst = *src;
      }
    } else {
      const int8_t pad = static_cast<int8_t>(zp[per_sample ? b : 0] - 128);
      if constexpr (VEC == 16) {
        const int p = static_cast<int>(static_cast<uint32_t>(static_cast<uint8_t>(pad)) * 0x01010101u);
        *reinterpret_cast<int4*>(dst) = make_int4(p, p, p, p);
      } else {
        *dst = pad;
      }
    }
  }
}

__global__ void k_weight_s8(const int32_t* __restrict__ q, int64_t N, int64_t wpr, int64_t K, int bits,
                            const uint8_t* __restrict__ w_zp, int64_t conv_c, int64_t khw, int8_t* __restrict__ out,
                            int64_t Kp, int32_t* __restrict__ wsum) {
  const int64_t n = blockIdx.x;
  int8_t* orow = out + n * Kp;
  if (n >= N) {
    for (int64_t k = threadIdx.x; k < Kp; k += blockDim.x) orow[k] = 0;
    if (threadIdx.x == 0) wsum[n] = 0;
    return;
  }
  const int vpw = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const int zpv = w_zp != nullptr ? static_cast<int>(w_zp[n]) : (1 << (bits - 1));
  const int32_t* qrow = q + n * wpr;
  int sum = 0;
  for (int64_t k = threadIdx.x; k < Kp; k += blockDim.x) {
    int v = 0;
    if (k < K) {
      int64_t ks = k;
      if (conv_c > 0) {
        const int64_t tap = k / conv_c, c = k - tap * conv_c;
        ks = c * khw + tap;
      }
      const uint32_t word = static_cast<uint32_t>(qrow[ks / vpw]);
      v = static_cast<int>((word >> ((ks % vpw) * bits)) & mask) - zpv;
      sum += v;
    }
    orow[k] = static_cast<int8_t>(v);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) wsum[n] = sum;
}

// 8-bit symmetric or 4-bit weights of a Linear with K % 8 == 0 (Kp == K): one packed word per thread.
__global__ void k_weight_s8_fast(const int32_t* __restrict__ q, int64_t N, int64_t K, int bits,
                                 const uint8_t* __restrict__ w_zp, int8_t* __restrict__ out,
                                 int32_t* __restrict__ wsum) {
  const int64_t n = blockIdx.x;
  int8_t* orow = out + n * K;
  const int64_t wpr = K * bits / 32;
  if (n >= N) {
    for (int64_t w = threadIdx.x; w < wpr; w += blockDim.x) {
      if (bits == 8) {
        reinterpret_cast<uint32_t*>(orow)[w] = 0u;
      } else {
        reinterpret_cast<uint2*>(orow)[w] = make_uint2(0u, 0u);
      }
    }
    if (threadIdx.x == 0) wsum[n] = 0;
    return;
  }
  const int32_t* qrow = q + n * wpr;
  int sum = 0;
  if (bits == 8) {  // symmetric: code - 128 is the code with its top bit flipped
    for (int64_t w = threadIdx.x; w < wpr; w += blockDim.x) {
      const uint32_t v = static_cast<uint32_t>(qrow[w]) ^ 0x80808080u;
      reinterpret_cast<uint32_t*>(orow)[w] = v;
      sum = __dp4a(static_cast<int>(v), 0x01010101, sum);
    }
  } else {
    const int zpv = w_zp != nullptr ? static_cast<int>(w_zp[n]) : 8;
    for (int64_t w = threadIdx.x; w < wpr; w += blockDim.x) {
      const uint32_t word = static_cast<uint32_t>(qrow[w]);
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int a = static_cast<int>((word >> (4 * t)) & 15u) - zpv;
        const int b = static_cast<int>((word >> (4 * t + 16)) & 15u) - zpv;
        sum += a + b;
        lo |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(a))) << (8 * t);
        hi |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(b))) << (8 * t);
      }
      reinterpret_cast<uint2*>(orow)[w] = make_uint2(lo, hi);
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) wsum[n] = sum;
}

// The exact integer result of one output, scaled in the reference's fp32 order.
__device__ __forceinline__ float dequant_acc(int32_t acc, long long corr, int32_t ws, float wscale, float s) {
  const long long exact = static_cast<long long>(acc) + corr * static_cast<long long>(ws);
  return __fmul_rn(__fmul_rn(__ll2float_rn(exact), wscale), s);
}

template <typename T>
__global__ void k_epilogue_rows(const int32_t* __restrict__ acc, int64_t ldacc, int64_t M, int64_t N,
                                const int32_t* __restrict__ wsum, const __half* __restrict__ w_scale,
                                const float* __restrict__ s, const int32_t* __restrict__ zp, bool per_row,
                                const float* __restrict__ bias_f, const T* __restrict__ bias_t, T* __restrict__ y) {
  const bool has_bias = bias_f != nullptr || bias_t != nullptr;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const int64_t r = per_row ? m : 0;
    const float sm = s[r];
    const long long corr = 128 - zp[r];
    for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float v = dequant_acc(acc[m * ldacc + n], corr, wsum[n], __half2float(w_scale[n]), sm);
      if (has_bias) v = __fadd_rn(v, bias_at<T>(bias_f, bias_t, n));
      y[m * N + n] = Cvt<T>::from(v);
    }
  }
}

// N % 8 == 0 (then ldacc == N): eight outputs per thread.
template <typename T>
__global__ void k_epilogue_rows_v8(const int32_t* __restrict__ acc, int64_t ldacc, int64_t M, int64_t N,
                                   const int32_t* __restrict__ wsum, const __half* __restrict__ w_scale,
                                   const float* __restrict__ s, const int32_t* __restrict__ zp, bool per_row,
                                   const float* __restrict__ bias_f, const T* __restrict__ bias_t,
                                   T* __restrict__ y) {
  const bool has_bias = bias_f != nullptr || bias_t != nullptr;
  const int64_t chunks = N / 8;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const int64_t r = per_row ? m : 0;
    const float sm = s[r];
    const long long corr = 128 - zp[r];
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t n0 = c * 8;
      const int4 a0 = *reinterpret_cast<const int4*>(acc + m * ldacc + n0);
      const int4 a1 = *reinterpret_cast<const int4*>(acc + m * ldacc + n0 + 4);
      const int32_t a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      float v[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        v[t] = dequant_acc(a[t], corr, wsum[n0 + t], __half2float(w_scale[n0 + t]), sm);
        if (has_bias) v[t] = __fadd_rn(v[t], bias_at<T>(bias_f, bias_t, n0 + t));
      }
      store8<T>(y + m * N + n0, v);
    }
  }
}

// Rows of y = (b, n) pairs on the grid's y axis; VEC = 8 when HW % 8 == 0 (aligned loads and stores), else 1.
template <typename T, int VEC>
__global__ void k_epilogue_conv(const int32_t* __restrict__ acc, int64_t ldacc, int64_t B, int64_t HW, int64_t N,
                                const int32_t* __restrict__ wsum, const __half* __restrict__ w_scale,
                                const float* __restrict__ s, const int32_t* __restrict__ zp, bool per_sample,
                                const float* __restrict__ bias_f, const T* __restrict__ bias_t,
                                T* __restrict__ y) {
  const bool has_bias = bias_f != nullptr || bias_t != nullptr;
  for (int64_t bn = blockIdx.y; bn < B * N; bn += gridDim.y) {
    const int64_t b = bn / N, n = bn - b * N;
    const int64_t r = per_sample ? b : 0;
    const float sb = s[r];
    const long long corr = 128 - zp[r];
    const int32_t ws = wsum[n];
    const float wsc = __half2float(w_scale[n]);
    const float bv = has_bias ? bias_at<T>(bias_f, bias_t, n) : 0.f;
    const int32_t* arow = acc + n * ldacc + b * HW;
    T* yrow = y + bn * HW;
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < HW / VEC;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if constexpr (VEC == 8) {
        const int4 a0 = *reinterpret_cast<const int4*>(arow + c * 8);
        const int4 a1 = *reinterpret_cast<const int4*>(arow + c * 8 + 4);
        const int32_t a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        float v[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          v[t] = dequant_acc(a[t], corr, ws, wsc, sb);
          if (has_bias) v[t] = __fadd_rn(v[t], bv);
        }
        store8<T>(yrow + c * 8, v);
      } else {
        float v = dequant_acc(arow[c], corr, ws, wsc, sb);
        if (has_bias) v = __fadd_rn(v, bv);
        yrow[c] = Cvt<T>::from(v);
      }
    }
  }
}

template <typename T>
__global__ void k_dequantize(const int32_t* __restrict__ q, int64_t N, int64_t wpr, int64_t K, int bits,
                             const __half* __restrict__ w_scale, const uint8_t* __restrict__ w_zp, int64_t G,
                             T* __restrict__ out) {
  const int vpw = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const int64_t glen = K / G;
  const int64_t total = N * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i - n * K;
    const int64_t g = k / glen;
    const uint32_t word = static_cast<uint32_t>(q[n * wpr + k / vpw]);
    const int code = static_cast<int>((word >> ((k % vpw) * bits)) & mask);
    const int zpv = w_zp != nullptr ? static_cast<int>(w_zp[n * G + g]) : (1 << (bits - 1));
    out[i] = Cvt<T>::from(__fmul_rn(static_cast<float>(code - zpv), __half2float(w_scale[n * G + g])));
  }
}

// 4-bit, K % 8 == 0 and group length % 8 == 0: one word (eight codes of one group) per thread, rows on y.
template <typename T>
__global__ void k_dequantize_w4_v8(const int32_t* __restrict__ q, int64_t N, int wpr, int glen,
                                   const __half* __restrict__ w_scale, const uint8_t* __restrict__ w_zp, int G,
                                   T* __restrict__ out) {
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    for (int w = blockIdx.x * blockDim.x + threadIdx.x; w < wpr; w += gridDim.x * blockDim.x) {
      const int g = (w * 8) / glen;
      const float sc = __half2float(w_scale[n * G + g]);
      const int zpv = w_zp != nullptr ? static_cast<int>(w_zp[n * G + g]) : 8;
      const uint32_t word = static_cast<uint32_t>(q[n * wpr + w]);
      float v[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) v[t] = __fmul_rn(static_cast<float>(static_cast<int>((word >> (4 * t)) & 15u) - zpv), sc);
      store8<T>(out + n * static_cast<int64_t>(wpr) * 8 + w * 8, v);
    }
  }
}

constexpr int kGemvMaxRows = 4;
constexpr int kGemvWarps = 8;

// Eight 4-bit codes of `word` dequantized exactly as the reference (fp32 product rounded to T), as floats.
template <typename T>
__device__ __forceinline__ void dequant8(uint32_t word, int zpv, float sc, float* w) {
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    w[t] = Cvt<T>::to(Cvt<T>::from(__fmul_rn(static_cast<float>(static_cast<int>((word >> (4 * t)) & 15u) - zpv), sc)));
  }
}

// Generic GEMV (any K % 8 == 0, group length % 8 == 0): one warp per output column n, one 32-bit word (8 codes)
// per lane and step.
template <typename T>
__global__ void k_gemv_w4a16(const T* __restrict__ x, int M, int K, const int32_t* __restrict__ q, int wpr,
                             const __half* __restrict__ w_scale, const uint8_t* __restrict__ w_zp, int G,
                             const T* __restrict__ bias, int N, T* __restrict__ y) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * kGemvWarps + warp;
  if (n >= N) return;
  const int glen = K / G;
  float acc[kGemvMaxRows] = {0.f, 0.f, 0.f, 0.f};
  const int32_t* qrow = q + static_cast<int64_t>(n) * wpr;
  for (int j = lane; j < wpr; j += 32) {
    const uint32_t word = static_cast<uint32_t>(__ldg(qrow + j));
    const int k0 = j * 8;
    const int g = k0 / glen;
    const float sc = __half2float(w_scale[n * G + g]);
    const int zpv = w_zp != nullptr ? static_cast<int>(w_zp[n * G + g]) : 8;
    float w[8];
    dequant8<T>(word, zpv, sc, w);
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) {
      if (m < M) {
        float xv[8];
        load8<T>(x + m * K + k0, xv);
#pragma unroll
        for (int t = 0; t < 8; ++t) acc[m] = fmaf(w[t], xv[t], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) {
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? Cvt<T>::to(bias[n]) : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n] = Cvt<T>::from(acc[m] + b);
  }
}

// Streaming 128-bit load of weights (read once per call: no L1 allocation).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// part[m] += the eight products x[m][t] * (code_t - zp) of one 32-bit word of 4-bit codes (code t at bits 4t), in
// code order. A code becomes a float exactly through the exponent trick: byte b of `lo` / `hi` moved into the low
// byte of 0x4B000000 is the float 2**23 + code, and zf = 2**23 + zp, so one subtraction gives code - zp.
template <int MR>
__device__ __forceinline__ void word_dot(uint32_t word, float zf, const float (&xv)[MR][8], float (&part)[MR]) {
  const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;  // codes 0,2,4,6 / 1,3,5,7
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const float we = __fsub_rn(__uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540u + b)), zf);
    const float wo = __fsub_rn(__uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540u + b)), zf);
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      part[m] = fmaf(xv[m][2 * b], we, part[m]);
      part[m] = fmaf(xv[m][2 * b + 1], wo, part[m]);
    }
  }
}

constexpr int kGemv2Threads = 128;  // 4 warps
constexpr int kGemv2Rows = 4;       // output columns per warp

// Fast GEMV for K % 32 == 0 and group length % 32 == 0 (the weight-bandwidth-bound batch-1 case). Warps are split
// into `ksplit` slices of K times 4 / ksplit groups of kGemv2Rows output columns; lane l of a warp reads chunks
// (32 codes = one 16-byte load) l, l + 32 * ksplit, ... of each of its columns, all kGemv2Rows loads issued before
// use, and the chunk's activations are read once for the kGemv2Rows columns. A code c becomes a float exactly
// through the exponent trick float(0x4B000000 | c) = 2**23 + c, so (2**23 + c) - (2**23 + zp) = c - zp with one
// add; each word's eight products x * (c - zp) are summed in fp32 and scaled once by the group scale (exact
// weights, fp32 sums: within rounding of the reference, which rounds each dequantized weight to T).
template <typename T, int MR>
__global__ void __launch_bounds__(kGemv2Threads) k_gemv_w4a16_v2(const T* __restrict__ x, int K,
                                                                  const uint4* __restrict__ q,
                                                                  const __half* __restrict__ w_scale,
                                                                  const uint8_t* __restrict__ w_zp, int G,
                                                                  const T* __restrict__ bias, int N, int ksplit,
                                                                  T* __restrict__ y) {
  __shared__ float red[kGemv2Threads / 32][MR * kGemv2Rows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kslice = warp % ksplit, rgroup = warp / ksplit;
  const int groups_per_block = (kGemv2Threads / 32) / ksplit;
  const int n0 = (blockIdx.x * groups_per_block + rgroup) * kGemv2Rows;
  const int chunks = K / 32, cpg = (K / G) / 32;
  int rows[kGemv2Rows];
#pragma unroll
  for (int r = 0; r < kGemv2Rows; ++r) rows[r] = min(n0 + r, N - 1);  // columns past N recompute the last one
  float acc[MR][kGemv2Rows];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kGemv2Rows; ++r) acc[m][r] = 0.f;

  for (int c = kslice * 32 + lane; c < chunks; c += 32 * ksplit) {
    uint4 wv[kGemv2Rows];
#pragma unroll
    for (int r = 0; r < kGemv2Rows; ++r) wv[r] = ld_stream(q + static_cast<int64_t>(rows[r]) * chunks + c);
    const int g = c / cpg;
    float sc[kGemv2Rows], zf[kGemv2Rows];
#pragma unroll
    for (int r = 0; r < kGemv2Rows; ++r) {
      sc[r] = __half2float(w_scale[static_cast<int64_t>(rows[r]) * G + g]);
      zf[r] = 8388608.f + static_cast<float>(w_zp != nullptr ? w_zp[static_cast<int64_t>(rows[r]) * G + g] : 8);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float xv[MR][8];
#pragma unroll
      for (int m = 0; m < MR; ++m) load8<T>(x + static_cast<int64_t>(m) * K + c * 32 + i * 8, xv[m]);
#pragma unroll
      for (int r = 0; r < kGemv2Rows; ++r) {
        const uint32_t word = i == 0 ? wv[r].x : i == 1 ? wv[r].y : i == 2 ? wv[r].z : wv[r].w;
        float part[MR];
#pragma unroll
        for (int m = 0; m < MR; ++m) part[m] = 0.f;
        word_dot<MR>(word, zf[r], xv, part);
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[m][r] = fmaf(part[m], sc[r], acc[m][r]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kGemv2Rows; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);
  if (ksplit > 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int r = 0; r < kGemv2Rows; ++r) red[warp][m * kGemv2Rows + r] = acc[m][r];
    }
    __syncthreads();
    if (kslice != 0) return;
    if (lane == 0) {
      for (int s = 1; s < ksplit; ++s)
#pragma unroll
        for (int m = 0; m < MR; ++m)
#pragma unroll
          for (int r = 0; r < kGemv2Rows; ++r) acc[m][r] += red[warp + s][m * kGemv2Rows + r];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kGemv2Rows; ++r) {
      const int n = n0 + r;
      if (n >= N) break;
      const float b = bias != nullptr ? Cvt<T>::to(bias[n]) : 0.f;
#pragma unroll
      for (int m = 0; m < MR; ++m) y[static_cast<int64_t>(m) * N + n] = Cvt<T>::from(acc[m][r] + b);
    }
  }
}

// One-round GEMV (K % 32 == 0, group length % 32 == 0), the default for small weights. Measured on an H200, a batch-1 GEMV costs
// about one memory latency per dependent round of loads, far more than its bytes: v2 (a warp per 4 columns, one
// 16-byte chunk of 32 codes per lane and round) needs two rounds for K = 1280 (40 chunks). Here `LPR` lanes share a
// column and each lane issues all its chunks (sub, sub + LPR, ... up to U of them) before using the first, so a row
// of up to LPR * U chunks (K <= 8192 with LPR = 32, U = 8) is one round; many columns' lanes keep the memory system
// busy. The lanes of a column are summed by shuffles in a fixed order (deterministic); the arithmetic per word is
// v2's (exact weights through the exponent trick, fp32 sums, one scale per chunk).
constexpr int kGemv3Threads = 64;  // 2 warps: more blocks for the SMs when N is small

template <typename T, int MR, int LPR, int U>
__global__ void __launch_bounds__(kGemv3Threads) k_gemv_w4a16_v3(const T* __restrict__ x, int K,
                                                                  const uint4* __restrict__ q,
                                                                  const __half* __restrict__ w_scale,
                                                                  const uint8_t* __restrict__ w_zp, int G,
                                                                  const T* __restrict__ bias, int N,
                                                                  T* __restrict__ y) {
  const int sub = threadIdx.x % LPR;
  const int n = blockIdx.x * (kGemv3Threads / LPR) + threadIdx.x / LPR;
  const int nr = min(n, N - 1);  // columns past N recompute the last one (no early exit: shuffles need all lanes)
  const int chunks = K / 32, cpg = (K / G) / 32;
  const uint4* qrow = q + static_cast<int64_t>(nr) * chunks;
  const __half* srow = w_scale + static_cast<int64_t>(nr) * G;
  const uint8_t* zrow = w_zp != nullptr ? w_zp + static_cast<int64_t>(nr) * G : nullptr;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;

  for (int base = sub; base < chunks; base += LPR * U) {
    uint4 wv[U];
    float sc[U], zf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * LPR;
      if (c < chunks) {
        wv[u] = ld_stream(qrow + c);
        const int g = c / cpg;
        sc[u] = __half2float(srow[g]);
        zf[u] = 8388608.f + static_cast<float>(zrow != nullptr ? zrow[g] : 8);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * LPR;
      if (c >= chunks) break;
      float part[MR];
#pragma unroll
      for (int m = 0; m < MR; ++m) part[m] = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float xv[MR][8];
#pragma unroll
        for (int m = 0; m < MR; ++m) load8<T>(x + static_cast<int64_t>(m) * K + c * 32 + i * 8, xv[m]);
        const uint32_t word = i == 0 ? wv[u].x : i == 1 ? wv[u].y : i == 2 ? wv[u].z : wv[u].w;
        word_dot<MR>(word, zf[u], xv, part);
      }
#pragma unroll
      for (int m = 0; m < MR; ++m) acc[m] = fmaf(part[m], sc[u], acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  if (sub == 0 && n < N) {
    const float b = bias != nullptr ? Cvt<T>::to(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < MR; ++m) y[static_cast<int64_t>(m) * N + n] = Cvt<T>::from(acc[m] + b);
  }
}

// ld_stream without `volatile`: the compiler may schedule these loads together (with the volatile form it issued
// each load just before its use, one load in flight per thread).
__device__ __forceinline__ uint4 ld_stream_free(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Tensor-core GEMV for fp16 (K % 128 == 0, group length % 32 == 0, at most 8 rows of activations): the 4-bit
// weights become exactly the reference's fp16 weights in registers and one mma.m16n8k16 (fp32 accumulation)
// multiplies 16 output columns by up to 8 activation rows. A block owns 16 columns; its warps split K in blocks of
// 128 codes. Lane (gid = lane / 4, tq = lane % 4) loads 16 bytes (32 codes) of chunk 4 kb + tq of columns
// n0 + gid and n0 + gid + 8; a 32-bit word's codes (c0 .. c7) feed two MMAs as the half2 pairs (c0, c4), (c1, c5)
// and (c2, c6), (c3, c7): ((word >> 4i) & 0x000F000F) | 0x64006400 is half2(1024 + c, 1024 + c'), minus
// 1024 + zp is the exact c - zp, times the group scale rounded once to fp16 (as the reference rounds the fp32
// product). The k order inside the MMA is this permutation of the word's codes; the activations are staged in
// shared memory in the same order (groups of 8 as 0, 4, 1, 5, 2, 6, 3, 7), one 16-byte load per word. The MMA's
// output column n is activation row n (rows past M repeat the last one and are not stored); the warps' partial
// sums meet in shared memory and are added in warp order (deterministic).
constexpr int kGemvTcMaxWarps = 8;
constexpr int kGemvTcUnroll = 4;        // k-blocks (2 x 16-byte loads each) in flight per lane
constexpr int kGemvTcMaxRows = 8;
constexpr int64_t kGemvTcSmem = 48 * 1024;  // staged activations: M * K * 2 bytes at most

__device__ __forceinline__ __half2 dq_pair(uint32_t word, int shift, __half2 zero, __half2 scale) {
  const uint32_t t = ((word >> shift) & 0x000F000Fu) | 0x64006400u;
  return __hmul2_rn(__hsub2(*reinterpret_cast<const __half2*>(&t), zero), scale);
}

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One k-block of a lane: words of columns r0 / r1 (16 bytes each) against the staged activations of its chunk. The
// two MMAs of a word accumulate into separate registers (two dependency chains).
__device__ __forceinline__ void gemv_tc_block(float (&d)[2][4], uint4 w0, uint4 w1, __half2 z0, __half2 z1,
                                              __half2 s0, __half2 s1, const uint4* __restrict__ xw) {
  const uint32_t a[4] = {w0.x, w0.y, w0.z, w0.w}, b[4] = {w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 xv = xw[j];
    mma_16816(d[0], h2u(dq_pair(a[j], 0, z0, s0)), h2u(dq_pair(b[j], 0, z1, s1)), h2u(dq_pair(a[j], 4, z0, s0)),
              h2u(dq_pair(b[j], 4, z1, s1)), xv.x, xv.y);
    mma_16816(d[1], h2u(dq_pair(a[j], 8, z0, s0)), h2u(dq_pair(b[j], 8, z1, s1)), h2u(dq_pair(a[j], 12, z0, s0)),
              h2u(dq_pair(b[j], 12, z1, s1)), xv.z, xv.w);
  }
}

__global__ void __launch_bounds__(kGemvTcMaxWarps * 32) k_gemv_w4a16_tc(const __half* __restrict__ x, int M, int K,
                                                                         const uint4* __restrict__ q,
                                                                         const __half* __restrict__ w_scale,
                                                                         const uint8_t* __restrict__ w_zp, int G,
                                                                         const __half* __restrict__ bias, int N,
                                                                         __half* __restrict__ y) {
  extern __shared__ uint4 xs[];  // [M][K / 8], each 16 bytes = 8 activations in the order 0, 4, 1, 5, 2, 6, 3, 7
  __shared__ float red[kGemvTcMaxWarps][32][4];
  const int chunks = K / 32, cpg = (K / G) / 32, k8 = K / 8, kblocks = chunks / 4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int gid = lane / 4, tq = lane % 4;
  for (int i = threadIdx.x; i < M * k8; i += blockDim.x) {
    const uint4 u = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(i) * 8);
    xs[i] = make_uint4(__byte_perm(u.x, u.z, 0x5410), __byte_perm(u.x, u.z, 0x7632), __byte_perm(u.y, u.w, 0x5410),
                       __byte_perm(u.y, u.w, 0x7632));
  }
  __syncthreads();
  const int n0 = blockIdx.x * 16;
  const int64_t r0 = min(n0 + gid, N - 1), r1 = min(n0 + gid + 8, N - 1);  // past N: recomputed, not stored
  const uint4* q0 = q + r0 * chunks + tq;
  const uint4* q1 = q + r1 * chunks + tq;
  const uint4* xrow = xs + min(gid, M - 1) * k8 + tq * 4;
  auto zero = [&](int64_t r, int g) {
    const int zp = w_zp != nullptr ? w_zp[r * G + g] : 8;
    return __half2half2(__ushort_as_half(static_cast<unsigned short>(0x6400 + zp)));
  };
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  int kb = warp;
  for (; kb + (kGemvTcUnroll - 1) * warps < kblocks; kb += kGemvTcUnroll * warps) {
    uint4 w0[kGemvTcUnroll], w1[kGemvTcUnroll];
    __half2 s0[kGemvTcUnroll], s1[kGemvTcUnroll], z0[kGemvTcUnroll], z1[kGemvTcUnroll];
#pragma unroll
    for (int u = 0; u < kGemvTcUnroll; ++u) {
      const int b = kb + u * warps, g = (b * 4 + tq) / cpg;
      w0[u] = ld_stream_free(q0 + b * 4);
      w1[u] = ld_stream_free(q1 + b * 4);
      s0[u] = __half2half2(w_scale[r0 * G + g]);
      s1[u] = __half2half2(w_scale[r1 * G + g]);
      z0[u] = zero(r0, g);
      z1[u] = zero(r1, g);
    }
#pragma unroll
    for (int u = 0; u < kGemvTcUnroll; ++u) {
      gemv_tc_block(acc, w0[u], w1[u], z0[u], z1[u], s0[u], s1[u], xrow + (kb + u * warps) * 16);
    }
  }
  for (; kb < kblocks; kb += warps) {
    const int g = (kb * 4 + tq) / cpg;
    gemv_tc_block(acc, ld_stream_free(q0 + kb * 4), ld_stream_free(q1 + kb * 4), zero(r0, g), zero(r1, g),
                  __half2half2(w_scale[r0 * G + g]), __half2half2(w_scale[r1 * G + g]), xrow + kb * 16);
  }
  float d[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) d[e] = red[warp][lane][e] = acc[0][e] + acc[1][e];
  __syncthreads();
  if (warp != 0) return;
  for (int w = 1; w < warps; ++w)
#pragma unroll
    for (int e = 0; e < 4; ++e) d[e] += red[w][lane][e];
  // d[0], d[1]: column n0 + gid, activation rows 2 tq, 2 tq + 1; d[2], d[3]: column n0 + gid + 8.
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int m = 2 * tq + (e & 1), n = n0 + gid + (e >> 1) * 8;
    if (m < M && n < N) {
      const float bv = bias != nullptr ? __half2float(bias[n]) : 0.f;
      y[static_cast<int64_t>(m) * N + n] = __float2half_rn(d[e] + bv);
    }
  }
}

// v3's shape: 8 lanes per column for rows of at most 8 chunks, else 32; chunks per lane and round the power of two
// (at most 8) that covers the row in one round.
inline void gemv3_shape(int64_t chunks, int* lpr, int* unroll) {
  *lpr = chunks <= 8 ? 8 : 32;
  const int64_t per_lane = (chunks + *lpr - 1) / *lpr;
  *unroll = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
}

inline int sm_count() {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

inline dim3 grid_2d(int64_t per_row, int64_t rows, int threads = kThreads) {
  int64_t gx = (per_row + threads - 1) / threads;
  gx = gx < 1 ? 1 : (gx > 65535 ? 65535 : gx);
  const int64_t gy = rows < 1 ? 1 : (rows > 65535 ? 65535 : rows);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

}  // namespace

void quantize_rows_static(DType dt, const void* x, int64_t M, int64_t K, const float* scale, const int32_t* zp,
                          int bits, uint8_t* out, int64_t ldo, uint8_t xor_mask, cudaStream_t stream) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  if (M * ldo == 0) return;
  if (K % 8 == 0 && ldo == K && K / 8 < (1LL << 31)) {
    QK_DISPATCH(dt, T,
                k_quant_rows_static_v8<T><<<grid_2d(K / 8, M), kThreads, 0, stream>>>(
                    static_cast<const T*>(x), M, static_cast<int>(K), scale, zp, qmax, out, xor_mask));
    return;
  }
  QK_DISPATCH(dt, T,
              k_quant_rows_static<T><<<grid_for(M * ldo), kThreads, 0, stream>>>(
                  static_cast<const T*>(x), M, K, scale, zp, qmax, out, ldo, xor_mask));
}

void quantize_rows_dynamic(DType dt, const void* x, int64_t M, int64_t K, int bits, uint8_t* out, int64_t ldo,
                           uint8_t xor_mask, float* scale_out, int32_t* zp_out, cudaStream_t stream) {
  if (M == 0) return;
  const float qmax = static_cast<float>((1 << bits) - 1);
  QK_DISPATCH(dt, T,
              k_quant_rows_dynamic<T><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
                  static_cast<const T*>(x), K, qmax, out, ldo, xor_mask, scale_out, zp_out));
}

void qparams_from_range(const float* lo, const float* hi, int64_t n, int bits, float* scale, int32_t* zp,
                        cudaStream_t stream) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  k_qparams<<<grid_for(n), kThreads, 0, stream>>>(lo, hi, n, qmax, scale, zp);
}

void quantize_nchw_to_nhwc(DType dt, const void* x, int64_t B, int64_t C, int64_t HW, const float* scale,
                           const int32_t* zp, bool per_sample, int bits, int8_t* out, cudaStream_t stream) {
  if (B == 0 || C == 0 || HW == 0) return;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const dim3 grid(static_cast<unsigned>((HW + 31) / 32), static_cast<unsigned>((C + 31) / 32),
                  static_cast<unsigned>(B));
  const dim3 block(32, 8);
  QK_DISPATCH(dt, T,
              k_quant_nchw_to_nhwc<T><<<grid, block, 0, stream>>>(static_cast<const T*>(x), C, HW, scale, zp,
                                                                     per_sample, qmax, out));
}

void im2col_s8(const int8_t* x, int64_t B, int64_t H, int64_t W, int64_t C, int kh, int kw, int sh, int sw, int ph,
               int pw, int dh, int dw, int64_t Ho, int64_t Wo, const int32_t* zp, bool per_sample, int8_t* out,
               int64_t Mp, int64_t Kp, cudaStream_t stream) {
  const int64_t Mtot = B * Ho * Wo;
  if (C % 16 == 0 && Kp % 16 == 0) {
    k_im2col<16><<<grid_for(Mp * (Kp / 16)), kThreads, 0, stream>>>(x, H, W, C, kh, kw, sh, sw, ph, pw, dh, dw, Ho,
                                                                     Wo, Mtot, zp, per_sample, out, Mp, Kp);
  } else {
    k_im2col<1><<<grid_for(Mp * Kp), kThreads, 0, stream>>>(x, H, W, C, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, Mtot,
                                                            zp, per_sample, out, Mp, Kp);
  }
}

void weight_to_s8(const int32_t* qdata, int64_t N, int64_t words_per_row, int64_t K, int bits, const uint8_t* w_zp,
                  int64_t conv_c, int64_t khw, int8_t* out, int64_t Np, int64_t Kp, int32_t* wsum,
                  cudaStream_t stream) {
  if (Np == 0) return;
  if (conv_c == 0 && K % 8 == 0 && Kp == K && ((bits == 8 && w_zp == nullptr) || bits == 4)) {
    k_weight_s8_fast<<<static_cast<unsigned>(Np), kThreads, 0, stream>>>(qdata, N, K, bits, w_zp, out, wsum);
    return;
  }
  k_weight_s8<<<static_cast<unsigned>(Np), kThreads, 0, stream>>>(qdata, N, words_per_row, K, bits, w_zp, conv_c,
                                                                  khw, out, Kp, wsum);
}

void epilogue_rows(DType dt, const int32_t* acc, int64_t ldacc, int64_t M, int64_t N, const int32_t* wsum,
                   const __half* w_scale, const float* s, const int32_t* zp, bool per_row, const float* bias_f32,
                   const void* bias_x, void* y, cudaStream_t stream) {
  if (M * N == 0) return;
  if (N % 8 == 0 && ldacc % 8 == 0) {
    QK_DISPATCH(dt, T,
                k_epilogue_rows_v8<T><<<grid_2d(N / 8, M), kThreads, 0, stream>>>(
                    acc, ldacc, M, N, wsum, w_scale, s, zp, per_row, bias_f32, static_cast<const T*>(bias_x),
                    static_cast<T*>(y)));
    return;
  }
  QK_DISPATCH(dt, T,
              k_epilogue_rows<T><<<grid_2d(N, M), kThreads, 0, stream>>>(acc, ldacc, M, N, wsum, w_scale, s, zp,
                                                                         per_row, bias_f32,
                                                                         static_cast<const T*>(bias_x),
                                                                         static_cast<T*>(y)));
}

void epilogue_conv(DType dt, const int32_t* acc, int64_t ldacc, int64_t B, int64_t HW, int64_t N,
                   const int32_t* wsum, const __half* w_scale, const float* s, const int32_t* zp, bool per_sample,
                   const float* bias_f32, const void* bias_x, void* y, cudaStream_t stream) {
  if (B * HW * N == 0) return;
  if (HW % 8 == 0 && ldacc % 8 == 0) {
    QK_DISPATCH(dt, T,
                k_epilogue_conv<T, 8><<<grid_2d(HW / 8, B * N), kThreads, 0, stream>>>(
                    acc, ldacc, B, HW, N, wsum, w_scale, s, zp, per_sample, bias_f32, static_cast<const T*>(bias_x),
                    static_cast<T*>(y)));
    return;
  }
  QK_DISPATCH(dt, T,
              k_epilogue_conv<T, 1><<<grid_2d(HW, B * N), kThreads, 0, stream>>>(
                  acc, ldacc, B, HW, N, wsum, w_scale, s, zp, per_sample, bias_f32, static_cast<const T*>(bias_x),
                  static_cast<T*>(y)));
}

void dequantize_weight(DType dt, const int32_t* qdata, int64_t N, int64_t words_per_row, int64_t K, int bits,
                       const __half* w_scale, const uint8_t* w_zp, int64_t G, void* out, cudaStream_t stream) {
  if (N * K == 0) return;
  if (bits == 4 && K % 8 == 0 && (K / G) % 8 == 0 && K / 8 < (1LL << 31)) {
    QK_DISPATCH(dt, T,
                k_dequantize_w4_v8<T><<<grid_2d(K / 8, N), kThreads, 0, stream>>>(
                    qdata, N, static_cast<int>(words_per_row), static_cast<int>(K / G), w_scale, w_zp,
                    static_cast<int>(G), static_cast<T*>(out)));
    return;
  }
  QK_DISPATCH(dt, T,
              k_dequantize<T><<<grid_for(N * K), kThreads, 0, stream>>>(qdata, N, words_per_row, K, bits, w_scale,
                                                                       w_zp, G, static_cast<T*>(out)));
}

void gemv_w4a16(DType dt, const void* x, int64_t M, int64_t K, const int32_t* qdata, int64_t words_per_row,
                const __half* w_scale, const uint8_t* w_zp, int64_t G, const void* bias, int64_t N, void* y,
                cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const int Ki = static_cast<int>(K), wpr = static_cast<int>(words_per_row), Gi = static_cast<int>(G);
  const int Mi = static_cast<int>(M), Ni = static_cast<int>(N);
  const bool fast = K % 32 == 0 && (K / G) % 32 == 0 && reinterpret_cast<uintptr_t>(qdata) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // The size rule, from side-by-side runs on an H200 at one row (benchmarks/results/kernels-cuda-gemv.json):
  // tc (tensor cores, fp16 only) for N >= 4096 output columns, where its N / 16 blocks fill the GPU: 640x5120
  // 3.3 vs 3.8 us, 1280x10240 5.5 vs 7.8 us, 4096x10240 11.4 vs 15.7 us; with fewer columns it lost or tied
  // (1280x1280 3.2 vs 3.0, 12288x3072 13.7 vs 13.1). Otherwise v3 up to N * K = 4M codes (attn proj 640x640 2.3
  // vs 3.2 us for v2, add_embedding 4.5 vs 4.8 us) and v2 above (ff.out 5120x1280 5.7 vs 6.7 us, 12288x3072 13.1
  // vs 17.3 us), where v3's 8 loads per lane cost occupancy. QUANTKIT_GEMV=v2|v3|tc forces one (tests,
  // benchmarks).
  const char* engine = std::getenv("QUANTKIT_GEMV");
  const std::string forced = engine != nullptr ? std::string(engine) : std::string();
  const bool tc_fits = fast && dt == kF16 && K % 128 == 0 && M <= kGemvTcMaxRows && M * K * 2 <= kGemvTcSmem;
  if (tc_fits && (forced == "tc" || (forced.empty() && N >= 4096))) {
    const int64_t blocks = (N + 15) / 16, kblocks = K / 128;
    const int64_t want = blocks < 2 * sm_count() ? 8 : 4;  // more warps split K when blocks are few
    const int warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kblocks, want)));
    k_gemv_w4a16_tc<<<static_cast<unsigned>(blocks), warps * 32, static_cast<size_t>(M * K * 2), stream>>>(
        static_cast<const __half*>(x), Mi, Ki, reinterpret_cast<const uint4*>(qdata), w_scale, w_zp, Gi,
        static_cast<const __half*>(bias), Ni, static_cast<__half*>(y));
    return;
  }
  const bool use_v3 = forced == "v3" || (forced != "v2" && N * K <= (int64_t{1} << 22));
  if (fast && use_v3) {
    int lpr = 32, unroll = 1;
    gemv3_shape(K / 32, &lpr, &unroll);
    const unsigned grid = static_cast<unsigned>((N * lpr + kGemv3Threads - 1) / kGemv3Threads);
    const uint4* q4 = reinterpret_cast<const uint4*>(qdata);
#define QK_GEMV3(MR, LPR, U)                                                                                   \
  QK_DISPATCH(dt, T,                                                                                          \
              k_gemv_w4a16_v3<T, MR, LPR, U><<<grid, kGemv3Threads, 0, stream>>>(                              \
                  static_cast<const T*>(x), Ki, q4, w_scale, w_zp, Gi, static_cast<const T*>(bias), Ni,         \
                  static_cast<T*>(y)))
#define QK_GEMV3_SHAPE(MR)                         \
  if (lpr == 8) {                                  \
    QK_GEMV3(MR, 8, 1);                            \
  } else if (unroll == 1) {                        \
    QK_GEMV3(MR, 32, 1);                           \
  } else if (unroll == 2) {                        \
    QK_GEMV3(MR, 32, 2);                           \
  } else if (unroll == 4) {                        \
    QK_GEMV3(MR, 32, 4);                           \
  } else {                                         \
    QK_GEMV3(MR, 32, 8);                           \
  }
    switch (Mi) {
      case 1:
        QK_GEMV3_SHAPE(1);
        break;
      case 2:
        QK_GEMV3_SHAPE(2);
        break;
      case 3:
        QK_GEMV3_SHAPE(3);
        break;
      default:
        QK_GEMV3_SHAPE(4);
        break;
    }
#undef QK_GEMV3_SHAPE
#undef QK_GEMV3
    return;
  }
  if (fast) {
    // Split K over the block's warps when few columns would leave SMs idle or rows are long.
    const int64_t chunks = K / 32;
    const int ksplit = chunks >= 128 ? 4 : (chunks >= 64 || N <= 2048 ? 2 : 1);
    const int64_t cols_per_block = static_cast<int64_t>(kGemv2Rows) * (kGemv2Threads / 32 / ksplit);
    const unsigned grid = static_cast<unsigned>((N + cols_per_block - 1) / cols_per_block);
    const uint4* q4 = reinterpret_cast<const uint4*>(qdata);
#define QK_GEMV2(MR)                                                                                          \
  QK_DISPATCH(dt, T,                                                                                          \
              k_gemv_w4a16_v2<T, MR><<<grid, kGemv2Threads, 0, stream>>>(                                      \
                  static_cast<const T*>(x), Ki, q4, w_scale, w_zp, Gi, static_cast<const T*>(bias), Ni, ksplit, \
                  static_cast<T*>(y)))
    switch (Mi) {
      case 1:
        QK_GEMV2(1);
        break;
      case 2:
        QK_GEMV2(2);
        break;
      case 3:
        QK_GEMV2(3);
        break;
      default:
        QK_GEMV2(4);
        break;
    }
#undef QK_GEMV2
    return;
  }
  const unsigned grid = static_cast<unsigned>((N + kGemvWarps - 1) / kGemvWarps);
  QK_DISPATCH(dt, T,
              k_gemv_w4a16<T><<<grid, kGemvWarps * 32, 0, stream>>>(static_cast<const T*>(x), Mi, Ki, qdata, wpr,
                                                                    w_scale, w_zp, Gi, static_cast<const T*>(bias),
                                                                    Ni, static_cast<T*>(y)));
}

}  // namespace cuda
}  // namespace quantkit
