// CPU kernels of the JLCM codebook ops (schemas and the reference gather: src/quantkit/ops/library.py and
// ops/reference.py; the stored layout: src/quantkit/formats/spec.py, CodebookFormat).
//
// Few input rows (M <= kGemvMaxRows, GEMV): each stored weight row is decoded in registers and multiplied in the
// same pass: one int32 word of indices is broadcast, shifted per lane (vpsrlvd) and masked to 8 indices, which
// select fp32 codewords with vpermps (8-entry codebooks; 16 entries: two vpermps and a blend on index bit 3),
// then FMA with the activations. Nothing but the packed indices is read from the weight, so the GEMV is compute
// bound instead of bandwidth bound like fp32 F.linear. One input row (dot4_m1_avx2): four stored rows per pass and
// a lookup per bit width that keeps cross-lane permutes (the bottleneck on Zen) to at most one per 8 weights.
// Many rows, and convolutions: the weight is decoded to fp32 (in original row order, bit-identical to the
// reference gather) and a dense at::linear / at::conv2d runs on it.
//
// The AVX2 functions carry a target attribute, have internal linkage and touch only raw pointers and intrinsics,
// so no inline torch/STL code is compiled for AVX2; they run only when the CPU has AVX2+FMA and the ISA in use
// (quantkit::cpu::isa(), QUANTKIT_CPU_ISA) is "avx2". The scalar path is the portable fallback.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define QK_CB_AVX2 1
#include <immintrin.h>
#endif

