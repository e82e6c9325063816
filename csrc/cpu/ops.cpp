// CPU implementations of the quantkit ops (schemas: src/quantkit/ops/library.py; math: ops/reference.py).
//
// Integer paths (act_bits <= 8): activations are quantized exactly like the reference (fp32 true division,
// round-half-even, + zero point, clamp), weights come repacked from the cache (repack.cpp), accumulation is
// exact (int32 when it provably cannot overflow, int64 otherwise) and the epilogue runs in fp32 in the
// reference's order: y = (sum_g float(acc_g) * w_scale[n, g]) * s_x + bias. This file is compiled with
// -ffp-contract=off so that order is kept (per-channel outputs are then bit-identical to the reference).
// Weight-only paths (act_bits >= 16): 4-bit weights with few rows run a fused kernel; everything else
// dequantizes the weight (as the reference does; compacted weights from their panels) and calls at::linear /
// at::conv2d.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "internal.h"
#include "quantkit/format.h"

namespace quantkit {
namespace cpu {

// ---- instruction set ------------------------------------------------------------------------------------------

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  if (!(osxsave && avx && fma)) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 6u) != 6u) return false;  // the OS saves XMM and YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return (b & (1u << 5)) != 0;
#else
  return false;
#endif
}

bool avx2_compiled() { return avx2_kernels() != nullptr; }

namespace {

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* choose(const std::string& name) {
  if (name == "scalar") return &scalar_kernels();
  const bool can = avx2_compiled() && cpu_has_avx2_fma();
  if (name == "avx2") {
    TORCH_CHECK(can, "quantkit: AVX2 kernels requested but ",
                avx2_compiled() ? "this CPU lacks AVX2/FMA" : "they were not compiled");
    return avx2_kernels();
  }
  TORCH_CHECK(name.empty() || name == "auto", "quantkit: unknown CPU ISA '", name,
              "', expected auto, avx2 or scalar");
  return can ? avx2_kernels() : &scalar_kernels();
}

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    const char* env = std::getenv("QUANTKIT_CPU_ISA");
    t = choose(env ? std::string(env) : std::string());
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::string isa() { return kernels().name; }

void set_isa(const std::string& name) { g_table.store(choose(name), std::memory_order_release); }

namespace {

// ---- helpers --------------------------------------------------------------------------------------------------

// Rows up to which 4-bit weight-only layers run the fused kernel; more rows dequantize (from the panels when the
// weight is compacted) + at::linear (MKL), exactly as the reference.
// QUANTKIT_W4A16_FUSED_MAX_ROWS overrides it (tuning).
int64_t env_int(const char* name, int64_t dflt) {
  const char* env = std::getenv(name);
  return env && *env ? static_cast<int64_t>(std::atoll(env)) : dflt;
}

int64_t w4a16_fused_max_rows() {
  static const int64_t v = env_int("QUANTKIT_W4A16_FUSED_MAX_ROWS", 80);
  return v;
}

at::Tensor dequantize_scratch(const at::Tensor& qdata, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& w_zero_point, int64_t w_bits, int64_t k);

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Activation qparams from a range, exactly as reference.act_qparams_from_range (fp32 arithmetic).
void dynamic_qparams(float lo, float hi, int64_t bits, float* scale, int32_t* zp) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  lo = lo > 0.f ? 0.f : lo;
  hi = hi < 0.f ? 0.f : hi;
  float s = (hi - lo) / qmax;
  if (s < 1e-8f) s = 1e-8f;
  float z = std::nearbyint(-lo / s);
  z = z < 0.f ? 0.f : (z > qmax ? qmax : z);
  *scale = s;
  *zp = static_cast<int32_t>(z);
}

void check_act_bits(int64_t act_bits) {
  TORCH_CHECK(act_bits >= 1 && act_bits <= 8,
              "quantkit: act_bits must be 2..8 (integer activations, uint8 codes) or >= 16 (weight-only), got ",
              act_bits);
}

void check_weight(const at::Tensor& qdata, int64_t w_bits, int64_t k) {
  TORCH_CHECK(format::valid_weight_bits(static_cast<int>(w_bits)), "quantkit: w_bits must be one of 2, 3, 4, 8, got ",
              w_bits);
  // CPU kernel layout (a compacted module): get_packed / dequantize_into read its header and check it against the
  // call, once.
  if (is_blob(qdata)) return;
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kInt, "quantkit: qdata must be int32 [out, words], got ",
              qdata.scalar_type(), " ", qdata.sizes());
  TORCH_CHECK(qdata.device().is_cpu(), "quantkit: CPU kernel called with qdata on ", qdata.device());
  TORCH_CHECK(qdata.size(1) * format::values_per_word(static_cast<int>(w_bits)) >= k, "quantkit: ", qdata.size(1),
              " words of ", w_bits, "-bit codes cannot hold ", k, " values");
}

struct ActParams {
  bool dynamic = true;
  float scale = 1.f;
  int32_t zp = 0;
};

