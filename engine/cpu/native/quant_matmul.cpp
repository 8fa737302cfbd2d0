// Products with quantized weights on the CPU, straight from their integer blocks (see
// engine/cpu/quant_layout.py for the layout and why).
//
// Weights: tiles of 16 outputs; per tile, per group of 32 inputs (k), `group_bytes`:
//   values    8 "steps" of 4 consecutive k for 16 outputs, [output (16)][k%4 (4)] = 64
//             bytes a step, the operand layout of vpdpbusd:
//               8 bits:   512 bytes, step after step
//               4-6 bits: 256 bytes of nibbles, steps 2p and 2p+1 in the low and high
//                         nibbles of vector p, then one 64-byte bit plane per bit above 4
//                         (bit i of a step's 8 bytes: byte i of that step)
//   then      float32 scales [subs][16]: subs = 1 (one per 32 k) or 2 (one per 16 k)
//   then      float32 offsets [16] when the format has them (K-quant minimums, mlx biases)
// Formats whose scales are float16 in the file, with one per 32 k and no offsets (Q4_0,
// Q5_0, Q8_0), keep them as float16 ("half"), two groups at a time, when a row has an even
// number of groups: values of group 2p, values of group 2p + 1, then both groups' 16
// scales (64 bytes). Q8_0 then costs the file's 8.5 bits a weight instead of 9; the
// scales convert exactly, so the products keep their bits.
// mlx-lm's affine checkpoints, whose scales and biases are float16 or bfloat16, keep them
// so too, in runs of the groups that share them (`share`: the checkpoint's group size / 32,
// 1, 2 or 4): the run's values, then its 16-bit scales [16] and offsets [16] (64 bytes).
// A 4-bit weight at mlx-lm's default group size 64 then costs the checkpoint's 4.5 bits.
// The K-quants (Q4_K, Q5_K, Q6_K) keep their integer scales ("ints"), 8 groups to a
// superblock: the 8 groups' values, then per group its integer scales [subs][16] (Q6_K:
// int8) and, with offsets, integer minimums [16] (uint8), 32 bytes a group, then the
// superblock's bases d [16] and dmin [16] as float16 (64 bytes). A scale is d * integer
// and an offset -(dmin * integer), both exact in float32: the same values, and bits, as
// float32 scales and offsets stored whole. Q4_K then costs 4.625 bits a weight, not 6.
// Every part is a multiple of 64 bytes, so each vector load is aligned, and a product
// reads one sequential stream (a layout with a tile's scales apart from its values, at
// float16, saved 6% more bytes but ran large products 30% slower: the hardware
// prefetcher follows one stream well and two poorly).
// A weight is scale * (u - zero) + offset.
//
// Activations are quantized per row per 32 k to two int8 levels (see Acts; the output
// projection multiplies the first only). A group's
// contribution to output j of a row is, level by level,
//   acc_j += float(isum_j - zero * xsum) * scale_j * dx  (+ offset_j * dxsum)
// with the integer dot product isum exact, and the float steps in a fixed order over k:
// a row's bits never depend on the other rows of the call, on the number of rows or
// threads, on the instruction set (the AVX2 path reaches the same integers), or on how
// the values are packed (nibbles give the bits bytes gave).
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

constexpr int kTile = 16;        // outputs per tile: one AVX-512 vector of floats
constexpr int kGroup = 32;       // k per group
constexpr int kRows = 8;         // rows per kernel pass (8 int + 8 float accumulators)
constexpr int kRowBlock = 64;    // rows whose activations stay in cache while tiles pass
// Below both (few rows, a small matrix): the calling thread alone. The byte bound depends
// on the pool: where workers spin, a wake is cheap and a product of 256 KB pays for it;
// where they sleep (2 cores, workers.h), a decode step's trunk products (0.5-2 MB each,
// ~80 a step on Gemma 3 270M) ran no faster on two threads than on one, and each woke a
// worker through the kernel. On one thread, with the prefetch below, single-stream decode
// ran at 89 tok/s against 76 (median of 18 runs each, interleaved).
constexpr size_t kParallelBytesSpinning = 256 << 10;
constexpr size_t kParallelBytesSleeping = 4 << 20;
constexpr double kParallelMultiplyAdds = 4e6;
// How far ahead of the kernel its weights are prefetched, every cache line of a group.
// Four groups ahead (1-2 KB of nibble formats) left a small product's stream to the
// hardware prefetcher, which stops at each 4 KB page: 4 KB ahead ran the trunk's products
// ~10% faster and 8 streams ~18% (8 KB and 2 KB: less).
constexpr int kPrefetchBytes = 4096;

