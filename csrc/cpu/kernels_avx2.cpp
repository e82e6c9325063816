// AVX2 + FMA inner kernels, selected at run time (ops.cpp: kernels()) only on CPUs that have both.
//
// This translation unit is compiled for the avx2,fma target through a pragma rather than global flags, and it
// includes no torch or STL header after the pragma: an inline function instantiated here could otherwise be
// merged by the linker into the portable code and executed on a CPU without AVX2.
//
// W8 (byte panels): codes are widened to int16 (vpmovzxbw) and multiplied with int16 activations by vpmaddwd,
// which cannot saturate for u8 x u8 (vpmaddubsw would: 255 * 255 * 2 > 32767).
// W4 (nibble panels): vpmaddubsw on u8 activations x 4-bit codes (at most 255 * 15 * 2 = 7650 per pair, and two
// of them summed stay below 32767), then vpmaddwd by ones into int32.
#include <cstdint>

#include "quantkit/cpu_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define QK_HAVE_AVX2_TU 1
#endif

#ifdef QK_HAVE_AVX2_TU

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

namespace quantkit {
namespace cpu {
namespace {

// Epilogue of one segment for `rows` rows: accumulate into the tile c, or on the last segment with out.y set,
// write y = c * act_scale + bias (separate multiply and add, the reference's rounding). The panel's per-column
// vectors are loaded once per tile; wzp * sx is a scalar product where every column has the same zero point, and
// swc * zx is reused while consecutive rows share their zero point (per-tensor and per-sample activations).
inline void tile_epilogue(const PanelWeight& w, int64_t panel, int g, int rows, const int32_t* acc,
                          const ActRows& x, int64_t r0, const OutRows& out, float* c) {
  const int64_t pi = (panel * w.nseg + g) * kNR;
  const bool last = g + 1 == w.nseg && out.y != nullptr;
  __m256i wz[2], sw[2], swz[2];
  __m256 sc[2];
  for (int v = 0; v < 2; ++v) {
    wz[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wzp + pi + 8 * v));
    sw[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.swc + pi + 8 * v));
    sc[v] = _mm256_loadu_ps(w.scale + pi + 8 * v);
  }
  // Uniform weight zero point over the panel (symmetric weights: 128 in W8, -128 in W8Q, 8 in W4): wzp * sx is
  // one scalar product per row (wrap-around, as _mm256_mullo_epi32).
  const int32_t wz0 = w.wzp[pi];
  const __m256i wzb = _mm256_set1_epi32(wz0);
  const __m256i neq = _mm256_or_si256(_mm256_xor_si256(wz[0], wzb), _mm256_xor_si256(wz[1], wzb));
  const bool uniform = _mm256_testz_si256(neq, neq);
  int32_t zx_prev = x.zx[r0];
  for (int v = 0; v < 2; ++v) swz[v] = _mm256_mullo_epi32(sw[v], _mm256_set1_epi32(zx_prev));
  for (int r = 0; r < rows; ++r) {
    const int32_t sx = x.sx[(r0 + r) * w.nseg + g], zx = x.zx[r0 + r];
    if (zx != zx_prev) {
      zx_prev = zx;
      for (int v = 0; v < 2; ++v) swz[v] = _mm256_mullo_epi32(sw[v], _mm256_set1_epi32(zx));
    }
    __m256 f[2];
    for (int v = 0; v < 2; ++v) {
      __m256i corr = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + r * kNR + 8 * v));
      corr = _mm256_sub_epi32(corr, uniform ? _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(wz0) *
                                                                                 static_cast<uint32_t>(sx)))
                                            : _mm256_mullo_epi32(wz[v], _mm256_set1_epi32(sx)));
      corr = _mm256_sub_epi32(corr, swz[v]);
      f[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(corr), sc[v]);
      float* cp = c + (r0 + r) * kNR + 8 * v;
      if (g > 0) f[v] = _mm256_add_ps(_mm256_loadu_ps(cp), f[v]);
      if (!last) _mm256_storeu_ps(cp, f[v]);
    }
    if (!last) continue;
    const __m256 s = _mm256_set1_ps(x.scale[r0 + r]);
    for (int v = 0; v < 2; ++v) {
      f[v] = _mm256_mul_ps(f[v], s);
      if (out.bias) f[v] = _mm256_add_ps(f[v], _mm256_loadu_ps(out.bias + 8 * v));
    }
    float* yr = out.y + (r0 + r) * out.ldy;
    if (out.ncols == kNR) {
      _mm256_storeu_ps(yr, f[0]);
      _mm256_storeu_ps(yr + 8, f[1]);
    } else {
      alignas(32) float tmp[kNR];
      _mm256_store_ps(tmp, f[0]);
      _mm256_store_ps(tmp + 8, f[1]);
      for (int n = 0; n < out.ncols; ++n) yr[n] = tmp[n];
    }
  }
}

// ---- W8 x A8 ------------------------------------------------------------------------------------------------------

// GCC keeps vector accumulators poorly across these loops (it spills them and chains the spills through
// store forwarding), so the k-loops are inline assembly with fixed registers; `.if` drops the rows >= MR.
// Per k-pair: two 16-byte weight loads widened to int16 (ymm12/13), then per row one broadcast int16 pair
// (ymm14) and vpmaddwd into the row's two accumulators.
#define QK_W8_ROW(R, ADDR, A0, A1)                \
  ".if %c[mr] > " #R "\n"                         \
  "vpbroadcastd " ADDR ", %%ymm14\n"              \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n"          \
  "vpaddd %%ymm15, %%ymm" #A0 ", %%ymm" #A0 "\n"  \
  ".if %c[half] == 0\n"                           \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n"          \
  "vpaddd %%ymm15, %%ymm" #A1 ", %%ymm" #A1 "\n"  \
  ".endif\n"                                      \
  ".endif\n"
