// Encoder products on the CPU in bfloat16 with float32 accumulation (AVX-512 BF16,
// vdpbf16ps), see engine/cpu/bf16_linear.py for when and why.
//
// Weights are packed once at load, in panels of 64 outputs: uint16 [N/64][K/2][64][2],
// so one k pair of a panel is four 64-byte vectors, the operand layout of vdpbf16ps.
// Activations are rounded to bfloat16 row by row (vcvtneps2bf16, round to nearest even).
//
// Exactness: every output element is one vdpbf16ps chain over the k pairs in order,
// from zero, then + bias (and GELU) in float32: the same instructions on the same data
// for any number of rows, any row block and any thread split. A row's bits never
// depend on the rows beside it (batch invariance of embeddings).
#include <immintrin.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#include <nanobind/nanobind.h>
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

constexpr int kPanel = 64;     // outputs per panel: 4 vectors of 16
constexpr int kRows = 6;       // rows per kernel call: 6 x 4 accumulators + 4 weight vectors
constexpr int kRowBlock = 48;  // rows per task: their bf16 activations stay in L1 across a panel
constexpr double kParallelMultiplyAdds = 2e6;  // below, the calling thread alone

#define KX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq,fma")))

// GELU with erf by Abramowitz & Stegun 7.1.28, the formula of engine/embed/bert.py's
// gelu_erf (|erf error| <= 3e-7), so both paths compute the same function.
KX_TARGET inline __m512 gelu_erf(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 a = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.7071067811865476f));
  __m512 p = _mm512_fmadd_ps(a, _mm512_set1_ps(0.0000430638f), _mm512_set1_ps(0.0002765672f));
  p = _mm512_fmadd_ps(a, p, _mm512_set1_ps(0.0001520143f));
  p = _mm512_fmadd_ps(a, p, _mm512_set1_ps(0.0092705272f));
  p = _mm512_fmadd_ps(a, p, _mm512_set1_ps(0.0422820123f));
  p = _mm512_fmadd_ps(a, p, _mm512_set1_ps(0.0705230784f));
  p = _mm512_fmadd_ps(a, p, one);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);  // ^16
  __m512 erf = _mm512_sub_ps(one, _mm512_div_ps(one, p));
  __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  erf = _mm512_mask_sub_ps(erf, neg, _mm512_setzero_ps(), erf);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, erf));
}

// R rows (bf16, row stride K) times one weight panel, + bias, optional GELU, into the
// panel's first `valid` columns of out.
template <int R>
KX_TARGET void kernel(const uint16_t* x, int K, const uint16_t* panel, const float* bias, bool gelu,
                      float* out, long ldo, int valid) {
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
  for (int p = 0; p < K / 2; p++) {
    const uint16_t* w = panel + (size_t)p * 2 * kPanel;
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32),
             w2 = (__m512bh)_mm512_loadu_si512(w + 64), w3 = (__m512bh)_mm512_loadu_si512(w + 96);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      int32_t pair;
      std::memcpy(&pair, x + (size_t)r * K + 2 * p, 4);
      __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
      __m512 v = _mm512_add_ps(acc[r][c], _mm512_loadu_ps(bias + c * 16));
      if (gelu) v = gelu_erf(v);
      int left = valid - c * 16;
      __mmask16 m = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
      _mm512_mask_storeu_ps(out + (size_t)r * ldo + c * 16, m, v);
    }
}

// y = LayerNorm(y + residual) over one row of N: y's sum, then the squared deviations,
// each in 16 lanes in order and reduced in a fixed order (one row's bits, any batch).
KX_TARGET void add_norm(float* y, const float* residual, const float* gamma, const float* beta, int N,
                        float eps) {
  __m512 sum = _mm512_setzero_ps();
  for (int k = 0; k < N; k += 16) {
    __mmask16 m = N - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - k)) - 1);
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + k), _mm512_maskz_loadu_ps(m, residual + k));
    _mm512_mask_storeu_ps(y + k, m, v);
    sum = _mm512_add_ps(sum, v);
  }
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / N);
  __m512 sq = _mm512_setzero_ps();
  for (int k = 0; k < N; k += 16) {
    __mmask16 m = N - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - k)) - 1);
    __m512 d = _mm512_maskz_sub_ps(m, _mm512_loadu_ps(y + k), mean);
    sq = _mm512_fmadd_ps(d, d, sq);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / N + eps));
  for (int k = 0; k < N; k += 16) {
    __mmask16 m = N - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - k)) - 1);
    __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, y + k), mean), inv);
    __m512 v = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, gamma + k), _mm512_maskz_loadu_ps(m, beta + k));
    _mm512_mask_storeu_ps(y + k, m, v);
  }
}

