// GGUF's raw block formats as the file stores them (livelm/quant/gguf_blocks.py): the bytes
// of each block, row after row, decoded here into exact fp32 weights.
//
//   q5_0 (32 weights, 22 bytes):  d fp16 | qh u32 (bit i: 5th bit of weight i) | qs[16]
//                                 w = d * (q - 16)
//   q5_1 (32 weights, 24 bytes):  d fp16 | m fp16 | qh u32 | qs[16]     w = d * q + m
//   q4_k (256 weights, 144 bytes): d, dmin fp16 | 12 bytes of 6-bit scales and mins |
//                                 qs[128]; eight 32-weight groups, w = (d*sc) * q - dmin*mn
//   q5_k (256 weights, 176 bytes): as q4_k with qh[32] (bit g of byte l: 5th bit of weight
//                                 l of group g) before qs
//   q6_k (256 weights, 210 bytes): ql[128] | qh[64] | int8 scales[16] | d fp16;
//                                 sixteen 16-weight groups, w = (d*sc) * (q - 32)
// In a q4 byte pair of the K-quants, byte l of a 32-byte run holds weight l of one group
// (low nibble) and weight l of the next (high nibble); in q5_0/q5_1 byte j holds weights j
// and j + 16, as q4_0 does.
//
// Every product below is exact in fp32 (fp16 scales times integers of at most 7 bits), so
// the single rounding of each fused multiply-add or subtract equals the reference's, and
// the weights are bit-identical to gguf-py's dequantization.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LIVELM_GGUF_AVX2 1
#endif