struct Format {
  int subs;        // scales per group: 1 (per 32 k) or 2 (per 16 k)
  bool offsets;    // a float offset per output per group
  int zero;        // subtracted from every u8 value
  bool wide;       // values use all 8 bits (the AVX2 path then multiplies in signed form)
  int bits;        // 4, 5, 6 (nibbles and bit planes) or 8 (bytes)
  int levels;      // activation levels multiplied (see Acts): 2, or 1 for the output projection
  bool half;       // 16-bit scales (subs 1): groups in pairs, or with 16-bit offsets (see the top)
  bool bf16;       // those are bfloat16, not float16
  bool ints;       // integer scales on float16 bases, superblocks of 8 groups (see the top)
  int share_shift; // half scales with offsets: log2 of the groups in a run sharing them
  int value_bytes() const { return bits == 8 ? 512 : 256 + (bits - 4) * 64; }
  // Bytes a group: with half scales, half of a pair's (2 * values + 64), or with offsets
  // its share of a run's (share * values + 64); with integer scales, an eighth of a
  // superblock's (8 * values + 8 * 32 + 64).
  int group_bytes() const {
    return half ? value_bytes() + (offsets ? 64 >> share_shift : 32)
                : ints ? value_bytes() + 40 : value_bytes() + 64 * subs + (offsets ? 64 : 0);
  }
};

constexpr int kSuper = 8;  // groups per superblock of integer scales

// Where group g of a tile lies in the layout (see the top): its values, its 16-bit scales
// (and offsets) with half scales, its superblock's first values with integer scales; else
// its float32 scales follow its values. One place for the three readers (the VNNI and
// AVX2 tiles, the embedding rows); the VNNI tile passes its layout as constants, so the
// branches fold away there. vb, gb: value and group bytes; shift: Format::share_shift.
struct GroupAt {
  const uint8_t* values;
  const uint16_t* halves = nullptr;
  const uint8_t* super_values = nullptr;
};

__attribute__((always_inline)) inline GroupAt group_at(const uint8_t* tile, long g, bool half, bool offsets,
                                                       bool ints, int shift, int vb, int gb) {
  if (half && offsets) {  // group g % share of run g / share
    const uint8_t* run = tile + (size_t)(g >> shift) * ((vb << shift) + 64);
    return {run + (g & ((1 << shift) - 1)) * vb, (const uint16_t*)(run + (vb << shift))};
  }
  if (half) {  // group g of pair g / 2
    const uint8_t* pair = tile + (size_t)(g / 2) * 2 * gb;
    return {pair + (g & 1) * vb, (const uint16_t*)(pair + 2 * vb) + (g & 1) * 16};
  }
  if (ints) {  // group g % 8 of superblock g / 8
    const uint8_t* super_values = tile + (size_t)(g / kSuper) * kSuper * gb;
    return {super_values + (g % kSuper) * vb, nullptr, super_values};
  }
  return {tile + (size_t)g * gb};
}

// 16 scales (or offsets) stored as float16 or bfloat16, as float32 (exact either way).
__attribute__((target("avx512f,avx512bw"), always_inline))
inline __m512 sixteen_ps(const void* p, bool bf16) {
  __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

// Scales (SUB: 0 or 1) or, with OFFSET, offsets of group j of a superblock of integer
// scales at `super_values` (its first group's values): integer times base, in float32.
template <bool OFFSET, bool SIGNED>
__attribute__((target("avx512f,avx512bw"), always_inline))
inline __m512 int_scales(const uint8_t* super_values, int value_bytes, int j, int sub) {
  const uint8_t* ints = super_values + kSuper * value_bytes + j * 32 + sub * 16;
  const uint16_t* bases = (const uint16_t*)(super_values + kSuper * value_bytes + kSuper * 32) + (OFFSET ? 16 : 0);
  __m128i i8 = _mm_loadu_si128((const __m128i*)ints);
  __m512i i32 = SIGNED ? _mm512_cvtepi8_epi32(i8) : _mm512_cvtepu8_epi32(i8);
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(i32), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)bases)));
  if (OFFSET) v = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u)));
  return v;
}

bool same_format(const Format& a, const Format& b) {
  return a.subs == b.subs && a.offsets == b.offsets && a.zero == b.zero && a.wide == b.wide &&
         a.bits == b.bits && a.levels == b.levels && a.half == b.half && a.bf16 == b.bf16 && a.ints == b.ints &&
         a.share_shift == b.share_shift;
}

// Activations of M rows, quantized per 32 k in two int8 levels: x ~ dx * q + dx2 * q2,
// q the nearest int8 step of x at amax / 127 (llama.cpp's q8_0) and q2 that rounding's
// remainder at 1/254 of the step. One level alone gave 97.2% top-1 agreement with the
// float32 model on 20k tokens (the issue asks 98%): most of the disagreements were
// near-ties that int8 activation noise tipped, and a float-exact trunk gave 98.6%. The
// second level makes activations ~16-bit (error <= amax / 64,516) for one more vpdpbusd
// per weight vector. A product multiplies both levels, or the first alone (Format::levels:
// the output projection, engine/cpu/quant_linear.py output_levels; 98.7% top-1 on the
// default model, against 99.98% with two levels there too and 12-15% slower decode).
struct Acts {
  int M, K, groups;
  std::vector<int8_t> q, q2;          // [M][K]
  std::vector<float> dx, dx2;         // [M][groups]
  std::vector<int32_t> sum16, sum16b; // [M][groups * 2] sums of q, q2 per 16 k
  std::vector<float> dxsum1, dxsum;   // [M][groups] dx * sum(q) (+ dx2 * sum(q2)): offsets

