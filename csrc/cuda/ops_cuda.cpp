// Torch glue of the CUDA kernels (kernels.cu): the internal ops `quantkit_cuda::*`, CUDA dispatch key only.
// The public `quantkit::*` ops route to them from src/quantkit/ops/cuda.py, which also decides which layer
// formats take these paths (everything else runs the reference on the GPU).
//
// Integer paths (W8 symmetric and W2/3/4 per-channel weights, activations <= 8 bits): activations are quantized
// to s8 codes (kernels.h), weights are converted from the canonical packed words to centred int8 into a transient
// buffer on every call (no second copy of the weights is kept: the memory footprint stays that of the packed
// format), the int8 x int8 -> int32 product runs on cuBLASLt through at::_int_mm (int8 tensor cores; cuBLASLt is
// the tuned GEMM for every shape and card, which a hand-written kernel here would not match), and a fused epilogue
// restores the exact integer result, applies the scales and bias in fp32 and writes fp16 / bf16 / fp32.
// Convolutions quantize NCHW input into NHWC codes, gather im2col tiles ((ky, kx, c) column order; 1x1 stride-1
// convolutions skip it), and compute the transposed product W . patches^T so the output lands in NCHW order.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "kernels.h"

namespace qk = quantkit::cuda;

namespace {

qk::DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return qk::kF32;
    case at::kHalf:
      return qk::kF16;
    case at::kBFloat16:
      return qk::kBF16;
    default:
      TORCH_CHECK(false, "quantkit CUDA kernels take float32, float16 or bfloat16 activations, got ", t);
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

const __half* half_ptr(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous(), "quantkit: weight_scale must be contiguous fp16");
  return reinterpret_cast<const __half*>(t.data_ptr<at::Half>());
}

const uint8_t* zp_ptr(const std::optional<at::Tensor>& w_zp) {
  if (!w_zp.has_value()) return nullptr;
  TORCH_CHECK(w_zp->scalar_type() == at::kByte && w_zp->is_contiguous(),
              "quantkit: weight_zero_point must be contiguous uint8");
  return w_zp->data_ptr<uint8_t>();
}

// The bias as the epilogue reads it: fp32 or the activation dtype as stored (both convert to fp32 exactly, as the
// reference's bias.to(float32)); any other dtype is converted to fp32 first.
struct Bias {
  at::Tensor t;
  const float* f32() const { return t.defined() && t.scalar_type() == at::kFloat ? t.data_ptr<float>() : nullptr; }
  const void* x() const { return t.defined() && t.scalar_type() != at::kFloat ? t.data_ptr() : nullptr; }
};

Bias epilogue_bias(const std::optional<at::Tensor>& bias, at::ScalarType x_dtype) {
  Bias b;
  if (bias.has_value()) {
    b.t = (bias->scalar_type() == at::kFloat || bias->scalar_type() == x_dtype) ? bias->contiguous()
                                                                                : bias->to(at::kFloat).contiguous();
  }
  return b;
}

int64_t words_per_row(int64_t K, int64_t bits) {
  const int64_t vpw = 32 / bits;
  return (K + vpw - 1) / vpw;
}

void check_weight(const at::Tensor& qdata, int64_t K, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "quantkit: weight bits must be 2, 3, 4 or 8");
  TORCH_CHECK(qdata.scalar_type() == at::kInt && qdata.dim() == 2 && qdata.is_contiguous(),
              "quantkit: weight_packed must be a contiguous int32 [out, words] tensor");
  TORCH_CHECK(qdata.size(1) == words_per_row(K, bits), "quantkit: weight_packed has ", qdata.size(1),
              " words per row, expected ", words_per_row(K, bits), " for K = ", K);
}

// Centred int8 weight [Np, Kp] (row sums in wsum) in a transient buffer.
struct S8Weight {
  at::Tensor w, wsum;
};

