// Portable inner kernels (any x86-64 / ARM CPU): the fallback when AVX2+FMA is absent, and the exact int64
// path. Same packed layouts as kernels_avx2.cpp (see include/quantkit/cpu_kernels.h).
#include <cmath>
#include <cstring>

#include "quantkit/cpu_kernels.h"

namespace quantkit {
namespace cpu {
namespace {

inline const int32_t* seg_params(const int32_t* base, const PanelWeight& w, int64_t panel, int g) {
  return base + (panel * w.nseg + g) * kNR;
}
inline const float* seg_scale(const PanelWeight& w, int64_t panel, int g) {
  return w.scale + (panel * w.nseg + g) * kNR;
}

// Codes of position p for the kNR columns of a panel.
template <int Bits>
inline void panel_codes(const uint8_t* b, int64_t p, int16_t* out) {
  if (Bits == 8) {
    const uint8_t* src = b + (p >> 1) * 2 * kNR + (p & 1);
    for (int n = 0; n < kNR; ++n) out[n] = src[2 * n];
  } else if (Bits == 7) {  // W8Q: signed code - 128
    const int8_t* src = reinterpret_cast<const int8_t*>(b) + (p >> 2) * 4 * kNR + (p & 3);
    for (int n = 0; n < kNR; ++n) out[n] = src[4 * n];
  } else {
    static const int kSlot[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    const uint32_t* words = reinterpret_cast<const uint32_t*>(b) + (p >> 3) * kNR;
    const int shift = 4 * kSlot[p & 7];
    for (int n = 0; n < kNR; ++n) out[n] = static_cast<int16_t>((words[n] >> shift) & 0xFu);
  }
}

// Shared body: Acc is uint32_t (wrap-around arithmetic, exact when the true value fits int32) or int64_t.
// Rows are processed four at a time so each decoded weight row serves four activation rows; the inner loops
// over the kNR columns have constant trip counts and vectorize with the baseline instruction set.
template <typename Acc, int Bits, typename AT>
void int_panel(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out, float* c) {
  constexpr int R = 4;
  const uint8_t* b = w.b + panel * w.panel_bytes;
  const AT* a = static_cast<const AT*>(x.a);
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const int nr = rows - r0 < R ? static_cast<int>(rows - r0) : R;
    for (int g = 0; g < w.nseg; ++g) {
      Acc acc[R][kNR];
      for (int i = 0; i < R; ++i)
        for (int n = 0; n < kNR; ++n) acc[i][n] = 0;
      for (int64_t p = w.seg_off[g]; p < w.seg_off[g + 1]; ++p) {
        int16_t codes[kNR];
        panel_codes<Bits>(b, p, codes);
        for (int i = 0; i < nr; ++i) {
          const Acc xv = static_cast<Acc>(static_cast<int64_t>(a[(r0 + i) * x.lda + p]));
          for (int n = 0; n < kNR; ++n) acc[i][n] += xv * static_cast<Acc>(static_cast<int64_t>(codes[n]));
        }
      }
      const int32_t* wzp = seg_params(w.wzp, w, panel, g);
      const int32_t* swc = seg_params(w.swc, w, panel, g);
      const float* sc = seg_scale(w, panel, g);
      for (int i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        float* cr = c + r * kNR;
        const Acc sx = static_cast<Acc>(static_cast<int64_t>(x.sx[r * w.nseg + g]));
        const Acc zx = static_cast<Acc>(static_cast<int64_t>(x.zx[r]));
        for (int n = 0; n < kNR; ++n) {
          const Acc corr = acc[i][n] - static_cast<Acc>(static_cast<int64_t>(wzp[n])) * sx -
                           zx * static_cast<Acc>(static_cast<int64_t>(swc[n]));
          int64_t v;
          if (sizeof(Acc) == 4) {
            v = static_cast<int32_t>(static_cast<uint32_t>(corr));
          } else {
            v = static_cast<int64_t>(corr);
          }
          const float f = static_cast<float>(v) * sc[n];
          cr[n] = g == 0 ? f : cr[n] + f;
        }
      }
    }
  }
  write_out_rows(c, rows, x, out);
}

void int_panel_w8_scalar(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                         float* c) {
  int_panel<uint32_t, 8, int16_t>(w, panel, x, rows, out, c);
}
void int_panel_w4_scalar(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                         float* c) {
  int_panel<uint32_t, 4, uint8_t>(w, panel, x, rows, out, c);
}
void int_panel_w8q_scalar(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                          float* c) {
  int_panel<uint32_t, 7, uint8_t>(w, panel, x, rows, out, c);
}

void w4a16_panel_scalar(const PanelWeight& w, int64_t panel, const float* xs, int64_t ldx, const float* xsum,
                        int64_t rows, float* c) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.b + panel * w.panel_bytes);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * ldx;
    float* cr = c + r * kNR;
    for (int g = 0; g < w.nseg; ++g) {
      float acc[kNR];
      for (int n = 0; n < kNR; ++n) acc[n] = 0.f;
      for (int64_t p = w.seg_off[g]; p < w.seg_off[g + 1]; p += 8) {
        const uint32_t* wb = words + (p >> 3) * kNR;
        for (int j = 0; j < 8; ++j) {
          const float xv = xr[p + j];
          for (int n = 0; n < kNR; ++n) {
            const uint32_t q = j < 7 ? (wb[n] & (0xFu << (4 * j))) : (wb[n] >> 28);
            acc[n] += static_cast<float>(static_cast<int32_t>(q)) * xv;
          }
        }
      }
      const int32_t* wzp = seg_params(w.wzp, w, panel, g);
      const float* sc = seg_scale(w, panel, g);
      const float xsg = xsum[r * w.nseg + g];
      for (int n = 0; n < kNR; ++n) {
        const float f = sc[n] * (acc[n] - static_cast<float>(wzp[n]) * xsg);
        cr[n] = g == 0 ? f : cr[n] + f;
      }
    }
  }
}