ActParams static_params(const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zero_point) {
  ActParams p;
  if (!in_scale.has_value()) return p;
  p.dynamic = false;
  TORCH_CHECK(in_scale->numel() == 1, "quantkit: in_scale must hold one value (per-tensor), got shape ",
              in_scale->sizes());
  p.scale = in_scale->to(at::kFloat).item<float>();
  if (in_zero_point.has_value()) {
    TORCH_CHECK(in_zero_point->numel() == 1, "quantkit: in_zero_point must hold one value, got shape ",
                in_zero_point->sizes());
    const int64_t z = in_zero_point->to(at::kLong).item<int64_t>();
    TORCH_CHECK(z >= INT32_MIN && z <= INT32_MAX, "quantkit: in_zero_point out of int32 range");
    p.zp = static_cast<int32_t>(z);
  }
  return p;
}

// Largest |xq - zx| for codes in [0, qmax].
int64_t max_abs_x(int64_t qmax, int64_t zx) {
  const int64_t a = zx < 0 ? -zx : zx, b = qmax - zx < 0 ? zx - qmax : qmax - zx;
  return a > b ? a : b;
}

// True when every per-group accumulator provably fits in int32 (else the exact int64 kernels run).
bool int32_safe(const PackedWeight& pw, int64_t max_x) {
  const double bound = static_cast<double>(pw.group_len) * static_cast<double>(max_x) *
                       static_cast<double>(pw.max_abs_wc);
  return bound < 2147483647.0;
}

IntPanelFn pick_int_kernel(const PackedWeight& pw, bool safe) {
  const KernelTable& kt = kernels();
  if (pw.layout_bits == 4) return safe ? kt.int_panel_w4 : int_panel_w4_i64;
  if (pw.layout_bits == 7) return safe ? kt.int_panel_w8q : int_panel_w8q_i64;
  return safe ? kt.int_panel_w8 : int_panel_w8_i64;
}

// Rows per block so that a block of packed activations stays in L2; a multiple of the kernels' row tile
// (6 for W8, 4 for W4) so that no block ends in a small tail tile, and where blocks hold at least
// lcm(tile, align) rows a multiple of that too (convolutions: store_cols transposes 8-row blocks).
int64_t rows_per_block(const PackedWeight& pw, int64_t cap, int64_t align = 1) {
  const int64_t elt = pw.layout_bits == 8 ? 2 : 1, tile = pw.layout_bits == 4 ? 4 : 6;
  int64_t mb = (int64_t(192) << 10) / (pw.view.kp * elt + 1);
  mb = mb < tile ? tile : (mb > cap ? cap : mb);
  int64_t unit = tile;
  while (unit % align) unit += tile;
  return mb >= unit ? mb / unit * unit : mb / tile * tile;
}

// Run fn(task) for tasks [0, n): inline when the whole job is small (a parallel region costs microseconds).
template <typename F>
void run_tasks(int64_t n, double work, const F& fn) {
  if (n <= 1 || work < 3.0e5 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < n; ++t) fn(t);
    return;
  }
  // Each thread claims the next task from a shared counter: at::parallel_for splits a range statically, so one
  // thread slowed down (by another process, or by a block with more rows) would leave the others waiting.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t);
  });
}

// How many chunks to split the panels into, given the number of row blocks.
int64_t panel_chunks(int64_t row_blocks, int64_t npanels) {
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  if (row_blocks >= want) return 1;
  int64_t chunks = div_up(want, row_blocks);
  return chunks > npanels ? npanels : chunks;
}

// Scratch buffers, one slice per thread.
struct Scratch {
  at::Tensor t;
  int64_t per = 0;
  Scratch(int64_t bytes_per_thread, bool zero) {
    per = (bytes_per_thread + 63) / 64 * 64;
    const int64_t n = per * at::get_num_threads();
    t = zero ? at::zeros({n}, at::kByte) : at::empty({n}, at::kByte);
  }
  uint8_t* get() { return t.data_ptr<uint8_t>() + per * at::get_thread_num(); }
};

// ---- linear, integer activations -----------------------------------------------------------------------------