namespace quantkit {
namespace cpu {
namespace {

constexpr int64_t kGemvMaxRows = 8;

int values_per_word(int64_t bits) { return bits == 3 ? 10 : static_cast<int>(32 / bits); }

int group_id_bits(int64_t groups) {
  for (int b : {2, 3, 4, 8}) {
    if (groups <= (int64_t{1} << b)) return b;
  }
  TORCH_CHECK(false, "quantkit codebook: at most 256 row groups are supported, got ", groups);
  return 8;
}

// Everything derived from the small tensors: the fp32 codeword table per group, the stored-row order.
struct CodebookView {
  int64_t out = 0, k = 0, groups = 0, csize = 0, bits = 0, words = 0;
  std::vector<float> table;         // [groups, 16] (padded), fp32 codewords
  std::vector<int64_t> perm;        // stored row i -> original row
  std::vector<int32_t> stored_grp;  // stored row i -> group
  const int32_t* codes = nullptr;
};

CodebookView make_view(const at::Tensor& codes, const at::Tensor& codebook, const std::optional<at::Tensor>& w_scale,
                       const at::Tensor& row_group, int64_t bits, int64_t in_features) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quantkit codebook: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.dim() == 2 && codes.is_contiguous(),
              "quantkit codebook: codes must be a contiguous int32 [O, words] tensor");
  // Stored as float16; a loader may hand them over widened to float32 (diffusers casts floating parameters to the
  // load dtype), which is exact, so any floating dtype is accepted and read as fp32.
  TORCH_CHECK(at::isFloatingType(codebook.scalar_type()) && codebook.dim() == 2,
              "quantkit codebook: codebook must be a floating [G or 1, 2**bits] tensor (float16 on disk)");
  TORCH_CHECK(codebook.size(1) == (int64_t{1} << bits), "quantkit codebook: codebook has ", codebook.size(1),
              " entries per row, ", bits, "-bit indices need ", (int64_t{1} << bits));
  TORCH_CHECK(row_group.scalar_type() == at::kInt && row_group.dim() == 2,
              "quantkit codebook: row_group must be int32 [1, words]");
  CodebookView v;
  v.out = codes.size(0);
  v.k = in_features;
  v.bits = bits;
  v.csize = int64_t{1} << bits;
  v.words = codes.size(1);
  TORCH_CHECK(v.words * values_per_word(bits) >= in_features, "quantkit codebook: ", v.words, " words of ", bits,
              "-bit indices cannot hold ", in_features, " values");
  v.codes = codes.data_ptr<int32_t>();
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const float* cbp = cb.data_ptr<float>();
  if (w_scale.has_value()) {
    TORCH_CHECK(at::isFloatingType(w_scale->scalar_type()) && w_scale->dim() == 1,
                "quantkit codebook: w_scale must be a floating [G] tensor (float16 on disk)");
    TORCH_CHECK(codebook.size(0) == 1, "quantkit codebook: a shared codebook has one row");
    v.groups = w_scale->size(0);
  } else {
    v.groups = codebook.size(0);
  }
  v.table.assign(v.groups * 16, 0.0f);
  if (w_scale.has_value()) {
    const at::Tensor sc = w_scale->to(at::kFloat).contiguous();
    const float* scp = sc.data_ptr<float>();
    for (int64_t g = 0; g < v.groups; ++g)
      for (int64_t c = 0; c < v.csize; ++c) v.table[g * 16 + c] = scp[g] * cbp[c];  // one fp32 rounding
  } else {
    for (int64_t g = 0; g < v.groups; ++g)
      for (int64_t c = 0; c < v.csize; ++c) v.table[g * 16 + c] = cbp[g * v.csize + c];
  }
  // Group of each original row (packed like the codes, gbits wide), then the stable counting sort.
  const int gb = group_id_bits(v.groups);
  const int gvpw = values_per_word(gb);
  TORCH_CHECK(row_group.size(1) * gvpw >= v.out, "quantkit codebook: row_group is too short for ", v.out, " rows");
  const at::Tensor rgc = row_group.contiguous();
  const int32_t* rgp = rgc.data_ptr<int32_t>();
  std::vector<int32_t> grp(v.out);
  std::vector<int64_t> count(v.groups + 1, 0);
  for (int64_t r = 0; r < v.out; ++r) {
    const uint32_t word = static_cast<uint32_t>(rgp[r / gvpw]);
    const int32_t g = static_cast<int32_t>((word >> ((r % gvpw) * gb)) & ((1u << gb) - 1));
    TORCH_CHECK(g < v.groups, "quantkit codebook: row ", r, " has group ", g, " of ", v.groups);
    grp[r] = g;
    count[g + 1]++;
  }
  for (int64_t g = 0; g < v.groups; ++g) count[g + 1] += count[g];
  v.perm.resize(v.out);
  v.stored_grp.resize(v.out);
  for (int64_t r = 0; r < v.out; ++r) {
    const int64_t i = count[grp[r]]++;
    v.perm[i] = r;
    v.stored_grp[i] = grp[r];
  }
  return v;
}

// ---- decode one stored row to fp32 -------------------------------------------------------------------------
void decode_row_scalar(const CodebookView& v, int64_t i, float* dst) {
  const int32_t* w = v.codes + i * v.words;
  const float* t = v.table.data() + v.stored_grp[i] * 16;
  const int vpw = values_per_word(v.bits);
  const uint32_t mask = (1u << v.bits) - 1;
  for (int64_t k = 0; k < v.k; ++k) {
    const uint32_t word = static_cast<uint32_t>(w[k / vpw]);
    dst[k] = t[(word >> ((k % vpw) * v.bits)) & mask];
  }
}

float dot_row_scalar(const CodebookView& v, int64_t i, const float* x) {
  const int32_t* w = v.codes + i * v.words;
  const float* t = v.table.data() + v.stored_grp[i] * 16;
  const int vpw = values_per_word(v.bits);
  const uint32_t mask = (1u << v.bits) - 1;
  float acc = 0.0f;
  for (int64_t k = 0; k < v.k; ++k) {
    const uint32_t word = static_cast<uint32_t>(w[k / vpw]);
    acc += x[k] * t[(word >> ((k % vpw) * v.bits)) & mask];
  }
  return acc;
}

#ifdef QK_CB_AVX2
// 8 codewords for 8 indices (0..15) held in the low bits of idx.
__attribute__((target("avx2,fma"))) inline __m256 lookup(__m256i idx, __m256 lo, __m256 hi, bool sixteen) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  if (!sixteen) return a;
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign bit
}

