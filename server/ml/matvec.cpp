// One row through a float32 Linear layer, y = W x + b, at the memory's rate (server/ml/matvec.py says why).
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
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

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

// Rows [first, last) of an in-place W, R at a time (the last rows, fewer than kRows, one at a time).
template <int64_t R>
void in_place(const float* w, const float* x, const float* b, float* y, int64_t in, int64_t first, int64_t last) {
  const int64_t body = in - in % kLanes;
  for (int64_t r = first; r + R <= last; r += R) {
    Lanes sums[R] = {};
    float tails[R] = {};
    const float* block = w + r * in;
    for (int64_t l = 0; l < body; l += kLanes) {
      const Lanes xs = load(x + l);
      for (int64_t i = 0; i < R; ++i) sums[i] += load(block + i * in + l) * xs;
    }
    for (int64_t l = body; l < in; ++l)
      for (int64_t i = 0; i < R; ++i) tails[i] += block[i * in + l] * x[l];
    for (int64_t i = 0; i < R; ++i) y[r + i] = total(sums[i]) + tails[i] + (b ? b[r + i] : 0.f);
  }
}

// Blocks [first, last) of a blocked W whose padded width is `in` (x padded alike); rows past `out` are padding.
void blocked(const float* w, const float* x, const float* b, float* y, int64_t in, int64_t out, int64_t first,
             int64_t last) {
  for (int64_t block = first; block < last; ++block) {
    Lanes sums[kRows] = {};
    const float* pieces = w + block * kRows * in;
    for (int64_t l = 0; l < in; l += kLanes) {
      const Lanes xs = load(x + l);
      for (int64_t i = 0; i < kRows; ++i) sums[i] += load(pieces + l * kRows + i * kLanes) * xs;
    }
    for (int64_t i = 0, r = block * kRows; i < kRows && r < out; ++i, ++r) y[r] = total(sums[i]) + (b ? b[r] : 0.f);
  }
}

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                     int64_t out) {
  const bool is_blocked = weight.dim() == 4;
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == torch::kFloat &&
                  (is_blocked ? weight.size(2) == kRows && weight.size(3) == kLanes && weight.size(0) * kRows >= out &&
                                    weight.size(0) * kRows < out + kRows
                              : weight.dim() == 2 && weight.size(0) == out),
              "matvec: the weight must be a contiguous float32 matrix of `out` rows, in place or blocked");
  const int64_t in = x.size(-1), padded = is_blocked ? weight.size(1) * kLanes : in;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.numel() == in && (is_blocked ? padded - kLanes < in && in <= padded
                                                                                  : weight.size(1) == in),
              "matvec: the input must be one float32 row of the weight's width");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == torch::kFloat && bias->numel() == out),
              "matvec: the bias must be a contiguous float32 vector of the weight's height");
  const torch::Tensor row = x.contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  torch::Tensor y = torch::empty(shape, x.options());
  const float* w = weight.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* ys = y.data_ptr<float>();
  if (is_blocked) {
    std::vector<float> widened;
    const float* xs = row.data_ptr<float>();
    if (padded != in) {
      widened.assign(padded, 0.f);
      std::copy(xs, xs + in, widened.begin());
      xs = widened.data();
    }
    at::parallel_for(0, weight.size(0), kGrainRows / kRows, [&](int64_t first, int64_t last) {
      blocked(w, xs, b, ys, padded, out, first, last);
    });
    return y;
  }
  const float* xs = row.data_ptr<float>();
  const int64_t blocks = out / kRows;
  at::parallel_for(0, blocks, kGrainRows / kRows, [&](int64_t first, int64_t last) {
    in_place<kRows>(w, xs, b, ys, in, first * kRows, last * kRows);
  });
  in_place<1>(w, xs, b, ys, in, blocks * kRows, out);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is let go for the product, as torch's own ops do: the server's event loop runs beside it.
  module.def("matvec", &matvec, pybind11::call_guard<pybind11::gil_scoped_release>());
}