S8Weight weight_s8(const at::Tensor& qdata, const std::optional<at::Tensor>& w_zp, int64_t K, int64_t bits,
                   int64_t conv_c, int64_t khw, int64_t Np, int64_t Kp) {
  S8Weight r;
  r.w = at::empty({Np, Kp}, qdata.options().dtype(at::kChar));
  r.wsum = at::empty({Np}, qdata.options().dtype(at::kInt));
  qk::weight_to_s8(qdata.data_ptr<int32_t>(), qdata.size(0), qdata.size(1), K, static_cast<int>(bits), zp_ptr(w_zp),
                   conv_c, khw, r.w.data_ptr<int8_t>(), Np, Kp, r.wsum.data_ptr<int32_t>(), stream());
  return r;
}

// Activation qparams: the static ones as given, or fresh per-row / per-sample ones.
struct ActParams {
  at::Tensor scale, zp;
  bool per_row = false;
};

ActParams static_params(const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zp) {
  TORCH_CHECK(in_zp.has_value(), "quantkit: a static input_scale needs an input_zero_point");
  TORCH_CHECK(in_scale->numel() == 1 && in_zp->numel() == 1, "quantkit CUDA kernels take per-tensor static scales");
  ActParams p;
  p.scale = in_scale->to(at::kFloat).contiguous();
  p.zp = in_zp->to(at::kInt).contiguous();
  return p;
}

// NCHW input -> NHWC int8 codes (q - 128) with static per-tensor or fresh per-sample qparams.
struct NhwcCodes {
  at::Tensor xq;
  ActParams p;
};

NhwcCodes quantize_nhwc(const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                        const std::optional<at::Tensor>& in_zp, int64_t act_bits) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto dt = dtype_code(x.scalar_type());
  NhwcCodes r;
  ActParams& p = r.p;
  if (in_scale.has_value()) {
    p = static_params(in_scale, in_zp);
  } else {  // per-sample dynamic range; min / max are exact in any order
    const auto mm = at::aminmax(x.view({B, -1}), 1);
    const at::Tensor lo = std::get<0>(mm).to(at::kFloat).contiguous();
    const at::Tensor hi = std::get<1>(mm).to(at::kFloat).contiguous();
    p.scale = at::empty({B}, x.options().dtype(at::kFloat));
    p.zp = at::empty({B}, x.options().dtype(at::kInt));
    p.per_row = true;
    qk::qparams_from_range(lo.data_ptr<float>(), hi.data_ptr<float>(), B, static_cast<int>(act_bits),
                           p.scale.data_ptr<float>(), p.zp.data_ptr<int32_t>(), stream());
  }
  r.xq = at::empty({B, H, W, C}, x.options().dtype(at::kChar));
  if (B * C * H * W > 0) {
    qk::quantize_nchw_to_nhwc(dt, x.data_ptr(), B, C, H * W, p.scale.data_ptr<float>(), p.zp.data_ptr<int32_t>(),
                              p.per_row, static_cast<int>(act_bits), r.xq.data_ptr<int8_t>(), stream());
  }
  return r;
}