  Acts(int M_, int K_) : M(M_), K(K_), groups(K_ / kGroup) {
    q.resize((size_t)M * K);
    q2.resize((size_t)M * K);
    dx.resize((size_t)M * groups);
    dx2.resize((size_t)M * groups);
    sum16.resize((size_t)M * groups * 2);
    sum16b.resize((size_t)M * groups * 2);
    dxsum1.resize((size_t)M * groups);
    dxsum.resize((size_t)M * groups);
  }
  // Rows [r0, r1) of x. Each row on its own: the same bits whatever the split.
  void quantize_rows(const float* x, int r0, int r1) {
    for (int r = r0; r < r1; r++)
      for (int g = 0; g < groups; g++) {
        size_t i = (size_t)r * groups + g, at = (size_t)r * K + g * kGroup;
        quantize_group(x + at, q.data() + at, q2.data() + at, dx[i], &sum16[i * 2], &sum16b[i * 2]);
        dx2[i] = dx[i] / 254.f;
        dxsum1[i] = dx[i] * (float)(sum16[i * 2] + sum16[i * 2 + 1]);
        dxsum[i] = dxsum1[i] + dx2[i] * (float)(sum16b[i * 2] + sum16b[i * 2 + 1]);
      }
  }

  // 32 values -> q = round(v * 127 / amax) (half to even), d = amax / 127,
  // q2 = round((v * 127 / amax - q) * 254), and the sums of q and q2 over each 16.
  // AVX2: both kernel paths run it (the CPU check requires AVX2).
  __attribute__((target("avx2,fma")))
  static void quantize_group(const float* v, int8_t* qq, int8_t* qq2, float& d, int32_t* s, int32_t* s2) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 a[4] = {_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8), _mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)};
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                             _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    d = amax / 127.f;
    const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f), fine = _mm256_set1_ps(254.f);
    __m256i i[4], j[4];
    for (int c = 0; c < 4; c++) {
      __m256 f = _mm256_mul_ps(a[c], id);
      i[c] = _mm256_cvtps_epi32(f);
      // f - q is exact (both within one step of each other) and within [-0.5, 0.5].
      j[c] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(f, _mm256_cvtepi32_ps(i[c])), fine));
    }
    s[0] = hsum(_mm256_add_epi32(i[0], i[1]));
    s[1] = hsum(_mm256_add_epi32(i[2], i[3]));
    s2[0] = hsum(_mm256_add_epi32(j[0], j[1]));
    s2[1] = hsum(_mm256_add_epi32(j[2], j[3]));
    store_int8(i, qq);
    store_int8(j, qq2);
  }
  // int32 -> int8 in order (packs interleave 128-bit lanes; the permute undoes it).
  __attribute__((target("avx2")))
  static void store_int8(const __m256i* v, int8_t* out) {
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)out, p);
  }
  __attribute__((target("avx2")))
  static int hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  }
};

// ---- AVX-512 VNNI ------------------------------------------------------------------

// The 64 values of steps 2p and 2p+1 of a group (BITS 4-6: from nibble vector p and the
// bit planes; a bit plane's 8 bytes of a step are one AVX-512 byte mask).
template <int BITS>
__attribute__((target("avx512f,avx512bw"), always_inline))
inline void step_pair_vnni(const uint8_t* w, int p, __m512i& w0, __m512i& w1) {
  if constexpr (BITS == 8) {
    w0 = _mm512_loadu_si512(w + 2 * p * 64);
    w1 = _mm512_loadu_si512(w + (2 * p + 1) * 64);
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i nib = _mm512_loadu_si512(w + p * 64);
    w0 = _mm512_and_si512(nib, low4);
    w1 = _mm512_and_si512(_mm512_srli_epi16(nib, 4), low4);
    for (int b = 0; b < BITS - 4; b++) {
      const uint8_t* plane = w + 256 + b * 64 + 2 * p * 8;
      uint64_t m0, m1;
      std::memcpy(&m0, plane, 8);
      std::memcpy(&m1, plane + 8, 8);
      const __m512i bit = _mm512_set1_epi8((char)(16 << b));
      w0 = _mm512_or_si512(w0, _mm512_maskz_mov_epi8(_cvtu64_mask64(m0), bit));
      w1 = _mm512_or_si512(w1, _mm512_maskz_mov_epi8(_cvtu64_mask64(m1), bit));
    }
  }
}

