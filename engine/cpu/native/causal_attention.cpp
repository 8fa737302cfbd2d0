// Attention of decoder queries over their cached keys, with one fixed summation per query
// (engine/models/row_attention.py says where and why).
//
// Inputs: q [B, Hq, L, D] (float32), k [B, Hkv, N, D], v [B, Hkv, N, Dv] (both float32 or both
// float16: a float16 KV cache is read as it is, each element widened exactly to float32, so
// it gives the bits its values give as float32; query head h reads KV head h / (Hq / Hkv)),
// and which keys each query sees: a mask [B, L, N] (uint8), or "causal" (query i sees keys
// 0 .. N - L + i), or none (all N). Keys are visited in the order t = 0 .. N - 1 at buffer
// index (t + ring) % N: a sliding-window cache that decodes in place keeps its keys in a
// ring whose oldest entry is at `ring`, so t is their order in time, as a prefilled cache
// holds them.
//
// Exactness: what a query computes depends only on its own q and the keys it sees, in
// time order, never on the other queries of the call (chunk size, batch rows, verify
// window), the buffer layout, its place in a tile or the thread split:
//  - a score is one FMA chain per lane over the head dimension in order (lane l holds
//    dims l, l + 16, ...), then the lanes summed by one fixed tree, times scale;
//  - the softmax's maximum is exact; exp is lane by lane; the sum of the weights runs in
//    16 lanes indexed from the query's first key, then one fixed tree;
//  - the output is one FMA chain per output element over the query's keys in time order,
//    times 1 / sum.
// A query whose visible keys are one run in time order (causal, sliding windows, left
// padding: every mask mlx-lm makes) thus gives the bits a lone decode step of it gives.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
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

#define KX_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,f16c,fma")))

constexpr int kTileRows = 16;   // query rows (positions x the heads of one KV head) per task
constexpr int kScoreRows = 4;   // score pass: 4 rows x 4 keys
constexpr int kScoreKeys = 4;
constexpr int kValueRows = 6;   // weighted-value pass: 6 rows x 64 output dims
constexpr int kValueVecs = 4;
constexpr int kPrefetchKeys = 16;  // how far ahead the passes prefetch their keys' rows
constexpr int kValueBlock = 64;    // keys a weighted-value pass takes before its next dimensions

struct Problem {
  const float* q;
  const void *k, *v;  // float, or uint16_t (float16) with `half`
  const uint8_t* mask;  // [B, L, N] or null
  float* out;           // [B, Hq, L, Dv]
  int B, Hq, Hkv, G, L, N, D, Dv, ring, positions;  // positions: query positions per task
  long ks[3], vs[3];  // element strides of k and v over batch, head, key (a cache's keys are
                      // often a slice of a longer buffer: read in place, not copied)
  bool causal, half;
  float scale;
  long key(int t) const {  // buffer index of the t-th key in time order
    int j = t + ring;
    return j >= N ? j - N : j;
  }
};

