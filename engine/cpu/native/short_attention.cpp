// Bidirectional attention of short packed sequences in one native call (encoder forwards on
// the CPU; see engine/cpu/encoder_attention.py for when and why).
//
// Input: qkv float32 [T][3H], the fused Q, K, V projections of T tokens: sequence s holds
// tokens [starts[s], starts[s+1]) and attends to its own tokens only, so no token, key or
// query, is padding. Per (sequence, head) task: scores = scale * q.k over the sequence's
// keys, softmax, then p.v, all in float32 without leaving the cache; the output [T][H]
// has the heads side by side, as the output projection reads them.
//
// Exactness: a token's result depends only on its own sequence: every score is one FMA
// chain over the head dimension in order, the softmax's max and sum run over the
// sequence's own length in a fixed order, and p.v is one chain over its keys in order,
// whatever the other sequences of the call and the thread split.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "exp_avx512.h"
#include "primitive.h"
#include "workers.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

#define KX_TARGET __attribute__((target("avx512f,avx512dq,fma")))

constexpr int kQueries = 4;  // query rows per pass: 4 x 4 score accumulators

struct Scratch {
  std::vector<float> kt;      // [D][width]: the sequence's keys of one head, transposed
  std::vector<float> scores;  // [kQueries][width]
};

// out rows i0.. = (sum_j e_j v_j) / sum for kQueries query rows at once (one load of v_j
// serves all four), j in order: one FMA chain per output element. DV = ceil(D/16) vectors.
template <int DV>
KX_TARGET void weighted_values_dv(const float* qkv, float* out, int H, int D, int h, long t0, int n, int i0,
                                  int rows, int width, const float* e, const float* inv) {
  const long ld = 3L * H;
  const __mmask16 last = D % 16 ? (__mmask16)((1u << (D % 16)) - 1) : (__mmask16)0xffff;
  __m512 o[kQueries][DV];
  for (int r = 0; r < kQueries; r++)
    for (int c = 0; c < DV; c++) o[r][c] = _mm512_setzero_ps();
  for (int j = 0; j < n; j++) {
    const float* v = qkv + (t0 + j) * ld + 2 * H + h * D;
    __m512 vv[DV];
    for (int c = 0; c < DV; c++) vv[c] = _mm512_maskz_loadu_ps(c == DV - 1 ? last : 0xffff, v + c * 16);
    for (int r = 0; r < kQueries; r++) {
      __m512 p = _mm512_set1_ps(e[(size_t)r * width + j]);
      for (int c = 0; c < DV; c++) o[r][c] = _mm512_fmadd_ps(p, vv[c], o[r][c]);
    }
  }
  for (int r = 0; r < rows; r++) {
    float* dst = out + (t0 + i0 + r) * (long)H + h * D;
    const __m512 scale = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < DV; c++)
      _mm512_mask_storeu_ps(dst + c * 16, c == DV - 1 ? last : 0xffff, _mm512_mul_ps(o[r][c], scale));
  }
}

void weighted_values(const float* qkv, float* out, int H, int D, int h, long t0, int n, int i0, int rows,
                     int width, const float* e, const float* inv) {
  switch ((D + 15) / 16) {
#define DV_CASE(k) \
  case k: weighted_values_dv<k>(qkv, out, H, D, h, t0, n, i0, rows, width, e, inv); break;
    DV_CASE(1) DV_CASE(2) DV_CASE(3) DV_CASE(4) DV_CASE(5) DV_CASE(6) DV_CASE(7) DV_CASE(8)
#undef DV_CASE
  }
}