// SUBS, OFFSETS, BITS and the levels L are compile-time so the k loop unrolls. Integer accumulators per
// row and level: two (even and odd steps) for one or two rows, whose dependency chains
// would otherwise bound a decode step, one for more (registers); integer sums are exact,
// so this changes no bit.
template <int R, int SUBS, bool OFFSETS, int BITS, int L, bool HALF, bool INTS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
void tile_vnni(const uint8_t* tile, const Format& f, const Acts& a, int r0, float* out, long ldo,
               int valid) {
  constexpr int kPairs = 4 / SUBS;  // step pairs per scale
  constexpr int kValueBytes = BITS == 8 ? 512 : 256 + (BITS - 4) * 64;
  constexpr int kGroupBytes = HALF ? kValueBytes + (OFFSETS ? 64 : 32)  // runs of one group
                              : INTS ? kValueBytes + 40
                                     : kValueBytes + 64 * SUBS + (OFFSETS ? 64 : 0);
  const int shift = f.share_shift;
  const int group_bytes = HALF && OFFSETS ? kValueBytes + (64 >> shift) : kGroupBytes;
  static_assert(!HALF || SUBS == 1, "half scales: one per group");
  constexpr int C = R <= 2 ? 2 : 1;
  const int groups = a.groups, zero = f.zero;
  const int8_t* xq[R][2];
  const float* dx[R][2];
  const int32_t* sum16[R][2];
  const float* dxsum[R];
  for (int r = 0; r < R; r++) {
    size_t row = (size_t)(r0 + r);
    xq[r][0] = a.q.data() + row * a.K;
    xq[r][1] = a.q2.data() + row * a.K;
    dx[r][0] = a.dx.data() + row * groups;
    dx[r][1] = a.dx2.data() + row * groups;
    sum16[r][0] = a.sum16.data() + row * groups * 2;
    sum16[r][1] = a.sum16b.data() + row * groups * 2;
    dxsum[r] = (L == 2 ? a.dxsum : a.dxsum1).data() + row * groups;
  }
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int g = 0; g < groups; g++) {
    const uint8_t* stream = tile + (size_t)g * group_bytes;  // the stream's position: a group's share
    for (int line = 0; line < group_bytes; line += 64)
      _mm_prefetch((const char*)(stream + kPrefetchBytes + line), _MM_HINT_T0);
    const GroupAt at = group_at(tile, g, HALF, OFFSETS, INTS, shift, kValueBytes, kGroupBytes);
    const uint8_t* w = at.values;
    const float* scales = (const float*)(w + kValueBytes);
    const uint16_t* halves = at.halves;
    const uint8_t* super_values = at.super_values;
#pragma GCC unroll 2
    for (int s = 0; s < SUBS; s++) {
      __m512i ia[R][L][C];
      for (int r = 0; r < R; r++)
        for (int l = 0; l < L; l++)
          for (int c = 0; c < C; c++) ia[r][l][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int pp = 0; pp < kPairs; pp++) {
        const int p = s * kPairs + pp;
        __m512i w0, w1;
        step_pair_vnni<BITS>(w, p, w0, w1);
        for (int r = 0; r < R; r++)
          for (int l = 0; l < L; l++) {
            int32_t x0, x1;
            std::memcpy(&x0, xq[r][l] + g * kGroup + p * 8, 4);
            std::memcpy(&x1, xq[r][l] + g * kGroup + p * 8 + 4, 4);
            ia[r][l][0] = _mm512_dpbusd_epi32(ia[r][l][0], w0, _mm512_set1_epi32(x0));
            ia[r][l][C - 1] = _mm512_dpbusd_epi32(ia[r][l][C - 1], w1, _mm512_set1_epi32(x1));
          }
      }
      __m512 sv;
      if constexpr (HALF)
        sv = sixteen_ps(halves, f.bf16);
      else if constexpr (INTS)
        sv = int_scales<false, SUBS == 2>(super_values, kValueBytes, g % kSuper, s);
      else
        sv = _mm512_loadu_ps(scales + s * 16);
      for (int r = 0; r < R; r++)
        for (int l = 0; l < L; l++) {
          const int32_t* s16 = sum16[r][l] + g * 2;
          int32_t xs = SUBS == 2 ? s16[s] : s16[0] + s16[1];
          __m512i i = C == 2 ? _mm512_add_epi32(ia[r][l][0], ia[r][l][C - 1]) : ia[r][l][0];
          __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(i, _mm512_set1_epi32(zero * xs)));
          t = _mm512_mul_ps(t, sv);
          acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(dx[r][l][g]), acc[r]);
        }
    }
    if (OFFSETS) {
      __m512 ov = INTS   ? int_scales<true, false>(super_values, kValueBytes, g % kSuper, 1)
                  : HALF ? sixteen_ps(halves + 16, f.bf16)
                         : _mm512_loadu_ps(scales + SUBS * 16);
      for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(dxsum[r][g]), acc[r]);
    }
  }
  __mmask16 mask = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
  for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out + (size_t)r * ldo, mask, acc[r]);
}

// ---- AVX2 (vpmaddubsw), for CPUs without VNNI ------------------------------------------
// vpmaddubsw adds pairs of u8 x s8 products into saturating int16: values below 64 times
// |q| <= 127 stay below 2^15. 8-bit values are multiplied as signed (u - 128): |u - 128|
// with q's sign moved onto it, as llama.cpp does, and 128 * xsum added back; the integer
// sums, and so the results, equal the VNNI path's.