at::Tensor linear_a8(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& w_zp, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zp,
                     int64_t w_bits, int64_t act_bits) {
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(act_bits >= 1 && act_bits <= 8, "quantkit: integer kernels take 1..8 activation bits");
  const int64_t K = x.size(-1), N = qdata.size(0);
  check_weight(qdata, K, w_bits);
  TORCH_CHECK(w_scale.size(0) == N && w_scale.size(1) == 1, "quantkit: integer CUDA kernels need per-channel scales");
  TORCH_CHECK(w_bits != 8 || !w_zp.has_value(), "quantkit: 8-bit integer kernels need symmetric weights");
  const auto dt = dtype_code(x.scalar_type());
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0) return y;

  // cuBLASLt int8 GEMM constraints (at::_int_mm): rows > 16, K and N multiples of 8.
  const int64_t Kp = round_up(K, 8), Np = round_up(N, 8), Mp = M > 16 ? M : 32;
  at::Tensor codes = at::empty({Mp, Kp}, x.options().dtype(at::kByte));
  if (Mp > M) codes.narrow(0, M, Mp - M).zero_();
  ActParams p;
  if (in_scale.has_value()) {
    p = static_params(in_scale, in_zp);
    qk::quantize_rows_static(dt, x2.data_ptr(), M, K, p.scale.data_ptr<float>(), p.zp.data_ptr<int32_t>(),
                             static_cast<int>(act_bits), codes.data_ptr<uint8_t>(), Kp, 0x80, stream());
  } else {
    p.scale = at::empty({M}, x.options().dtype(at::kFloat));
    p.zp = at::empty({M}, x.options().dtype(at::kInt));
    p.per_row = true;
    qk::quantize_rows_dynamic(dt, x2.data_ptr(), M, K, static_cast<int>(act_bits), codes.data_ptr<uint8_t>(), Kp,
                              0x80, p.scale.data_ptr<float>(), p.zp.data_ptr<int32_t>(), stream());
  }
  const S8Weight w = weight_s8(qdata, w_zp, K, w_bits, 0, 1, Np, Kp);
  const at::Tensor acc = at::_int_mm(codes.view(at::kChar), w.w.t());
  const Bias b = epilogue_bias(bias, x.scalar_type());
  qk::epilogue_rows(dt, acc.data_ptr<int32_t>(), acc.stride(0), M, N, w.wsum.data_ptr<int32_t>(), half_ptr(w_scale),
                    p.scale.data_ptr<float>(), p.zp.data_ptr<int32_t>(), p.per_row, b.f32(), b.x(), y.data_ptr(),
                    stream());
  return y;
}

at::Tensor conv_a8(const at::Tensor& x_in, const at::Tensor& qdata, const at::Tensor& w_scale,
                   const std::optional<at::Tensor>& w_zp, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_zp, int64_t w_bits,
                   int64_t act_bits, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(x_in.dim() == 4, "quantkit: conv2d input must be [B, C, H, W]");
  TORCH_CHECK(act_bits >= 1 && act_bits <= 8, "quantkit: integer kernels take 1..8 activation bits");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int kh = static_cast<int>(kernel_size[0]), kw = static_cast<int>(kernel_size[1]);
  const int sh = static_cast<int>(stride[0]), sw = static_cast<int>(stride[1]);
  const int ph = static_cast<int>(padding[0]), pw = static_cast<int>(padding[1]);
  const int dh = static_cast<int>(dilation[0]), dw = static_cast<int>(dilation[1]);
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const int64_t N = qdata.size(0), K = C * kh * kw;
  check_weight(qdata, K, w_bits);
  TORCH_CHECK(w_scale.size(0) == N && w_scale.size(1) == 1, "quantkit: integer CUDA kernels need per-channel scales");
  TORCH_CHECK(w_bits != 8 || !w_zp.has_value(), "quantkit: 8-bit integer kernels need symmetric weights");
  const auto dt = dtype_code(x.scalar_type());
  at::Tensor y = at::empty({B, N, Ho, Wo}, x.options());
  if (B * N * Ho * Wo == 0) return y;

  const NhwcCodes codes = quantize_nhwc(x, in_scale, in_zp, act_bits);
  const ActParams& p = codes.p;
  const at::Tensor& xq = codes.xq;

  const int64_t Mtot = B * Ho * Wo;
  const bool direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && C % 8 == 0 && Mtot % 8 == 0;
  at::Tensor patches;
  int64_t Kp;
  if (direct) {
    Kp = C;
    patches = xq.view({Mtot, C});
  } else {
    Kp = round_up(K, 8);
    const int64_t Mp = round_up(Mtot, 8);
    patches = at::empty({Mp, Kp}, x.options().dtype(at::kChar));
    qk::im2col_s8(xq.data_ptr<int8_t>(), B, H, W, C, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo,
                  p.zp.data_ptr<int32_t>(), p.per_row, patches.data_ptr<int8_t>(), Mp, Kp, stream());
  }
  // W [Np, Kp] . patches^T [Kp, Mp] -> [Np, Mp]; rows of the first operand must exceed 16.
  const int64_t Np = round_up(N > 16 ? N : 17, 8);
  const S8Weight w = weight_s8(qdata, w_zp, K, w_bits, C, static_cast<int64_t>(kh) * kw, Np, Kp);
  const at::Tensor acc = at::_int_mm(w.w, patches.t());
  const Bias b = epilogue_bias(bias, x.scalar_type());
  qk::epilogue_conv(dt, acc.data_ptr<int32_t>(), acc.stride(0), B, Ho * Wo, N, w.wsum.data_ptr<int32_t>(),
                    half_ptr(w_scale), p.scale.data_ptr<float>(), p.zp.data_ptr<int32_t>(), p.per_row, b.f32(),
                    b.x(), y.data_ptr(), stream());
  return y;
}