namespace gguf_blocks {

enum RawFormat : int64_t { kQ5_0 = 4, kQ5_1 = 5, kQ4_K = 6, kQ5_K = 7, kQ6_K = 8 };

constexpr bool is_raw(int64_t f) { return f >= kQ5_0 && f <= kQ6_K; }
// Weights per block.
constexpr int64_t block_weights(int64_t f) { return f <= kQ5_1 ? 32 : 256; }
// Bytes per block.
constexpr int64_t block_bytes(int64_t f) {
  return f == kQ5_0 ? 22 : f == kQ5_1 ? 24 : f == kQ4_K ? 144 : f == kQ5_K ? 176 : 210;
}

inline float fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Scale and minimum of 32-weight group g (0..7) from the 12 packed bytes of q4_k / q5_k.
inline void scale_min_k4(const uint8_t* s, int g, int& sc, int& mn) {
  if (g < 4) {
    sc = s[g] & 63;
    mn = s[g + 4] & 63;
  } else {
    sc = (s[g + 4] & 0x0F) | ((s[g - 4] >> 6) << 4);
    mn = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

// The block's weights into out[block_weights(F)], one at a time (the portable path and
// the definition the vector code below follows).
template <int64_t F>
inline void dequant_scalar(const uint8_t* blk, float* out) {
  if constexpr (F == kQ5_0 || F == kQ5_1) {
    const float d = fp16(blk);
    const float m = F == kQ5_1 ? fp16(blk + 2) : 0.f;
    const uint8_t* qhp = blk + (F == kQ5_1 ? 4 : 2);
    uint32_t qh;
    std::memcpy(&qh, qhp, 4);
    const uint8_t* qs = qhp + 4;
    for (int j = 0; j < 32; ++j) {
      const int nib = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
      const int q = nib | (((qh >> j) & 1) << 4);
      out[j] = F == kQ5_0 ? d * static_cast<float>(q - 16) : d * static_cast<float>(q) + m;
    }
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    const float d = fp16(blk), dmin = fp16(blk + 2);
    const uint8_t* scales = blk + 4;
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (F == kQ5_K ? 48 : 16);
    for (int g = 0; g < 8; ++g) {
      int sc, mn;
      scale_min_k4(scales, g, sc, mn);
      const float s = d * static_cast<float>(sc), mm = dmin * static_cast<float>(mn);
      const uint8_t* q = qs + 32 * (g >> 1);
      for (int l = 0; l < 32; ++l) {
        int v = (q[l] >> (4 * (g & 1))) & 0x0F;
        if constexpr (F == kQ5_K) v |= ((qh[l] >> g) & 1) << 4;
        out[32 * g + l] = s * static_cast<float>(v) - mm;
      }
    }
  } else {  // q6_k
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = fp16(blk + 208);
    for (int g = 0; g < 8; ++g) {
      const int h = g >> 2, q4 = g & 3;
      const uint8_t* qlb = ql + 64 * h + 32 * (q4 & 1);
      const uint8_t* qhb = qh + 32 * h;
      for (int l = 0; l < 32; ++l) {
        const int v = ((qlb[l] >> (4 * (q4 >> 1))) & 0x0F) | (((qhb[l] >> (2 * q4)) & 3) << 4);
        const float s = d * static_cast<float>(sc[8 * h + 2 * q4 + (l >> 4)]);
        out[32 * g + l] = s * static_cast<float>(v - 32);
      }
    }
  }
}

#ifdef LIVELM_GGUF_AVX2
// 8 bytes at p as 8 int32 lanes.
inline __m256i u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline float fp16_fast(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// 32 int8 values -> 4 x 8 fp32 lanes, in order.
__attribute__((always_inline)) inline void widen32(__m256i v, __m256& q0, __m256& q1, __m256& q2, __m256& q3) {
  const __m128i a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
  q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
  q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
  q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}

// Byte i = 16 where bit i of x is set, else 0.
__attribute__((always_inline)) inline __m256i bits_to_16s(uint32_t x) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), shuf);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

// Whether weight = s * q + add (an additive term per group) rather than s * q.
constexpr bool has_add(int64_t f) { return f == kQ5_1 || f == kQ4_K || f == kQ5_K; }

// Calls emit(g, s0, s1, add, q0, q1, q2, q3) for each 32-weight group g of the block:
// q0..q3 are the group's integers as fp32 (offsets such as q - 16 already applied), in
// order (q0 = weights 0-7, ..., q3 = 24-31); weights 0-15 have scale s0 and 16-31 scale
// s1 (the same except in q6_k's 16-weight groups); weight = s * q + add, add = 0 unless
// has_add(F). Each s * q is exact in fp32, so fmadd(s, q, add) rounds as gguf-py does.
// The bits are taken apart 32 bytes at a time before widening to fp32.
template <int64_t F, typename Emit>
__attribute__((always_inline)) inline void groups(const uint8_t* blk, Emit&& emit) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  if constexpr (F == kQ5_0 || F == kQ5_1) {
    const float d = fp16_fast(blk);
    const float add = F == kQ5_1 ? fp16_fast(blk + 2) : 0.f;
    const uint8_t* qhp = blk + (F == kQ5_1 ? 4 : 2);
    uint32_t qh;
    std::memcpy(&qh, qhp, 4);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qhp + 4));
    const __m256i lohi = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);  // weights 16-31 from the high nibbles
    __m256i q = _mm256_or_si256(_mm256_and_si256(lohi, nib), bits_to_16s(qh));
    if constexpr (F == kQ5_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
    __m256 q0, q1, q2, q3;
    widen32(q, q0, q1, q2, q3);
    emit(0, d, d, add, q0, q1, q2, q3);
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    const float d = fp16_fast(blk), dmin = fp16_fast(blk + 2);
    const uint8_t* scales = blk + 4;
    float sc[8], mn[8];
    for (int g = 0; g < 8; ++g) {
      int a, b;
      scale_min_k4(scales, g, a, b);
      sc[g] = d * static_cast<float>(a);
      mn[g] = -(dmin * static_cast<float>(b));
    }
    const uint8_t* qs = blk + (F == kQ5_K ? 48 : 16);
    __m256i h = _mm256_setzero_si256();
    if constexpr (F == kQ5_K) h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    const __m256i one = _mm256_set1_epi8(1);
    if constexpr (F == kQ4_K) {
      // Nibbles straight from memory, 8 bytes to 8 lanes (fewer shuffles than widening).
      const __m256i nib32 = _mm256_set1_epi32(0x0F);
      for (int c = 0; c < 4; ++c) {
        const uint8_t* p = qs + 32 * c;
        const __m256i v0 = u8x8(p), v1 = u8x8(p + 8), v2 = u8x8(p + 16), v3 = u8x8(p + 24);
        emit(2 * c, sc[2 * c], sc[2 * c], mn[2 * c],
             _mm256_cvtepi32_ps(_mm256_and_si256(v0, nib32)), _mm256_cvtepi32_ps(_mm256_and_si256(v1, nib32)),
             _mm256_cvtepi32_ps(_mm256_and_si256(v2, nib32)), _mm256_cvtepi32_ps(_mm256_and_si256(v3, nib32)));
        emit(2 * c + 1, sc[2 * c + 1], sc[2 * c + 1], mn[2 * c + 1],
             _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)),
             _mm256_cvtepi32_ps(_mm256_srli_epi32(v2, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(v3, 4)));
      }
      return;
    }
    for (int c = 0; c < 4; ++c) {  // 32 bytes: groups 2c (low nibbles) and 2c + 1 (high)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      for (int half = 0; half < 2; ++half) {
        const int g = 2 * c + half;
        __m256i q = _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, nib);
        if constexpr (F == kQ5_K)
          q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, g), one), 4));
        __m256 q0, q1, q2, q3;
        widen32(q, q0, q1, q2, q3);
        emit(g, sc[g], sc[g], mn[g], q0, q1, q2, q3);
      }
    }
  } else {  // q6_k
    const uint8_t* ql = blk;
    const uint8_t* qhp = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = fp16_fast(blk + 208);
    const __m256i three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    for (int hh = 0; hh < 2; ++hh) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * hh));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * hh + 32));
      const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qhp + 32 * hh));
      for (int q4 = 0; q4 < 4; ++q4) {
        const int g = 4 * hh + q4;
        const __m256i src = (q4 & 1) ? l1 : l0;
        const __m256i low = _mm256_and_si256((q4 >> 1) ? _mm256_srli_epi16(src, 4) : src, nib);
        const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * q4), three), 4);
        __m256 q0, q1, q2, q3;
        widen32(_mm256_sub_epi8(_mm256_or_si256(low, high), off), q0, q1, q2, q3);
        emit(g, d * static_cast<float>(sc[8 * hh + 2 * q4]), d * static_cast<float>(sc[8 * hh + 2 * q4 + 1]), 0.f,
             q0, q1, q2, q3);
      }
    }
  }
}
#endif  // LIVELM_GGUF_AVX2