// Sum of the 8 lanes.
__attribute__((target("avx2,fma"))) inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Decode 8 (4-bit: one word; 2-bit: half a word; 3-bit: the first 8 of a word's 10) indices into codewords.
// y[m] = dot(x[m], row i) for m < R; x rows have stride ldx. Templated on R so the accumulators stay in registers;
// two accumulators per row break the FMA dependency chain.
template <int R>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const int32_t* w, const float* t, int64_t bits, int64_t k,
                                                       const float* x, int64_t ldx, float* out) {
  const __m256 lo = _mm256_loadu_ps(t);
  const __m256 hi = _mm256_loadu_ps(t + 8);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  __m256 acc0[R], acc1[R];
  float tail[R];
  for (int m = 0; m < R; ++m) {
    acc0[m] = _mm256_setzero_ps();
    acc1[m] = _mm256_setzero_ps();
    tail[m] = 0.0f;
  }
  int64_t kk = 0;
  if (bits == 4) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; kk + 16 <= k; kk += 16) {
      const __m256 c0 = lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[kk / 8]), sh), mask), lo, hi,
                               true);
      const __m256 c1 = lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[kk / 8 + 1]), sh), mask), lo,
                               hi, true);
      for (int m = 0; m < R; ++m) {
        acc0[m] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(x + m * ldx + kk), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(x + m * ldx + kk + 8), acc1[m]);
      }
    }
  } else if (bits == 2) {
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    for (; kk + 16 <= k; kk += 16) {
      const __m256i word = _mm256_set1_epi32(w[kk / 16]);
      const __m256 c0 = lookup(_mm256_and_si256(_mm256_srlv_epi32(word, sh0), mask), lo, hi, false);
      const __m256 c1 = lookup(_mm256_and_si256(_mm256_srlv_epi32(word, sh1), mask), lo, hi, false);
      for (int m = 0; m < R; ++m) {
        acc0[m] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(x + m * ldx + kk), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(x + m * ldx + kk + 8), acc1[m]);
      }
    }
  } else {  // 3-bit: 10 indices per word; 8 in registers, the last 2 scalar
    const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    for (; kk + 20 <= k; kk += 20) {
      const int32_t w0 = w[kk / 10], w1 = w[kk / 10 + 1];
      const __m256 c0 = lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w0), sh), mask), lo, hi, false);
      const __m256 c1 = lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w1), sh), mask), lo, hi, false);
      const float a8 = t[(static_cast<uint32_t>(w0) >> 24) & 7u], a9 = t[(static_cast<uint32_t>(w0) >> 27) & 7u];
      const float b8 = t[(static_cast<uint32_t>(w1) >> 24) & 7u], b9 = t[(static_cast<uint32_t>(w1) >> 27) & 7u];
      for (int m = 0; m < R; ++m) {
        const float* xm = x + m * ldx + kk;
        acc0[m] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xm), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xm + 10), acc1[m]);
        tail[m] += a8 * xm[8] + a9 * xm[9] + b8 * xm[18] + b9 * xm[19];
      }
    }
  }
  const int vpw = bits == 3 ? 10 : static_cast<int>(32 / bits);
  const uint32_t smask = (1u << bits) - 1;
  for (int m = 0; m < R; ++m) {
    float r = hsum(_mm256_add_ps(acc0[m], acc1[m])) + tail[m];
    for (int64_t q = kk; q < k; ++q) {
      const uint32_t word = static_cast<uint32_t>(w[q / vpw]);
      r += x[m * ldx + q] * t[(word >> ((q % vpw) * bits)) & smask];
    }
    out[m] = r;
  }
}

__attribute__((target("avx2,fma"))) void dot_rows_avx2_n(const int32_t* w, const float* t, int64_t bits, int64_t k,
                                                         const float* x, int64_t ldx, int64_t rows, float* out) {
  switch (rows) {
    case 1: return dot_rows_avx2<1>(w, t, bits, k, x, ldx, out);
    case 2: return dot_rows_avx2<2>(w, t, bits, k, x, ldx, out);
    case 3: return dot_rows_avx2<3>(w, t, bits, k, x, ldx, out);
    case 4: return dot_rows_avx2<4>(w, t, bits, k, x, ldx, out);
    default:
      for (int64_t m = 0; m < rows; m += 4) {
        const int64_t n = rows - m < 4 ? rows - m : 4;
        dot_rows_avx2_n(w, t, bits, k, x + m * ldx, ldx, n, out + m);
      }
  }
}