#define QK_STORE_ACC(R, A0, A1)                       \
  ".if %c[mr] > " #R "\n"                             \
  "vmovdqu %%ymm" #A0 ", " #R "*64(%[out])\n"         \
  "vmovdqu %%ymm" #A1 ", " #R "*64+32(%[out])\n"      \
  ".endif\n"
#define QK_ZERO_ACC(R, A0, A1)                                 \
  ".if %c[mr] > " #R "\n"                                      \
  "vpxor %%xmm" #A0 ", %%xmm" #A0 ", %%xmm" #A0 "\n"           \
  "vpxor %%xmm" #A1 ", %%xmm" #A1 ", %%xmm" #A1 "\n"           \
  ".endif\n"
#define QK_YMM_CLOBBERS                                                                                   \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
      "xmm13", "xmm14", "xmm15"

// acc[r][n] = sum over `pairs` k-pairs of a[r][k] * b[k][n] (r < MR <= 6, n < 16), int32 wrap-around.
// HALF: only columns 0..7 are wanted (the last panel of a layer with N % 16 in 1..8); 8..15 come out 0.
template <int MR, bool HALF>
inline void w8_kloop(const int16_t* a, int64_t lda_bytes, const uint8_t* b, int64_t pairs, int32_t* out) {
  const char* a0 = reinterpret_cast<const char*>(a);
  const char* a3 = a0 + 3 * lda_bytes;
  __asm__ volatile(
      QK_ZERO_ACC(0, 0, 1) QK_ZERO_ACC(1, 2, 3) QK_ZERO_ACC(2, 4, 5) QK_ZERO_ACC(3, 6, 7) QK_ZERO_ACC(4, 8, 9)
      QK_ZERO_ACC(5, 10, 11)
      "test %[n], %[n]\n"
      "jz 2f\n"
      "1:\n"
      "vpmovzxbw (%[b]), %%ymm12\n"
      ".if %c[half] == 0\n"
      "vpmovzxbw 16(%[b]), %%ymm13\n"
      ".endif\n"
      QK_W8_ROW(0, "(%[a0])", 0, 1)
      QK_W8_ROW(1, "(%[a0],%[lda])", 2, 3)
      QK_W8_ROW(2, "(%[a0],%[lda],2)", 4, 5)
      QK_W8_ROW(3, "(%[a3])", 6, 7)
      QK_W8_ROW(4, "(%[a3],%[lda])", 8, 9)
      QK_W8_ROW(5, "(%[a3],%[lda],2)", 10, 11)
      "add $32, %[b]\n"
      "add $4, %[a0]\n"
      "add $4, %[a3]\n"
      "dec %[n]\n"
      "jnz 1b\n"
      "2:\n"
      QK_STORE_ACC(0, 0, 1) QK_STORE_ACC(1, 2, 3) QK_STORE_ACC(2, 4, 5) QK_STORE_ACC(3, 6, 7)
      QK_STORE_ACC(4, 8, 9) QK_STORE_ACC(5, 10, 11)
      : [a0] "+r"(a0), [a3] "+r"(a3), [b] "+r"(b), [n] "+r"(pairs)
      : [lda] "r"(lda_bytes), [out] "r"(out), [mr] "i"(MR), [half] "i"(HALF ? 1 : 0)
      : QK_YMM_CLOBBERS, "memory", "cc");
}

// Shared driver of the byte-panel kernels (W8, W8Q): 6-row tiles over the rows, the segments of each tile, and
// the half-panel variant for the last panel. Loop::run<MR, HALF>(a, lda_bytes, b, positions, acc) is the k-loop;
// Loop::kElt the bytes of one activation code.
template <class Loop, int MR, bool HALF>
void byte_tile(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t r0, const OutRows& out, float* c) {
  const uint8_t* b = w.b + panel * w.panel_bytes;
  const uint8_t* a = static_cast<const uint8_t*>(x.a) + r0 * x.lda * Loop::kElt;
  alignas(32) int32_t acc[6 * kNR];
  for (int g = 0; g < w.nseg; ++g) {
    const int64_t p0 = w.seg_off[g], p1 = w.seg_off[g + 1];
    Loop::template run<MR, HALF>(a + p0 * Loop::kElt, x.lda * Loop::kElt, b + p0 * kNR, p1 - p0, acc);
    tile_epilogue(w, panel, g, MR, acc, x, r0, out, c);
  }
}

template <class Loop, bool HALF>
void byte_rows(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out, float* c) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) byte_tile<Loop, 6, HALF>(w, panel, x, r, out, c);
  switch (rows - r) {
    case 5: byte_tile<Loop, 5, HALF>(w, panel, x, r, out, c); break;
    case 4: byte_tile<Loop, 4, HALF>(w, panel, x, r, out, c); break;
    case 3: byte_tile<Loop, 3, HALF>(w, panel, x, r, out, c); break;
    case 2: byte_tile<Loop, 2, HALF>(w, panel, x, r, out, c); break;
    case 1: byte_tile<Loop, 1, HALF>(w, panel, x, r, out, c); break;
    default: break;
  }
}

template <class Loop>
void byte_panel(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out, float* c) {
  if (w.n - panel * kNR <= 8) {
    byte_rows<Loop, true>(w, panel, x, rows, out, c);
  } else {
    byte_rows<Loop, false>(w, panel, x, rows, out, c);
  }
}

// W8: int16 activation codes, k-pairs.
struct W8Loop {
  static constexpr int64_t kElt = 2;
  template <int MR, bool HALF>
  static void run(const uint8_t* a, int64_t lda_bytes, const uint8_t* b, int64_t positions, int32_t* acc) {
    w8_kloop<MR, HALF>(reinterpret_cast<const int16_t*>(a), lda_bytes, b, positions / 2, acc);
  }
};