// The block's weights into out[block_weights(F)] (exact), vectorized where possible.
template <int64_t F>
inline void dequant_block(const uint8_t* blk, float* out) {
#ifdef LIVELM_GGUF_AVX2
  groups<F>(blk, [&](int g, float s0, float s1, float add, __m256 q0, __m256 q1, __m256 q2, __m256 q3) {
    float* o = out + 32 * g;
    const __m256 a = _mm256_set1_ps(s0), b = _mm256_set1_ps(s1);
    if constexpr (has_add(F)) {
      const __m256 c = _mm256_set1_ps(add);
      _mm256_storeu_ps(o, _mm256_fmadd_ps(a, q0, c));
      _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(a, q1, c));
      _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(b, q2, c));
      _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(b, q3, c));
    } else {
      _mm256_storeu_ps(o, _mm256_mul_ps(a, q0));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(a, q1));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(b, q2));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(b, q3));
    }
  });
#else
  dequant_scalar<F>(blk, out);
#endif
}

// A row of K weights (K / block_weights(F) blocks from `row`) into out[K].
template <int64_t F>
inline void dequant_row(const uint8_t* row, int64_t K, float* out) {
  const int64_t nb = K / block_weights(F);
  for (int64_t b = 0; b < nb; ++b) dequant_block<F>(row + b * block_bytes(F), out + b * block_weights(F));
}

}  // namespace gguf_blocks
