// One row through a float32 (or bfloat16, or int8) Linear layer, y = W x + b, at the memory's rate (server/ml/matvec.py
// says why).
//
// Each thread takes a contiguous run of output rows and computes them eight at a time: eight streams of weights read
// side by side against one copy of x, one 16-wide accumulator each. Fewer streams per thread left the memory idle
// between loads: on an AMD EPYC Zen 4 (2 cores), four rows at a time read GPT-2's weights at 26 GB/s, two at 22,
// eight at 31 (llama.cpp's tinyBLAS reads four, oneDNN's packed product 22).
//
// W comes in one of two layouts. In place: [out, in] row-major, as a Linear holds it. Blocked: [out/8, in/16, 8, 16],
// each block of eight rows with their 16-wide pieces interleaved, zero-padded to whole blocks, so that a thread reads
// one sequential stream instead of eight short ones; the hardware prefetchers follow it further. On the Zen 4 a
// thread alone read GPT-2's 48 block weights at 20 GB/s blocked against 16 in place, two threads 28.6 to 30.2 GB/s
// against 26.9 to 27.7 (three runs). Blocking costs a copy, so matvec.py blocks only weights it must copy anyway.
//
// bfloat16 (where the CPU has AVX512-BF16): the same loops over bfloat16 weights and input, 32 values to a piece, one
// `vdpbf16ps` per piece (exact products summed in float32), each output rounded to bfloat16 once.
//
// int8 (`matvec_int8`, where the CPU has AVX512-VNNI): torch's dynamic quantization, computed as fbgemm computes it
// (the weight int8 per output row, the input quantized per call to 7-bit unsigned with a zero point, int32 sums),
// blocked alike with 64-byte pieces, one VNNI instruction per piece. On the Zen 4 it read GPT-2's 48 block weights at
// 19 to 20 GB/s against fbgemm's 15 to 18 (fbgemm reads one row at a time).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SERVER_INT8_UNITS 1
#else
#define SERVER_INT8_UNITS 0
#endif
#if defined(__AVX512BF16__)
#define SERVER_BF16_UNITS 1
#else
#define SERVER_BF16_UNITS 0
#endif

