// Per-row elementwise ops of a CPU step as single vectorized kernels (see
// engine/cpu/fused_layers.py for why): the Gemma family's gated GELU, and RMS norm.
//
// gelu_tanh(gate) * up.
// MLX's CPU kernels compute tanh (and x ** 3, through powf) one element at a time in libm:
// ~30 ns an element here, so Gemma 3 270M spent ~30 ms a layer on GELU in a 512-token
// prefill, a third of the prefill. This loop has no calls, so the compiler vectorizes it
// (AVX-512 or AVX2, picked at run time), and is ~20x faster.
//
// tanh(z) = 1 - 2 / (exp(2z) + 1), so gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x sigmoid(2z),
// with exp by range reduction and a degree-6 polynomial (Cephes' expf, ~1 ulp). Every element
// is computed by the same sequence of IEEE operations whatever its position, the vector width
// or the thread (no FMA contraction: -ffp-contract=off), so a row's bits depend on nothing
// but its own inputs: prefill, decode, verify windows and batches agree.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "primitive.h"
#include "workers.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// exp(x) for x in [-87.3, 88.7] (clamped): x = n ln2 + r, exp(x) = 2^n exp(r).
inline float exp_poly(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;  // ln2 in two parts (Cody-Waite)
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <bool GATED>
inline void gelu_range(const float* x, const float* up, float* out, long n) {
  for (long i = 0; i < n; i++) {
    float v = x[i];
    float z = 1.5957691216057308f * (v + 0.044715f * (v * v * v));  // 2 * sqrt(2 / pi) * (...)
    // sigmoid(z) = e / (e + 1) = 1 - 1 / (e + 1): the first form below 0, where the second
    // would cancel (relative error 3e-4 in the negative tail, against MLX's 5e-5).
    float e = exp_poly(z);
    float s = z < 0.f ? e / (e + 1.0f) : 1.0f - 1.0f / (e + 1.0f);
    float g = z > 40.f ? v : v * s;  // exp(z) past float's range: gelu(v) = v (also for v = inf)
    out[i] = GATED ? g * up[i] : g;
  }
}

template <bool GATED>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void gelu_avx512(const float* x, const float* up, float* out, long n) { gelu_range<GATED>(x, up, out, n); }
template <bool GATED>
__attribute__((target("avx2,fma")))
void gelu_avx2(const float* x, const float* up, float* out, long n) { gelu_range<GATED>(x, up, out, n); }
template <bool GATED>
void gelu_plain(const float* x, const float* up, float* out, long n) { gelu_range<GATED>(x, up, out, n); }

// The widest vectors this CPU runs the loops above with: 2 AVX-512, 1 AVX2 + FMA, 0 neither.
int simd_level() {
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")   ? 1 : 0;
  return level;
}

template <bool GATED>
void gelu_any(const float* x, const float* up, float* out, long n) {
  int level = simd_level();
  if (level == 2) gelu_avx512<GATED>(x, up, out, n);
  else if (level == 1) gelu_avx2<GATED>(x, up, out, n);
  else gelu_plain<GATED>(x, up, out, n);
}

// RMS norm of rows of d values: x * (1 / sqrt(mean(x^2) + eps)) * (w + add). The sum of
// squares runs in 16 lanes (lane j takes the elements j, j + 16, ...) added up in a fixed
// tree at the end: the same order on every path and for every row, whatever the batch.
template <int>
inline void rms_rows(const float* x, const float* w, float add, float eps, float* out, long rows, long d) {
  for (long r = 0; r < rows; r++) {
    const float* xr = x + r * d;
    float* orow = out + r * d;
    float acc[16] = {0};
    long i = 0;
    for (; i + 16 <= d; i += 16)
      for (int j = 0; j < 16; j++) acc[j] += xr[i + j] * xr[i + j];
    for (int j = 0; i + j < d; j++) acc[j] += xr[i + j] * xr[i + j];
    for (int width = 8; width > 0; width /= 2)
      for (int j = 0; j < width; j++) acc[j] += acc[j + width];
    float scale = 1.0f / std::sqrt(acc[0] / (float)d + eps);
    for (long k = 0; k < d; k++) orow[k] = (xr[k] * scale) * (w[k] + add);
  }
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void rms_avx512(const float* x, const float* w, float add, float eps, float* out, long rows, long d) {
  rms_rows<2>(x, w, add, eps, out, rows, d);
}
__attribute__((target("avx2,fma")))
void rms_avx2(const float* x, const float* w, float add, float eps, float* out, long rows, long d) {
  rms_rows<1>(x, w, add, eps, out, rows, d);
}
void rms_any(const float* x, const float* w, float add, float eps, float* out, long rows, long d) {
  int level = simd_level();
  if (level == 2) rms_avx512(x, w, add, eps, out, rows, d);
  else if (level == 1) rms_avx2(x, w, add, eps, out, rows, d);
  else rms_rows<0>(x, w, add, eps, out, rows, d);
}

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream stream, float add, float eps) : mx::Primitive(stream), add_(add), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    long d = inputs[1].size();
    encoder.dispatch([xp = inputs[0].data<float>(), wp = inputs[1].data<float>(), op = out.data<float>(),
                      rows = (long)out.size() / d, d, add = add_, eps = eps_]() {
      rms_any(xp, wp, add, eps, op, rows, d);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("rms_norm runs on the CPU only");
  }
  // Training (an MTP head, engine/spec/mtp_train.py) differentiates through norms: the
  // gradients in MLX ops, with y = x s (w + add), s = 1 / sqrt(mean(x^2) + eps).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const mx::array &x = primals[0], &w = primals[1], &c = cotangents[0];
    auto s = mx::rsqrt(mx::add(mx::mean(mx::square(x), -1, true), mx::array(eps_)));
    std::vector<mx::array> grads;
    for (int a : argnums) {
      if (a == 0) {
        auto g = mx::multiply(c, mx::add(w, mx::array(add_)));
        auto s3 = mx::multiply(s, mx::square(s));
        grads.push_back(mx::subtract(mx::multiply(g, s),
                                     mx::multiply(mx::multiply(x, s3), mx::mean(mx::multiply(g, x), -1, true))));
      } else {
        std::vector<int> rows(x.ndim() - 1);
        for (int i = 0; i < (int)rows.size(); i++) rows[i] = i;
        grads.push_back(mx::sum(mx::multiply(mx::multiply(c, x), s), rows));
      }
    }
    return grads;
  }
  const char* name() const override { return "RmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RmsNorm&>(other);
    return add_ == o.add_ && eps_ == o.eps_;
  }

 private:
  float add_, eps_;
};