inline float quantize_one(float x, float scale, float zp, float qmax) {
  // torch.round is round-half-to-even; std::nearbyint follows the current (default: nearest-even) mode.
  float q = std::nearbyint(x / scale) + zp;
  q = q < 0.f ? 0.f : q;
  q = q > qmax ? qmax : q;
  return q;
}

void quantize_u8_scalar(const float* x, int64_t n, float scale, float zp, float qmax, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(quantize_one(x[i], scale, zp, qmax));
}

void quantize_i16_scalar(const float* x, int64_t n, float scale, float zp, float qmax, int16_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int16_t>(quantize_one(x[i], scale, zp, qmax));
}

void minmax_scalar(const float* x, int64_t n, float* lo, float* hi) {
  float l = x[0], h = x[0];
  for (int64_t i = 1; i < n; ++i) {
    l = x[i] < l ? x[i] : l;
    h = x[i] > h ? x[i] : h;
  }
  *lo = l;
  *hi = h;
}

void dequant_row_scalar(const int32_t* q, int bits, int64_t k, int64_t groups, const float* scale, const int32_t* zp,
                        float* out) {
  const int vpw = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const int64_t gl = k / groups;
  for (int64_t g = 0; g < groups; ++g) {
    const float s = scale[g];
    const int32_t z = zp[g];
    for (int64_t kk = g * gl; kk < (g + 1) * gl; ++kk) {
      const uint32_t word = static_cast<uint32_t>(q[kk / vpw]);
      const int32_t code = static_cast<int32_t>((word >> ((kk % vpw) * bits)) & mask);
      out[kk] = static_cast<float>(code - z) * s;
    }
  }
}

void quantize_nhwc_scalar(const float* x, int64_t c, int64_t plane, int64_t p0, int64_t p1, float scale, float zp,
                          float qmax, uint8_t* q) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t ch = 0; ch < c; ++ch)
      q[p * c + ch] = static_cast<uint8_t>(quantize_one(x[ch * plane + p], scale, zp, qmax));
}

void store_cols_scalar(const float* c, int64_t rows, int ncols, float scale, const float* bias, float* y,
                       int64_t ldy) {
  for (int n = 0; n < ncols; ++n) {
    float* yn = y + n * ldy;
    if (bias) {
      const float bn = bias[n];
      for (int64_t r = 0; r < rows; ++r) yn[r] = c[r * kNR + n] * scale + bn;
    } else {
      for (int64_t r = 0; r < rows; ++r) yn[r] = c[r * kNR + n] * scale;
    }
  }
}

void dequant_panels_w4_scalar(const PanelWeight& w, const int32_t* kmap, int64_t p0, int64_t p1, float* out,
                              int64_t ldo) {
  for (int64_t panel = p0; panel < p1; ++panel) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(w.b + panel * w.panel_bytes);
    float* col = out + (panel - p0) * kNR;
    for (int g = 0; g < w.nseg; ++g) {
      const int32_t* wzp = seg_params(w.wzp, w, panel, g);
      const float* sc = seg_scale(w, panel, g);
      for (int64_t p = w.seg_off[g]; p < w.seg_off[g + 1]; p += 8) {
        const uint32_t* wb = words + (p >> 3) * kNR;
        for (int j = 0; j < 8; ++j) {
          const int32_t kk = kmap[p + nib_pos(j)];
          if (kk < 0) continue;  // padding
          float* dst = col + kk * ldo;
          for (int n = 0; n < kNR; ++n) {
            const int32_t code = static_cast<int32_t>((wb[n] >> (4 * j)) & 0xFu);
            dst[n] = static_cast<float>(code - wzp[n]) * sc[n];
          }
        }
      }
    }
  }
}

const KernelTable kScalar = {"scalar",           int_panel_w8_scalar, int_panel_w4_scalar, int_panel_w8q_scalar,
                             w4a16_panel_scalar,
                             quantize_u8_scalar, quantize_i16_scalar, minmax_scalar,       dequant_row_scalar,
                             quantize_nhwc_scalar, store_cols_scalar, dequant_panels_w4_scalar};

}  // namespace

const KernelTable& scalar_kernels() { return kScalar; }

void int_panel_w8_i64(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                      float* c) {
  int_panel<int64_t, 8, int16_t>(w, panel, x, rows, out, c);
}
void int_panel_w4_i64(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                      float* c) {
  int_panel<int64_t, 4, uint8_t>(w, panel, x, rows, out, c);
}
void int_panel_w8q_i64(const PanelWeight& w, int64_t panel, const ActRows& x, int64_t rows, const OutRows& out,
                       float* c) {
  int_panel<int64_t, 7, uint8_t>(w, panel, x, rows, out, c);
}

}  // namespace cpu
}  // namespace quantkit