namespace {

// GCC's generic vectors: AVX-512 where the CPU has it, two AVX2 halves or narrower elsewhere (the build targets the
// CPU it runs on: server/ml/matvec.py).
typedef float Lanes __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kRows = 8;
// Rows per thread below which a second thread costs more than it saves.
constexpr int64_t kGrainRows = 128;

inline Lanes load(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline float total(Lanes v) {
  float sum = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// What a weight type's products take: how many of its values one vector holds (a piece), and how a piece of W
// times a piece of x is added to a row's 16 float32 sums.
struct Float32 {
  using W = float;
  static constexpr int64_t kPiece = kLanes;
  static Lanes add(Lanes sums, const float* w, const float* x) { return sums + load(w) * load(x); }
};

#if SERVER_BF16_UNITS
// bfloat16 weights and input, 32 to a vector, their products exact in float32 and summed in float32 by one
// AVX512-BF16 instruction per piece, as oneDNN's bf16 kernels sum; half float32's bytes read.
struct BFloat16 {
  using W = c10::BFloat16;
  static constexpr int64_t kPiece = 2 * kLanes;
  static Lanes add(Lanes sums, const W* w, const W* x) {
    return _mm512_dpbf16_ps(sums, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
  }
};
#endif

// Rows [first, last) of an in-place W, R at a time (the last rows, fewer than kRows, one at a time), into y in W's
// type: float32 sums, rounded once.
template <typename T, int64_t R, typename W = typename T::W>
void in_place(const W* w, const W* x, const W* b, W* y, int64_t in, int64_t first, int64_t last) {
  const int64_t body = in - in % T::kPiece;
  for (int64_t r = first; r + R <= last; r += R) {
    Lanes sums[R] = {};
    float tails[R] = {};
    const W* block = w + r * in;
    for (int64_t l = 0; l < body; l += T::kPiece)
      for (int64_t i = 0; i < R; ++i) sums[i] = T::add(sums[i], block + i * in + l, x + l);
    for (int64_t l = body; l < in; ++l)
      for (int64_t i = 0; i < R; ++i) tails[i] += static_cast<float>(block[i * in + l]) * static_cast<float>(x[l]);
    for (int64_t i = 0; i < R; ++i)
      y[r + i] = static_cast<W>(total(sums[i]) + tails[i] + (b ? static_cast<float>(b[r + i]) : 0.f));
  }
}

// Blocks [first, last) of a blocked W whose padded width is `in` (x padded alike); rows past `out` are padding.
template <typename T, typename W = typename T::W>
void blocked(const W* w, const W* x, const W* b, W* y, int64_t in, int64_t out, int64_t first, int64_t last) {
  for (int64_t block = first; block < last; ++block) {
    Lanes sums[kRows] = {};
    const W* pieces = w + block * kRows * in;
    for (int64_t l = 0; l < in; l += T::kPiece)
      for (int64_t i = 0; i < kRows; ++i) sums[i] = T::add(sums[i], pieces + l * kRows + i * T::kPiece, x + l);
    for (int64_t i = 0, r = block * kRows; i < kRows && r < out; ++i, ++r)
      y[r] = static_cast<W>(total(sums[i]) + (b ? static_cast<float>(b[r]) : 0.f));
  }
}

template <typename T, typename W = typename T::W>
void product(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
             torch::Tensor& y, int64_t in, int64_t out) {
  const torch::Tensor row = x.contiguous();
  const W* xs = row.data_ptr<W>();
  const W* w = weight.data_ptr<W>();
  const W* b = bias ? bias->data_ptr<W>() : nullptr;
  W* ys = y.data_ptr<W>();
  if (weight.dim() == 4) {
    const int64_t padded = weight.size(1) * T::kPiece;
    std::vector<W> widened;
    if (padded != in) {
      widened.assign(padded, W(0.f));
      std::copy(xs, xs + in, widened.begin());
      xs = widened.data();
    }
    at::parallel_for(0, weight.size(0), kGrainRows / kRows, [&](int64_t first, int64_t last) {
      blocked<T>(w, xs, b, ys, padded, out, first, last);
    });
    return;
  }
  const int64_t blocks = out / kRows;
  at::parallel_for(0, blocks, kGrainRows / kRows, [&](int64_t first, int64_t last) {
    in_place<T, kRows>(w, xs, b, ys, in, first * kRows, last * kRows);
  });
  in_place<T, 1>(w, xs, b, ys, in, blocks * kRows, out);
}

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                     int64_t out) {
  const auto type = weight.scalar_type();
  TORCH_CHECK(type == torch::kFloat || (type == torch::kBFloat16 && SERVER_BF16_UNITS),
              SERVER_BF16_UNITS ? "matvec: the weight must be float32 or bfloat16"
                                : "matvec: the weight must be float32 (this CPU has no AVX512-BF16)");
  const bool is_blocked = weight.dim() == 4;
  const int64_t piece = type == torch::kFloat ? kLanes : 2 * kLanes;
  TORCH_CHECK(weight.is_contiguous() &&
                  (is_blocked ? weight.size(2) == kRows && weight.size(3) == piece && weight.size(0) * kRows >= out &&
                                    weight.size(0) * kRows < out + kRows
                              : weight.dim() == 2 && weight.size(0) == out),
              "matvec: the weight must be a contiguous matrix of `out` rows, in place or blocked");
  const int64_t in = x.size(-1), padded = is_blocked ? weight.size(1) * piece : in;
  TORCH_CHECK(x.scalar_type() == type && x.numel() == in && (is_blocked ? padded - piece < in && in <= padded
                                                                         : weight.size(1) == in),
              "matvec: the input must be one row of the weight's width and type");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == type && bias->numel() == out),
              "matvec: the bias must be a contiguous vector of the weight's height and type");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  torch::Tensor y = torch::empty(shape, x.options());
#if SERVER_BF16_UNITS
  if (type == torch::kBFloat16) {
    product<BFloat16>(x, weight, bias, y, in, out);
    return y;
  }
#endif
  product<Float32>(x, weight, bias, y, in, out);
  return y;
}

// The input's scale and zero point as torch's dynamic quantization chooses them for fbgemm
// (`quant_utils::ChooseQuantizationParams` with reduce_range: levels 0..127, the range widened to hold 0).
std::pair<float, int32_t> input_grid(const float* x, int64_t in) {
  constexpr int32_t kHighest = 127;
  constexpr float kSmallestScale = 6.1e-5f;
  float low = 0.f, high = 0.f;
  for (int64_t l = 0; l < in; ++l) low = std::min(low, x[l]), high = std::max(high, x[l]);
  double scale = (static_cast<double>(high) - low) / kHighest;
  if (static_cast<float>(scale) == 0.f || std::isinf(1.f / static_cast<float>(scale))) scale = 0.1;
  if (scale < kSmallestScale) {
    const float amplifier = kSmallestScale / static_cast<float>(scale);
    scale = kSmallestScale;
    if (low == 0.f) {
      high = kSmallestScale * kHighest;
    } else if (high == 0.f) {
      low = -kSmallestScale * kHighest;
    } else {
      low *= amplifier, high *= amplifier;
    }
  }
  const double from_low = -low / scale, from_high = kHighest - high / scale;
  const double initial = -std::abs(low / scale) < kHighest - std::abs(high / scale) ? from_low : from_high;
  const int32_t zero = initial < 0 ? 0 : initial > kHighest ? kHighest : static_cast<int32_t>(std::nearbyint(initial));
  return {static_cast<float>(scale), zero};
}

#if SERVER_INT8_UNITS
constexpr int64_t kBytes = 64;

// Blocks [first, last) of an int8 blocked W ([out/8, in/64, 8, 64]) against the quantized input `x` (padded alike).
void blocked_int8(const int8_t* w, const uint8_t* x, const float* scales, const int32_t* sums, const float* b,
                  float* y, int64_t in, int64_t out, float x_scale, int32_t zero, int64_t first, int64_t last) {
  for (int64_t block = first; block < last; ++block) {
    __m512i acc[kRows];
    for (int64_t i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_si512();
    const int8_t* pieces = w + block * kRows * in;
    for (int64_t l = 0; l < in; l += kBytes) {
      const __m512i xs = _mm512_loadu_si512(x + l);
      for (int64_t i = 0; i < kRows; ++i)
        acc[i] = _mm512_dpbusd_epi32(acc[i], xs, _mm512_loadu_si512(pieces + l * kRows + i * kBytes));
    }
    for (int64_t i = 0, r = block * kRows; i < kRows && r < out; ++i, ++r) {
      const int32_t total = _mm512_reduce_add_epi32(acc[i]) - zero * sums[r];
      y[r] = static_cast<float>(total) * x_scale * scales[r] + (b ? b[r] : 0.f);
    }
  }
}
#endif

torch::Tensor matvec_int8(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          const torch::Tensor& sums, const c10::optional<torch::Tensor>& bias, int64_t out) {
#if SERVER_INT8_UNITS
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() && weight.scalar_type() == torch::kChar &&
                  weight.size(2) == kRows && weight.size(3) == kBytes && weight.size(0) * kRows >= out &&
                  weight.size(0) * kRows < out + kRows,
              "matvec_int8: the weight must be a blocked int8 matrix of `out` rows");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kFloat && scales.numel() == out &&
                  sums.is_contiguous() && sums.scalar_type() == torch::kInt && sums.numel() == out,
              "matvec_int8: a float32 scale and an int32 sum per row");
  const int64_t in = x.size(-1), padded = weight.size(1) * kBytes;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.numel() == in && padded - kBytes < in && in <= padded,
              "matvec_int8: the input must be one float32 row of the weight's width");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == torch::kFloat && bias->numel() == out),
              "matvec_int8: the bias must be a contiguous float32 vector of the weight's height");
  const torch::Tensor row = x.contiguous();
  const float* xs = row.data_ptr<float>();
  const auto [x_scale, zero] = input_grid(xs, in);
  // fbgemm's rounding: multiplied by the inverse scale, to nearest even, then shifted by the zero point.
  const float inverse = 1.f / x_scale;
  std::vector<uint8_t> quantized(padded, 0);
  for (int64_t l = 0; l < in; ++l)
    quantized[l] = static_cast<uint8_t>(std::clamp(zero + std::nearbyint(xs[l] * inverse), 0.f, 255.f));
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  torch::Tensor y = torch::empty(shape, x.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, weight.size(0), kGrainRows / kRows, [&](int64_t first, int64_t last) {
    blocked_int8(weight.data_ptr<int8_t>(), quantized.data(), scales.data_ptr<float>(), sums.data_ptr<int32_t>(), b,
                 y.data_ptr<float>(), padded, out, x_scale, zero, first, last);
  });
  return y;
#else
  TORCH_CHECK(false, "matvec_int8: this CPU has no AVX512-VNNI");
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is let go for the product, as torch's own ops do: the server's event loop runs beside it.
  module.def("matvec", &matvec, pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("matvec_int8", &matvec_int8, pybind11::call_guard<pybind11::gil_scoped_release>());
  module.attr("int8_units") = static_cast<bool>(SERVER_INT8_UNITS);
  module.attr("bf16_units") = static_cast<bool>(SERVER_BF16_UNITS);
}