at::Tensor gemm_int(const at::Tensor& x2, const PackedWeight& pw, const float* bias, int64_t act_bits,
                    const ActParams& ap) {
  const KernelTable& kt = kernels();
  const int64_t m = x2.size(0), k = x2.size(1), n = pw.view.n;
  const int64_t kp = pw.view.kp, nseg = pw.groups, gl = pw.group_len;
  const bool w8 = pw.layout_bits == 8;
  const float qmax = static_cast<float>((1 << act_bits) - 1);
  at::Tensor y = at::empty({m, n}, x2.options().dtype(at::kFloat));
  if (m == 0) return y;

  at::Tensor a = at::empty({m, kp}, x2.options().dtype(w8 ? at::kShort : at::kByte));
  at::Tensor sxs = at::empty({m, nseg}, x2.options().dtype(at::kInt));
  at::Tensor zx = at::empty({m}, x2.options().dtype(at::kInt));
  at::Tensor sx = at::empty({m}, x2.options().dtype(at::kFloat));
  const float* xp = x2.data_ptr<float>();
  int32_t* sxsp = sxs.data_ptr<int32_t>();
  int32_t* zxp = zx.data_ptr<int32_t>();
  float* sxp = sx.data_ptr<float>();
  uint8_t* ab = static_cast<uint8_t*>(a.data_ptr());
  const int64_t* seg_off = pw.seg_off;

  // 1. quantize the rows into the padded logical order (+ per-segment code sums).
  at::parallel_for(0, m, div_up(1 << 15, k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * k;
      float s = ap.scale;
      int32_t z = ap.zp;
      if (ap.dynamic) {
        float lo, hi;
        kt.minmax(xr, k, &lo, &hi);
        dynamic_qparams(lo, hi, act_bits, &s, &z);
      }
      sxp[r] = s;
      zxp[r] = z;
      const float zf = static_cast<float>(z);
      for (int64_t g = 0; g < nseg; ++g) {
        const int64_t o = seg_off[g], len = seg_off[g + 1] - o;
        int64_t sum = 0;
        if (w8) {
          int16_t* dst = reinterpret_cast<int16_t*>(ab) + r * kp + o;
          kt.quantize_i16(xr + g * gl, gl, s, zf, qmax, dst);
          for (int64_t j = gl; j < len; ++j) dst[j] = 0;
          for (int64_t j = 0; j < gl; ++j) sum += dst[j];
        } else {
          uint8_t* dst = ab + r * kp + o;
          kt.quantize_u8(xr + g * gl, gl, s, zf, qmax, dst);
          for (int64_t j = gl; j < len; ++j) dst[j] = 0;
          for (int64_t j = 0; j < gl; ++j) sum += dst[j];
        }
        sxsp[r * nseg + g] = static_cast<int32_t>(sum);
      }
    }
  });

  // 2. blocked GEMM: tasks = row blocks x panel chunks; the kernels write y directly.
  int64_t max_x = ap.dynamic ? static_cast<int64_t>(qmax) : max_abs_x(static_cast<int64_t>(qmax), ap.zp);
  const IntPanelFn fn = pick_int_kernel(pw, int32_safe(pw, max_x));
  // Few rows (text tokens, GEMV): one block, so the weight streams through the cache once, split over the threads
  // by panels. Many rows: small blocks, whose activations stay in L1 while the panels stream past them (measured
  // on the UNet shapes: 48-row blocks up to 1.3x faster than 252-row ones on the wide layers).
  const int64_t mb = rows_per_block(pw, m <= 128 ? 256 : 48);
  const int64_t nmb = div_up(m, mb);
  const int64_t npanels = pw.view.npanels;
  const int64_t chunks = panel_chunks(nmb, npanels);
  const int64_t per_chunk = div_up(npanels, chunks);
  const int64_t elt = w8 ? 2 : 1;
  float* yp = y.data_ptr<float>();
  // Bias padded to whole panels: the kernels read kNR values per panel.
  std::vector<float> bias_pad;
  if (bias) {
    bias_pad.assign(static_cast<size_t>(npanels * kNR), 0.f);
    std::memcpy(bias_pad.data(), bias, static_cast<size_t>(n) * sizeof(float));
  }
  Scratch scratch(mb * kNR * static_cast<int64_t>(sizeof(float)), false);
  run_tasks(nmb * chunks, static_cast<double>(m) * n * k, [&](int64_t t) {
    const int64_t bi = t / chunks, ci = t % chunks;
    const int64_t r0 = bi * mb, rows = (r0 + mb > m ? m : r0 + mb) - r0;
    const int64_t p0 = ci * per_chunk, p1 = p0 + per_chunk > npanels ? npanels : p0 + per_chunk;
    float* c = reinterpret_cast<float*>(scratch.get());
    ActRows ar;
    ar.a = ab + r0 * kp * elt;
    ar.lda = kp;
    ar.sx = sxsp + r0 * nseg;
    ar.zx = zxp + r0;
    ar.scale = sxp + r0;
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int64_t n0 = panel * kNR;
      OutRows out;
      out.y = yp + r0 * n + n0;
      out.ldy = n;
      out.bias = bias ? bias_pad.data() + n0 : nullptr;
      out.ncols = static_cast<int>(n - n0 < kNR ? n - n0 : kNR);
      fn(pw.view, panel, ar, rows, out, c);
    }
  });
  return y;
}

// ---- linear, 4-bit weights x float activations, few rows ------------------------------------------------------

