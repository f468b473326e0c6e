// Small AVX-512 helpers shared by the C++ kernels: exp for softmax, horizontal sums.
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>

// exp of softmax arguments (x <= 0, or -inf for masked scores); exactly 0 below -87.3.
// The online softmax spends more instructions on exp than on both matrix products at
// head_dim 64, so this version is short: n = round(x / ln2) by vrndscaleps, r = x -
// n ln2 in two steps (hi + lo, exact to ~1e-10), e^r by its Taylor series to r^7 (|r| <=
// ln2/2: truncation error 1.2e-8 relative), then 2^n by vscalefps with the lanes below the
// cut-off zeroed by the same instruction: 13 operations, about Cephes' accuracy (1-2 ulp).
__attribute__((always_inline)) inline __m512 exp512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // 1/k! for k = 7 .. 0 (Horner).
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

#if defined(__AVX512DQ__)
// Sums of a, b, c, d (16 lanes each) as the 4 lanes of the result.
__attribute__((always_inline)) inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif  // __AVX512DQ__
#endif  // __AVX512F__