inline __mmask16 lanes(int n) {  // the first n (0..16) lanes
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// 16 (masked) keys' or values' elements as float32: T is float, or uint16_t holding float16
// (widened exactly).
template <typename T>
KX_TARGET inline __m512 load16(__mmask16 m, const T* p) {
  if constexpr (sizeof(T) == 2)
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  else
    return _mm512_maskz_loadu_ps(m, p);
}

// The keys query i of batch row b sees: [first, end) in time order; `holes` when the
// mask hides keys inside that run (no mask mlx-lm makes does; they then weigh exactly 0).
void visible_run(const Problem& p, int b, int i, int& first, int& end, bool& holes) {
  holes = false;
  if (p.mask != nullptr) {
    const uint8_t* m = p.mask + ((long)b * p.L + i) * p.N;
    int count = 0;
    first = -1, end = 0;
    for (int t = 0; t < p.N; t++)
      if (m[p.key(t)]) {
        if (first < 0) first = t;
        end = t + 1;
        count++;
      }
    if (first < 0) first = 0;
    holes = count != end - first;
  } else if (p.causal) {
    first = 0, end = std::clamp(p.N - p.L + i + 1, 0, p.N);
  } else {
    first = 0, end = p.N;
  }
}

// The 16 lane sums of v[0..15] as one vector, lane j = sum of v[j]'s lanes, every v[j]
// through the same tree: lanes (l, l + 2) then (l, l + 1) within each 128-bit block, then
// blocks (0 + 1) + (2 + 3). One score's bits thus do not depend on its slot.
KX_TARGET inline __m512 lane_sums16(const __m512 v[16]) {
  __m512 w[8], x[4], u[2];
  for (int i = 0; i < 8; i++)  // per block: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)  // per block: the block sums of v[4i .. 4i + 3]
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; i++)  // blocks 0 + 1 and 2 + 3 of x[2i], then of x[2i + 1]
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[r][t - base] = scale * q_r . k_t for kScoreRows rows and keys t in [lo, hi).
template <typename T>
KX_TARGET void score_rows(const Problem& p, const T* kbase, const float* const q[kScoreRows], int rows,
                          int lo, int hi, int base, float* scores, long stride) {
  static_assert(kScoreRows * kScoreKeys == 16, "one lane_sums16 per pass");
  const int dvecs = (p.D + 15) / 16;
  const __mmask16 tail = lanes(p.D - (dvecs - 1) * 16);
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int t = lo; t < hi; t += kScoreKeys) {
    const T* kp[kScoreKeys];
    for (int c = 0; c < kScoreKeys; c++) kp[c] = kbase + p.key(std::min(t + c, hi - 1)) * p.ks[2];
    for (int c = 0; c < kScoreKeys && t + kPrefetchKeys + c < hi; c++) {
      const char* ahead = (const char*)(kbase + p.key(t + kPrefetchKeys + c) * p.ks[2]);
      for (int b = 0; b < p.D * (int)sizeof(T); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    __m512 acc[kScoreRows * kScoreKeys];  // row r, key c at 4r + c
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int dv = 0; dv < dvecs; dv++) {
      const __mmask16 m = dv == dvecs - 1 ? tail : (__mmask16)0xffff;
      __m512 kv[kScoreKeys];
      for (int c = 0; c < kScoreKeys; c++) kv[c] = load16(m, kp[c] + dv * 16);
      for (int r = 0; r < kScoreRows; r++) {
        const __m512 qv = _mm512_maskz_loadu_ps(m, q[r] + dv * 16);
        for (int c = 0; c < kScoreKeys; c++) acc[4 * r + c] = _mm512_fmadd_ps(qv, kv[c], acc[4 * r + c]);
      }
    }
    alignas(64) float sums[16];  // 4r + c: row r, key t + c
    _mm512_store_ps(sums, _mm512_mul_ps(lane_sums16(acc), scale));
    const int keys = std::min(kScoreKeys, hi - t);
    for (int r = 0; r < rows; r++)
      for (int c = 0; c < keys; c++) scores[r * stride + (t + c - base)] = sums[4 * r + c];
  }
}

// Softmax weights of one row in place over its n scores; returns 1 / their sum. `visible`
// (null: all) marks the keys a mask with holes lets through.
KX_TARGET float softmax_row(float* s, int n, const uint8_t* visible) {
  if (n <= 0) return 0.f;
  if (visible != nullptr)
    for (int j = 0; j < n; j++)
      if (!visible[j]) s[j] = -INFINITY;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 16) top = _mm512_mask_max_ps(top, lanes(n - j), top, _mm512_loadu_ps(s + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    __mmask16 m = lanes(n - j);
    if (visible != nullptr)
      for (int l = 0; l < 16 && j + l < n; l++)
        if (!visible[j + l]) m &= (__mmask16)~(1u << l);
    const __m512 e = _mm512_maskz_mov_ps(m, kernelext::exp_poly(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), mx)));
    _mm512_mask_storeu_ps(s + j, lanes(n - j), e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// acc_r[0 .. 64) += sum over t in [lo, hi) of w_r[t] v_t[d0 .. d0 + 64), t ascending, for
// R <= kValueRows rows (a row adds only its keys [first_r, end_r)): one load of v_t serves
// them all. acc holds R x 64 floats between calls: a task walks its keys in blocks and its
// dimensions within each block, so it reads its part of each row at once (the rows of a
// block stay in cache for the next 64 dimensions), and every output element is still one
// FMA chain over its keys in time order. `prefetch`: bytes of each row from d0 to fetch
// kPrefetchKeys keys ahead (0: none; the block's first pass fetches for the others).
template <int R, typename T>
KX_TARGET void weigh_values(const Problem& p, const T* vbase, const float* const w[kValueRows],
                            const int* first, const int* end, float* acc_mem, int rows, int lo, int hi,
                            int d0, int prefetch) {
  const int nd = std::min(kValueVecs * 16, p.Dv - d0);
  __mmask16 lm[kValueVecs];
  for (int c = 0; c < kValueVecs; c++) lm[c] = lanes(nd - c * 16);
  __m512 acc[R][kValueVecs];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < kValueVecs; c++) acc[r][c] = _mm512_loadu_ps(acc_mem + (r * kValueVecs + c) * 16);
  for (int t = lo; t < hi; t++) {
    const T* vr = vbase + p.key(t) * p.vs[2] + d0;
    if (prefetch > 0 && t + kPrefetchKeys < hi) {  // a task reads part of each row: a
      // stride the hardware prefetcher does not follow, so each row would wait on DRAM
      const char* ahead = (const char*)(vbase + p.key(t + kPrefetchKeys) * p.vs[2] + d0);
      for (int c = 0; c < prefetch; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
    }
    __m512 vv[kValueVecs];
    for (int c = 0; c < kValueVecs; c++) vv[c] = load16(lm[c], vr + c * 16);
    for (int r = 0; r < R; r++) {
      // rows outside their run, or missing, add nothing (no 0 * v term either)
      const __mmask16 on = r < rows && t >= first[r] && t < end[r] ? (__mmask16)0xffff : (__mmask16)0;
      const __m512 wt = _mm512_set1_ps(w[r][t]);
      for (int c = 0; c < kValueVecs; c++) acc[r][c] = _mm512_mask3_fmadd_ps(wt, vv[c], acc[r][c], on);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < kValueVecs; c++) _mm512_storeu_ps(acc_mem + (r * kValueVecs + c) * 16, acc[r][c]);
}

// One tile: query positions [i0, i0 + positions) of batch row b, the G query heads of KV
// head g (row r = position r / G, head g * G + r % G). Its three phases touch disjoint
// parts (scores of a key range, softmax of a row, outputs of a dimension range), and each
// element's arithmetic is the same however the phases are split: a call with many tiles
// runs each tile whole on one thread, keeping its scores in cache (`attend_tile`); one
// with few (a decode step) splits them over the threads (`attend_split`).
struct Tile {
  int b = 0, g = 0, i0 = 0, rows = 0, lo = 0, hi = 0;
  long stride = 0;                  // scores per row; row r's weight of key t: scores[r * stride + t - lo]
  std::vector<int> first, end;      // per row: its visible keys [first, end) in time order
  std::vector<uint8_t> holes;       // per row: the mask hides keys inside that run
  std::vector<float> scores, inv;   // inv: 1 / the row's softmax sum
};

void tile_runs(const Problem& p, int b, int g, int i0, Tile& t) {
  const int positions = std::min(p.positions, p.L - i0);
  t.b = b, t.g = g, t.i0 = i0, t.rows = positions * p.G, t.lo = p.N, t.hi = 0;
  t.first.resize(t.rows), t.end.resize(t.rows), t.holes.resize(t.rows), t.inv.resize(t.rows);
  for (int pi = 0; pi < positions; pi++) {
    int first, end;
    bool holes;
    visible_run(p, b, i0 + pi, first, end, holes);
    end = std::max(first, end);
    if (end > first) t.lo = std::min(t.lo, first), t.hi = std::max(t.hi, end);
    for (int h = 0; h < p.G; h++) t.first[pi * p.G + h] = first, t.end[pi * p.G + h] = end, t.holes[pi * p.G + h] = holes;
  }
  t.stride = std::max(0, t.hi - t.lo) + 16;
  t.scores.resize((size_t)t.rows * t.stride);
}

// Scores of keys [k0, k1) for every row of the tile.
template <typename T>
KX_TARGET void tile_scores(const Problem& p, Tile& t, int k0, int k1) {
  const T* kbase = (const T*)p.k + t.b * p.ks[0] + t.g * p.ks[1];
  for (int r0 = 0; r0 < t.rows; r0 += kScoreRows) {
    const int n = std::min(kScoreRows, t.rows - r0);
    const float* q[kScoreRows];
    int glo = p.N, ghi = 0;
    for (int r = 0; r < kScoreRows; r++) {
      const int rr = r0 + std::min(r, n - 1);
      q[r] = p.q + (((long)t.b * p.Hq + t.g * p.G + rr % p.G) * p.L + t.i0 + rr / p.G) * p.D;
      if (t.end[rr] > t.first[rr]) glo = std::min(glo, t.first[rr]), ghi = std::max(ghi, t.end[rr]);
    }
    glo = std::max(glo, k0), ghi = std::min(ghi, k1);
    if (glo < ghi) score_rows(p, kbase, q, n, glo, ghi, t.lo, t.scores.data() + r0 * t.stride, t.stride);
  }
}

void tile_softmax(const Problem& p, Tile& t, int r, std::vector<uint8_t>& visible) {
  const int n = t.end[r] - t.first[r];
  const uint8_t* shown = nullptr;
  if (t.holes[r]) {
    visible.resize(n);
    const uint8_t* m = p.mask + ((long)t.b * p.L + t.i0 + r / p.G) * p.N;
    for (int j = 0; j < n; j++) visible[j] = m[p.key(t.first[r] + j)];
    shown = visible.data();
  }
  t.inv[r] = softmax_row(t.scores.data() + r * t.stride + (t.first[r] - t.lo), n, shown);
}

// Outputs [d0, d1) (multiples of 64 but the last) of every row of the tile.
template <typename T>
KX_TARGET void tile_values(const Problem& p, Tile& t, int d0, int d1) {
  const T* vbase = (const T*)p.v + t.b * p.vs[0] + t.g * p.vs[1];
  for (int r0 = 0; r0 < t.rows; r0 += kValueRows) {
    const int n = std::min(kValueRows, t.rows - r0);
    const float* w[kValueRows];
    float* dst[kValueRows];
    int f[kValueRows], e[kValueRows], glo = p.N, ghi = 0;
    float iv[kValueRows];
    for (int r = 0; r < kValueRows; r++) {
      const int rr = r0 + std::min(r, n - 1);
      w[r] = t.scores.data() + rr * t.stride - t.lo;
      dst[r] = p.out + (((long)t.b * p.Hq + t.g * p.G + rr % p.G) * p.L + t.i0 + rr / p.G) * p.Dv;
      f[r] = t.first[rr], e[r] = t.end[rr], iv[r] = t.inv[rr];
      if (r < n && e[r] > f[r]) glo = std::min(glo, f[r]), ghi = std::max(ghi, e[r]);
    }
    if (glo >= ghi) {  // no key at all: zeros
      for (int r = 0; r < n; r++) std::fill(dst[r] + d0, dst[r] + d1, 0.f);
      continue;
    }
    const int chunks = (d1 - d0 + kValueVecs * 16 - 1) / (kValueVecs * 16), per_chunk = kValueRows * kValueVecs * 16;
    thread_local std::vector<float> acc;
    acc.assign((size_t)chunks * per_chunk, 0.f);
    for (int t0 = glo; t0 < ghi; t0 += kValueBlock) {
      const int t1 = std::min(ghi, t0 + kValueBlock);
      for (int c = 0; c < chunks; c++) {
        const int d = d0 + c * kValueVecs * 16, prefetch = c == 0 ? (d1 - d0) * (int)sizeof(T) : 0;
        if (n <= 4)  // a decode step's rows (4 query heads a KV head): no idle accumulators
          weigh_values<4>(p, vbase, w, f, e, acc.data() + c * per_chunk, n, t0, t1, d, prefetch);
        else
          weigh_values<kValueRows>(p, vbase, w, f, e, acc.data() + c * per_chunk, n, t0, t1, d, prefetch);
      }
    }
    for (int r = 0; r < n; r++) {  // times 1 / the row's softmax sum
      const __m512 scale = _mm512_set1_ps(iv[r]);
      for (int d = d0; d < d1; d += 16) {
        const float* a = acc.data() + (d - d0) / (kValueVecs * 16) * per_chunk + (r * kValueVecs + (d - d0) / 16 % kValueVecs) * 16;
        _mm512_mask_storeu_ps(dst[r] + d, lanes(d1 - d), _mm512_mul_ps(_mm512_loadu_ps(a), scale));
      }
    }
  }
}

template <typename T>
void attend_tile(const Problem& p, int b, int g, int i0) {
  thread_local Tile t;
  thread_local std::vector<uint8_t> visible;
  tile_runs(p, b, g, i0, t);
  tile_scores<T>(p, t, 0, p.N);
  for (int r = 0; r < t.rows; r++) tile_softmax(p, t, r, visible);
  tile_values<T>(p, t, 0, p.Dv);
}

constexpr int kSplitKeys = 256;  // keys per scoring task when a call's tiles are split
constexpr int kSplitDims = 128;  // output dimensions per weighted-value task then: half of a
                                 // 256-dim row each, read as one run

template <typename T>
void attend_split(const Problem& p, int tiles_per_bg) {
  const int tiles = p.B * p.Hkv * tiles_per_bg;
  std::vector<Tile> ts(tiles);
  auto& pool = kernelext::workers();
  for (int c = 0; c < tiles; c++) {
    const int bg = c / tiles_per_bg;
    tile_runs(p, bg / p.Hkv, bg % p.Hkv, c % tiles_per_bg * p.positions, ts[c]);
  }
  const int key_chunks = (p.N + kSplitKeys - 1) / kSplitKeys, dim_chunks = (p.Dv + kSplitDims - 1) / kSplitDims;
  pool.run([&](int c) { tile_scores<T>(p, ts[c / key_chunks], c % key_chunks * kSplitKeys,
                                    std::min(p.N, (c % key_chunks + 1) * kSplitKeys)); }, tiles * key_chunks);
  for (auto& t : ts) {
    thread_local std::vector<uint8_t> visible;
    for (int r = 0; r < t.rows; r++) tile_softmax(p, t, r, visible);
  }
  pool.run([&](int c) { tile_values<T>(p, ts[c / dim_chunks], c % dim_chunks * kSplitDims,
                                    std::min(p.Dv, (c % dim_chunks + 1) * kSplitDims)); }, tiles * dim_chunks);
}

// Keys or values whose last dimension is not dense (never from mlx-lm's caches), copied
// dense, as raw elements of 4 (float32) or 2 (float16) bytes.
std::shared_ptr<std::vector<uint32_t>> dense_copy(const mx::array& a) {
  return a.strides()[3] == 1 ? nullptr : std::make_shared<std::vector<uint32_t>>((a.size() * a.itemsize() + 3) / 4);
}

template <typename T>
const void* fill_dense(const mx::array& a, std::vector<uint32_t>& buffer) {
  const T* src = a.data<T>();
  T* dst = (T*)buffer.data();
  long i = 0;
  for (int d0 = 0; d0 < a.shape(0); d0++)
    for (int d1 = 0; d1 < a.shape(1); d1++)
      for (int d2 = 0; d2 < a.shape(2); d2++)
        for (int d3 = 0; d3 < a.shape(3); d3++)
          dst[i++] = src[d0 * a.strides()[0] + d1 * a.strides()[1] + d2 * a.strides()[2] + d3 * a.strides()[3]];
  return dst;
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
}

template <typename T>
void attend(Problem& p, const mx::array& k, const mx::array& v, std::vector<uint32_t>* dense_k,
            std::vector<uint32_t>* dense_v) {
  if (dense_k) p.k = fill_dense<T>(k, *dense_k);
  if (dense_v) p.v = fill_dense<T>(v, *dense_v);
  if (p.N == 0) {
    std::fill(p.out, p.out + (long)p.B * p.Hq * p.L * p.Dv, 0.f);
    return;
  }
  const int tiles = (p.L + p.positions - 1) / p.positions;
  kernelext::Workers& pool = kernelext::workers();
  if (p.B * p.Hkv * tiles < pool.size() && p.N > kSplitKeys) return attend_split<T>(p, tiles);
  pool.run([&](int c) { attend_tile<T>(p, c / tiles / p.Hkv, c / tiles % p.Hkv, c % tiles * p.positions); },
           p.B * p.Hkv * tiles);
}

class CausalAttention : public mx::Primitive {
 public:
  CausalAttention(mx::Stream stream, float scale, int ring, bool causal)
      : mx::Primitive(stream), scale_(scale), ring_(ring), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array &q = inputs[0], &k = inputs[1], &v = inputs[2];
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    Problem p{};
    p.half = k.dtype() == mx::float16;
    p.q = q.data<float>(), p.k = k.data<void>(), p.v = v.data<void>(), p.out = out.data<float>();
    p.mask = inputs.size() > 3 ? inputs[3].data<uint8_t>() : nullptr;
    p.B = q.shape(0), p.Hq = q.shape(1), p.L = q.shape(2), p.D = q.shape(3);
    p.Hkv = k.shape(1), p.N = k.shape(2), p.Dv = v.shape(3), p.G = p.Hq / p.Hkv;
    p.ring = p.N > 0 ? ((ring_ % p.N) + p.N) % p.N : 0;
    for (int i = 0; i < 3; i++) p.ks[i] = k.strides()[i], p.vs[i] = v.strides()[i];
    p.causal = causal_, p.scale = scale_;
    p.positions = std::max(1, kTileRows / p.G);
    // A last dimension that is not dense (never from mlx-lm's caches) is copied first.
    auto dense_k = dense_copy(k), dense_v = dense_copy(v);
    if (dense_k) p.ks[0] = (long)p.Hkv * p.N * p.D, p.ks[1] = (long)p.N * p.D, p.ks[2] = p.D;
    if (dense_v) p.vs[0] = (long)p.Hkv * p.N * p.Dv, p.vs[1] = (long)p.N * p.Dv, p.vs[2] = p.Dv;
    encoder.dispatch([p, k, v, dense_k, dense_v]() mutable {
      if (p.half)
        attend<uint16_t>(p, k, v, dense_k.get(), dense_v.get());
      else
        attend<float>(p, k, v, dense_k.get(), dense_v.get());
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("causal_attention runs on the CPU only");
  }
  const char* name() const override { return "CausalAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CausalAttention&>(other);
    return scale_ == o.scale_ && ring_ == o.ring_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  int ring_;
  bool causal_;
};

mx::array causal_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           const std::optional<mx::array>& mask, bool causal, int ring, float scale,
                           mx::StreamOrDevice s) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.dtype() != mx::float32 ||
      (k.dtype() != mx::float32 && k.dtype() != mx::float16) || v.dtype() != k.dtype())
    throw std::invalid_argument(
        "causal_attention: q float32, k and v both float32 or both float16, each [B, heads, length, dims]");
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), Hkv = k.shape(1), N = k.shape(2);
  if (k.shape(0) != B || v.shape(0) != B || v.shape(1) != Hkv || v.shape(2) != N || k.shape(3) != q.shape(3) ||
      Hkv < 1 || Hq % Hkv != 0 || Hq / Hkv > 8 * kTileRows)
    throw std::invalid_argument("causal_attention: shapes do not match (query heads a multiple of KV heads)");
  if (mask && (mask->dtype() != mx::uint8 || mask->ndim() != 3 || mask->shape(0) != B || mask->shape(1) != L ||
               mask->shape(2) != N))
    throw std::invalid_argument("causal_attention: mask uint8 [B, L, N]");
  if (!supported()) throw std::runtime_error("causal_attention: this CPU lacks AVX-512");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  // k and v are read through their strides; eval_cpu needs only their last dimension dense,
  // which a cache's slice always is (checked there: strides are known only once evaluated).
  std::vector<mx::array> inputs = {mx::contiguous(q, false, stream), k, v};
  if (mask) inputs.push_back(mx::contiguous(*mask, false, stream));
  return mx::array({B, Hq, L, v.shape(3)}, mx::float32,
                   std::make_shared<CausalAttention>(stream, scale, ring, causal && !mask), inputs);
}

}  // namespace

NB_MODULE(_causal_attention, m) {
  kernelext::share_workers(m);
  m.doc() = "decoder attention with one fixed summation per query (kernelext)";
  m.def("causal_attention", &causal_attention, "q"_a, "k"_a, "v"_a, "mask"_a = nb::none(), "causal"_a = false,
        "ring"_a = 0, "scale"_a = 1.0f, nb::kw_only(), "stream"_a = nb::none());
  m.def("supported", &supported);
}