at::Tensor dequant(const at::Tensor& qdata, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zp,
                   int64_t w_bits, int64_t in_features, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(qdata.device());
  check_weight(qdata, in_features, w_bits);
  const int64_t N = qdata.size(0), G = w_scale.size(1);
  TORCH_CHECK(in_features % G == 0, "quantkit: groups do not divide the weight rows");
  at::Tensor out = at::empty({N, in_features}, qdata.options().dtype(dtype));
  qk::dequantize_weight(dtype_code(dtype), qdata.data_ptr<int32_t>(), N, qdata.size(1), in_features,
                        static_cast<int>(w_bits), half_ptr(w_scale), zp_ptr(w_zp), G, out.data_ptr(), stream());
  return out;
}

at::Tensor linear_w4a16(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& w_scale,
                        const std::optional<at::Tensor>& w_zp, const std::optional<at::Tensor>& bias) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), N = qdata.size(0), G = w_scale.size(1);
  check_weight(qdata, K, 4);
  TORCH_CHECK(K % 8 == 0 && K % G == 0 && (K / G) % 8 == 0,
              "quantkit: the 4-bit GEMV needs K and the group length to be multiples of 8");
  const auto dt = dtype_code(x.scalar_type());
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M <= 4, "quantkit: the 4-bit GEMV takes at most 4 rows");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  // Weight-only layers add the bias in the activation dtype, as the reference's F.linear(x, w, bias.to(x.dtype)).
  const at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
  qk::gemv_w4a16(dt, x2.data_ptr(), M, K, qdata.data_ptr<int32_t>(), qdata.size(1), half_ptr(w_scale),
                 zp_ptr(w_zp), G, b.defined() ? b.data_ptr() : nullptr, N, y.data_ptr(), stream());
  return y;
}

// Static per-tensor activation codes of x (any shape): uint8 q, or int8 q - 128 (`signed_codes`) for an int8 GEMM
// that takes them directly (the Triton engine, src/quantkit/ops/triton_gemm.py).
at::Tensor static_codes(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t bits,
                        bool signed_codes) {
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(scale.numel() == 1 && zero_point.numel() == 1, "quantkit CUDA quantize_act takes per-tensor qparams");
  const ActParams p = static_params(scale, zero_point);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(signed_codes ? at::kChar : at::kByte));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  qk::quantize_rows_static(dtype_code(x.scalar_type()), xc.data_ptr(), 1, n, p.scale.data_ptr<float>(),
                           p.zp.data_ptr<int32_t>(), static_cast<int>(bits), static_cast<uint8_t*>(out.data_ptr()), n,
                           signed_codes ? 0x80 : 0, stream());
  return out;
}

// Dynamic per-row codes of x [M, K] as static_codes writes them, with the per-row scale (fp32 [M]) and zero point
// (int32 [M]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_codes(const at::Tensor& x, int64_t bits, bool signed_codes) {
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2, "quantkit: dynamic activation quantization takes [M, K]");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor codes = at::empty({M, K}, x.options().dtype(signed_codes ? at::kChar : at::kByte));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor zp = at::empty({M}, x.options().dtype(at::kInt));
  qk::quantize_rows_dynamic(dtype_code(x.scalar_type()), xc.data_ptr(), M, K, static_cast<int>(bits),
                            static_cast<uint8_t*>(codes.data_ptr()), K, signed_codes ? 0x80 : 0,
                            scale.data_ptr<float>(), zp.data_ptr<int32_t>(), stream());
  return {codes, scale, zp};
}

