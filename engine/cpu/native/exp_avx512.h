// exp of 16 floats at once for the AVX-512 attention kernels (short_attention.cpp,
// causal_attention.cpp): range reduction and a degree-7 polynomial, the formula of
// engine/embed/bert.py's _exp_parts (within 3e-7 of exp). Lane by lane the same
// instructions, so an element's bits depend only on its own input.
#pragma once
#include <immintrin.h>

namespace kernelext {

__attribute__((target("avx512f,avx512dq,fma"))) inline __m512 exp_poly(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.4426950408889634f), _mm512_set1_ps(0.5f)),
                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                           _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
  __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

}  // namespace kernelext