void int_panel_w8_avx2(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                       float* c) {
  byte_panel<W8Loop>(w, panel, x, rows, out, c);
}

// ---- W4 x A8 ------------------------------------------------------------------------------------------------------

// Per 8-k block: two vectors of 8 words (16 columns) split into low / high nibbles (ymm8..11); per row two
// broadcast activation quads (ymm12: positions 0..3, ymm13: 4..7), vpmaddubsw, the two halves summed in int16
// (at most 2 * 7650), then vpmaddwd by ones into int32.
#define QK_W4_ROW(R, ADDR, ADDR4, A0, A1)          \
  ".if %c[mr] > " #R "\n"                          \
  "vpbroadcastd " ADDR ", %%ymm12\n"               \
  "vpbroadcastd " ADDR4 ", %%ymm13\n"              \
  "vpmaddubsw %%ymm8, %%ymm12, %%ymm14\n"          \
  "vpmaddubsw %%ymm9, %%ymm13, %%ymm15\n"          \
  "vpaddw %%ymm15, %%ymm14, %%ymm14\n"             \
  "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n"         \
  "vpaddd %%ymm14, %%ymm" #A0 ", %%ymm" #A0 "\n"   \
  ".if %c[half] == 0\n"                            \
  "vpmaddubsw %%ymm10, %%ymm12, %%ymm14\n"         \
  "vpmaddubsw %%ymm11, %%ymm13, %%ymm15\n"         \
  "vpaddw %%ymm15, %%ymm14, %%ymm14\n"             \
  "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n"         \
  "vpaddd %%ymm14, %%ymm" #A1 ", %%ymm" #A1 "\n"   \
  ".endif\n"                                       \
  ".endif\n"

alignas(32) const int16_t kOnes16[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
alignas(32) const uint8_t kLowNibbles[32] = {15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
                                             15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15};

// acc[r][n] = sum over `blocks` 8-k blocks of a[r][k] * code[k][n] (r < MR <= 4, n < 16); HALF as for W8.
template <int MR, bool HALF>
inline void w4_kloop(const uint8_t* a, int64_t lda, const uint8_t* b, int64_t blocks, int32_t* out) {
  const uint8_t* a0 = a;
  const uint8_t* a3 = a + 3 * lda;
  __asm__ volatile(
      QK_ZERO_ACC(0, 0, 1) QK_ZERO_ACC(1, 2, 3) QK_ZERO_ACC(2, 4, 5) QK_ZERO_ACC(3, 6, 7)
      "test %[n], %[n]\n"
      "jz 2f\n"
      "1:\n"
      "vmovdqu (%[b]), %%ymm8\n"
      "vpsrlw $4, %%ymm8, %%ymm9\n"
      "vpand (%[m4]), %%ymm8, %%ymm8\n"
      "vpand (%[m4]), %%ymm9, %%ymm9\n"
      ".if %c[half] == 0\n"
      "vmovdqu 32(%[b]), %%ymm10\n"
      "vpsrlw $4, %%ymm10, %%ymm11\n"
      "vpand (%[m4]), %%ymm10, %%ymm10\n"
      "vpand (%[m4]), %%ymm11, %%ymm11\n"
      ".endif\n"
      QK_W4_ROW(0, "(%[a0])", "4(%[a0])", 0, 1)
      QK_W4_ROW(1, "(%[a0],%[lda])", "4(%[a0],%[lda])", 2, 3)
      QK_W4_ROW(2, "(%[a0],%[lda],2)", "4(%[a0],%[lda],2)", 4, 5)
      QK_W4_ROW(3, "(%[a3])", "4(%[a3])", 6, 7)
      "add $64, %[b]\n"
      "add $8, %[a0]\n"
      "add $8, %[a3]\n"
      "dec %[n]\n"
      "jnz 1b\n"
      "2:\n"
      QK_STORE_ACC(0, 0, 1) QK_STORE_ACC(1, 2, 3) QK_STORE_ACC(2, 4, 5) QK_STORE_ACC(3, 6, 7)
      : [a0] "+r"(a0), [a3] "+r"(a3), [b] "+r"(b), [n] "+r"(blocks)
      : [lda] "r"(lda), [out] "r"(out), [mr] "i"(MR), [ones] "r"(kOnes16), [m4] "r"(kLowNibbles),
        [half] "i"(HALF ? 1 : 0)
      : QK_YMM_CLOBBERS, "memory", "cc");
}

template <int MR, bool HALF>
void w4_tile(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t r0, const OutRows& out, float* c) {
  const uint8_t* b = w.b + panel * w.panel_bytes;
  const uint8_t* a = static_cast<const uint8_t*>(x.a) + r0 * x.lda;
  alignas(32) int32_t acc[4 * kNR];
  for (int g = 0; g < w.nseg; ++g) {
    const int64_t p0 = w.seg_off[g], p1 = w.seg_off[g + 1];
    w4_kloop<MR, HALF>(a + p0, x.lda, b + p0 / 2 * kNR, (p1 - p0) / 8, acc);
    tile_epilogue(w, panel, g, MR, acc, x, r0, out, c);
  }
}

template <bool HALF>
void w4_rows(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out, float* c) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) w4_tile<4, HALF>(w, panel, x, r, out, c);
  switch (rows - r) {
    case 3: w4_tile<3, HALF>(w, panel, x, r, out, c); break;
    case 2: w4_tile<2, HALF>(w, panel, x, r, out, c); break;
    case 1: w4_tile<1, HALF>(w, panel, x, r, out, c); break;
    default: break;
  }
}

