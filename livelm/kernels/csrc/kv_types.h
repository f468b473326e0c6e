// Element types of the KV cache the attention kernels read in place: float, bfloat16
// (the upper 16 bits of a float), which halves the bytes every decode step reads, and
// q8_0 rows (below), which take 27% of float's. Keys and values are widened to float on
// load; all arithmetic stays fp32.
#pragma once
#include <cmath>
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

// ---- q8_0 rows (layers/attention/kv_format.py): head_dim int8 values, then one float16
// scale per 32 of them. A cache of this format is a uint8 tensor [Hkv, S, row_bytes].
constexpr int64_t Q8_BLOCK = 32;
inline int64_t q8_row_bytes(int64_t head_dim) { return head_dim + 2 * (head_dim / Q8_BLOCK); }

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// Round to nearest even, as torch's float -> float16 conversion does.
inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504: inf
  if (ax < 0x38800000u) {  // float16 subnormal (or zero): add and drop the magic 0.5
    float mag;
    std::memcpy(&mag, &ax, sizeof mag);
    const float r = mag + 0.5f;
    uint32_t rb;
    std::memcpy(&rb, &r, sizeof rb);
    return static_cast<uint16_t>(sign | (rb - 0x3f000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((ax + 0xc8000fffu + odd) >> 13));
#endif
}

inline float q8_scale(const uint8_t* row, int64_t head_dim, int64_t block) {
  uint16_t h;
  std::memcpy(&h, row + head_dim + 2 * block, sizeof h);
  return half_to_float(h);
}

// One row of head_dim floats to q8_0: d = max|x| * (1/127) (float16-rounded when stored),
// q = round-half-even(x * (1/d)), written as the torch path writes it.
inline void quantize_q8_row(const float* x, int64_t head_dim, uint8_t* row) {
  int8_t* q = reinterpret_cast<int8_t*>(row);
  for (int64_t b = 0; b < head_dim / Q8_BLOCK; ++b) {
    const float* xb = x + b * Q8_BLOCK;
    float amax = 0.f;
    for (int64_t i = 0; i < Q8_BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    for (int64_t i = 0; i < Q8_BLOCK; ++i)
      if (std::isnan(xb[i])) amax = xb[i];  // NaN in, NaN scale out (the torch path's amax)
    // volatile: under -ffast-math the compiler may turn x * (1 / d) into x / d, which
    // rounds differently from the torch path in ties.
    const volatile float d_stored = amax * (1.0f / 127.0f);
    const float d = d_stored;
    const volatile float inv_stored = d == 0.f ? 0.f : 1.0f / d;
    const float inv = inv_stored;
    for (int64_t i = 0; i < Q8_BLOCK; ++i) {
      const float r = std::nearbyint(xb[i] * inv);
      q[b * Q8_BLOCK + i] = static_cast<int8_t>(std::isnan(r) ? 0.f : std::min(127.f, std::max(-127.f, r)));
    }
    const uint16_t h = float_to_half(d);
    std::memcpy(row + head_dim + 2 * b, &h, sizeof h);
  }
}

// A q8_0 row widened to head_dim floats.
inline void dequantize_q8_row(const uint8_t* row, int64_t head_dim, float* out) {
  const int8_t* q = reinterpret_cast<const int8_t*>(row);
  for (int64_t b = 0; b < head_dim / Q8_BLOCK; ++b) {
    const float d = q8_scale(row, head_dim, b);
#pragma omp simd
    for (int64_t i = 0; i < Q8_BLOCK; ++i) out[b * Q8_BLOCK + i] = d * static_cast<float>(q[b * Q8_BLOCK + i]);
  }
}

#if defined(__AVX2__)
// Eight int8 values as floats.
inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

}  // namespace livelm