// One input row (M = 1) against four stored rows at once: the activation chunk is loaded once for the four, and
// the four independent accumulator chains hide the FMA latency (a single row's chain bounds dot_rows_avx2<1>).
// w[r] / t[r]: the stored rows' indices and codeword tables. Same decode as dot_rows_avx2.
//
// 2- and 4-bit indices, blocks of 32: the byte-plane lookup. Each fp32 codeword table is split into four 16-byte
// planes (byte p of every codeword); 32 indices held as bytes select 32 bytes of each plane with one vpshufb, and
// eight unpacks reassemble the 32 floats. The floats come out in a fixed permuted k order, so the activations are
// read from `xperm`, the same permutation of x made once per call (block_perm). vpshufb and unpacks are cheap on
// Zen and Intel alike; the cross-lane vpermps of the plain lookup bounds that loop at about 2 weights per cycle.
// planes[r]: 64 bytes, plane p at 16 * p.
__attribute__((target("avx2,fma"))) void dot4_m1_avx2(const int32_t* const* w, const float* const* t, int64_t bits,
                                                      int64_t k, const float* x, const float* xperm,
                                                      const uint8_t* const* planes, float* out) {
  __m256 lo[4], hi[4], acc[4];
  float tail[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < 4; ++r) {
    lo[r] = _mm256_loadu_ps(t[r]);
    hi[r] = _mm256_loadu_ps(t[r] + 8);
    acc[r] = _mm256_setzero_ps();
  }
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  int64_t kk = 0;
  if (xperm != nullptr && (bits == 4 || bits == 2)) {
    const __m256i nib = _mm256_set1_epi8(bits == 4 ? 0x0F : 0x03);
    const __m256i sh = bits == 4 ? _mm256_setr_epi64x(0, 0, 4, 4) : _mm256_setr_epi64x(0, 2, 4, 6);
    for (; kk + 32 <= k; kk += 32) {
      const __m256 x0 = _mm256_loadu_ps(xperm + kk), x1 = _mm256_loadu_ps(xperm + kk + 8);
      const __m256 x2 = _mm256_loadu_ps(xperm + kk + 16), x3 = _mm256_loadu_ps(xperm + kk + 24);
      for (int r = 0; r < 4; ++r) {
        // 32 indices as bytes: 4-bit, the block's 16 bytes in both halves, the upper half shifted by 4 (low nibbles
        // | high nibbles); 2-bit, its 8 bytes in all four quarters shifted by 0, 2, 4, 6.
        const __m256i raw = bits == 4 ? _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                            reinterpret_cast<const __m128i*>(w[r] + kk / 8)))
                                      : _mm256_set1_epi64x(*reinterpret_cast<const int64_t*>(w[r] + kk / 16));
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi64(raw, sh), nib);
        const uint8_t* pl = planes[r];
        const __m256i p0 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                                   reinterpret_cast<const __m128i*>(pl))), idx);
        const __m256i p1 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                                   reinterpret_cast<const __m128i*>(pl + 16))), idx);
        const __m256i p2 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                                   reinterpret_cast<const __m128i*>(pl + 32))), idx);
        const __m256i p3 = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                                                   reinterpret_cast<const __m128i*>(pl + 48))), idx);
        const __m256i a = _mm256_unpacklo_epi8(p0, p1), b = _mm256_unpackhi_epi8(p0, p1);
        const __m256i c = _mm256_unpacklo_epi8(p2, p3), d = _mm256_unpackhi_epi8(p2, p3);
        acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(a, c)), x0, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(a, c)), x1, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(b, d)), x2, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(b, d)), x3, acc[r]);
      }
    }
  }
  if (bits == 4) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; kk + 8 <= k; kk += 8) {
      const __m256 xv = _mm256_loadu_ps(x + kk);
      for (int r = 0; r < 4; ++r) {
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[r][kk / 8]), sh), mask);
        acc[r] = _mm256_fmadd_ps(lookup(idx, lo[r], hi[r], true), xv, acc[r]);
      }
    }
  } else if (bits == 2) {
    // Four codewords: an in-lane vpermilps on the table duplicated in both halves (cross-lane vpermps is the
    // bottleneck of this loop on Zen).
    __m256 t4[4];
    for (int r = 0; r < 4; ++r) t4[r] = _mm256_permute2f128_ps(lo[r], lo[r], 0x00);
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    for (; kk + 16 <= k; kk += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + kk), x1 = _mm256_loadu_ps(x + kk + 8);
      for (int r = 0; r < 4; ++r) {
        const __m256i word = _mm256_set1_epi32(w[r][kk / 16]);
        acc[r] = _mm256_fmadd_ps(_mm256_permutevar_ps(t4[r], _mm256_and_si256(_mm256_srlv_epi32(word, sh0), mask)),
                                 x0, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_permutevar_ps(t4[r], _mm256_and_si256(_mm256_srlv_epi32(word, sh1), mask)),
                                 x1, acc[r]);
      }
    }
  } else {  // 3-bit: 10 indices per word
    // Blocks of 40 indices (four words) as five vectors of 8: lane j of vector v holds index i = 8v + j, taken from
    // word i / 10 (vpermilps, in-lane) at bit 3 * (i % 10) (vpsrlvd); no scalar tail inside a block.
    alignas(32) static constexpr int32_t kPerm[5][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 1, 1, 1, 1, 1, 1},
                                                        {1, 1, 1, 1, 2, 2, 2, 2}, {2, 2, 2, 2, 2, 2, 3, 3},
                                                        {3, 3, 3, 3, 3, 3, 3, 3}};
    alignas(32) static constexpr int32_t kShift[5][8] = {{0, 3, 6, 9, 12, 15, 18, 21}, {24, 27, 0, 3, 6, 9, 12, 15},
                                                         {18, 21, 24, 27, 0, 3, 6, 9}, {12, 15, 18, 21, 24, 27, 0, 3},
                                                         {6, 9, 12, 15, 18, 21, 24, 27}};
    for (; kk + 40 <= k; kk += 40) {
      __m256i words[4];
      for (int r = 0; r < 4; ++r)
        words[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + kk / 10)));
      for (int vv = 0; vv < 5; ++vv) {
        const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm[vv]));
        const __m256i shv = _mm256_load_si256(reinterpret_cast<const __m256i*>(kShift[vv]));
        const __m256 xv = _mm256_loadu_ps(x + kk + 8 * vv);
        for (int r = 0; r < 4; ++r) {
          // words[r] holds the four words in both halves: an in-lane vpermilps selects each lane's word.
          const __m256i wd = _mm256_castps_si256(_mm256_permutevar_ps(_mm256_castsi256_ps(words[r]), perm));
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(wd, shv), mask);
          acc[r] = _mm256_fmadd_ps(lookup(idx, lo[r], hi[r], false), xv, acc[r]);
        }
      }
    }
    const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    for (; kk + 10 <= k; kk += 10) {
      const __m256 xv = _mm256_loadu_ps(x + kk);
      for (int r = 0; r < 4; ++r) {
        const int32_t wd = w[r][kk / 10];
        acc[r] = _mm256_fmadd_ps(lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(wd), sh), mask), lo[r],
                                        hi[r], false),
                                 xv, acc[r]);
        tail[r] += t[r][(static_cast<uint32_t>(wd) >> 24) & 7u] * x[kk + 8] +
                   t[r][(static_cast<uint32_t>(wd) >> 27) & 7u] * x[kk + 9];
      }
    }
  }
  const int vpw = bits == 3 ? 10 : static_cast<int>(32 / bits);
  const uint32_t smask = (1u << bits) - 1;
  for (int r = 0; r < 4; ++r) {
    float v = hsum(acc[r]) + tail[r];
    for (int64_t q = kk; q < k; ++q) {
      v += x[q] * t[r][(static_cast<uint32_t>(w[r][q / vpw]) >> ((q % vpw) * bits)) & smask];
    }
    out[r] = v;
  }
}