void int_panel_w4_avx2(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                       float* c) {
  if (w.n - panel * kNR <= 8) {
    w4_rows<true>(w, panel, x, rows, out, c);
  } else {
    w4_rows<false>(w, panel, x, rows, out, c);
  }
}

// ---- W8Q: 8-bit codes x activations of at most 7 bits -------------------------------------------------------------

// Per 4-k block: two vectors of 8 columns x 4 signed codes (ymm12/13); per row one broadcast activation quad
// (ymm14), vpmaddubsw (u7 x s8: |pair| <= 2 * 127 * 128 < 32768, never saturates), vpmaddwd by ones into int32.
#define QK_W8Q_ROW(R, ADDR, A0, A1)                \
  ".if %c[mr] > " #R "\n"                          \
  "vpbroadcastd " ADDR ", %%ymm14\n"               \
  "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n"         \
  "vpmaddwd (%[ones]), %%ymm15, %%ymm15\n"         \
  "vpaddd %%ymm15, %%ymm" #A0 ", %%ymm" #A0 "\n"   \
  ".if %c[half] == 0\n"                            \
  "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n"         \
  "vpmaddwd (%[ones]), %%ymm15, %%ymm15\n"         \
  "vpaddd %%ymm15, %%ymm" #A1 ", %%ymm" #A1 "\n"   \
  ".endif\n"                                       \
  ".endif\n"

// acc[r][n] = sum over `quads` 4-k blocks of a[r][k] * scode[k][n] (r < MR <= 6, n < 16); HALF as for W8.
template <int MR, bool HALF>
inline void w8q_kloop(const uint8_t* a, int64_t lda, const uint8_t* b, int64_t quads, int32_t* out) {
  const uint8_t* a0 = a;
  const uint8_t* a3 = a + 3 * lda;
  __asm__ volatile(
      QK_ZERO_ACC(0, 0, 1) QK_ZERO_ACC(1, 2, 3) QK_ZERO_ACC(2, 4, 5) QK_ZERO_ACC(3, 6, 7) QK_ZERO_ACC(4, 8, 9)
      QK_ZERO_ACC(5, 10, 11)
      "test %[n], %[n]\n"
      "jz 2f\n"
      "1:\n"
      "vmovdqu (%[b]), %%ymm12\n"
      ".if %c[half] == 0\n"
      "vmovdqu 32(%[b]), %%ymm13\n"
      ".endif\n"
      QK_W8Q_ROW(0, "(%[a0])", 0, 1)
      QK_W8Q_ROW(1, "(%[a0],%[lda])", 2, 3)
      QK_W8Q_ROW(2, "(%[a0],%[lda],2)", 4, 5)
      QK_W8Q_ROW(3, "(%[a3])", 6, 7)
      QK_W8Q_ROW(4, "(%[a3],%[lda])", 8, 9)
      QK_W8Q_ROW(5, "(%[a3],%[lda],2)", 10, 11)
      "add $64, %[b]\n"
      "add $4, %[a0]\n"
      "add $4, %[a3]\n"
      "dec %[n]\n"
      "jnz 1b\n"
      "2:\n"
      QK_STORE_ACC(0, 0, 1) QK_STORE_ACC(1, 2, 3) QK_STORE_ACC(2, 4, 5) QK_STORE_ACC(3, 6, 7)
      QK_STORE_ACC(4, 8, 9) QK_STORE_ACC(5, 10, 11)
      : [a0] "+r"(a0), [a3] "+r"(a3), [b] "+r"(b), [n] "+r"(quads)
      : [lda] "r"(lda), [out] "r"(out), [mr] "i"(MR), [ones] "r"(kOnes16), [half] "i"(HALF ? 1 : 0)
      : QK_YMM_CLOBBERS, "memory", "cc");
}

// W8Q: uint8 activation codes, k-quads.
struct W8QLoop {
  static constexpr int64_t kElt = 1;
  template <int MR, bool HALF>
  static void run(const uint8_t* a, int64_t lda_bytes, const uint8_t* b, int64_t positions, int32_t* acc) {
    w8q_kloop<MR, HALF>(a, lda_bytes, b, positions / 4, acc);
  }
};

void int_panel_w8q_avx2(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                        float* c) {
  byte_panel<W8QLoop>(w, panel, x, rows, out, c);
}

// ---- W4 x float -------------------------------------------------------------------------------------------------

// Per 8-k block: the 16 columns' words (ymm8/9); nibble j is isolated in place by a mask (j < 7, so the int32
// value is code * 16^j and stays positive) or shifted down (j = 7), converted to float and FMA'd with the
// pre-scaled activation, which carries the 16^-j factor. With one or two rows the FMAs rotate over all eight
// accumulators (summed afterwards) so that FMA latency, not a single dependency chain, bounds the loop.
#define QK_A16_FMA(XADDR, A0, A1)                          \
  "vbroadcastss " XADDR ", %%ymm12\n"                      \
  "vfmadd231ps %%ymm12, %%ymm10, %%ymm" #A0 "\n"           \
  "vfmadd231ps %%ymm12, %%ymm11, %%ymm" #A1 "\n"
