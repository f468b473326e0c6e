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

// Calls emit(g, w0, w1, w2, w3) for each 32-weight group g of the block, with its weights
// (exact fp32) in order: w0 = weights 0-7, w1 = 8-15, w2 = 16-23, w3 = 24-31.
template <int64_t F, typename Emit>
__attribute__((always_inline)) inline void groups(const uint8_t* blk, Emit&& emit) {
  const __m256i nib = _mm256_set1_epi32(0x0F);
  if constexpr (F == kQ5_0 || F == kQ5_1) {
    const __m256 d = _mm256_set1_ps(fp16(blk));
    const uint8_t* qhp = blk + (F == kQ5_1 ? 4 : 2);
    uint32_t qhv;
    std::memcpy(&qhv, qhp, 4);
    const __m256i qh = _mm256_set1_epi32(static_cast<int>(qhv));
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i one = _mm256_set1_epi32(1);
    const uint8_t* qs = qhp + 4;
    const __m256i a = u8x8(qs), b = u8x8(qs + 8);
    auto high = [&](int i0) {  // 16 where weight i0 + lane has its 5th bit
      return _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_add_epi32(iota, _mm256_set1_epi32(i0))), one), 4);
    };
    __m256i q0 = _mm256_or_si256(_mm256_and_si256(a, nib), high(0));
    __m256i q1 = _mm256_or_si256(_mm256_and_si256(b, nib), high(8));
    __m256i q2 = _mm256_or_si256(_mm256_srli_epi32(a, 4), high(16));
    __m256i q3 = _mm256_or_si256(_mm256_srli_epi32(b, 4), high(24));
    if constexpr (F == kQ5_0) {
      const __m256i sixteen = _mm256_set1_epi32(16);
      emit(0, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q0, sixteen))),
           _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q1, sixteen))),
           _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q2, sixteen))),
           _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q3, sixteen))));
    } else {
      const __m256 m = _mm256_set1_ps(fp16(blk + 2));
      emit(0, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q0), m), _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q1), m),
           _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q2), m), _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q3), m));
    }
  } else if constexpr (F == kQ4_K || F == kQ5_K) {
    const float d = fp16(blk), dmin = fp16(blk + 2);
    const uint8_t* scales = blk + 4;
    const uint8_t* qhp = blk + 16;
    const uint8_t* qs = blk + (F == kQ5_K ? 48 : 16);
    __m256i h[4];
    if constexpr (F == kQ5_K)
      for (int i = 0; i < 4; ++i) h[i] = u8x8(qhp + 8 * i);
    for (int c = 0; c < 4; ++c) {  // 32 bytes: groups 2c (low nibbles) and 2c + 1 (high)
      const uint8_t* q = qs + 32 * c;
      __m256i v[4];
      for (int i = 0; i < 4; ++i) v[i] = u8x8(q + 8 * i);
      for (int half = 0; half < 2; ++half) {
        const int g = 2 * c + half;
        int sc, mn;
        scale_min_k4(scales, g, sc, mn);
        const __m256 s = _mm256_set1_ps(d * static_cast<float>(sc));
        const __m256 mm = _mm256_set1_ps(dmin * static_cast<float>(mn));
        __m256 w[4];
        for (int i = 0; i < 4; ++i) {
          __m256i qi = half ? _mm256_srli_epi32(v[i], 4) : _mm256_and_si256(v[i], nib);
          if constexpr (F == kQ5_K)
            qi = _mm256_or_si256(qi, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h[i], g), _mm256_set1_epi32(1)), 4));
          w[i] = _mm256_fmsub_ps(s, _mm256_cvtepi32_ps(qi), mm);
        }
        emit(g, w[0], w[1], w[2], w[3]);
      }
    }
  } else {  // q6_k
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = fp16(blk + 208);
    const __m256i three = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
    for (int hh = 0; hh < 2; ++hh) {
      __m256i hv[4], lo[4], hi[4];
      for (int i = 0; i < 4; ++i) {
        hv[i] = u8x8(qh + 32 * hh + 8 * i);
        lo[i] = u8x8(ql + 64 * hh + 8 * i);
        hi[i] = u8x8(ql + 64 * hh + 32 + 8 * i);
      }
      for (int q4 = 0; q4 < 4; ++q4) {
        const int g = 4 * hh + q4;
        const __m256 s0 = _mm256_set1_ps(d * static_cast<float>(sc[8 * hh + 2 * q4]));
        const __m256 s1 = _mm256_set1_ps(d * static_cast<float>(sc[8 * hh + 2 * q4 + 1]));
        __m256 w[4];
        for (int i = 0; i < 4; ++i) {
          const __m256i src = (q4 & 1) ? hi[i] : lo[i];
          const __m256i l4 = (q4 >> 1) ? _mm256_srli_epi32(src, 4) : _mm256_and_si256(src, nib);
          const __m256i h2 = _mm256_and_si256(_mm256_srli_epi32(hv[i], 2 * q4), three);
          const __m256i qi = _mm256_sub_epi32(_mm256_or_si256(l4, _mm256_slli_epi32(h2, 4)), off);
          w[i] = _mm256_mul_ps(i < 2 ? s0 : s1, _mm256_cvtepi32_ps(qi));
        }
        emit(g, w[0], w[1], w[2], w[3]);
      }
    }
  }
}
#endif  // LIVELM_GGUF_AVX2

// The block's weights into out[block_weights(F)] (exact), vectorized where possible.
template <int64_t F>
inline void dequant_block(const uint8_t* blk, float* out) {
#ifdef LIVELM_GGUF_AVX2
  groups<F>(blk, [&](int g, __m256 w0, __m256 w1, __m256 w2, __m256 w3) {
    float* o = out + 32 * g;
    _mm256_storeu_ps(o, w0);
    _mm256_storeu_ps(o + 8, w1);
    _mm256_storeu_ps(o + 16, w2);
    _mm256_storeu_ps(o + 24, w3);
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