// One stored row decoded to fp32 codewords (exact table values, as the scalar decode).
__attribute__((target("avx2,fma"))) void decode_row_avx2(const int32_t* w, const float* t, int64_t bits, int64_t k,
                                                         float* dst) {
  const __m256 lo = _mm256_loadu_ps(t);
  const __m256 hi = _mm256_loadu_ps(t + 8);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  int64_t kk = 0;
  if (bits == 4) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; kk + 8 <= k; kk += 8)
      _mm256_storeu_ps(dst + kk, lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[kk / 8]), sh), mask),
                                        lo, hi, true));
  } else if (bits == 2) {
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    for (; kk + 16 <= k; kk += 16) {
      const __m256i word = _mm256_set1_epi32(w[kk / 16]);
      _mm256_storeu_ps(dst + kk, lookup(_mm256_and_si256(_mm256_srlv_epi32(word, sh0), mask), lo, hi, false));
      _mm256_storeu_ps(dst + kk + 8, lookup(_mm256_and_si256(_mm256_srlv_epi32(word, sh1), mask), lo, hi, false));
    }
  } else {
    const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    for (; kk + 10 <= k; kk += 10) {
      const int32_t wd = w[kk / 10];
      _mm256_storeu_ps(dst + kk, lookup(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(wd), sh), mask), lo, hi,
                                        false));
      dst[kk + 8] = t[(static_cast<uint32_t>(wd) >> 24) & 7u];
      dst[kk + 9] = t[(static_cast<uint32_t>(wd) >> 27) & 7u];
    }
  }
  const int vpw = bits == 3 ? 10 : static_cast<int>(32 / bits);
  const uint32_t smask = (1u << bits) - 1;
  for (; kk < k; ++kk) dst[kk] = t[(static_cast<uint32_t>(w[kk / vpw]) >> ((kk % vpw) * bits)) & smask];
}
#endif