at::Tensor gemm_w4a16_fused(const at::Tensor& x2, const PackedWeight& pw, const float* bias) {
  const KernelTable& kt = kernels();
  const int64_t m = x2.size(0), k = x2.size(1), n = pw.view.n;
  const int64_t kp = pw.view.kp, nseg = pw.groups;
  at::Tensor y = at::empty({m, n}, x2.options().dtype(at::kFloat));
  if (m == 0) return y;
  at::Tensor xs = at::empty({m, kp}, x2.options().dtype(at::kFloat));
  at::Tensor xsum = at::empty({m, nseg}, x2.options().dtype(at::kFloat));
  const float* xp = x2.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  float* xsump = xsum.data_ptr<float>();
  const int32_t* kmap = pw.kmap;
  static const float kPow[8] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096, 1.f / 65536, 1.f / 1048576, 1.f / 16777216, 1.f};
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = xp + r * k;
    float* dst = xsp + r * kp;
    for (int64_t b = 0; b < kp / 8; ++b) {
      for (int j = 0; j < 8; ++j) {
        const int32_t src = kmap[b * 8 + nib_pos(j)];
        dst[b * 8 + j] = src < 0 ? 0.f : xr[src] * kPow[j];
      }
    }
    for (int64_t g = 0; g < nseg; ++g) {
      double s = 0.0;
      for (int64_t j = 0; j < pw.group_len; ++j) s += xr[g * pw.group_len + j];
      xsump[r * nseg + g] = static_cast<float>(s);
    }
  }
  const int64_t npanels = pw.view.npanels;
  const int64_t chunks = panel_chunks(1, npanels);
  const int64_t per_chunk = div_up(npanels, chunks);
  float* yp = y.data_ptr<float>();
  Scratch scratch(m * kNR * static_cast<int64_t>(sizeof(float)), false);
  run_tasks(chunks, static_cast<double>(m) * n * k * 4, [&](int64_t ci) {
    const int64_t p0 = ci * per_chunk, p1 = p0 + per_chunk > npanels ? npanels : p0 + per_chunk;
    float* c = reinterpret_cast<float*>(scratch.get());
    for (int64_t panel = p0; panel < p1; ++panel) {
      kt.w4a16_panel(pw.view, panel, xsp, kp, xsump, m, c);
      const int64_t n0 = panel * kNR, nc = n - n0 < kNR ? n - n0 : kNR;
      for (int64_t r = 0; r < m; ++r) {
        float* yr = yp + r * n + n0;
        const float* cr = c + r * kNR;
        for (int64_t j = 0; j < nc; ++j) yr[j] = bias ? cr[j] + bias[n0 + j] : cr[j];
      }
    }
  });
  return y;
}

at::Tensor bias_f32(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->numel() == n, "quantkit: bias has ", bias->numel(), " values for ", n, " outputs");
  return bias->to(at::kFloat).contiguous().view({n});
}

// ---- convolution, integer activations ---------------------------------------------------------------------------

struct Run {
  int64_t dst, c0, len, ti, tj;
};

// Activation-tile row of one output pixel: copy the runs of channel codes of each tap (or the zero point
// where the tap falls into the padding). Padding positions of the K layout are never written (stay 0).
void gather_row(const Run* runs, int64_t nruns, const uint8_t* qs, int64_t ih0, int64_t iw0, int64_t h, int64_t wd,
                int64_t c, int64_t dh, int64_t dw, int32_t z, bool w8, uint8_t* base, int64_t off) {
  for (int64_t i = 0; i < nruns; ++i) {
    const Run run = runs[i];
    const int64_t ih = ih0 + run.ti * dh, iw = iw0 + run.tj * dw;
    const bool inside = ih >= 0 && ih < h && iw >= 0 && iw < wd;
    const uint8_t* src = qs + (ih * wd + iw) * c + run.c0;
    const int64_t len = run.len;
    if (w8) {
      int16_t* dst = reinterpret_cast<int16_t*>(base) + off + run.dst;
      if (inside) {
        for (int64_t j = 0; j < len; ++j) dst[j] = src[j];
      } else {
        for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<int16_t>(z);
      }
    } else {
      uint8_t* dst = base + off + run.dst;
      if (len <= 16) {  // few channels (conv_in): a library call per tap would cost more than the copy
        const uint8_t fill = static_cast<uint8_t>(z);
        for (int64_t j = 0; j < len; ++j) dst[j] = inside ? src[j] : fill;
      } else if (inside) {
        std::memcpy(dst, src, static_cast<size_t>(len));
      } else {
        std::memset(dst, z, static_cast<size_t>(len));
      }
    }
  }
}

// Per-segment sums of one activation row (wrap-around int32: only used modulo 2^32, see cpu_kernels.h).
void segment_sums(const uint8_t* base, bool w8, int64_t off, const int64_t* seg_off, int64_t nseg, int32_t* out) {
  for (int64_t g = 0; g < nseg; ++g) {
    uint32_t sum = 0;
    if (w8) {
      const int16_t* a = reinterpret_cast<const int16_t*>(base) + off;
      for (int64_t p = seg_off[g]; p < seg_off[g + 1]; ++p) sum += static_cast<uint32_t>(static_cast<int32_t>(a[p]));
    } else {
      const uint8_t* a = base + off;
      for (int64_t p = seg_off[g]; p < seg_off[g + 1]; ++p) sum += a[p];
    }
    out[g] = static_cast<int32_t>(sum);
  }
}

std::vector<Run> gather_runs(const PackedWeight& pw) {
  std::vector<Run> runs;
  const int64_t taps = pw.conv_kh * pw.conv_kw;
  for (int64_t p = 0; p < pw.view.kp; ++p) {
    const int32_t k = pw.kmap[p];
    if (k < 0) continue;
    const int64_t c = k / taps, t = k % taps, ti = t / pw.conv_kw, tj = t % pw.conv_kw;
    if (!runs.empty()) {
      Run& last = runs.back();
      if (last.ti == ti && last.tj == tj && last.c0 + last.len == c && last.dst + last.len == p) {
        ++last.len;
        continue;
      }
    }
    runs.push_back({p, c, 1, ti, tj});
  }
  return runs;
}

}  // namespace