// One (sequence, head): tokens [t0, t0 + n) of qkv (row stride 3H), head h of D dims.
KX_TARGET void attend(const float* qkv, float* out, int H, int D, int h, long t0, int n, float scale,
                      Scratch& s) {
  const long ld = 3L * H;
  const int width = (n + 15) / 16 * 16, blocks = width / 16;
  s.kt.assign((size_t)D * width, 0.f);
  s.scores.resize((size_t)kQueries * width);
  for (int j = 0; j < n; j++) {
    const float* k = qkv + (t0 + j) * ld + H + h * D;
    for (int d = 0; d < D; d++) s.kt[(size_t)d * width + j] = k[d];
  }
  const float* kt = s.kt.data();
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int i0 = 0; i0 < n; i0 += kQueries) {
    const int rows = std::min(kQueries, n - i0);
    const float* q[kQueries];
    for (int r = 0; r < kQueries; r++) q[r] = qkv + (t0 + i0 + std::min(r, rows - 1)) * ld + h * D;
    // scores[r][j] = scale * sum_d q[r][d] * k[j][d], d in order
    for (int b0 = 0; b0 < blocks; b0 += 4) {
      const int nb = std::min(4, blocks - b0);
      __m512 acc[kQueries][4];
      for (int r = 0; r < kQueries; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
      for (int d = 0; d < D; d++) {
        const float* row = kt + (size_t)d * width + b0 * 16;
        __m512 k0 = _mm512_loadu_ps(row), k1 = nb > 1 ? _mm512_loadu_ps(row + 16) : k0,
               k2 = nb > 2 ? _mm512_loadu_ps(row + 32) : k0, k3 = nb > 3 ? _mm512_loadu_ps(row + 48) : k0;
        for (int r = 0; r < kQueries; r++) {
          __m512 qv = _mm512_set1_ps(q[r][d]);
          acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
          acc[r][2] = _mm512_fmadd_ps(qv, k2, acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(qv, k3, acc[r][3]);
        }
      }
      const __m512 sc = _mm512_set1_ps(scale);
      for (int r = 0; r < rows; r++)
        for (int c = 0; c < nb; c++)
          _mm512_storeu_ps(s.scores.data() + (size_t)r * width + (b0 + c) * 16, _mm512_mul_ps(acc[r][c], sc));
    }
    float inv[kQueries];
    for (int r = 0; r < rows; r++) {
      float* sr = s.scores.data() + (size_t)r * width;
      // keys past n (the last block's tail) get weight exactly 0
      __m512 mx = neg_inf;
      for (int b = 0; b < blocks; b++) {
        int valid = std::min(16, n - b * 16);
        __mmask16 m = valid == 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(sr + b * 16));
      }
      const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int b = 0; b < blocks; b++) {
        int valid = std::min(16, n - b * 16);
        __mmask16 m = valid == 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
        __m512 e = _mm512_maskz_mov_ps(m, kernelext::exp_poly(_mm512_sub_ps(_mm512_loadu_ps(sr + b * 16), top)));
        _mm512_storeu_ps(sr + b * 16, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv[r] = 1.f / _mm512_reduce_add_ps(sum);
    }
    for (int r = rows; r < kQueries; r++)  // missing rows of the last group weigh nothing
      std::fill(s.scores.data() + (size_t)r * width, s.scores.data() + (size_t)(r + 1) * width, 0.f);
    weighted_values(qkv, out, H, D, h, t0, n, i0, rows, width, s.scores.data(), inv);
  }
}
bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

class ShortAttention : public mx::Primitive {
 public:
  ShortAttention(mx::Stream stream, int heads, float scale) : mx::Primitive(stream), heads_(heads), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& qkv = inputs[0];
    const mx::array& starts = inputs[1];
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    int H = qkv.shape(-1) / 3, heads = heads_, D = H / heads, S = starts.size() - 1;
    encoder.dispatch([qp = qkv.data<float>(), sp = starts.data<int32_t>(), op = out.data<float>(), H, D, S,
                      heads, scale = scale_, T = (long)(qkv.size() / (3L * H))]() {
      if (T == 0) return;
      std::fill(op, op + T * H, 0.f);  // tokens outside every sequence (none, normally)
      auto task = [&](int c) {
        thread_local Scratch scratch;
        int s = c / heads, h = c % heads;
        int n = sp[s + 1] - sp[s];
        if (n > 0 && sp[s] >= 0 && sp[s + 1] <= T) attend(qp, op, H, D, h, sp[s], n, scale, scratch);
      };
      kernelext::Workers& pool = kernelext::workers();
      pool.run(task, S * heads);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("short_attention runs on the CPU only");
  }
  const char* name() const override { return "ShortAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const ShortAttention&>(other);
    return heads_ == o.heads_ && scale_ == o.scale_;
  }

 private:
  int heads_;
  float scale_;
};

// qkv float32 [T, 3H], starts int32 [S + 1] (ascending, starts[S] <= T) -> [T, H].
mx::array short_attention(const mx::array& qkv, const mx::array& starts, int heads, float scale,
                          mx::StreamOrDevice s) {
  if (heads < 1 || qkv.dtype() != mx::float32 || qkv.ndim() != 2 || qkv.shape(1) % (3 * heads) != 0 ||
      qkv.shape(1) / 3 / heads > 128)
    throw std::invalid_argument("short_attention: qkv float32 [T, 3H], head size up to 128");
  if (starts.dtype() != mx::int32 || starts.ndim() != 1 || starts.size() < 1)
    throw std::invalid_argument("short_attention: starts int32 [S + 1]");
  if (!supported()) throw std::runtime_error("short_attention: this CPU lacks AVX-512");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  return mx::array({qkv.shape(0), qkv.shape(1) / 3}, mx::float32,
                   std::make_shared<ShortAttention>(stream, heads, scale),
                   {mx::contiguous(qkv, false, stream), mx::contiguous(starts, false, stream)});
}

}  // namespace

NB_MODULE(_short_attention, m) {
  kernelext::share_workers(m);
  m.doc() = "attention of short packed sequences, softmax fused (kernelext)";
  m.def("short_attention", &short_attention, "qkv"_a, "starts"_a, "heads"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("supported", &supported);
}