using KernelFn = void (*)(const uint16_t*, int, const uint16_t*, const float*, bool, float*, long, int);
const KernelFn kernels[kRows + 1] = {nullptr, kernel<1>, kernel<2>, kernel<3>, kernel<4>, kernel<5>, kernel<6>};

// Rows [r0, r1) of x float32 [M][K] to bfloat16, each row on its own.
KX_TARGET void to_bf16(const float* x, uint16_t* xb, int K, int r0, int r1) {
  for (int r = r0; r < r1; r++)
    for (int k = 0; k < K; k += 16) {
      __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
      __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + (size_t)r * K + k));
      _mm256_mask_storeu_epi16(xb + (size_t)r * K + k, m, (__m256i)b);
    }
}

// Rows [r0, r1) through panel p.
void multiply(const uint16_t* xb, int K, const uint16_t* w, const float* bias, bool gelu, long N,
              float* out, int r0, int r1, long p) {
  const uint16_t* panel = w + (size_t)p * K * kPanel;
  for (int r = r0; r < r1; r += kRows) {
    int rows = std::min(kRows, r1 - r);
    kernels[rows](xb + (size_t)r * K, K, panel, bias + p * kPanel, gelu, out + (size_t)r * N + p * kPanel, N,
                  (int)std::min<long>(kPanel, N - p * kPanel));
  }
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

// The residual add and LayerNorm after a product (BERT's attention and layer outputs).
struct Norm {
  const float* residual;  // [M][N]
  const float* gamma;
  const float* beta;
  float eps;
};

class Bf16Matmul : public mx::Primitive {
 public:
  Bf16Matmul(mx::Stream stream, long n, bool gelu, bool norm, float eps)
      : mx::Primitive(stream), n_(n), gelu_(gelu), norm_(norm), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const mx::array& bias = inputs[2];
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    int K = w.shape(1) * 2;
    int M = (int)(x.size() / K);
    long panels = w.shape(0), N = n_;
    std::optional<Norm> norm;
    if (norm_) norm = Norm{inputs[3].data<float>(), inputs[4].data<float>(), inputs[5].data<float>(), eps_};
    encoder.dispatch([xp = x.data<float>(), wp = w.data<uint16_t>(), bp = bias.data<float>(),
                      op = out.data<float>(), M, K, N, panels, gelu = gelu_, norm]() {
      if (M == 0) return;
      // Kept per calling (stream) thread and grown only: a fresh buffer of this size came from
      // mmap on every call, and its page faults cost ~15% of an encoder forward.
      thread_local std::vector<uint16_t> xb_buffer;
      if (xb_buffer.size() < (size_t)M * K) xb_buffer.resize((size_t)M * K);
      uint16_t* xb = xb_buffer.data();
      // Rows [r0, r1) through every panel, then their residual add and norm (a row block's
      // outputs are still in cache).
      auto rows_all_panels = [&](int r0, int r1) {
        for (long p = 0; p < panels; p++) multiply(xb, K, wp, bp, gelu, N, op, r0, r1, p);
        if (norm)
          for (int r = r0; r < r1; r++)
            add_norm(op + (size_t)r * N, norm->residual + (size_t)r * N, norm->gamma, norm->beta, (int)N, norm->eps);
      };
      if ((double)M * K * N < kParallelMultiplyAdds) {
        to_bf16(xp, xb, K, 0, M);
        rows_all_panels(0, M);
        return;
      }
      kernelext::Workers& pool = kernelext::workers();
      int parts = std::min(M, 4 * pool.size());
      pool.run([&](int c) { to_bf16(xp, xb, K, M * c / parts, M * (c + 1) / parts); }, parts);
      int blocks = (M + kRowBlock - 1) / kRowBlock;
      if (norm) {  // a task holds whole rows
        pool.run([&](int b) { rows_all_panels(b * kRowBlock, std::min(M, (b + 1) * kRowBlock)); }, blocks);
      } else {
        pool.run([&](int c) {
          int b = c / (int)panels;
          multiply(xb, K, wp, bp, gelu, N, op, b * kRowBlock, std::min(M, (b + 1) * kRowBlock), c % panels);
        }, blocks * (int)panels);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("bf16_matmul runs on the CPU only");
  }
  const char* name() const override { return "Bf16Matmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Bf16Matmul&>(other);
    return n_ == o.n_ && gelu_ == o.gelu_ && norm_ == o.norm_ && eps_ == o.eps_;
  }

 private:
  long n_;
  bool gelu_, norm_;
  float eps_;
};

void check(const mx::array& x, const mx::array& w, const mx::array& bias, long n) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::uint16 || w.ndim() != 3 || w.shape(2) != 2 * kPanel ||
      x.ndim() < 1 || x.shape(-1) != 2 * w.shape(1) || bias.dtype() != mx::float32 ||
      bias.size() != (size_t)w.shape(0) * kPanel || n <= (long)(w.shape(0) - 1) * kPanel ||
      n > (long)w.shape(0) * kPanel)
    throw std::invalid_argument(
        "bf16_matmul: x float32 [..., K], packed weights uint16 [ceil(N/64), K/2, 128], bias float32 [ceil(N/64) * 64]");
  if (!supported()) throw std::runtime_error("bf16_matmul: this CPU lacks AVX-512 BF16");
}

// x float32 [..., K] @ W.T + bias (then GELU if asked): W packed [ceil(N/64), K/2, 128] uint16.
mx::array bf16_matmul(const mx::array& x, const mx::array& w, const mx::array& bias, long n, bool gelu,
                      mx::StreamOrDevice s) {
  check(x, w, bias, n);
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = (int)n;
  return mx::array(shape, mx::float32, std::make_shared<Bf16Matmul>(stream, n, gelu, false, 0.f),
                   {mx::contiguous(x, false, stream), w, mx::contiguous(bias, false, stream)});
}

// LayerNorm(x @ W.T + bias + residual) with gamma, beta [N].
mx::array bf16_matmul_norm(const mx::array& x, const mx::array& w, const mx::array& bias, long n,
                           const mx::array& residual, const mx::array& gamma, const mx::array& beta, float eps,
                           mx::StreamOrDevice s) {
  check(x, w, bias, n);
  if (residual.dtype() != mx::float32 || residual.size() != x.size() / x.shape(-1) * n ||
      gamma.dtype() != mx::float32 || beta.dtype() != mx::float32 || gamma.size() != (size_t)n ||
      beta.size() != (size_t)n)
    throw std::invalid_argument("bf16_matmul_norm: residual float32 [..., N], gamma and beta float32 [N]");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = (int)n;
  return mx::array(shape, mx::float32, std::make_shared<Bf16Matmul>(stream, n, false, true, eps),
                   {mx::contiguous(x, false, stream), w, mx::contiguous(bias, false, stream),
                    mx::contiguous(residual, false, stream), mx::contiguous(gamma, false, stream),
                    mx::contiguous(beta, false, stream)});
}

}  // namespace

NB_MODULE(_bf16_matmul, m) {
  kernelext::share_workers(m);
  m.doc() = "x @ W.T + b with W in bfloat16 panels, float32 accumulation (kernelext)";
  m.def("bf16_matmul", &bf16_matmul, "x"_a, "packed"_a, "bias"_a, "n"_a, "gelu"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("bf16_matmul_norm", &bf16_matmul_norm, "x"_a, "packed"_a, "bias"_a, "n"_a, "residual"_a, "gamma"_a,
        "beta"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("supported", &supported);
}