// The 32 values of step t for outputs 8h..8h+7 (bit planes: 32 bits to 32 bytes, as
// llama.cpp's bytes_from_bits_32).
__attribute__((target("avx2"), always_inline))
inline __m256i step_half_avx2(const uint8_t* w, int bits, int t, int h) {
  if (bits == 8) return _mm256_loadu_si256((const __m256i*)(w + t * 64 + h * 32));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i nib = _mm256_loadu_si256((const __m256i*)(w + (t / 2) * 64 + h * 32));
  __m256i u = _mm256_and_si256(t & 1 ? _mm256_srli_epi16(nib, 4) : nib, low4);
  const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i bit_of_byte = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  for (int b = 0; b < bits - 4; b++) {
    int32_t m;
    std::memcpy(&m, w + 256 + b * 64 + t * 8 + h * 4, 4);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(m), spread);  // byte i: byte i/8 of m
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit_of_byte), bit_of_byte);
    u = _mm256_or_si256(u, _mm256_and_si256(v, _mm256_set1_epi8((char)(16 << b))));
  }
  return u;
}

// sixteen_ps for 8 outputs, on the AVX2 path.
__attribute__((target("avx2,f16c")))
inline __m256 sixteen_avx2(const uint16_t* p, bool bf16) {
  __m128i h = _mm_loadu_si128((const __m128i*)p);
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

// int_scales for 8 outputs (half: outputs 0-7 or 8-15), on the AVX2 path.
__attribute__((target("avx2,fma,f16c")))
inline __m256 int_scales_avx2(const uint8_t* super_values, int value_bytes, int j, int sub, int half,
                              bool offset, bool is_signed) {
  const uint8_t* ints = super_values + kSuper * value_bytes + j * 32 + sub * 16 + half * 8;
  const uint16_t* bases = (const uint16_t*)(super_values + kSuper * value_bytes + kSuper * 32) + (offset ? 16 : 0) + half * 8;
  __m128i i8 = _mm_loadl_epi64((const __m128i*)ints);
  __m256i i32 = is_signed ? _mm256_cvtepi8_epi32(i8) : _mm256_cvtepu8_epi32(i8);
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(i32), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)bases)));
  return offset ? _mm256_xor_ps(v, _mm256_set1_ps(-0.f)) : v;
}

template <int R>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2(const uint8_t* tile, const Format& f, const Acts& a, int r0, float* out, long ldo,
               int valid) {
  const int vb = f.value_bytes(), gb = f.group_bytes();
  const int steps = 8 / f.subs;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  for (int half = 0; half < 2; half++) {  // outputs 0-7, then 8-15
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < a.groups; g++) {
      const GroupAt at = group_at(tile, g, f.half, f.offsets, f.ints, f.share_shift, vb, gb);
      const uint8_t* w = at.values;
      const float* scales = (const float*)(w + vb);
      const uint16_t* halves = at.halves;
      const uint8_t* super_values = at.super_values;
      for (int s = 0; s < f.subs; s++) {
        __m256i ia[R][2];
        const int levels = f.levels;
        for (int r = 0; r < R; r++) ia[r][0] = ia[r][1] = _mm256_setzero_si256();
        for (int t = s * steps; t < (s + 1) * steps; t++) {
          __m256i wv = step_half_avx2(w, f.bits, t, half);
          __m256i signed_w = _mm256_xor_si256(wv, flip);
          __m256i mag = f.wide ? _mm256_abs_epi8(signed_w) : wv;
          for (int r = 0; r < R; r++)
            for (int l = 0; l < levels; l++) {
              const int8_t* xq = (l ? a.q2 : a.q).data() + (size_t)(r0 + r) * a.K;
              int32_t x4;
              std::memcpy(&x4, xq + g * kGroup + t * 4, 4);
              __m256i xv = _mm256_set1_epi32(x4);
              if (f.wide) xv = _mm256_sign_epi8(xv, signed_w);
              __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, xv), ones);
              ia[r][l] = _mm256_add_epi32(ia[r][l], p);
            }
        }
        __m256 sv = f.half   ? sixteen_avx2(halves + half * 8, f.bf16)
                    : f.ints ? int_scales_avx2(super_values, vb, g % kSuper, s, half, false, f.subs == 2)
                             : _mm256_loadu_ps(scales + s * 16 + half * 8);
        for (int r = 0; r < R; r++)
          for (int l = 0; l < levels; l++) {
            size_t i = (size_t)(r0 + r) * a.groups + g;
            const int32_t* s16 = (l ? a.sum16b : a.sum16).data() + i * 2;
            int32_t xs = f.subs == 2 ? s16[s] : s16[0] + s16[1];
            int32_t corr = (f.wide ? -128 * xs : 0) + f.zero * xs;
            __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(ia[r][l], _mm256_set1_epi32(corr)));
            t = _mm256_mul_ps(t, sv);
            acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps((l ? a.dx2 : a.dx)[i]), acc[r]);
          }
      }
      if (f.offsets) {
        __m256 ov = f.ints   ? int_scales_avx2(super_values, vb, g % kSuper, 1, half, true, false)
                    : f.half ? sixteen_avx2(halves + 16 + half * 8, f.bf16)
                             : _mm256_loadu_ps(scales + f.subs * 16 + half * 8);
        for (int r = 0; r < R; r++)
          acc[r] = _mm256_fmadd_ps(ov, _mm256_set1_ps((f.levels == 2 ? a.dxsum : a.dxsum1)[(size_t)(r0 + r) * a.groups + g]), acc[r]);
      }
    }
    for (int r = 0; r < R; r++) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[r]);
      int n = std::min(8, valid - half * 8);
      for (int i = 0; i < n; i++) out[(size_t)r * ldo + half * 8 + i] = tmp[i];
    }
  }
}