constexpr long kParallelElements = 1 << 16;  // below: the calling thread alone

class GeluTanh : public mx::Primitive {
 public:
  explicit GeluTanh(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    bool gated = inputs.size() == 2;
    encoder.dispatch([xp = inputs[0].data<float>(), up = gated ? inputs[1].data<float>() : nullptr,
                      op = out.data<float>(), n = (long)out.size(), gated]() {
      auto run = [&](long a, long b) {
        if (gated) gelu_any<true>(xp + a, up + a, op + a, b - a);
        else gelu_any<false>(xp + a, nullptr, op + a, b - a);
      };
      if (n < kParallelElements) return run(0, n);
      kernelext::Workers& pool = kernelext::workers();
      int chunks = 4 * pool.size();
      pool.run([&](int c) { run(n * c / chunks / 16 * 16, c + 1 == chunks ? n : n * (c + 1) / chunks / 16 * 16); },
               chunks);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("gelu_tanh runs on the CPU only");
  }
  // The gradients in MLX ops (training an MTP head on a Gemma model differentiates through
  // its MLP): gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2), t = tanh(k (x + a x^3)).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const mx::array &x = primals[0], &c = cotangents[0];
    const float k = 0.7978845608028654f, a = 0.044715f;
    auto x2 = mx::square(x);
    auto t = mx::tanh(mx::multiply(mx::array(k), mx::add(x, mx::multiply(mx::array(a), mx::multiply(x2, x)))));
    auto half_one_t = mx::multiply(mx::array(0.5f), mx::add(mx::array(1.f), t));
    std::vector<mx::array> grads;
    for (int i : argnums) {
      if (i == 0) {
        auto slope = mx::multiply(mx::multiply(mx::multiply(mx::array(0.5f * k), x), mx::subtract(mx::array(1.f), mx::square(t))),
                                  mx::add(mx::array(1.f), mx::multiply(mx::array(3.f * a), x2)));
        auto d = mx::add(half_one_t, slope);
        grads.push_back(mx::multiply(primals.size() == 2 ? mx::multiply(c, primals[1]) : c, d));
      } else {
        grads.push_back(mx::multiply(c, mx::multiply(x, half_one_t)));
      }
    }
    return grads;
  }
  const char* name() const override { return "GeluTanh"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

mx::array gelu_tanh(const mx::array& x, std::optional<mx::array> up, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("gelu_tanh: x must be float32");
  if (up && (up->dtype() != mx::float32 || up->shape() != x.shape()))
    throw std::invalid_argument("gelu_tanh: up must be float32 of x's shape");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  std::vector<mx::array> in = {mx::contiguous(x, false, stream)};
  if (up) in.push_back(mx::contiguous(*up, false, stream));
  return mx::array(x.shape(), mx::float32, std::make_shared<GeluTanh>(stream), std::move(in));
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float add, float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || x.ndim() < 1 || weight.ndim() != 1 ||
      x.shape(-1) != weight.shape(0))
    throw std::invalid_argument("rms_norm: x must be float32 [..., d] and weight float32 [d]");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, add, eps),
                   {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream)});
}

}  // namespace

NB_MODULE(_row_ops, m) {
  kernelext::share_workers(m);
  m.doc() = "per-row elementwise ops on the CPU, vectorized (engine/cpu/fused_layers.py)";
  m.def("gelu_tanh", &gelu_tanh, "x"_a, "up"_a = nb::none(), nb::kw_only(), "stream"_a = nb::none());
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "add"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
}