// J: nibble; P1*: accumulators with one row; P2*: row 0 / row 1 accumulators with two rows.
#define QK_A16_ROWS(J, P1A, P1B, P2A0, P2B0, P2A1, P2B1)   \
  "vcvtdq2ps %%ymm10, %%ymm10\n"                           \
  "vcvtdq2ps %%ymm11, %%ymm11\n"                           \
  ".if %c[mr] == 1\n"                                      \
  QK_A16_FMA(#J "*4(%[x0])", P1A, P1B)                     \
  ".endif\n"                                               \
  ".if %c[mr] == 2\n"                                      \
  QK_A16_FMA(#J "*4(%[x0])", P2A0, P2B0)                   \
  QK_A16_FMA(#J "*4(%[x0],%[ldx])", P2A1, P2B1)            \
  ".endif\n"                                               \
  ".if %c[mr] >= 3\n"                                      \
  QK_A16_FMA(#J "*4(%[x0])", 0, 1)                         \
  QK_A16_FMA(#J "*4(%[x0],%[ldx])", 2, 3)                  \
  QK_A16_FMA(#J "*4(%[x0],%[ldx],2)", 4, 5)                \
  ".endif\n"                                               \
  ".if %c[mr] >= 4\n"                                      \
  QK_A16_FMA(#J "*4(%[x3])", 6, 7)                         \
  ".endif\n"
#define QK_A16_MASK(J, P1A, P1B, P2A0, P2B0, P2A1, P2B1)   \
  "vpand " #J "*32(%[masks]), %%ymm8, %%ymm10\n"           \
  "vpand " #J "*32(%[masks]), %%ymm9, %%ymm11\n"           \
  QK_A16_ROWS(J, P1A, P1B, P2A0, P2B0, P2A1, P2B1)

alignas(32) const uint32_t kNibbleMasks[7 * 8] = {
    0xFu, 0xFu, 0xFu, 0xFu, 0xFu, 0xFu, 0xFu, 0xFu,
    0xF0u, 0xF0u, 0xF0u, 0xF0u, 0xF0u, 0xF0u, 0xF0u, 0xF0u,
    0xF00u, 0xF00u, 0xF00u, 0xF00u, 0xF00u, 0xF00u, 0xF00u, 0xF00u,
    0xF000u, 0xF000u, 0xF000u, 0xF000u, 0xF000u, 0xF000u, 0xF000u, 0xF000u,
    0xF0000u, 0xF0000u, 0xF0000u, 0xF0000u, 0xF0000u, 0xF0000u, 0xF0000u, 0xF0000u,
    0xF00000u, 0xF00000u, 0xF00000u, 0xF00000u, 0xF00000u, 0xF00000u, 0xF00000u, 0xF00000u,
    0xF000000u, 0xF000000u, 0xF000000u, 0xF000000u, 0xF000000u, 0xF000000u, 0xF000000u, 0xF000000u};

// acc[r][n] = sum over `blocks` 8-k blocks of code(k, n) * x[r][k] (fp32, MR <= 4 rows, 16 columns).
// out receives the 8 accumulator registers; w4a16_tile folds them back into rows.
template <int MR>
inline void w4a16_kloop(const float* xs, int64_t ldx_bytes, const uint8_t* b, int64_t blocks, float* out) {
  const char* x0 = reinterpret_cast<const char*>(xs);
  const char* x3 = x0 + 3 * ldx_bytes;
  __asm__ volatile(
      "vpxor %%xmm0, %%xmm0, %%xmm0\n vpxor %%xmm1, %%xmm1, %%xmm1\n vpxor %%xmm2, %%xmm2, %%xmm2\n"
      "vpxor %%xmm3, %%xmm3, %%xmm3\n vpxor %%xmm4, %%xmm4, %%xmm4\n vpxor %%xmm5, %%xmm5, %%xmm5\n"
      "vpxor %%xmm6, %%xmm6, %%xmm6\n vpxor %%xmm7, %%xmm7, %%xmm7\n"
      "test %[n], %[n]\n"
      "jz 2f\n"
      "1:\n"
      "vmovdqu (%[b]), %%ymm8\n"
      "vmovdqu 32(%[b]), %%ymm9\n"
      QK_A16_MASK(0, 0, 1, 0, 1, 2, 3) QK_A16_MASK(1, 2, 3, 4, 5, 6, 7) QK_A16_MASK(2, 4, 5, 0, 1, 2, 3)
      QK_A16_MASK(3, 6, 7, 4, 5, 6, 7) QK_A16_MASK(4, 0, 1, 0, 1, 2, 3) QK_A16_MASK(5, 2, 3, 4, 5, 6, 7)
      QK_A16_MASK(6, 4, 5, 0, 1, 2, 3)
      "vpsrld $28, %%ymm8, %%ymm10\n"
      "vpsrld $28, %%ymm9, %%ymm11\n"
      QK_A16_ROWS(7, 6, 7, 4, 5, 6, 7)
      "add $64, %[b]\n"
      "add $32, %[x0]\n"
      "add $32, %[x3]\n"
      "dec %[n]\n"
      "jnz 1b\n"
      "2:\n"
      "vmovups %%ymm0, 0(%[out])\n vmovups %%ymm1, 32(%[out])\n vmovups %%ymm2, 64(%[out])\n"
      "vmovups %%ymm3, 96(%[out])\n vmovups %%ymm4, 128(%[out])\n vmovups %%ymm5, 160(%[out])\n"
      "vmovups %%ymm6, 192(%[out])\n vmovups %%ymm7, 224(%[out])\n"
      : [x0] "+r"(x0), [x3] "+r"(x3), [b] "+r"(b), [n] "+r"(blocks)
      : [ldx] "r"(ldx_bytes), [out] "r"(out), [mr] "i"(MR), [masks] "r"(kNibbleMasks)
      : QK_YMM_CLOBBERS, "memory", "cc");
  // Fold the rotated accumulators: one row used all four pairs, two rows two pairs each.
  if (MR == 1) {
    for (int i = 0; i < 16; ++i) out[i] = (out[i] + out[32 + i]) + (out[16 + i] + out[48 + i]);
  } else if (MR == 2) {
    for (int i = 0; i < 16; ++i) {
      out[i] += out[32 + i];
      out[16 + i] += out[48 + i];
    }
  }
}

template <int MR>
void w4a16_tile(const PanelWeight& w, int64_t panel, const float* xs, int64_t ldx, const float* xsum, float* c) {
  const uint8_t* b = w.b + panel * w.panel_bytes;
  alignas(32) float acc[4 * kNR];
  for (int g = 0; g < w.nseg; ++g) {
    const int64_t p0 = w.seg_off[g], p1 = w.seg_off[g + 1];
    w4a16_kloop<MR>(xs + p0, ldx * 4, b + p0 / 2 * kNR, (p1 - p0) / 8, acc);
    const int64_t pi = (panel * w.nseg + g) * kNR;
    for (int v = 0; v < 2; ++v) {
      const __m256 wz = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wzp + pi + 8 * v)));
      const __m256 sc = _mm256_loadu_ps(w.scale + pi + 8 * v);
      for (int r = 0; r < MR; ++r) {
        const __m256 xsg = _mm256_set1_ps(xsum[r * w.nseg + g]);
        const __m256 a = _mm256_load_ps(acc + r * kNR + 8 * v);
        const __m256 f = _mm256_mul_ps(sc, _mm256_fnmadd_ps(wz, xsg, a));
        float* cp = c + r * kNR + 8 * v;
        _mm256_storeu_ps(cp, g == 0 ? f : _mm256_add_ps(_mm256_loadu_ps(cp), f));
      }
    }
  }
}

void w4a16_panel_avx2(const PanelWeight& w, int64_t panel, const float* xs, int64_t ldx, const float* xsum,
                      int64_t rows, float* c) {
  constexpr int MR = 4;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) w4a16_tile<MR>(w, panel, xs + r * ldx, ldx, xsum + r * w.nseg, c + r * kNR);
  const int64_t tail = rows - r;
  const float* xt = xs + r * ldx;
  const float* st = xsum + r * w.nseg;
  float* ct = c + r * kNR;
  if (tail == 3) w4a16_tile<3>(w, panel, xt, ldx, st, ct);
  if (tail == 2) w4a16_tile<2>(w, panel, xt, ldx, st, ct);
  if (tail == 1) w4a16_tile<1>(w, panel, xt, ldx, st, ct);
}

// ---- activation quantization ------------------------------------------------------------------------------------

// 8 codes as int32: clamp(round_half_even(x / s) + zp, 0, qmax). True division, as torch's x / scale.
inline __m256i quant8(__m256 x, __m256 s, __m256 zp, __m256 qmax) {
  __m256 q = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_add_ps(q, zp);
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), qmax);
  return _mm256_cvttps_epi32(q);
}

void quantize_u8_avx2(const float* x, int64_t n, float scale, float zp, float qmax, uint8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zp), qm = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a = quant8(_mm256_loadu_ps(x + i), s, z, qm);
    const __m256i b = quant8(_mm256_loadu_ps(x + i + 8), s, z, qm);
    const __m256i c = quant8(_mm256_loadu_ps(x + i + 16), s, z, qm);
    const __m256i d = quant8(_mm256_loadu_ps(x + i + 24), s, z, qm);
    // packs work per 128-bit lane; the final permute restores element order.
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    const __m256i abcd = _mm256_packus_epi16(ab, cd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                        _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  for (; i < n; i += 8) {
    float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t len = n - i < 8 ? n - i : 8;
    for (int64_t j = 0; j < len; ++j) buf[j] = x[i + j];
    int32_t out[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), quant8(_mm256_loadu_ps(buf), s, z, qm));
    for (int64_t j = 0; j < len; ++j) q[i + j] = static_cast<uint8_t>(out[j]);
  }
}