using TileFn = void (*)(const uint8_t*, const Format&, const Acts&, int, float*, long, int);

template <int S, bool O, int B, int L, bool H, bool I>
constexpr std::array<TileFn, kRows + 1> vnni_table() {
  return {nullptr,                         tile_vnni<1, S, O, B, L, H, I>, tile_vnni<2, S, O, B, L, H, I>,
          tile_vnni<3, S, O, B, L, H, I>, tile_vnni<4, S, O, B, L, H, I>, tile_vnni<5, S, O, B, L, H, I>,
          tile_vnni<6, S, O, B, L, H, I>, tile_vnni<7, S, O, B, L, H, I>, tile_vnni<8, S, O, B, L, H, I>};
}
using RowFns = std::array<TileFn, kRows + 1>;
template <int S, bool O, int L, bool H = false>
constexpr std::array<RowFns, 4> vnni_tables() {
  return {vnni_table<S, O, 4, L, H, false>(), vnni_table<S, O, 5, L, H, false>(), vnni_table<S, O, 6, L, H, false>(),
          vnni_table<S, O, 8, L, H, false>()};
}
int bits_index(int bits) { return bits == 8 ? 3 : bits - 4; }
// [levels - 1][subs - 1][offsets][bits_index][rows]
const std::array<RowFns, 4> vnni_fns[2][2][2] = {
    {{vnni_tables<1, false, 1>(), vnni_tables<1, true, 1>()}, {vnni_tables<2, false, 1>(), vnni_tables<2, true, 1>()}},
    {{vnni_tables<1, false, 2>(), vnni_tables<1, true, 2>()}, {vnni_tables<2, false, 2>(), vnni_tables<2, true, 2>()}}};
// Half scales (one per group): [levels - 1][offsets][bits_index][rows]
const std::array<RowFns, 4> vnni_half_fns[2][2] = {{vnni_tables<1, false, 1, true>(), vnni_tables<1, true, 1, true>()},
                                                    {vnni_tables<1, false, 2, true>(), vnni_tables<1, true, 2, true>()}};
// Integer scales, the K-quants' formats only: [levels - 1][Q4_K, Q5_K, Q6_K][rows]
template <int L>
constexpr std::array<RowFns, 3> vnni_int_tables() {
  return {vnni_table<1, true, 4, L, false, true>(), vnni_table<1, true, 5, L, false, true>(),
          vnni_table<2, false, 6, L, false, true>()};
}
const std::array<RowFns, 3> vnni_int_fns[2] = {vnni_int_tables<1>(), vnni_int_tables<2>()};
int int_index(const Format& f) { return f.bits - 4; }  // Q4_K 4, Q5_K 5, Q6_K 6 (checked by make_format)
const TileFn avx2_fns[kRows + 1] = {nullptr,      tile_avx2<1>, tile_avx2<2>, tile_avx2<3>, tile_avx2<4>,
                                    tile_avx2<5>, tile_avx2<6>, tile_avx2<7>, tile_avx2<8>};

bool has_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