// Byte-plane decode order (dot4_m1_avx2): float j (0..31) of a 32-index block comes from index k = block_perm(j).
// Float j is element e = j % 8 of output vector q = j / 8: lane L = e / 4, byte position p = 4q + e % 4 of that lane.
// 4-bit: lane 0 holds the low nibbles (k = 2p), lane 1 the high ones (k = 2p + 1). 2-bit: 64-bit quarter
// Q = 2L + p / 8 holds field Q of byte p % 8 (k = 4 (p % 8) + Q).
int block_perm(int64_t bits, int j) {
  const int q = j / 8, e = j % 8, lane = e / 4, p = 4 * q + e % 4;
  return bits == 4 ? 2 * p + lane : 4 * (p % 8) + 2 * lane + p / 8;
}

bool use_avx2() {
#ifdef QK_CB_AVX2
  static const bool can = cpu_has_avx2_fma();
  return can && isa() == "avx2";
#else
  return false;
#endif
}

// fp32 [O, K] weight in original row order (bit-identical to the reference gather: pure table lookups).
at::Tensor decode_weight(const CodebookView& v) {
  at::Tensor w = at::empty({v.out, v.k}, at::kFloat);
  float* wp = w.data_ptr<float>();
  const bool avx = use_avx2();
  at::parallel_for(0, v.out, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
#ifdef QK_CB_AVX2
      if (avx) {
        decode_row_avx2(v.codes + i * v.words, v.table.data() + v.stored_grp[i] * 16, v.bits, v.k,
                        wp + v.perm[i] * v.k);
        continue;
      }
#endif
      decode_row_scalar(v, i, wp + v.perm[i] * v.k);
    }
  });
  return w;
}

