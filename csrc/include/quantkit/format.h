// The canonical packed weight layout, repeated once for C++.
//
// Source of truth: src/quantkit/formats/spec.py (and formats/pack.py for the reference pack/unpack).
// Keep the two in step; tests/ops/test_native_kernels.py checks that the native `quantkit::unpack` equals the
// Python unpack bit for bit.
//
//   weight_packed      int32 [O, ceil(K / values_per_word(bits))]; code j of a word sits in bits
//                      [j*bits, (j+1)*bits), least-significant first along K; 3-bit packs 10 codes per word
//                      (top 2 bits zero); padding codes at the end of a row are zero.
//   weight_scale       float16 [O, G], G = 1 (per output channel, group_size -1) or K / group_size.
//   weight_zero_point  uint8 [O, G] (asymmetric only); symmetric formats use the implicit 2**(bits-1).
//   dequantized        w = (code - zero_point) * scale.
//   activations        unsigned codes q = clamp(round_half_even(x / s) + zp, 0, 2**bits - 1).
//
// Conv weights [O, C, kh, kw] are flattened to [O, K = C*kh*kw] in PyTorch's own (c, kh, kw) order.
#pragma once

#include <cstdint>

namespace quantkit {
namespace format {

constexpr int kFormatVersion = 1;  // spec.FORMAT_VERSION

inline bool valid_weight_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

// spec.values_per_word: 32 // bits (3-bit: 10 codes, top 2 bits unused).
inline int values_per_word(int bits) { return 32 / bits; }

// Implicit zero point of symmetric formats.
inline int symmetric_zero_point(int bits) { return 1 << (bits - 1); }

// Code k of one packed row (pack.unpack for a single element).
inline uint8_t unpack_code(const int32_t* row, int64_t k, int bits) {
  const int vpw = values_per_word(bits);
  const uint32_t word = static_cast<uint32_t>(row[k / vpw]);
  return static_cast<uint8_t>((word >> ((k % vpw) * bits)) & ((1u << bits) - 1u));
}

}  // namespace format
}  // namespace quantkit