void quantize_i16_avx2(const float* x, int64_t n, float scale, float zp, float qmax, int16_t* q) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zp), qm = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = quant8(_mm256_loadu_ps(x + i), s, z, qm);
    const __m256i b = quant8(_mm256_loadu_ps(x + i + 8), s, z, qm);
    const __m256i ab = _mm256_packs_epi32(a, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permute4x64_epi64(ab, 0xD8));
  }
  for (; i < n; i += 8) {
    float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t len = n - i < 8 ? n - i : 8;
    for (int64_t j = 0; j < len; ++j) buf[j] = x[i + j];
    int32_t out[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), quant8(_mm256_loadu_ps(buf), s, z, qm));
    for (int64_t j = 0; j < len; ++j) q[i + j] = static_cast<int16_t>(out[j]);
  }
}

void minmax_avx2(const float* x, int64_t n, float* lo, float* hi) {
  int64_t i = 0;
  float l = x[0], h = x[0];
  if (n >= 8) {
    __m256 vl = _mm256_loadu_ps(x), vh = vl;
    for (i = 8; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      vl = _mm256_min_ps(vl, v);
      vh = _mm256_max_ps(vh, v);
    }
    float bl[8], bh[8];
    _mm256_storeu_ps(bl, vl);
    _mm256_storeu_ps(bh, vh);
    l = bl[0];
    h = bh[0];
    for (int j = 1; j < 8; ++j) {
      l = bl[j] < l ? bl[j] : l;
      h = bh[j] > h ? bh[j] : h;
    }
  }
  for (; i < n; ++i) {
    l = x[i] < l ? x[i] : l;
    h = x[i] > h ? x[i] : h;
  }
  *lo = l;
  *hi = h;
}