at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& w_zero_point, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zero_point,
                      int64_t w_bits, int64_t group_size, int64_t act_bits, at::IntArrayRef kernel_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  (void)group_size;  // like the reference, the groups come from w_scale.shape[1]
  TORCH_CHECK(x.dim() == 4, "quantkit: conv2d expects x [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "quantkit: CPU kernel called with x on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "quantkit: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "quantkit: kernel_size, stride, padding and dilation must have two values each");
  const int64_t bsz = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pwd = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pwd >= 0,
              "quantkit: invalid conv2d geometry");
  const int64_t k = c * kh * kw;
  check_weight(qdata, w_bits, k);
  const int64_t o = qdata.size(0);
  const int64_t ho = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t wo = (wd + 2 * pwd - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "quantkit: conv2d output would be empty (", ho, "x", wo, ")");

  if (act_bits >= 16) {
    const at::Tensor w = (x.scalar_type() == at::kFloat
                              ? dequantize_scratch(qdata, w_scale, w_zero_point, w_bits, k)
                              : dequantize_cpu(qdata, w_scale, w_zero_point, w_bits, k, x.scalar_type()))
                             .view({o, c, kh, kw});
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(x.scalar_type());
    return at::conv2d(x, w, b, stride, padding, dilation);
  }
  check_act_bits(act_bits);
  const ActParams ap = static_params(in_scale, in_zero_point);
  const int64_t qmax = (1 << act_bits) - 1;
  const bool fill_fits_u8 = ap.dynamic || (ap.zp >= 0 && ap.zp <= 255);
  TORCH_CHECK(fill_fits_u8 || (ap.zp >= -32768 && ap.zp <= 32767),
              "quantkit: conv2d in_zero_point out of the supported range [-32768, 32767]: ", ap.zp);
  // W8Q needs every code, padding fill included, below 128.
  const bool fill_fits_u7 = ap.dynamic || (ap.zp >= 0 && ap.zp <= qmax && qmax <= 127);
  const int layout_bits = w_bits == 4 ? (fill_fits_u8 ? 4 : 8) : cpu_layout(w_bits, act_bits, fill_fits_u7);
  auto packed = get_packed(qdata, w_scale, w_zero_point, w_bits, layout_bits, k, KOrder::kConv, c, kh, kw);
  const PackedWeight& pw = *packed;
  const at::Tensor bias_t = bias_f32(bias, o);
  const float* bp = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  const KernelTable& kt = kernels();
  const bool w8 = layout_bits == 8;

  // 1. per-sample qparams and NHWC uint8 codes (channels-last input is read as it is).
  const bool nhwc_in = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xf = nhwc_in ? x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast)
                                : x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<float> sx(static_cast<size_t>(bsz), ap.scale);
  std::vector<int32_t> zx(static_cast<size_t>(bsz), ap.zp);
  const int64_t plane = h * wd, sample = c * plane;
  if (ap.dynamic) {
    const int64_t nchunk = sample >= (1 << 16) ? 64 : 1;
    std::vector<float> lo(static_cast<size_t>(bsz * nchunk)), hi(static_cast<size_t>(bsz * nchunk));
    const int64_t clen = div_up(sample, nchunk);
    at::parallel_for(0, bsz * nchunk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nchunk, s0 = (t % nchunk) * clen;
        const int64_t len = s0 + clen > sample ? sample - s0 : clen;
        if (len <= 0) {
          lo[t] = hi[t] = xp[b * sample];
          continue;
        }
        kt.minmax(xp + b * sample + s0, len, &lo[t], &hi[t]);
      }
    });
    for (int64_t b = 0; b < bsz; ++b) {
      float l = lo[b * nchunk], hh = hi[b * nchunk];
      for (int64_t i = 1; i < nchunk; ++i) {
        l = lo[b * nchunk + i] < l ? lo[b * nchunk + i] : l;
        hh = hi[b * nchunk + i] > hh ? hi[b * nchunk + i] : hh;
      }
      dynamic_qparams(l, hh, act_bits, &sx[b], &zx[b]);
    }
  }
  at::Tensor q = at::empty({bsz, h, wd, c}, x.options().dtype(at::kByte));
  uint8_t* qp = q.data_ptr<uint8_t>();
  // Per-channel weights (one segment over every tap): the code sum of an output pixel's activation row is the
  // sum over its taps of per-input-pixel channel sums (c * zero point where a tap falls into the padding), so
  // each input pixel is summed once instead of once per tap. Wrap-around uint32, as in segment_sums.
  const bool pixel_sums = pw.groups == 1;
  std::vector<uint32_t> psum(pixel_sums ? static_cast<size_t>(bsz * plane) : 0);
  // Chunks of pixels per task: threads write disjoint pixel ranges, so no cache line is shared.
  const int64_t pchunk = 256, nchunks_px = div_up(plane, pchunk);
  at::parallel_for(0, bsz * nchunks_px, div_up(1 << 14, c * pchunk), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nchunks_px, p0 = (t % nchunks_px) * pchunk;
      const int64_t p1 = p0 + pchunk > plane ? plane : p0 + pchunk;
      const float* xs = xp + b * sample;
      uint8_t* qs = qp + b * sample;
      const float zf = static_cast<float>(zx[b]), qm = static_cast<float>(qmax);
      if (nhwc_in) {
        kt.quantize_u8(xs + p0 * c, (p1 - p0) * c, sx[b], zf, qm, qs + p0 * c);
      } else {
        kt.quantize_nhwc(xs, c, plane, p0, p1, sx[b], zf, qm, qs);
      }
      if (pixel_sums) {
        for (int64_t p = p0; p < p1; ++p) {
          const uint8_t* row = qs + p * c;
          uint32_t sum = 0;
          for (int64_t j = 0; j < c; ++j) sum += row[j];
          psum[static_cast<size_t>(b * plane + p)] = sum;
        }
      }
    }
  });

  // 2. implicit GEMM over blocks of output pixels; each task gathers its own activation tile.
  const std::vector<Run> runs = gather_runs(pw);
  const int64_t kp = pw.view.kp, nseg = pw.groups, npanels = pw.view.npanels;
  const int64_t pix = ho * wo;
  const int64_t mb = rows_per_block(pw, 128, 8);
  const int64_t blocks_per_sample = div_up(pix, mb);
  const int64_t nblocks = bsz * blocks_per_sample;
  const int64_t chunks = panel_chunks(nblocks, npanels);
  const int64_t per_chunk = div_up(npanels, chunks);
  const int64_t elt = w8 ? 2 : 1;
  int64_t max_x = 0;
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t v = max_abs_x(qmax, zx[b]);
    max_x = v > max_x ? v : max_x;
  }
  const IntPanelFn fn = pick_int_kernel(pw, int32_safe(pw, max_x));
  at::Tensor y = at::empty({bsz, o, ho, wo}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int64_t tile_bytes = mb * kp * elt;
  const int64_t c_off = (tile_bytes + 63) / 64 * 64;
  const int64_t sxs_off = c_off + mb * kNR * 4;
  Scratch scratch(sxs_off + mb * (nseg + 1) * 4 + 64, true);  // zeroed: padding positions stay 0
  const int64_t* seg_off = pw.seg_off;

  run_tasks(nblocks * chunks, static_cast<double>(bsz) * pix * o * k, [&](int64_t t) {
    const int64_t blk = t / chunks, ci = t % chunks;
    const int64_t b = blk / blocks_per_sample, q0 = (blk % blocks_per_sample) * mb;
    const int64_t rows = (q0 + mb > pix ? pix : q0 + mb) - q0;
    uint8_t* base = scratch.get();
    float* cbuf = reinterpret_cast<float*>(base + c_off);
    int32_t* sxs = reinterpret_cast<int32_t*>(base + sxs_off);
    int32_t* zrows = sxs + mb * nseg;
    const int32_t z = zx[b];
    const uint8_t* qs = qp + b * h * wd * c;
    const uint32_t* ps = pixel_sums ? psum.data() + b * plane : nullptr;
    const uint32_t pad_sum = static_cast<uint32_t>(z) * static_cast<uint32_t>(c);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t oh = (q0 + r) / wo, ow = (q0 + r) % wo;
      const int64_t ih0 = oh * sh - ph, iw0 = ow * sw - pwd;
      gather_row(runs.data(), static_cast<int64_t>(runs.size()), qs, ih0, iw0, h, wd, c, dh, dw, z, w8, base, r * kp);
      if (ps) {
        uint32_t sum = 0;
        for (int64_t ti = 0; ti < kh; ++ti) {
          const int64_t ih = ih0 + ti * dh;
          for (int64_t tj = 0; tj < kw; ++tj) {
            const int64_t iw = iw0 + tj * dw;
            sum += (ih >= 0 && ih < h && iw >= 0 && iw < wd) ? ps[ih * wd + iw] : pad_sum;
          }
        }
        sxs[r] = static_cast<int32_t>(sum);
      } else {
        segment_sums(base, w8, r * kp, seg_off, nseg, sxs + r * nseg);
      }
      zrows[r] = z;
    }
    ActRows ar;
    ar.a = base;
    ar.lda = kp;
    ar.sx = sxs;
    ar.zx = zrows;
    const int64_t p0 = ci * per_chunk, p1 = p0 + per_chunk > npanels ? npanels : p0 + per_chunk;
    const float s = sx[b];
    const OutRows tile_only;  // y = null: the kernel leaves the tile in cbuf; stored transposed below
    for (int64_t panel = p0; panel < p1; ++panel) {
      fn(pw.view, panel, ar, rows, tile_only, cbuf);
      const int64_t n0 = panel * kNR, nc = o - n0 < kNR ? o - n0 : kNR;
      kt.store_cols(cbuf, rows, static_cast<int>(nc), s, bp ? bp + n0 : nullptr, yp + (b * o + n0) * pix + q0, pix);
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor gemm_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& w_scale,
                    const std::optional<at::Tensor>& w_zero_point, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zero_point,
                    int64_t w_bits, int64_t group_size, int64_t act_bits) {
  (void)group_size;  // like the reference, the groups come from w_scale.shape[1]
  TORCH_CHECK(x.dim() >= 1, "quantkit: gemm expects x [..., K]");
  TORCH_CHECK(x.device().is_cpu(), "quantkit: CPU kernel called with x on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "quantkit: x must be floating point, got ", x.scalar_type());
  const int64_t k = x.size(-1);
  check_weight(qdata, w_bits, k);
  const int64_t n = qdata.size(0);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  const at::Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);

  if (act_bits >= 16) {
    if (w_bits == 4 && m <= w4a16_fused_max_rows() && m > 0) {
      auto packed = get_packed(qdata, w_scale, w_zero_point, w_bits, 4, k, KOrder::kLinear, 0, 1, 1);
      const at::Tensor b = bias_f32(bias, n);
      at::Tensor y = gemm_w4a16_fused(x2.to(at::kFloat).contiguous(), *packed,
                                      b.defined() ? b.data_ptr<float>() : nullptr);
      return y.to(x.scalar_type()).view(out_shape);
    }
    check_weight(qdata, w_bits, k);
    const at::Tensor w = x.scalar_type() == at::kFloat
                             ? dequantize_scratch(qdata, w_scale, w_zero_point, w_bits, k)
                             : dequantize_cpu(qdata, w_scale, w_zero_point, w_bits, k, x.scalar_type());
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(x.scalar_type());
    return at::linear(x2, w, b).reshape(out_shape);
  }
  check_act_bits(act_bits);
  const ActParams ap = static_params(in_scale, in_zero_point);
  const int layout_bits = cpu_layout(w_bits, act_bits, true);
  auto packed = get_packed(qdata, w_scale, w_zero_point, w_bits, layout_bits, k, KOrder::kLinear, 0, 1, 1);
  const at::Tensor b = bias_f32(bias, n);
  at::Tensor y = gemm_int(x2.to(at::kFloat).contiguous(), *packed, b.defined() ? b.data_ptr<float>() : nullptr,
                          act_bits, ap);
  return y.to(x.scalar_type()).view(out_shape);
}

// ---- building blocks ---------------------------------------------------------------------------------------------

namespace {

// Dequantize into out (fp32 [n, k]), exactly as the reference: float(code - zp) * float(scale).
void dequantize_into(const at::Tensor& qdata, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero_point,
                     int64_t w_bits, int64_t k, float* out) {
  const int64_t n = qdata.size(0);
  if (is_blob(qdata)) {
    auto pw = from_blob(qdata);
    TORCH_CHECK(pw->k == k && pw->w_bits == w_bits, "quantkit: the CPU-kernel-layout weight holds ", pw->k, " ",
                pw->w_bits, "-bit inputs, the call expects ", k, " ", w_bits, "-bit");
    if (pw->layout_bits == 4) {  // chunks of panels through the vectorized K-major kernel, then transposed
      const KernelTable& kt = kernels();
      const int64_t npanels = pw->view.npanels, ppc = 8, ldo = ppc * kNR;
      at::parallel_for(0, div_up(npanels, ppc), 1, [&](int64_t c0, int64_t c1) {
        std::vector<float> tmp(static_cast<size_t>(k * ldo));
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t p0 = c * ppc, p1 = p0 + ppc > npanels ? npanels : p0 + ppc;
          kt.dequant_panels_w4(pw->view, pw->kmap, p0, p1, tmp.data(), ldo);
          const int64_t row0 = p0 * kNR, row1 = p1 * kNR < n ? p1 * kNR : n;
          for (int64_t kk = 0; kk < k; ++kk) {  // contiguous reads of each K-row, one write stream per output row
            const float* src = tmp.data() + kk * ldo;
            for (int64_t row = row0; row < row1; ++row) out[row * k + kk] = src[row - row0];
          }
        }
      });
      return;
    }
    at::parallel_for(0, n, div_up(1 << 14, k), [&](int64_t r0, int64_t r1) {
      dequantize_packed_rows(*pw, r0, r1, out + r0 * k);
    });
    return;
  }
  const at::Tensor sc = scale_f32(w_scale, n);
  const at::Tensor zp = zero_point_i32(w_zero_point, sc, w_bits);
  const int64_t groups = sc.size(1);
  TORCH_CHECK(groups >= 1 && k % groups == 0, "quantkit: ", groups, " weight groups do not divide in_features ", k);
  const int64_t gl = k / groups;
  const at::Tensor q = qdata.contiguous();
  const int32_t* qp = q.data_ptr<int32_t>();
  const float* sp = sc.data_ptr<float>();
  const int32_t* zpp = zp.data_ptr<int32_t>();
  const int64_t words = q.size(1);
  const int bits = static_cast<int>(w_bits);
  const KernelTable& kt = kernels();
  (void)gl;
  at::parallel_for(0, n, div_up(1 << 14, k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      kt.dequant_row(qp + r * words, bits, k, groups, sp + r * groups, zpp + r * groups, out + r * k);
  });
}

}  // namespace

at::Tensor dequantize_cpu(const at::Tensor& qdata, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& w_zero_point, int64_t w_bits, int64_t in_features,
                          at::ScalarType dtype) {
  check_weight(qdata, w_bits, in_features);
  at::Tensor w = at::empty({qdata.size(0), in_features}, qdata.options().dtype(at::kFloat));
  dequantize_into(qdata, w_scale, w_zero_point, w_bits, in_features, w.data_ptr<float>());
  return dtype == at::kFloat ? w : w.to(dtype);
}

namespace {

// Weight-only layers dequantize on every call; reusing one buffer per calling thread avoids paging in a fresh
// allocation each time (the buffer holds no state between calls).
at::Tensor dequantize_scratch(const at::Tensor& qdata, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& w_zero_point, int64_t w_bits, int64_t k) {
  thread_local at::Tensor buffer;
  const int64_t numel = qdata.size(0) * k;
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::empty({numel}, qdata.options().dtype(at::kFloat));
  at::Tensor w = buffer.narrow(0, 0, numel).view({qdata.size(0), k});
  dequantize_into(qdata, w_scale, w_zero_point, w_bits, k, w.data_ptr<float>());
  return w;
}

}  // namespace

at::Tensor dequantize_w4_panels_cpu(const at::Tensor& qdata, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& w_zero_point, int64_t in_features,
                                    int64_t panels_per_chunk) {
  check_weight(qdata, 4, in_features);
  TORCH_CHECK(panels_per_chunk >= 1, "quantkit: panels_per_chunk must be >= 1");
  auto packed = get_packed(qdata, w_scale, w_zero_point, 4, 4, in_features, KOrder::kLinear, 0, 1, 1);
  const PackedWeight& pw = *packed;
  const int64_t k = in_features, n = pw.view.n, npanels = pw.view.npanels, ldo = panels_per_chunk * kNR;
  const int32_t* kmap = pw.kmap;
  at::Tensor out = at::empty({k, npanels * kNR}, qdata.options().dtype(at::kFloat));
  at::Tensor chunk = at::empty({k, ldo}, qdata.options().dtype(at::kFloat));
  for (int64_t p0 = 0; p0 < npanels; p0 += panels_per_chunk) {
    const int64_t p1 = p0 + panels_per_chunk > npanels ? npanels : p0 + panels_per_chunk;
    chunk.fill_(std::nanf(""));  // positions the kernel must write stay visible otherwise
    kernels().dequant_panels_w4(pw.view, kmap, p0, p1, chunk.data_ptr<float>(), ldo);
    out.narrow(1, p0 * kNR, (p1 - p0) * kNR).copy_(chunk.narrow(1, 0, (p1 - p0) * kNR));
  }
  return out.narrow(1, 0, n).t().contiguous();
}

at::Tensor quantize_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                            int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "quantkit: activation bits must be 1..8 (uint8 codes), got ", bits);
  const float qmax = static_cast<float>((1 << bits) - 1);
  if (scale.numel() != 1 || zero_point.numel() != 1 || scale.dim() > x.dim() || zero_point.dim() > x.dim()) {
    // Broadcasting scales (per row, per sample): the reference expression, evaluated by ATen.
    at::Tensor q = at::round(x.to(at::kFloat) / scale.to(at::kFloat)) + zero_point.to(at::kFloat);
    return q.clamp(0, qmax).to(at::kByte);
  }
  const float s = scale.to(at::kFloat).item<float>();
  const float z = zero_point.to(at::kFloat).item<float>();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const float* xp = xf.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const KernelTable& kt = kernels();
  at::parallel_for(0, xf.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
    kt.quantize_u8(xp + i0, i1 - i0, s, z, qmax, op + i0);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_dynamic_cpu(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "quantkit: activation bits must be 1..8 (uint8 codes), got ", bits);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "quantkit: quantize_act_dynamic expects x [..., K] with K > 0");
  const int64_t k = x.size(-1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t m = xf.numel() / k;
  std::vector<int64_t> qshape = x.sizes().vec();
  qshape.back() = 1;
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(qshape, x.options().dtype(at::kFloat));
  at::Tensor zp = at::empty(qshape, x.options().dtype(at::kInt));
  const float* xp = xf.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* zpp = zp.data_ptr<int32_t>();
  const KernelTable& kt = kernels();
  const float qmax = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, m, div_up(1 << 15, k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float lo, hi;
      kt.minmax(xp + r * k, k, &lo, &hi);
      dynamic_qparams(lo, hi, bits, &sp[r], &zpp[r]);
      kt.quantize_u8(xp + r * k, k, sp[r], static_cast<float>(zpp[r]), qmax, cp + r * k);
    }
  });
  return {codes, scale, zp};
}