__attribute__((target("f16c"))) float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
float sixteen_to_float(uint16_t h, bool bf16) {
  if (!bf16) return half_to_float(h);
  uint32_t bits = (uint32_t)h << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// Tiles [t0, t1) for all M rows: rows in blocks whose activations stay in cache, each
// block through every tile, 8 rows per pass (a tile's weights are re-read from cache).
void multiply_tiles(const Acts& a, const uint8_t* w, const Format& f, long N, float* out,
                    long t0, long t1, bool avx2) {
  const TileFn* fns = avx2     ? avx2_fns
                      : f.half ? vnni_half_fns[f.levels - 1][f.offsets][bits_index(f.bits)].data()
                      : f.ints ? vnni_int_fns[f.levels - 1][int_index(f)].data()
                               : vnni_fns[f.levels - 1][f.subs - 1][f.offsets][bits_index(f.bits)].data();
  size_t tile_bytes = (size_t)a.groups * f.group_bytes();
  for (int rb = 0; rb < a.M; rb += kRowBlock) {
    int re = std::min(a.M, rb + kRowBlock);
    for (long t = t0; t < t1; t++) {
      int valid = (int)std::min<long>(kTile, N - t * kTile);
      for (int r = rb; r < re; r += kRows) {
        int rows = std::min(kRows, re - r);
        fns[rows](w + t * tile_bytes, f, a, r, out + (size_t)r * N + t * kTile, N, valid);
      }
    }
  }
}

class QuantMatmul : public mx::Primitive {
 public:
  QuantMatmul(mx::Stream stream, long n, Format f, bool avx2)
      : mx::Primitive(stream), n_(n), f_(f), avx2_(avx2) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    int K = w.shape(1) * kGroup;
    int M = (int)(x.size() / K);
    long N = n_, tiles = w.shape(0);
    Format f = f_;
    bool avx2 = avx2_;
    encoder.dispatch([xp = x.data<float>(), wp = w.data<uint8_t>(), op = out.data<float>(), M, K, N,
                      tiles, f, avx2, wbytes = w.nbytes()]() {
      if (M == 0) return;
      Acts a(M, K);
      kernelext::Workers& pool = kernelext::workers();
      const size_t parallel_bytes = pool.spins() ? kParallelBytesSpinning : kParallelBytesSleeping;
      if (wbytes < parallel_bytes && (double)M * K * N < kParallelMultiplyAdds) {
        a.quantize_rows(xp, 0, M);
        multiply_tiles(a, wp, f, N, op, 0, tiles, avx2);
        return;
      }
      if (M < 16) {
        a.quantize_rows(xp, 0, M);
      } else {  // prefill: quantize the rows on all threads too
        int parts = std::min(M, 4 * pool.size());
        pool.run([&](int c) { a.quantize_rows(xp, M * c / parts, M * (c + 1) / parts); }, parts);
      }
      int chunks = (int)std::min<long>(tiles, 8L * pool.size());
      pool.run([&](int c) {
        multiply_tiles(a, wp, f, N, op, tiles * c / chunks, tiles * (c + 1) / chunks, avx2);
      }, chunks);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("quant_matmul runs on the CPU only");
  }
  const char* name() const override { return "QuantMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantMatmul&>(other);
    return n_ == o.n_ && same_format(f_, o.f_) && avx2_ == o.avx2_;
  }

 private:
  long n_;
  Format f_;
  bool avx2_;
};

// Rows of the weight matrix as float32 (the embedding lookup): scale * (u - zero) + offset.
class QuantRows : public mx::Primitive {
 public:
  QuantRows(mx::Stream stream, long n, Format f) : mx::Primitive(stream), n_(n), f_(f) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& ids = inputs[0];
    const mx::array& w = inputs[1];
    mx::array& out = outputs[0];
    auto& encoder = kernelext::start_eval(stream(), inputs, out);
    encoder.dispatch([ip = ids.data<int32_t>(), count = ids.size(), wp = w.data<uint8_t>(),
                      op = out.data<float>(), groups = w.shape(1), n = n_, f = f_]() {
      size_t vb = f.value_bytes(), gb = f.group_bytes(), tile_bytes = (size_t)groups * gb;
      long K = (long)groups * kGroup;
      for (size_t i = 0; i < count; i++) {
        long id = ip[i];
        float* o = op + i * K;
        if (id < 0 || id >= n) {  // MLX's take clamps nothing either; keep it defined
          std::fill(o, o + K, 0.f);
          continue;
        }
        const uint8_t* tile = wp + (id / kTile) * tile_bytes;
        int j = (int)(id % kTile);
        for (long g = 0; g < groups; g++) {
          const GroupAt at = group_at(tile, g, f.half, f.offsets, f.ints, f.share_shift, (int)vb, (int)gb);
          const uint8_t* gw = at.values;
          const float* scales = (const float*)(gw + vb);
          const uint8_t* super_values = at.super_values;
          float half_scale = 0.f, half_offset = 0.f;
          if (f.half) {
            half_scale = sixteen_to_float(at.halves[j], f.bf16);
            if (f.offsets) half_offset = sixteen_to_float(at.halves[16 + j], f.bf16);
          }
          for (int k = 0; k < kGroup; k++) {
            int t = k / 4, byte = j * 4 + k % 4;  // step, byte of the step
            int u;
            if (f.bits == 8) {
              u = gw[t * 64 + byte];
            } else {
              int nib = gw[(t / 2) * 64 + byte];
              u = t & 1 ? nib >> 4 : nib & 15;
              for (int b = 0; b < f.bits - 4; b++)
                u |= ((gw[256 + b * 64 + t * 8 + byte / 8] >> (byte % 8)) & 1) << (4 + b);
            }
            float s, offset = 0.f;
            if (f.ints) {
              const uint8_t* ints = super_values + kSuper * vb + (g % kSuper) * 32;
              const uint16_t* bases = (const uint16_t*)(super_values + kSuper * vb + kSuper * 32);
              int sub = f.subs == 2 ? k / 16 : 0;
              float sc = f.subs == 2 ? (float)(int8_t)ints[sub * 16 + j] : (float)ints[j];
              s = sc * half_to_float(bases[j]);
              if (f.offsets) offset = -((float)ints[16 + j] * half_to_float(bases[16 + j]));
            } else {
              s = f.half ? half_scale : scales[(f.subs == 2 ? k / 16 : 0) * 16 + j];
              if (f.offsets) offset = f.half ? half_offset : scales[f.subs * 16 + j];
            }
            float v = (float)(u - f.zero) * s;
            if (f.offsets) v = v + offset;
            o[g * kGroup + k] = v;
          }
        }
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("quant_rows runs on the CPU only");
  }
  const char* name() const override { return "QuantRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantRows&>(other);
    return n_ == o.n_ && same_format(f_, o.f_);
  }

 private:
  long n_;
  Format f_;
};

Format make_format(int subs, bool offsets, int zero, bool wide, int bits, int levels, bool half, bool bf16,
                   bool ints, int share) {
  if (subs != 1 && subs != 2) throw std::invalid_argument("quant format: subs must be 1 or 2");
  if (bits != 4 && bits != 5 && bits != 6 && bits != 8)
    throw std::invalid_argument("quant format: bits must be 4, 5, 6 or 8");
  if (wide && bits != 8) throw std::invalid_argument("quant format: wide values need 8 bits");
  if (levels != 1 && levels != 2) throw std::invalid_argument("quant format: levels must be 1 or 2");
  if (half && subs != 1) throw std::invalid_argument("quant format: half scales need one scale per group");
  if (bf16 && !half) throw std::invalid_argument("quant format: bfloat16 scales are half scales");
  if (ints && !((subs == 1 && offsets && (bits == 4 || bits == 5)) || (subs == 2 && !offsets && bits == 6)))
    throw std::invalid_argument("quant format: integer scales are the K-quants' (Q4_K, Q5_K, Q6_K)");
  if (half && ints) throw std::invalid_argument("quant format: half or integer scales, not both");
  if (share != 1 && share != 2 && share != 4) throw std::invalid_argument("quant format: share must be 1, 2 or 4");
  if (share != 1 && !(half && offsets))
    throw std::invalid_argument("quant format: groups share scales only as 16-bit scales with offsets");
  return Format{subs, offsets, zero, wide, bits, levels, half, bf16, ints, __builtin_ctz(share)};
}

void check_weights(const mx::array& w, long n, const Format& f, const char* what) {
  if (w.dtype() != mx::uint8 || w.ndim() != 3 || w.shape(2) != f.group_bytes() ||
      (long)w.shape(0) * kTile < n || (long)w.shape(0) * kTile >= n + kTile || (f.half && !f.offsets && w.shape(1) % 2) ||
      (f.ints && w.shape(1) % kSuper) || w.shape(1) % (1 << f.share_shift))
    throw std::invalid_argument(std::string(what) +
                                ": packed weights must be uint8 [ceil(N/16), K/32, group_bytes], an even "
                                "number of groups with half scales and no offsets, a multiple of 8 with integer "
                                "scales, of share with shared scales");
}

mx::array quant_matmul(const mx::array& x, const mx::array& w, long n, int subs, bool offsets,
                       int zero, bool wide, int bits, int levels, bool half, bool bf16, bool ints, int share,
                       bool avx2, mx::StreamOrDevice s) {
  Format f = make_format(subs, offsets, zero, wide, bits, levels, half, bf16, ints, share);
  check_weights(w, n, f, "quant_matmul");
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) != w.shape(1) * kGroup)
    throw std::invalid_argument("quant_matmul: x must be float32 [..., K]");
  if (avx2 ? !has_avx2() : !has_vnni())
    throw std::runtime_error("quant_matmul: this CPU lacks the instructions of the chosen path");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = (int)n;
  return mx::array(shape, mx::float32, std::make_shared<QuantMatmul>(stream, n, f, avx2),
                   {mx::contiguous(x, false, stream), w});
}

mx::array quant_rows(const mx::array& ids, const mx::array& w, long n, int subs, bool offsets,
                     int zero, int bits, bool half, bool bf16, bool ints, int share, mx::StreamOrDevice s) {
  Format f = make_format(subs, offsets, zero, false, bits, 1, half, bf16, ints, share);
  check_weights(w, n, f, "quant_rows");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto shape = ids.shape();
  shape.push_back(w.shape(1) * kGroup);
  return mx::array(shape, mx::float32, std::make_shared<QuantRows>(stream, n, f),
                   {mx::contiguous(mx::astype(ids, mx::int32, stream), false, stream), w});
}

}  // namespace

NB_MODULE(_quant_matmul, m) {
  kernelext::share_workers(m);
  m.doc() = "x @ W.T with W in kernelext's quantized tile layout (engine/cpu/quant_layout.py)";
  m.def("quant_matmul", &quant_matmul, "x"_a, "packed"_a, "n"_a, "subs"_a, "offsets"_a, "zero"_a,
        "wide"_a, "bits"_a, "levels"_a, "half"_a, "bf16"_a, "ints"_a, "share"_a, "avx2"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("quant_rows", &quant_rows, "ids"_a, "packed"_a, "n"_a, "subs"_a, "offsets"_a, "zero"_a,
        "bits"_a, "half"_a, "bf16"_a, "ints"_a, "share"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("has_vnni", &has_vnni);
  m.def("has_avx2", &has_avx2);
}