// NCHW -> NHWC codes, 8 channels x 8 pixels at a time: eight row vectors are quantized, transposed as an 8x8
// int32 block and narrowed to 8 bytes per pixel. Reads stay sequential within each channel plane.
void quantize_nhwc_avx2(const float* x, int64_t c, int64_t plane, int64_t p0, int64_t p1, float scale, float zp,
                        float qmax, uint8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zp), qm = _mm256_set1_ps(qmax);
  const int64_t c8 = c / 8 * 8;
  const int64_t pe = p0 + (p1 - p0) / 8 * 8;  // whole 8-pixel blocks end here
  // Channels outside, pixels inside: each channel plane is read as one contiguous run of the pixel range (the
  // other order touches one page per channel every 8 pixels, and the channel planes, a multiple of 4 KiB
  // apart, alias in L1), while the 8-byte stores go to the range's pixel rows, which stay in L1.
  for (int64_t c0 = 0; c0 < c8; c0 += 8) {
    for (int64_t p = p0; p < pe; p += 8) {
      __m256i v[8];
      for (int i = 0; i < 8; ++i) v[i] = quant8(_mm256_loadu_ps(x + (c0 + i) * plane + p), s, z, qm);
      // 8x8 int32 transpose: v[i][j] (channel i, pixel j) -> t[j][i].
      const __m256i a0 = _mm256_unpacklo_epi32(v[0], v[1]), a1 = _mm256_unpackhi_epi32(v[0], v[1]);
      const __m256i a2 = _mm256_unpacklo_epi32(v[2], v[3]), a3 = _mm256_unpackhi_epi32(v[2], v[3]);
      const __m256i a4 = _mm256_unpacklo_epi32(v[4], v[5]), a5 = _mm256_unpackhi_epi32(v[4], v[5]);
      const __m256i a6 = _mm256_unpacklo_epi32(v[6], v[7]), a7 = _mm256_unpackhi_epi32(v[6], v[7]);
      const __m256i b0 = _mm256_unpacklo_epi64(a0, a2), b1 = _mm256_unpackhi_epi64(a0, a2);
      const __m256i b2 = _mm256_unpacklo_epi64(a1, a3), b3 = _mm256_unpackhi_epi64(a1, a3);
      const __m256i b4 = _mm256_unpacklo_epi64(a4, a6), b5 = _mm256_unpackhi_epi64(a4, a6);
      const __m256i b6 = _mm256_unpacklo_epi64(a5, a7), b7 = _mm256_unpackhi_epi64(a5, a7);
      __m256i t[8];
      t[0] = _mm256_permute2x128_si256(b0, b4, 0x20);
      t[1] = _mm256_permute2x128_si256(b1, b5, 0x20);
      t[2] = _mm256_permute2x128_si256(b2, b6, 0x20);
      t[3] = _mm256_permute2x128_si256(b3, b7, 0x20);
      t[4] = _mm256_permute2x128_si256(b0, b4, 0x31);
      t[5] = _mm256_permute2x128_si256(b1, b5, 0x31);
      t[6] = _mm256_permute2x128_si256(b2, b6, 0x31);
      t[7] = _mm256_permute2x128_si256(b3, b7, 0x31);
      // Narrow two pixels at a time: packs keeps each 128-bit lane, so lane 0 = pixel j, lane 1 = pixel j+1.
      for (int j = 0; j < 8; j += 2) {
        const __m256i w16 = _mm256_packs_epi32(t[j], t[j + 1]);   // [pj c0-3, pj+1 c0-3 | pj c4-7, pj+1 c4-7]
        const __m256i w16p = _mm256_permute4x64_epi64(w16, 0xD8);  // [pj c0-7 | pj+1 c0-7]
        const __m256i b8 = _mm256_packus_epi16(w16p, w16p);       // lane0: pj bytes x2, lane1: pj+1 bytes x2
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + (p + j) * c + c0), _mm256_castsi256_si128(b8));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + (p + j + 1) * c + c0), _mm256_extracti128_si256(b8, 1));
      }
    }
  }
  for (int64_t p = p0; p < pe; p += 8) {
    for (int64_t ch = c8; ch < c; ++ch) {
      float buf[8];
      for (int j = 0; j < 8; ++j) buf[j] = x[ch * plane + p + j];
      int32_t out[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), quant8(_mm256_loadu_ps(buf), s, z, qm));
      for (int j = 0; j < 8; ++j) q[(p + j) * c + ch] = static_cast<uint8_t>(out[j]);
    }
  }
  int64_t p = pe;
  for (; p < p1; ++p) {
    for (int64_t c0 = 0; c0 < c; c0 += 8) {
      float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t n = c - c0 < 8 ? c - c0 : 8;
      for (int64_t i = 0; i < n; ++i) buf[i] = x[(c0 + i) * plane + p];
      int32_t out[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), quant8(_mm256_loadu_ps(buf), s, z, qm));
      for (int64_t i = 0; i < n; ++i) q[p * c + c0 + i] = static_cast<uint8_t>(out[i]);
    }
  }
}

// 8x8 blocks: eight tile rows (pixels) x eight columns, transposed so each column's eight pixels are stored
// contiguously; the rest goes through the portable loop.
void store_cols_avx2(const float* c, int64_t rows, int ncols, float scale, const float* bias, float* y,
                     int64_t ldy) {
  const __m256 s = _mm256_set1_ps(scale);
  const int64_t r8 = rows / 8 * 8;
  const int n8 = ncols / 8 * 8;
  for (int n0 = 0; n0 < n8; n0 += 8) {
    for (int64_t r0 = 0; r0 < r8; r0 += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(c + (r0 + i) * kNR + n0);
      const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
      const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
      const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
      const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
      __m256 t[8];
      t[0] = _mm256_permute2f128_ps(b0, b4, 0x20);
      t[1] = _mm256_permute2f128_ps(b1, b5, 0x20);
      t[2] = _mm256_permute2f128_ps(b2, b6, 0x20);
      t[3] = _mm256_permute2f128_ps(b3, b7, 0x20);
      t[4] = _mm256_permute2f128_ps(b0, b4, 0x31);
      t[5] = _mm256_permute2f128_ps(b1, b5, 0x31);
      t[6] = _mm256_permute2f128_ps(b2, b6, 0x31);
      t[7] = _mm256_permute2f128_ps(b3, b7, 0x31);
      for (int j = 0; j < 8; ++j) {
        __m256 out = _mm256_mul_ps(t[j], s);
        if (bias) out = _mm256_add_ps(out, _mm256_set1_ps(bias[n0 + j]));
        _mm256_storeu_ps(y + (n0 + j) * ldy + r0, out);
      }
    }
  }
  // leftovers: rows past the last multiple of 8 for the 8-column blocks, then the last columns for all rows
  if (r8 < rows) scalar_kernels().store_cols(c + r8 * kNR, rows - r8, n8, scale, bias, y + r8, ldy);
  if (n8 < ncols)
    scalar_kernels().store_cols(c + n8, rows, ncols - n8, scale, bias ? bias + n8 : nullptr, y + n8 * ldy, ldy);
}