at::Tensor gemv(const CodebookView& v, const at::Tensor& x2, const std::optional<at::Tensor>& bias) {
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, v.out}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const float* xp = x2.data_ptr<float>();
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const bool avx = use_avx2();
  // M = 1 with 4-bit indices: x permuted into the byte-plane decode order, and the codeword byte planes.
  std::vector<float> xperm;
  std::vector<uint8_t> planes;
  if (avx && m == 1 && v.bits == 4 && v.k >= 32) {  // 2-bit: the in-lane vpermilps loop is faster
    xperm.resize(v.k / 32 * 32);
    for (int64_t blk = 0; blk < v.k / 32; ++blk)
      for (int j = 0; j < 32; ++j) xperm[blk * 32 + j] = xp[blk * 32 + block_perm(v.bits, j)];
    planes.resize(v.groups * 64);
    for (int64_t g = 0; g < v.groups; ++g)
      for (int c = 0; c < 16; ++c) {
        uint32_t u;
        std::memcpy(&u, &v.table[g * 16 + c], 4);
        for (int p = 0; p < 4; ++p) planes[g * 64 + p * 16 + c] = static_cast<uint8_t>(u >> (8 * p));
      }
  }
  at::parallel_for(0, v.out, 32, [&](int64_t b, int64_t e) {
    float out[kGemvMaxRows];
    int64_t i = b;
#ifdef QK_CB_AVX2
    if (avx && m == 1) {  // four stored rows per pass
      for (; i + 4 <= e; i += 4) {
        const int32_t* w[4];
        const float* t[4];
        const uint8_t* pl[4];
        for (int r = 0; r < 4; ++r) {
          w[r] = v.codes + (i + r) * v.words;
          t[r] = v.table.data() + v.stored_grp[i + r] * 16;
          pl[r] = planes.empty() ? nullptr : planes.data() + v.stored_grp[i + r] * 64;
        }
        dot4_m1_avx2(w, t, v.bits, v.k, xp, xperm.empty() ? nullptr : xperm.data(), pl, out);
        for (int r = 0; r < 4; ++r) yp[v.perm[i + r]] = out[r] + (bp ? bp[v.perm[i + r]] : 0.0f);
      }
    }
#endif
    for (; i < e; ++i) {
      const int64_t r = v.perm[i];
#ifdef QK_CB_AVX2
      if (avx) {
        dot_rows_avx2_n(v.codes + i * v.words, v.table.data() + v.stored_grp[i] * 16, v.bits, v.k, xp, v.k, m, out);
      } else
#endif
      {
        for (int64_t mm = 0; mm < m; ++mm) out[mm] = dot_row_scalar(v, i, xp + mm * v.k);
      }
      for (int64_t mm = 0; mm < m; ++mm) yp[mm * v.out + r] = out[mm] + (bp ? bp[r] : 0.0f);
    }
  });
  return y;
}

}  // namespace

at::Tensor dequantize_codebook_cpu(const at::Tensor& codes, const at::Tensor& codebook,
                                   const std::optional<at::Tensor>& w_scale, const at::Tensor& row_group, int64_t bits,
                                   int64_t in_features) {
  return decode_weight(make_view(codes, codebook, w_scale, row_group, bits, in_features));
}

at::Tensor gemm_codebook_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                             const std::optional<at::Tensor>& w_scale, const at::Tensor& row_group,
                             const std::optional<at::Tensor>& bias, int64_t bits) {
  const int64_t k = x.size(-1);
  const CodebookView v = make_view(codes, codebook, w_scale, row_group, bits, k);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = v.out;
  const at::Tensor x2 = x.reshape({-1, k});
  if (x.scalar_type() == at::kFloat && x2.size(0) <= kGemvMaxRows) {
    return gemv(v, x2.contiguous(), bias).view(out_shape);
  }
  // Many rows (or a non-fp32 input): decode once, then the dense GEMM, exactly as the reference does.
  const at::Tensor w = decode_weight(v).to(x.scalar_type());
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(x.scalar_type());
  return at::linear(x, w, b);
}

at::Tensor conv2d_codebook_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                               const std::optional<at::Tensor>& w_scale, const at::Tensor& row_group,
                               const std::optional<at::Tensor>& bias, int64_t bits, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "quantkit conv2d_codebook: x must be [B, C, H, W]");
  TORCH_CHECK(kernel_size.size() == 2, "quantkit conv2d_codebook: kernel_size must have 2 values");
  const int64_t c = x.size(1);
  const int64_t k = c * kernel_size[0] * kernel_size[1];
  const CodebookView v = make_view(codes, codebook, w_scale, row_group, bits, k);
  const at::Tensor w = decode_weight(v).to(x.scalar_type()).view({v.out, c, kernel_size[0], kernel_size[1]});
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(x.scalar_type());
  return at::conv2d(x, w, b, stride, padding, dilation);
}

}  // namespace cpu
}  // namespace quantkit