at::Tensor quantize_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t bits) {
  return static_codes(x, scale, zero_point, bits, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_dynamic(const at::Tensor& x, int64_t bits) {
  auto [codes, scale, zp] = dynamic_codes(x, bits, false);
  return {codes, scale.view({-1, 1}), zp.view({-1, 1})};  // [M, 1], as the reference returns them
}

at::Tensor quantize_act_s8(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t bits) {
  TORCH_CHECK(x.dim() == 2, "quantkit: quantize_act_s8 takes [M, K]");
  return static_codes(x, scale, zero_point, bits, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_dynamic_s8(const at::Tensor& x, int64_t bits) {
  return dynamic_codes(x, bits, true);
}

// NHWC int8 codes (q - 128) of an NCHW input, with the qparams used: (codes [B, H, W, C], scale fp32 [1] or [B],
// zero point int32 [1] or [B]); static when in_scale is given, else per sample. For the Triton implicit-GEMM
// convolution of resident weights (src/quantkit/ops/triton_gemm.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_nhwc_s8(const at::Tensor& x_in,
                                                                 const std::optional<at::Tensor>& in_scale,
                                                                 const std::optional<at::Tensor>& in_zp,
                                                                 int64_t act_bits) {
  c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(x_in.dim() == 4, "quantkit: quantize_nhwc_s8 takes [B, C, H, W]");
  TORCH_CHECK(act_bits >= 1 && act_bits <= 8, "quantkit: integer kernels take 1..8 activation bits");
  const NhwcCodes r = quantize_nhwc(x_in.contiguous(), in_scale, in_zp, act_bits);
  return {r.xq, r.p.scale, r.p.zp};
}

}  // namespace

TORCH_LIBRARY(quantkit_cuda, m) {
  m.def(
      "linear_a8(Tensor x, Tensor qdata, Tensor w_scale, Tensor? w_zero_point, Tensor? bias, Tensor? in_scale, "
      "Tensor? in_zero_point, int w_bits, int act_bits) -> Tensor");
  m.def(
      "conv_a8(Tensor x, Tensor qdata, Tensor w_scale, Tensor? w_zero_point, Tensor? bias, Tensor? in_scale, "
      "Tensor? in_zero_point, int w_bits, int act_bits, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation) -> Tensor");
  m.def("dequant(Tensor qdata, Tensor w_scale, Tensor? w_zero_point, int w_bits, int in_features, ScalarType dtype)"
        " -> Tensor");
  m.def("linear_w4a16(Tensor x, Tensor qdata, Tensor w_scale, Tensor? w_zero_point, Tensor? bias) -> Tensor");
  m.def("quantize_act(Tensor x, Tensor scale, Tensor zero_point, int bits) -> Tensor");
  m.def("quantize_act_dynamic(Tensor x, int bits) -> (Tensor, Tensor, Tensor)");
  m.def("quantize_act_s8(Tensor x, Tensor scale, Tensor zero_point, int bits) -> Tensor");
  m.def("quantize_act_dynamic_s8(Tensor x, int bits) -> (Tensor, Tensor, Tensor)");
  m.def("quantize_nhwc_s8(Tensor x, Tensor? in_scale, Tensor? in_zero_point, int bits) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(quantkit_cuda, CUDA, m) {
  m.impl("linear_a8", &linear_a8);
  m.impl("conv_a8", &conv_a8);
  m.impl("dequant", &dequant);
  m.impl("linear_w4a16", &linear_w4a16);
  m.impl("quantize_act", &quantize_act);
  m.impl("quantize_act_dynamic", &quantize_act_dynamic);
  m.impl("quantize_act_s8", &quantize_act_s8);
  m.impl("quantize_act_dynamic_s8", &quantize_act_dynamic_s8);
  m.impl("quantize_nhwc_s8", &quantize_nhwc_s8);
}