// ---- dequantization (weight-only layers) -----------------------------------------------------------------------

// 4- and 8-bit rows whose groups are whole multiples of 8 codes; anything else goes to the portable loop.
void dequant_row_avx2(const int32_t* q, int bits, int64_t k, int64_t groups, const float* scale, const int32_t* zp,
                      float* out) {
  const int64_t gl = k / groups;
  if ((bits != 4 && bits != 8) || gl % 8 != 0) {
    scalar_kernels().dequant_row(q, bits, k, groups, scale, zp, out);
    return;
  }
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i m4 = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scale[g]);
    const __m256i z = _mm256_set1_epi32(zp[g]);
    for (int64_t kk = g * gl; kk < (g + 1) * gl; kk += 8) {
      __m256i codes;
      if (bits == 4) {
        codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(q[kk / 8]), shifts), m4);
      } else {
        codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(
            reinterpret_cast<const uint8_t*>(q) + kk)));
      }
      // (code - zp) is exact in int32 and in float; one rounding in the multiply, as in the reference.
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes, z)), s);
      _mm256_storeu_ps(out + kk, w);
    }
  }
}

// Nibble J of the 16 words of one 8-k block (v0: columns 0..7, v1: 8..15) holds position nib_pos(J); its codes
// are shifted down and masked, centred in int32 (exact), converted (exact) and scaled: one rounding, as in the
// reference. The row kk = kmap[position] of the K-major output receives the 16 columns.
template <int J>
inline void dequant_nibble(__m256i v0, __m256i v1, __m256i z0, __m256i z1, __m256 s0, __m256 s1, int32_t kk,
                           float* col, int64_t ldo) {
  if (kk < 0) return;  // padding position
  const __m256i m4 = _mm256_set1_epi32(0xF);
  const __m256i c0 = _mm256_and_si256(_mm256_srli_epi32(v0, 4 * J), m4);
  const __m256i c1 = _mm256_and_si256(_mm256_srli_epi32(v1, 4 * J), m4);
  float* dst = col + kk * ldo;
  _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c0, z0)), s0));
  _mm256_storeu_ps(dst + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c1, z1)), s1));
}

void dequant_panels_w4_avx2(const PanelWeight& w, const int32_t* kmap, int64_t p0, int64_t p1, float* out,
                            int64_t ldo) {
  for (int64_t panel = p0; panel < p1; ++panel) {
    const uint8_t* b = w.b + panel * w.panel_bytes;
    float* col = out + (panel - p0) * kNR;
    for (int g = 0; g < w.nseg; ++g) {
      const int64_t pi = (panel * w.nseg + g) * kNR;
      const __m256i z0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wzp + pi));
      const __m256i z1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wzp + pi + 8));
      const __m256 s0 = _mm256_loadu_ps(w.scale + pi), s1 = _mm256_loadu_ps(w.scale + pi + 8);
      for (int64_t p = w.seg_off[g]; p < w.seg_off[g + 1]; p += 8) {
        const __m256i* wb = reinterpret_cast<const __m256i*>(b + p / 2 * kNR);
        const __m256i v0 = _mm256_loadu_si256(wb), v1 = _mm256_loadu_si256(wb + 1);
        const int32_t* km = kmap + p;
        // nibble j <-> position nib_pos(j) = 0, 4, 1, 5, 2, 6, 3, 7
        dequant_nibble<0>(v0, v1, z0, z1, s0, s1, km[0], col, ldo);
        dequant_nibble<1>(v0, v1, z0, z1, s0, s1, km[4], col, ldo);
        dequant_nibble<2>(v0, v1, z0, z1, s0, s1, km[1], col, ldo);
        dequant_nibble<3>(v0, v1, z0, z1, s0, s1, km[5], col, ldo);
        dequant_nibble<4>(v0, v1, z0, z1, s0, s1, km[2], col, ldo);
        dequant_nibble<5>(v0, v1, z0, z1, s0, s1, km[6], col, ldo);
        dequant_nibble<6>(v0, v1, z0, z1, s0, s1, km[3], col, ldo);
        dequant_nibble<7>(v0, v1, z0, z1, s0, s1, km[7], col, ldo);
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace quantkit

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace quantkit {
namespace cpu {
namespace {
const KernelTable kAvx2 = {"avx2",           int_panel_w8_avx2, int_panel_w4_avx2, int_panel_w8q_avx2, w4a16_panel_avx2,
                           quantize_u8_avx2, quantize_i16_avx2, minmax_avx2,       dequant_row_avx2,
                           quantize_nhwc_avx2, store_cols_avx2, dequant_panels_w4_avx2};
}  // namespace
const KernelTable* avx2_kernels() { return &kAvx2; }
}  // namespace cpu
}  // namespace quantkit

#else  // no AVX2 translation unit on this platform / compiler

namespace quantkit {
namespace cpu {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace quantkit

#endif
