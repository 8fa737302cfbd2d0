// Small-batch float32 matmul for decode and verify steps on the CPU (see engine/cpu/row_kernels.py).
#include <immintrin.h>

#include <algorithm>
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

constexpr int kBlock = 64;  // weight columns per block: 4 AVX-512 vectors
constexpr int kRows = 8;    // rows per kernel call: 8 x 4 accumulators = 32 registers
constexpr int kPrefetch = 32;  // weight rows ahead to prefetch (measured best here)
// Below both, a product runs on the calling thread alone.
constexpr size_t kParallelBytes = 512 << 10;   // of blocked weights
constexpr double kParallelMultiplyAdds = 4e6;

// Every output element is one fused multiply-add chain over k = 0..K-1 in order, for
// any number of rows, so a row's result does not depend on the rows beside it.
#define ZERO(m) __m512 a##m##0 = _mm512_setzero_ps(), a##m##1 = a##m##0, a##m##2 = a##m##0, a##m##3 = a##m##0;
#define FMA(m)                                                                         \
  s = _mm512_set1_ps(x##m[k]);                                                         \
  a##m##0 = _mm512_fmadd_ps(s, w0, a##m##0);                                           \
  a##m##1 = _mm512_fmadd_ps(s, w1, a##m##1);                                           \
  a##m##2 = _mm512_fmadd_ps(s, w2, a##m##2);                                           \
  a##m##3 = _mm512_fmadd_ps(s, w3, a##m##3);
#define STORE(m)                                                                       \
  if (m < rows) {                                                                      \
    float* o = out + (m) * ldo;                                                        \
    _mm512_storeu_ps(o, a##m##0); _mm512_storeu_ps(o + 16, a##m##1);                   \
    _mm512_storeu_ps(o + 32, a##m##2); _mm512_storeu_ps(o + 48, a##m##3);              \
  }
#define LOAD_W                                                                         \
  const float* w = wb + (size_t)k * kBlock;                                            \
  _mm_prefetch((const char*)(w + kPrefetch * kBlock), _MM_HINT_T0);                    \
  _mm_prefetch((const char*)(w + kPrefetch * kBlock + 16), _MM_HINT_T0);               \
  _mm_prefetch((const char*)(w + kPrefetch * kBlock + 32), _MM_HINT_T0);               \
  _mm_prefetch((const char*)(w + kPrefetch * kBlock + 48), _MM_HINT_T0);               \
  __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16),                        \
         w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48), s;

// rows (2..8) of x times one block of weights [K][64] into out (row stride ldo).
void kernel8(const float* x, long ldx, int rows, const float* wb, int K, float* out, long ldo) {
  // Rows past `rows` re-read row 0; their results are not stored.
  const float* x0 = x;
  const float* x1 = x + (rows > 1 ? 1 : 0) * ldx;
  const float* x2 = x + (rows > 2 ? 2 : 0) * ldx;
  const float* x3 = x + (rows > 3 ? 3 : 0) * ldx;
  const float* x4 = x + (rows > 4 ? 4 : 0) * ldx;
  const float* x5 = x + (rows > 5 ? 5 : 0) * ldx;
  const float* x6 = x + (rows > 6 ? 6 : 0) * ldx;
  const float* x7 = x + (rows > 7 ? 7 : 0) * ldx;
  ZERO(0) ZERO(1) ZERO(2) ZERO(3) ZERO(4) ZERO(5) ZERO(6) ZERO(7)
  for (int k = 0; k < K; k++) {
    LOAD_W
    FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7)
  }
  STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
}

void kernel1(const float* x, long, int rows, const float* wb, int K, float* out, long ldo) {
  const float* x0 = x;
  ZERO(0)
  for (int k = 0; k < K; k++) {
    LOAD_W
    FMA(0)
  }
  STORE(0)
}

// out[M, N] = x[M, K] @ W, W blocked [ceil(N/64)][K][64] (zero-padded columns),
// for weight blocks [b0, b1).
void multiply_blocks(const float* x, int M, int K, const float* wb, long N, float* out,
                     long b0, long b1) {
  alignas(64) float tail[kRows * kBlock];
  for (long b = b0; b < b1; b++) {
    const float* block = wb + (size_t)b * K * kBlock;
    long col = b * kBlock;
    bool partial = col + kBlock > N;
    for (int r = 0; r < M; r += kRows) {
      int rows = M - r < kRows ? M - r : kRows;
      float* dst = partial ? tail : out + (size_t)r * N + col;
      long ldo = partial ? kBlock : N;
      (rows == 1 ? kernel1 : kernel8)(x + (size_t)r * K, K, rows, block, K, dst, ldo);
      if (partial)
        for (int i = 0; i < rows; i++)
          std::copy(tail + i * kBlock, tail + i * kBlock + (N - col), out + (size_t)(r + i) * N + col);
    }
  }
}

class RowMatmul : public mx::Primitive {
 public:
  RowMatmul(mx::Stream stream, long n) : mx::Primitive(stream), n_(n) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& wb = inputs[1];
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    int K = wb.shape(1);
    int M = (int)(x.size() / K);
    long N = n_, blocks = wb.shape(0);
    encoder.dispatch([xp = x.data<float>(), wp = wb.data<float>(), op = out.data<float>(),
                      M, K, N, blocks]() {
      // A small product (a tiny model's layer) is done here: waking the workers would
      // cost more than it saves, and would keep them spinning for nothing.
      if ((size_t)blocks * K * kBlock * sizeof(float) < kParallelBytes &&
          (double)M * K * N < kParallelMultiplyAdds) {
        multiply_blocks(xp, M, K, wp, N, op, 0, blocks);
        return;
      }
      kernelext::Workers& pool = kernelext::workers();
      // A few chunks per thread: enough to balance, few enough to claim cheaply.
      int chunks = (int)std::min<long>(blocks, 8L * pool.size());
      pool.run([&](int c) {
        multiply_blocks(xp, M, K, wp, N, op, blocks * c / chunks, blocks * (c + 1) / chunks);
      }, chunks);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("row_matmul runs on the CPU only");
  }
  const char* name() const override { return "RowMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return n_ == static_cast<const RowMatmul&>(other).n_;
  }

 private:
  long n_;
};

mx::array row_matmul(const mx::array& x, const mx::array& wb, int n, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || wb.dtype() != mx::float32 || wb.ndim() != 3 ||
      wb.shape(2) != kBlock || x.shape(-1) != wb.shape(1) || (long)wb.shape(0) * kBlock < n ||
      (long)wb.shape(0) * kBlock >= n + kBlock)
    throw std::invalid_argument("row_matmul: x [..., K] float32 and blocked weights [ceil(N/64), K, 64]");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = n;
  return mx::array(shape, mx::float32, std::make_shared<RowMatmul>(stream, n),
                   {mx::contiguous(x, false, stream), wb});
}

}  // namespace

NB_MODULE(_row_matmul, m) {
  kernelext::share_workers(m);
  m.doc() = "x @ W for a few rows, W blocked for streaming (kernelext)";
  m.def("row_matmul", &row_matmul, "x"_a, "blocked_weights"_a, "n"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("supported", [] { return (bool)__builtin_cpu_supports("avx512f"); });
}