at::Tensor unpack_cpu(const at::Tensor& qdata_in, int64_t bits, int64_t in_features) {
  TORCH_CHECK(format::valid_weight_bits(static_cast<int>(bits)), "quantkit: bits must be one of 2, 3, 4, 8, got ",
              bits);
  const at::Tensor qdata = is_blob(qdata_in) ? blob_to_canonical(qdata_in) : qdata_in;
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kInt, "quantkit: unpack expects int32 [out, words], got ",
              qdata.scalar_type(), " ", qdata.sizes());
  TORCH_CHECK(in_features >= 0 && qdata.size(1) * format::values_per_word(static_cast<int>(bits)) >= in_features,
              "quantkit: ", qdata.size(1), " words of ", bits, "-bit codes cannot hold ", in_features, " values");
  const at::Tensor q = qdata.contiguous();
  const int64_t n = q.size(0), words = q.size(1);
  at::Tensor out = at::empty({n, in_features}, q.options().dtype(at::kByte));
  const int32_t* qp = q.data_ptr<int32_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int b = static_cast<int>(bits);
  at::parallel_for(0, n, div_up(1 << 15, in_features + 1), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t kk = 0; kk < in_features; ++kk) op[r * in_features + kk] = format::unpack_code(qp + r * words, kk, b);
  });
  return out;
}

}  // namespace cpu
}  // namespace quantkit
