// Element types of the KV cache the attention kernels read in place: float, and bfloat16
// (the upper 16 bits of a float), which halves the bytes every decode step reads. Keys and
// values are widened to float on load; all arithmetic stays fp32.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace livelm {

// A bfloat16 as stored: torch's at::BFloat16 has the same layout (one uint16_t).
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 is two bytes");

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t b = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// Round to nearest even, NaN to the canonical quiet NaN: what torch's float -> bfloat16
// conversion does, so the CPU kernels' cache writes equal the torch path's.
inline bf16 to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  if ((b & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};
  b += 0x7fffu + ((b >> 16) & 1u);
  return bf16{static_cast<uint16_t>(b >> 16)};
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline bf16 from_float<bf16>(float f) { return to_bf16(f); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif
#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

}  // namespace livelm
