// Internal interface between the PyTorch-facing op code (csrc/cpu/ops.cpp) and the ISA-specific inner
// kernels (csrc/cpu/kernels_scalar.cpp, csrc/cpu/kernels_avx2.cpp).
//
// Deliberately free of torch and STL headers: the AVX2 translation unit is compiled for a different target,
// and any inline function it shared with the rest of the library could be merged by the linker and then run
// on a CPU without AVX2.
#pragma once

#include <cstdint>

namespace quantkit {
namespace cpu {

// Output columns per weight panel. Both integer layouts and the W4A16 kernel use it.
constexpr int kNR = 16;

// A weight repacked for the CPU kernels (derived at load time from the canonical packing, never stored).
//
// K is reordered into a "logical padded order": segment g (one per weight group; the whole row when
// per-channel) starts at seg_off[g], holds the group's codes in kernel order (linear: natural order; conv:
// tap-major when the group covers whole taps), and is zero padded to a multiple of 8 (W4) or 4 (W8).
// Layout of one panel of kNR output columns (zero columns pad the last panel):
//   W8: byte  [(p / 2) * 2 * kNR + n * 2 + p % 2]       = code(n, p)    (k-pairs of kNR columns; vpmaddwd)
//   W8Q (8-bit codes for activations of at most 7 bits, layout id 7):
//       int8  [(p / 4) * 4 * kNR + n * 4 + p % 4]       = code(n, p) - 128   (k-quads; vpmaddubsw u7 x s8 cannot
//       saturate: 2 * 127 * 128 < 32768); its wzp holds zero point - 128, so the epilogue below is unchanged.
//   W4: int32 [(p / 8) * kNR + n], nibble j (bits 4j..)  = code(n, 8 * (p / 8) + nib_pos(j))
//       with nib_pos(j) = j even ? j / 2 : 4 + j / 2, so that the low nibbles of the bytes of a word are
//       positions 0..3 and the high nibbles positions 4..7 (activations stay in natural order; vpmaddubsw).
// Codes are the raw unsigned codes; zero points are applied in the epilogue:
//   sum_k (xq - zx)(wq - wzp) = sum_k xq * wq - wzp * sum_k xq - zx * sum_k (wq - wzp).
struct PanelWeight {
  int w_bits = 0;          // layout: 4, 8 or 7 (W8Q)
  int64_t n = 0;           // output features
  int64_t npanels = 0;     // ceil(n / kNR)
  int nseg = 0;            // segments (= weight groups)
  int64_t kp = 0;          // padded K
  const int64_t* seg_off = nullptr;  // [nseg + 1]
  const uint8_t* b = nullptr;        // npanels * panel_bytes
  int64_t panel_bytes = 0;
  const int32_t* wzp = nullptr;      // [npanels][nseg][kNR] weight zero point
  const int32_t* swc = nullptr;      // [npanels][nseg][kNR] sum over the segment of (code - zero point)
  const float* scale = nullptr;      // [npanels][nseg][kNR]
};

inline int nib_pos(int j) { return (j & 1) ? 4 + (j >> 1) : (j >> 1); }

// Quantized activations for a block of rows, in logical padded order (padding positions hold 0).
struct ActRows {
  const void* a = nullptr;   // int16 (W8) or uint8 (W4, W8Q), [rows][lda]
  int64_t lda = 0;           // in elements
  const int32_t* sx = nullptr;  // [rows][nseg] sum of the codes of each segment
  const int32_t* zx = nullptr;  // [rows] activation zero point
  const float* scale = nullptr; // [rows] activation scale (used when writing `OutRows`)
};

// Where an integer kernel writes. With y set: y[r * ldy + n] = c[r][n] * scale[r] + bias[n] for n < ncols
// (the reference's epilogue order, fused); with y null: the tile c[rows][kNR] itself.
struct OutRows {
  float* y = nullptr;
  int64_t ldy = 0;
  const float* bias = nullptr;  // indexed from the panel's first column, or null
  int ncols = kNR;
};

// Integer kernel on one panel: c[r][n] = sum_g float(acc_g(r, n)) * scale(n, g), acc_g exact in int32,
// then written per `out`. c is scratch of rows * kNR floats. Callers guarantee that every |acc_g| fits in
// int32 (see ops.cpp).
using IntPanelFn = void (*)(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows,
                            const OutRows& out, float* c);

// W4A16 kernel on one panel: c[r][n] = sum_g scale(n, g) * (sum_k code * x - zp(n, g) * xsum[r][g]).
// xs holds x in nibble order, pre-scaled: xs[r][8b + j] = x(r, 8b + nib_pos(j)) * 2^(-4j) for j < 7 and
// * 1 for j == 7 (the kernels mask nibble j in place, which multiplies it by 2^(4j), and shift nibble 7).
using W4A16PanelFn = void (*)(const PanelWeight& w, int64_t panel, const float* xs, int64_t ldx,
                              const float* xsum, int64_t rows, float* c);

// q[i] = clamp(round_half_even(x[i] / scale) + zp, 0, qmax) (the reference's quantize_act, bit for bit).
using QuantizeU8Fn = void (*)(const float* x, int64_t n, float scale, float zp, float qmax, uint8_t* q);
using QuantizeI16Fn = void (*)(const float* x, int64_t n, float scale, float zp, float qmax, int16_t* q);
using MinMaxFn = void (*)(const float* x, int64_t n, float* lo, float* hi);
// One canonical packed row -> fp32 weights: out[k] = float(code(k) - zp[g]) * scale[g] (the reference's
// dequantize, bit for bit), g = k / (k_total / groups).
// Pixels [p0, p1) of one NCHW fp32 sample (x[ch * plane + p]) -> NHWC codes q[p * c + ch], quantized as
// QuantizeU8Fn does.
using QuantizeNhwcFn = void (*)(const float* x, int64_t c, int64_t plane, int64_t p0, int64_t p1, float scale,
                                float zp, float qmax, uint8_t* q);
// Transposed tile store for convolutions: y[n * ldy + r] = c[r * kNR + n] * scale (+ bias[n]) for r < rows,
// n < ncols (multiply, then add: the reference's rounding).
using StoreColsFn = void (*)(const float* c, int64_t rows, int ncols, float scale, const float* bias, float* y,
                             int64_t ldy);
using DequantRowFn = void (*)(const int32_t* q, int bits, int64_t k, int64_t groups, const float* scale,
                              const int32_t* zp, float* out);
// W4 nibble panels [p0, p1) -> fp32 weights, K-major (the B operand of y = x * W^T for a block of columns):
//   out[kmap[p] * ldo + (panel - p0) * kNR + n] = float(code(n, p) - wzp(n, g)) * scale(n, g)
// for every padded position p of segment g with kmap[p] >= 0 (padding positions are skipped; kmap maps padded
// positions to canonical k, see repack.cpp) and every n < kNR (the zero columns of a partial last panel come
// out as 0). The reference's dequantization, bit for bit. ldo >= (p1 - p0) * kNR.
using DequantPanelsW4Fn = void (*)(const PanelWeight& w, const int32_t* kmap, int64_t p0, int64_t p1, float* out,
                                   int64_t ldo);

struct KernelTable {
  const char* name;
  IntPanelFn int_panel_w8;
  IntPanelFn int_panel_w4;
  IntPanelFn int_panel_w8q;
  W4A16PanelFn w4a16_panel;
  QuantizeU8Fn quantize_u8;
  QuantizeI16Fn quantize_i16;
  MinMaxFn minmax;
  DequantRowFn dequant_row;
  QuantizeNhwcFn quantize_nhwc;
  StoreColsFn store_cols;
  DequantPanelsW4Fn dequant_panels_w4;
};

const KernelTable& scalar_kernels();
// nullptr when the library was built without the AVX2 translation unit.
const KernelTable* avx2_kernels();

// Exact int64 variants (any K); used when int32 accumulation could overflow. Portable code.
void int_panel_w8_i64(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                      float* c);
void int_panel_w4_i64(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                      float* c);
void int_panel_w8q_i64(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                       float* c);

// The fused output step of OutRows, shared by the portable kernels.
inline void write_out_rows(const float* c, int64_t rows, const ActRows& x, const OutRows& out) {
  if (!out.y) return;
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = out.y + r * out.ldy;
    const float s = x.scale[r];
    for (int n = 0; n < out.ncols; ++n) yr[n] = out.bias ? c[r * kNR + n] * s + out.bias[n] : c[r * kNR + n] * s;
  }
}

}  // namespace cpu
}  // namespace quantkit
