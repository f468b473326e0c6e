// Linear layers over quantized weights on CPU: fp32 activations, fp32 accumulation.
//
// Weight formats (see livelm/quant/formats.py), one row per output feature, blocks of 32
// weights along the input dimension K:
//   q8_0: qs int8 [N, K],       d fp16 [N, K/32]           w = d * q
//   q4_0: qs uint8 [N, K/2],    d fp16 [N, K/32]           w = d * (q - 8)
//   q4_1: qs uint8 [N, K/2],    d, m fp16 [N, K/32]        w = d * q + m
//   int8: qs int8 [N, K],       d fp32 [N] (per row)       w = d * q
// A q4 block is GGUF's 16 bytes: byte j holds weight j (low nibble) and j + 16 (high).
// Scales arrive as raw bits (int16 / int32 tensors) so that model.to(dtype) never casts them.
//
// Kernels (all fp32 multiply-adds on exactly dequantized weights or their integers):
// - AVX-512 builds, fewer than kGemmMinRows rows of x (decode): tiles of up to 8 rows of x
//   by 2-4 weight rows; a weight block is dequantized into registers once per tile (q4:
//   vpermps on a 16-entry table d*i + m) and multiplied with every row of the tile, so a
//   call reads each weight byte from memory once.
// - AVX-512 builds, 20 to 127 rows (batched decode): an outer-product GEMM; x is
//   transposed into 32-row panels once per call, 12 weight rows at a time are dequantized
//   into an L1 buffer and reused by every panel (2x12 zmm accumulators per k step); each
//   16 x 12 block of results is transposed in registers into rows of outputs.
// - AVX-512 builds, 128 rows and more (prefill): weight rows dequantized exactly into the
//   column panels of panel_gemm.h (4 panels, 64 outputs, at a time), then the fp32 panel
//   GEMM's micro-kernel: as fast as fp32 weights at 2048 rows.
// - AVX2 builds: one weight row at a time with up to four rows of x, the block scale on the
//   block's partial sums and the q4_1 minimum through per-block sums of x; Python sends
//   more rows than FUSED_MAX_ROWS_AVX2 to dequantize_rows + torch's fp32 GEMM instead.
// - Otherwise a scalar loop with the same arithmetic.
//
// Threads: at::parallel_for over output rows (torch's own pool; never link -fopenmp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LIVELM_QUANT_AVX2 1
#endif
#include "avx512_math.h"
#include "gguf_blocks.h"
#include "panel_gemm.h"

#if defined(LIVELM_QUANT_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define LIVELM_QUANT_AVX512 1
#endif

namespace {

enum Format : int64_t {
  kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3,
  // GGUF's raw blocks (gguf_blocks.h): qs holds the file's bytes, no separate scales.
  kQ5_0 = gguf_blocks::kQ5_0, kQ5_1 = gguf_blocks::kQ5_1, kQ4_K = gguf_blocks::kQ4_K,
  kQ5_K = gguf_blocks::kQ5_K, kQ6_K = gguf_blocks::kQ6_K,
};
constexpr int64_t kBlock = 32;
using gguf_blocks::is_raw;
// Whether format F has separate fp16 scales (d) per 32-weight block.
constexpr bool has_scales(int64_t f) { return f == kQ8_0 || f == kQ4_0 || f == kQ4_1; }

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// Bytes of one row's quantized values.
inline int64_t row_bytes(int64_t fmt, int64_t K) {
  if (is_raw(fmt)) return K / gguf_blocks::block_weights(fmt) * gguf_blocks::block_bytes(fmt);
  return (fmt == kQ4_0 || fmt == kQ4_1) ? K / 2 : K;
}

struct Problem {
  const float* x;  // [M, K]
  int64_t M, K, N;
  const uint8_t* qs;
  const uint16_t* d;    // block formats: fp16 bits [N, K/32]
  const uint16_t* m;    // q4_1 only
  const float* scale;   // int8 only: [N]
  const float* xsum;    // q4_1, q5_1, q4_k, q5_k: [M, K/32] sums of x over 32-weight groups
  const float* bias;    // [N] or null
  float* out;           // [M, N]
};

// Row n's block scales (and minimums) as fp32.
inline void row_scales(const uint16_t* src, int64_t nb, float* dst) {
  int64_t b = 0;
#ifdef LIVELM_QUANT_AVX2
  for (; b + 8 <= nb; b += 8)
    _mm256_storeu_ps(dst + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b))));
#endif
  for (; b < nb; ++b) dst[b] = half_to_float(src[b]);
}

inline float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

#ifdef LIVELM_QUANT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x1));
  return _mm_cvtss_f32(s);
}

// The 32 weights of block b (unscaled integers as floats), in order 0-7, 8-15, 16-23, 24-31.
template <int64_t F>
inline void load_block(const uint8_t* blk, __m256& w0, __m256& w1, __m256& w2, __m256& w3) {
  if constexpr (F == kQ8_0 || F == kInt8) {
    const __m128i* p = reinterpret_cast<const __m128i*>(blk);
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p)));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8))));
    w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 16))));
    w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 24))));
  } else {
    const __m256i lo_mask = _mm256_set1_epi32(0x0F);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8)));
    __m256i a_lo = _mm256_and_si256(a, lo_mask), a_hi = _mm256_srli_epi32(a, 4);
    __m256i b_lo = _mm256_and_si256(b, lo_mask), b_hi = _mm256_srli_epi32(b, 4);
    if constexpr (F == kQ4_0) {
      const __m256i eight = _mm256_set1_epi32(8);
      a_lo = _mm256_sub_epi32(a_lo, eight), a_hi = _mm256_sub_epi32(a_hi, eight);
      b_lo = _mm256_sub_epi32(b_lo, eight), b_hi = _mm256_sub_epi32(b_hi, eight);
    }
    w0 = _mm256_cvtepi32_ps(a_lo);
    w1 = _mm256_cvtepi32_ps(b_lo);
    w2 = _mm256_cvtepi32_ps(a_hi);
    w3 = _mm256_cvtepi32_ps(b_hi);
  }
}

// MT rows of x (t0 .. t0+MT) times weight row n, for the block formats.
template <int64_t F, int MT>
inline void block_row(const Problem& p, int64_t n, int64_t t0, const float* ds, const float* ms) {
  const int64_t K = p.K, nb = K / kBlock, bb = row_bytes(F, kBlock);
  const uint8_t* q = p.qs + n * row_bytes(F, K);
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 w0, w1, w2, w3;
    load_block<F>(q + b * bb, w0, w1, w2, w3);
    const __m256 db = _mm256_broadcast_ss(ds + b);
    for (int t = 0; t < MT; ++t) {
      const float* xb = p.x + (t0 + t) * K + b * kBlock;
      __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
      __m256 s2 = _mm256_mul_ps(w1, _mm256_loadu_ps(xb + 8));
      s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), s);
      s2 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), s2);
      acc[t] = _mm256_fmadd_ps(db, _mm256_add_ps(s, s2), acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    float y = hsum(acc[t]);
    if constexpr (F == kQ4_1) y += dot_scalar(ms, p.xsum + (t0 + t) * nb, nb);
    if (p.bias) y += p.bias[n];
    p.out[(t0 + t) * p.N + n] = y;
  }
}

// MT rows of x times weight row n, int8 with one scale per row (any K).
template <int MT>
inline void int8_row(const Problem& p, int64_t n, int64_t t0) {
  const int64_t K = p.K;
  const uint8_t* q = p.qs + n * K;
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kBlock <= K; k += kBlock) {
    __m256 w0, w1, w2, w3;
    load_block<kInt8>(q + k, w0, w1, w2, w3);
    for (int t = 0; t < MT; ++t) {
      const float* xk = p.x + (t0 + t) * K + k;
      acc[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xk), acc[t]);
      acc[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), acc[t]);
      acc[t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xk + 16), acc[t]);
      acc[t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xk + 24), acc[t]);
    }
  }
  const int8_t* qi = reinterpret_cast<const int8_t*>(q);
  for (int t = 0; t < MT; ++t) {
    float y = hsum(acc[t]);
    const float* xt = p.x + (t0 + t) * K;
    for (int64_t j = k; j < K; ++j) y += static_cast<float>(qi[j]) * xt[j];
    y *= p.scale[n];
    if (p.bias) y += p.bias[n];
    p.out[(t0 + t) * p.N + n] = y;
  }
}

// MT rows of x times weight row n for GGUF's raw block formats: each 32-weight group's
// integers are taken apart into registers once (gguf_blocks.h) and multiplied with the MT
// rows; the group's scales go on the partial sums and its additive term (minimum) through
// the group sums of x (p.xsum), as block_row does for q4_1.
template <int64_t F, int MT>
inline void raw_row(const Problem& p, int64_t n, int64_t t0) {
  const int64_t K = p.K, nb = K / gguf_blocks::block_weights(F), bb = gguf_blocks::block_bytes(F);
  const int64_t groups_per_row = K / 32;
  const uint8_t* q = p.qs + n * row_bytes(F, K);
  __m256 acc0[MT], acc1[MT];
  float extra[MT];
  for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps(), extra[t] = 0.f;
  const float* x = p.x + t0 * K;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g0 = b * (gguf_blocks::block_weights(F) / 32);
    gguf_blocks::groups<F>(q + b * bb, [&](int g, float s0, float s1, float add, __m256 q0, __m256 q1, __m256 q2,
                                           __m256 q3) {
      const float* xg = x + (g0 + g) * 32;
      const __m256 a = _mm256_set1_ps(s0), c = _mm256_set1_ps(s1);
      _Pragma("GCC unroll 4") for (int t = 0; t < MT; ++t) {
        const float* xt = xg + t * K;
        const __m256 lo = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xt + 8), _mm256_mul_ps(q0, _mm256_loadu_ps(xt)));
        const __m256 hi = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xt + 24), _mm256_mul_ps(q2, _mm256_loadu_ps(xt + 16)));
        acc0[t] = _mm256_fmadd_ps(a, lo, acc0[t]);
        acc1[t] = _mm256_fmadd_ps(c, hi, acc1[t]);
        if constexpr (gguf_blocks::has_add(F)) extra[t] += add * p.xsum[(t0 + t) * groups_per_row + g0 + g];
      }
    });
  }
  for (int t = 0; t < MT; ++t) {
    float y = hsum(_mm256_add_ps(acc0[t], acc1[t])) + extra[t];
    if (p.bias) y += p.bias[n];
    p.out[(t0 + t) * p.N + n] = y;
  }
}
#endif  // LIVELM_QUANT_AVX2

#ifdef LIVELM_QUANT_AVX512
// AVX-512 kernel: a tile of MT rows of x times NT weight rows. Each 32-weight block of
// the NT rows is dequantized exactly into registers once (q4: a 16-entry table d*i + m or
// d*(i - 8) indexed by the nibbles with vpermps; q8_0: d * q) and multiplied with the
// MT rows of x, so the dequantization cost is shared by MT rows and the x loads by NT
// rows. The MT*NT accumulators hold 16 partial sums each, reduced 4 at a time at the end.

// Exact fp32 weights of one 32-weight block: lo = weights 0..15, hi = 16..31.
template <int64_t F>
__attribute__((always_inline)) inline void dequant_block512(const uint8_t* blk, const float* d, const float* m, __m512& lo, __m512& hi) {
  if constexpr (F == kQ8_0) {
    const __m512 vd = _mm512_set1_ps(*d);
    lo = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)))));
    hi = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))));
  } else if constexpr (F == kInt8) {  // unscaled (one scale per row, applied to the sums)
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16))));
  } else if constexpr (F == kQ5_0 || F == kQ5_1) {
    // GGUF's 5-bit blocks: d (and m) fp16 in the block. The low 4 bits index a 16-entry
    // table, d * (i - 16) or d * i + m, looked up by vpermps as for q4 below; lanes whose
    // 5th bit (qh, through a mask register) is set then add 16 * d. Every value is an fp16
    // times a small integer (plus m for q5_1, rounded once), so the sums are exact and
    // the weights equal the reference's.
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float df = gguf_blocks::fp16_fast(blk);
    const __m512 vd = _mm512_set1_ps(df), step = _mm512_set1_ps(16.f * df);
    const uint8_t* qhp = blk + (F == kQ5_1 ? 4 : 2);
    const __m512 table = F == kQ5_0 ? _mm512_mul_ps(vd, _mm512_sub_ps(iota, _mm512_set1_ps(16.f)))
                                    : _mm512_fmadd_ps(vd, iota, _mm512_set1_ps(gguf_blocks::fp16_fast(blk + 2)));
    uint32_t qh;
    std::memcpy(&qh, qhp, 4);
    const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qhp + 4)));
    lo = _mm512_permutexvar_ps(raw, table);  // vpermps reads the index's low 4 bits: the low nibble
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), table);
    lo = _mm512_mask_add_ps(lo, static_cast<__mmask16>(qh & 0xFFFF), lo, step);
    hi = _mm512_mask_add_ps(hi, static_cast<__mmask16>(qh >> 16), hi, step);
  } else {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // d * i is exact in fp32, so the fused add rounds once, as the reference d * q + m does.
    const __m512 table = F == kQ4_1 ? _mm512_fmadd_ps(_mm512_set1_ps(*d), iota, _mm512_set1_ps(*m))
                                    : _mm512_mul_ps(_mm512_set1_ps(*d), _mm512_sub_ps(iota, _mm512_set1_ps(8.f)));
    const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    lo = _mm512_permutexvar_ps(raw, table);  // vpermps reads the index's low 4 bits: the low nibble
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), table);
  }
}

// How far ahead of the decode tiles weight rows are prefetched (see rows_range512).
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_range(const void* ptr, int64_t bytes) {
  const char* c = static_cast<const char*>(ptr);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

struct Tile {
  const float* x;      // first row of x
  int64_t K;           // row stride of x and the reduction length
  const uint8_t* q;    // first weight row
  int64_t rb;          // bytes per weight row
  const float* ds;     // fp32 scales of the first row, row stride nb (block formats)
  const float* ms;     // q4_1 minimums, same layout
  int64_t nb;
  float* out;          // out[t * ldo + j]
  int64_t ldo;
  const float* scale;  // int8: per-row scales of the first row
  const float* bias;   // of the first row, or null
};

template <int64_t F, int MT, int NT>
__attribute__((always_inline)) inline void tile512(const Tile& T) {
  __m512 acc[MT * NT];
  _Pragma("GCC unroll 32") for (int i = 0; i < MT * NT; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t K = T.K;
  const int64_t full = F == kInt8 ? K / kBlock : T.nb;
  const int64_t bb = row_bytes(F, kBlock);
  for (int64_t b = 0; b < full; ++b) {
    __m512 lo[NT], hi[NT];
    _Pragma("GCC unroll 32") for (int j = 0; j < NT; ++j)
      dequant_block512<F>(T.q + j * T.rb + b * bb, T.ds + j * T.nb + b, T.ms + j * T.nb + b, lo[j], hi[j]);
    const float* xb = T.x + b * kBlock;
    _Pragma("GCC unroll 32") for (int t = 0; t < MT; ++t) {
      const __m512 x0 = _mm512_loadu_ps(xb + t * K);
      _Pragma("GCC unroll 32") for (int j = 0; j < NT; ++j) acc[t * NT + j] = _mm512_fmadd_ps(lo[j], x0, acc[t * NT + j]);
      const __m512 x1 = _mm512_loadu_ps(xb + t * K + 16);
      _Pragma("GCC unroll 32") for (int j = 0; j < NT; ++j) acc[t * NT + j] = _mm512_fmadd_ps(hi[j], x1, acc[t * NT + j]);
    }
  }
  if constexpr (F == kInt8) {  // any K: 16 at a time, then a masked rest
    for (int64_t k = full * kBlock; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      __m512 w[NT];
      _Pragma("GCC unroll 32") for (int j = 0; j < NT; ++j)
        w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, T.q + j * T.rb + k)));
      _Pragma("GCC unroll 32") for (int t = 0; t < MT; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, T.x + t * K + k);
        _Pragma("GCC unroll 32") for (int j = 0; j < NT; ++j) acc[t * NT + j] = _mm512_fmadd_ps(w[j], xv, acc[t * NT + j]);
      }
    }
  }
  constexpr int kAcc = MT * NT;
  for (int g = 0; g < kAcc; g += 4) {
    const __m512 z = _mm512_setzero_ps();
    const __m128 r = reduce4(acc[g], g + 1 < kAcc ? acc[g + 1] : z, g + 2 < kAcc ? acc[g + 2] : z,
                             g + 3 < kAcc ? acc[g + 3] : z);
    if constexpr (NT == 4) {  // one row of x, four consecutive outputs
      __m128 y = r;
      if constexpr (F == kInt8) y = _mm_mul_ps(y, _mm_loadu_ps(T.scale));
      if (T.bias) y = _mm_add_ps(y, _mm_loadu_ps(T.bias));
      _mm_storeu_ps(T.out + (g / 4) * T.ldo, y);
    } else {
      alignas(16) float v[4];
      _mm_store_ps(v, r);
      _Pragma("GCC unroll 32") for (int i = 0; i < 4 && g + i < kAcc; ++i) {
        const int t = (g + i) / NT, j = (g + i) % NT;
        float y = v[i];
        if constexpr (F == kInt8) y *= T.scale[j];
        if (T.bias) y += T.bias[j];
        T.out[t * T.ldo + j] = y;
      }
    }
  }
}

template <int64_t F, int NT, int MT>
inline void tile_dispatch(int mt, const Tile& T) {
  if constexpr (MT >= 1) {
    if (mt == MT) return tile512<F, MT, NT>(T);
    return tile_dispatch<F, NT, MT - 1>(mt, T);
  }
}

template <int64_t F, int MaxMT, int NT>
inline void tile_dispatch_nt(int nt, int mt, const Tile& T) {
  if constexpr (NT >= 1) {
    if (nt == NT) return tile_dispatch<F, NT, MaxMT>(mt, T);
    return tile_dispatch_nt<F, MaxMT, NT - 1>(nt, mt, T);
  }
}

// Output rows [n0, n1) for all M rows of x, in tiles of up to MaxMT rows of x by NT
// weight rows (measured here: 4 x 4 for M <= 4, 8 x 2 above).
template <int64_t F, int MaxMT, int NT>
void rows_range512(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t K = p.K, nb = F == kInt8 ? 0 : K / kBlock, rb = row_bytes(F, K);
  // Weight rows per chunk (~8 KiB of them): they stay in L1 while every row block of x
  // passes over them, and a row block of x stays in L1 across the chunk's rows.
  const int64_t chunk = std::max<int64_t>(NT, (8 << 10) / std::max<int64_t>(rb, 1) / NT * NT);
  // Rows of x per pass: about 256 KiB of them (L2).
  const int64_t mchunk = std::max<int64_t>(MaxMT, (256 << 10) / (4 * K));
  // Scales as fp32 per row chunk, except int8's (per row) and the raw blocks' (inside them).
  std::vector<float> ds(has_scales(F) ? chunk * nb : 0), ms(F == kQ4_1 ? chunk * nb : 0);
  // Decode reads each weight once, straight from memory, in short runs per call (a few
  // hundred KiB per thread). Hardware prefetchers alone leave a thread waiting on memory
  // (~10 GB/s), so the weight rows (and their scales) kPrefetchBytes ahead are asked for
  // tile by tile, one run of lines per tile, and the first kPrefetchBytes all at once at the
  // start. Measured in one process, taking turns: all linears of a decode step 27% less
  // time for q4_1 and q8_0 than prefetching 8 KiB chunks in bursts; decode +27% (q4_1) and
  // +41% (q8_0) end to end. The prefetches are written out here on purpose: the same calls
  // through a small helper function measured no faster than the old bursts.
  const int64_t ahead = std::max<int64_t>(NT, kPrefetchBytes / std::max<int64_t>(rb, 1));
  {
    const int64_t r1 = std::min(n1, n0 + ahead);
    prefetch_range(p.qs + n0 * rb, (r1 - n0) * rb);
    if constexpr (has_scales(F)) prefetch_range(p.d + n0 * nb, (r1 - n0) * nb * 2);
    if constexpr (F == kQ4_1) prefetch_range(p.m + n0 * nb, (r1 - n0) * nb * 2);
  }
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    if constexpr (has_scales(F)) row_scales(p.d + c0 * nb, (c1 - c0) * nb, ds.data());
    if constexpr (F == kQ4_1) row_scales(p.m + c0 * nb, (c1 - c0) * nb, ms.data());
    for (int64_t m0 = 0; m0 < p.M; m0 += mchunk) {
      const int64_t m1 = std::min(p.M, m0 + mchunk);
      // Row blocks of x as even as possible, at most MaxMT rows each.
      const int64_t nblk = (m1 - m0 + MaxMT - 1) / MaxMT;
      int64_t t0 = m0;
      for (int64_t i = 0; i < nblk; ++i) {
        const int mt = static_cast<int>((m1 - t0 + (nblk - i) - 1) / (nblk - i));
        for (int64_t n = c0; n < c1; n += NT) {
          const int nt = static_cast<int>(std::min<int64_t>(NT, c1 - n));
          if (i == 0 && m0 == 0) {
            const int64_t pr0 = std::min(n1, n + ahead), pr1 = std::min(n1, n + nt + ahead);
            if (pr0 < pr1) {
              prefetch_range(p.qs + pr0 * rb, (pr1 - pr0) * rb);
              if constexpr (has_scales(F)) prefetch_range(p.d + pr0 * nb, (pr1 - pr0) * nb * 2);
              if constexpr (F == kQ4_1) prefetch_range(p.m + pr0 * nb, (pr1 - pr0) * nb * 2);
            }
          }
          Tile T{p.x + t0 * K, K, p.qs + n * rb, rb,
                 ds.data() + (n - c0) * nb, ms.data() + (n - c0) * nb, nb,
                 p.out + t0 * p.N + n, p.N, p.scale ? p.scale + n : nullptr, p.bias ? p.bias + n : nullptr};
          tile_dispatch_nt<F, MaxMT, NT>(nt, mt, T);
        }
        t0 += mt;
      }
    }
  }
}

template <int64_t F>
void rows_range_fused512(const Problem& p, int64_t n0, int64_t n1) {
  // The K-quants: the 256-bit kernel (one weight row at a time, up to 4 rows of x); q5_0
  // and q5_1 take the tiles, as q4_1 does (a table lookup per weight, dequantize_block512).
  if constexpr (is_raw(F) && F != kQ5_0 && F != kQ5_1) return raw_rows_range<F>(p, n0, n1);
  else if (p.M <= 4) rows_range512<F, 4, 4>(p, n0, n1);
  else rows_range512<F, 8, 2>(p, n0, n1);
}

// The 16 x 16 block r (r[i] = row i) transposed in place (r[i] = column i).
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// Many rows of x (M > kFusedRows): an outer-product GEMM. x is transposed once per call
// into panels of 16 * MV rows ([K][16 * MV], zero padded); NR weight rows are dequantized
// exactly into a row-major fp32 buffer (in L1) and reused by every panel. Per k, each
// weight is broadcast and multiplied with MV vectors of 16 rows of x.
constexpr int kGemmNR = 12;
// Rows of x from which the GEMM beats the fused tiles (measured on the model shapes).
constexpr int64_t kGemmMinRows = 20;
// Rows of x from which dequantizing into column panels for panel_gemm.h beats that GEMM
// (measured on the model shapes, one process taking turns, as time relative to fp32
// weights in the panel GEMM: at 32-64 rows the GEMM 0.75-0.91x, the panels 1.05-1.14x; at
// 128 both ~1.0x; at 256-512 the GEMM 1.06-1.11x, the panels 1.00-1.03x).
constexpr int64_t kPanelMinRows = 128;

template <int MV, int NR>
__attribute__((always_inline)) inline void gemm_tile(const float* xp, const float* w, int64_t ldw, int64_t K, float* tmp) {
  __m512 acc[NR * MV];
  _Pragma("GCC unroll 32") for (int i = 0; i < NR * MV; ++i) acc[i] = _mm512_setzero_ps();
  _Pragma("GCC unroll 2") for (int64_t k = 0; k < K; ++k) {
    __m512 xv[MV];
    _Pragma("GCC unroll 4") for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_ps(xp + k * 16 * MV + 16 * v);
    _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
      const __m512 wb = _mm512_set1_ps(w[j * ldw + k]);
      _Pragma("GCC unroll 4") for (int v = 0; v < MV; ++v) acc[j * MV + v] = _mm512_fmadd_ps(wb, xv[v], acc[j * MV + v]);
    }
  }
  _Pragma("GCC unroll 32") for (int i = 0; i < NR * MV; ++i) _mm512_storeu_ps(tmp + 16 * i, acc[i]);
}

template <int MV, int NR = kGemmNR>
inline void gemm_dispatch(int nr, const float* xp, const float* w, int64_t ldw, int64_t K, float* tmp) {
  if constexpr (NR >= 1) {
    if (nr == NR) return gemm_tile<MV, NR>(xp, w, ldw, K, tmp);
    return gemm_dispatch<MV, NR - 1>(nr, xp, w, ldw, K, tmp);
  }
}

// Exact fp32 values of weight row n (int8: unscaled integers) into dst[K].
template <int64_t F>
inline void dequant_row512(const Problem& p, int64_t n, float* dst, float* ds, float* ms) {
  if constexpr (is_raw(F)) {
    gguf_blocks::dequant_row<F>(p.qs + n * row_bytes(F, p.K), p.K, dst);
    return;
  } else {
  const int64_t K = p.K, rb = row_bytes(F, K), bb = row_bytes(F, kBlock);
  const uint8_t* q = p.qs + n * rb;
  const int64_t nb = K / kBlock;
  if constexpr (F != kInt8) row_scales(p.d + n * nb, nb, ds);
  if constexpr (F == kQ4_1) row_scales(p.m + n * nb, nb, ms);
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo, hi;
    dequant_block512<F>(q + b * bb, ds + b, ms + b, lo, hi);
    _mm512_storeu_ps(dst + b * kBlock, lo);
    _mm512_storeu_ps(dst + b * kBlock + 16, hi);
  }
  if constexpr (F == kInt8)
    for (int64_t k = nb * kBlock; k < K; ++k) dst[k] = static_cast<float>(reinterpret_cast<const int8_t*>(q)[k]);
  }
}

template <int64_t F>
void rows_range_gemm(const Problem& p, const float* xT, int64_t n0, int64_t n1) {
  const int64_t K = p.K, M = p.M, ldw = (K + 15) / 16 * 16;
  // Rows of x per pass (a multiple of the panel width): ~512 KiB of panels, kept in L2 while
  // the thread's weight rows pass over them (each weight row is dequantized once per pass).
  const int64_t mchunk = std::max<int64_t>(32, (512 << 10) / (4 * K) / 32 * 32);
  // Outputs are staged kStage columns at a time and copied out row by row, so each output
  // row is written in runs of 96 columns rather than 12 (rows whose stride is a multiple of
  // 4 KiB, N = 3072 or 49152, share cache sets).
  constexpr int64_t kStage = 8 * kGemmNR;
  std::vector<float> w(kGemmNR * ldw), ds(K / kBlock + 1), ms(K / kBlock + 1), tmp(kGemmNR * 32);
  std::vector<float> stage(std::min(M, mchunk) * kStage);
  for (int64_t mc = 0; mc < M; mc += mchunk) {
    const int64_t mend = std::min(M, mc + mchunk);
    for (int64_t s0 = n0; s0 < n1; s0 += kStage) {
      const int64_t s1 = std::min(n1, s0 + kStage);
      for (int64_t n = s0; n < s1; n += kGemmNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kGemmNR, s1 - n));
        for (int j = 0; j < nr; ++j) dequant_row512<F>(p, n + j, w.data() + j * ldw, ds.data(), ms.data());
        // The next rows' quantized bytes and scales load while these multiply (a large
        // weight, e.g. the LM head, comes from memory, and its rows are read far apart).
        const int64_t next = std::min<int64_t>(kGemmNR, n1 - (n + nr));
        if (next > 0) {
          prefetch_range(p.qs + (n + nr) * row_bytes(F, K), next * row_bytes(F, K));
          if constexpr (has_scales(F)) prefetch_range(p.d + (n + nr) * (K / kBlock), next * (K / kBlock) * 2);
          if constexpr (F == kQ4_1) prefetch_range(p.m + (n + nr) * (K / kBlock), next * (K / kBlock) * 2);
        }
        for (int64_t m0 = mc; m0 < mend; m0 += 32) {
          const int mv = M - m0 > 16 ? 2 : 1, rows = static_cast<int>(std::min<int64_t>(16 * mv, M - m0));
          const float* xp = xT + m0 * K;  // panels of 32 rows are [K][32]; a last one of <= 16 rows is [K][16]
          if (mv == 2) gemm_dispatch<2>(nr, xp, w.data(), ldw, K, tmp.data());
          else gemm_dispatch<1>(nr, xp, w.data(), ldw, K, tmp.data());
          // tmp is [nr][16 * mv]: per 16 rows of x, a 16 x 16 transpose (weight rows
          // padded with zeros) turns it into rows of outputs, stored as vectors (scalar
          // copies here cost ~10% of a 64-row call).
          const int ld = 16 * mv;
          const __mmask16 cols = static_cast<__mmask16>((1u << nr) - 1);
          const __m512 scale = F == kInt8 ? _mm512_maskz_loadu_ps(cols, p.scale + n) : _mm512_set1_ps(1.f);
          const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(cols, p.bias + n) : _mm512_setzero_ps();
          for (int v = 0; v * 16 < rows; ++v) {
            __m512 r[16];
            for (int j = 0; j < 16; ++j) r[j] = j < nr ? _mm512_loadu_ps(tmp.data() + j * ld + 16 * v) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16 && 16 * v + i < rows; ++i) {
              __m512 y = r[i];
              if constexpr (F == kInt8) y = _mm512_mul_ps(y, scale);
              _mm512_mask_storeu_ps(stage.data() + (m0 - mc + 16 * v + i) * kStage + (n - s0), cols, _mm512_add_ps(y, bias));
            }
          }
        }
      }
      for (int64_t m = mc; m < mend; ++m)
        std::memcpy(p.out + m * p.N + s0, stage.data() + (m - mc) * kStage, (s1 - s0) * sizeof(float));
    }
  }
}

// Weight rows [g0, g1) (<= 4 panels) dequantized exactly into the column panels of
// panel_gemm.h at `panels` ([K][16] each; int8 scaled, as dequantize does), through the
// row-major buffer `rows` [16][ldt]; the rows after g1 (up to n1) are prefetched meanwhile.
template <int64_t F>
void dequant_panels(const Problem& p, int64_t g0, int64_t g1, int64_t n1, float* rows, int64_t ldt, float* panels,
                    float* ds, float* ms) {
  const int64_t K = p.K;
  for (int64_t r0 = g0; r0 < g1; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, g1 - r0);
    // The next 16 rows load while these are dequantized (decode batches read them from memory).
    const int64_t next = std::min<int64_t>(16, n1 - (r0 + nr));
    if (next > 0) {
      const int64_t rb = row_bytes(F, K), nb = K / kBlock;
      prefetch_range(p.qs + (r0 + nr) * rb, next * rb);
      if constexpr (has_scales(F)) prefetch_range(p.d + (r0 + nr) * nb, next * nb * 2);
      if constexpr (F == kQ4_1) prefetch_range(p.m + (r0 + nr) * nb, next * nb * 2);
    }
    for (int64_t j = 0; j < 16; ++j) {
      float* dst = rows + j * ldt;
      if (j < nr) {
        dequant_row512<F>(p, r0 + j, dst, ds, ms);
        if constexpr (F == kInt8)
          for (int64_t k = 0; k < K; ++k) dst[k] *= p.scale[r0 + j];
        std::fill(dst + K, dst + ldt, 0.f);
      } else {
        std::fill(dst, dst + ldt, 0.f);
      }
    }
    float* panel = panels + (r0 - g0) * K;  // [K][16]
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(rows + j * ldt + k);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(panel + (k + i) * 16, r[i]);
    }
    for (; k < K; ++k)  // int8 with K % 16 != 0
      for (int j = 0; j < 16; ++j) panel[k * 16 + j] = rows[j * ldt + k];
  }
}

// Many rows of x (M >= kPanelMinRows): weight rows are dequantized exactly, 16 at a time, and
// transposed into the column panels of panel_gemm.h ([K][16]; int8 scaled, as dequantize
// does), up to four panels at once in an L2 buffer that every row block of x then sweeps.
// So quantized weights run the fp32 GEMM's micro-kernel, with outputs stored in rows.
template <int64_t F>
void rows_range_panels(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t K = p.K, ldt = (K + 15) / 16 * 16;
  constexpr int64_t G = panel_gemm::kPanels * 16;
  std::vector<float> rows(16 * ldt), panels(G * K), ds(K / kBlock + 1), ms(K / kBlock + 1);
  for (int64_t mc = 0; mc < p.M; mc += panel_gemm::kRowChunk) {
    const int64_t rows_m = std::min(panel_gemm::kRowChunk, p.M - mc);
    for (int64_t g0 = n0; g0 < n1; g0 += G) {
      const int64_t g1 = std::min(n1, g0 + G);
      dequant_panels<F>(p, g0, g1, n1, rows.data(), ldt, panels.data(), ds.data(), ms.data());
      panel_gemm::sweep(p.x + mc * K, rows_m, K, panels.data(), static_cast<int>((g1 - g0 + 15) / 16), g1 - g0,
                        p.out + mc * p.N + g0, p.N, p.bias ? p.bias + g0 : nullptr);
    }
  }
}

// x [M, K] -> panels: rows m0..m0+32 as [K][32] at xT + m0*K; a last panel of <= 16 rows as [K][16].
void transpose_x(const float* x, int64_t M, int64_t K, float* xT) {
  at::parallel_for(0, (M + 31) / 32, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t m0 = pi * 32, width = M - m0 > 16 ? 32 : 16, rows = std::min<int64_t>(width, M - m0);
      float* dst = xT + m0 * K;
      // 16 x 16 blocks transposed in registers (rows past M read as zeros).
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int64_t h = 0; h < width; h += 16) {
          __m512 r[16];
          for (int64_t i = 0; i < 16; ++i)
            r[i] = h + i < rows ? _mm512_loadu_ps(x + (m0 + h + i) * K + k) : _mm512_setzero_ps();
          transpose16(r);
          for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (k + i) * width + h, r[i]);
        }
      for (; k < K; ++k) {  // int8 with K % 16 != 0
        float* d = dst + k * width;
        for (int64_t r = 0; r < rows; ++r) d[r] = x[(m0 + r) * K + k];
        for (int64_t r = rows; r < width; ++r) d[r] = 0.f;
      }
    }
  });
}
#endif  // LIVELM_QUANT_AVX512

// Portable path: the same arithmetic one weight at a time.
inline float weight_int(int64_t fmt, const uint8_t* row, int64_t k) {
  if (fmt == kQ8_0 || fmt == kInt8) return static_cast<float>(reinterpret_cast<const int8_t*>(row)[k]);
  const int64_t b = k / kBlock, j = k % kBlock;
  const uint8_t byte = row[b * 16 + (j & 15)];
  const int v = j < 16 ? (byte & 0x0F) : (byte >> 4);
  return static_cast<float>(fmt == kQ4_0 ? v - 8 : v);
}

void scalar_row(const Problem& p, int64_t fmt, int64_t n, int64_t t, const float* ds, const float* ms) {
  const int64_t K = p.K;
  const uint8_t* row = p.qs + n * row_bytes(fmt, K);
  const float* xt = p.x + t * K;
  float y = 0.f;
  if (fmt == kInt8) {
    for (int64_t k = 0; k < K; ++k) y += weight_int(fmt, row, k) * xt[k];
    y *= p.scale[n];
  } else {
    const int64_t nb = K / kBlock;
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) s += weight_int(fmt, row, b * kBlock + j) * xt[b * kBlock + j];
      y += ds[b] * s;
    }
    if (fmt == kQ4_1) y += dot_scalar(ms, p.xsum + t * nb, nb);
  }
  if (p.bias) y += p.bias[n];
  p.out[t * p.N + n] = y;
}

// Bytes ahead of the current weight row that raw_rows_range asks for (software prefetch:
// decode streams each row once, and the hardware prefetcher alone leaves a thread waiting
// on memory; the AVX-512 tiles measured the same, see rows_range512).
constexpr int64_t kRawPrefetchBytes = 4096;

// Output rows [n0, n1) for GGUF's raw block formats.
template <int64_t F>
void raw_rows_range(const Problem& p, int64_t n0, int64_t n1) {
#ifdef LIVELM_QUANT_AVX2
  const int64_t rb = row_bytes(F, p.K);
  const char* base = reinterpret_cast<const char*>(p.qs);
  const char* end = base + n1 * rb;
#ifndef LIVELM_NO_RAW_PREFETCH
  for (const char* c = base + n0 * rb; c < std::min(end, base + n0 * rb + kRawPrefetchBytes); c += 64)
    _mm_prefetch(c, _MM_HINT_T0);
#endif
  for (int64_t n = n0; n < n1; ++n) {
#ifndef LIVELM_NO_RAW_PREFETCH
    // This row's bytes, kRawPrefetchBytes further on (one row of lines per row).
    const char* ahead = base + n * rb + kRawPrefetchBytes;
    for (const char* c = ahead; c < std::min(end, ahead + rb); c += 64) _mm_prefetch(c, _MM_HINT_T0);
#endif
    int64_t t0 = 0;
    for (; t0 + 4 <= p.M; t0 += 4) raw_row<F, 4>(p, n, t0);
    switch (p.M - t0) {
      case 3: raw_row<F, 3>(p, n, t0); break;
      case 2: raw_row<F, 2>(p, n, t0); break;
      case 1: raw_row<F, 1>(p, n, t0); break;
      default: break;
    }
  }
#else
  std::vector<float> w(p.K);
  for (int64_t n = n0; n < n1; ++n) {
    gguf_blocks::dequant_row<F>(p.qs + n * row_bytes(F, p.K), p.K, w.data());
    for (int64_t t = 0; t < p.M; ++t) {
      float y = dot_scalar(w.data(), p.x + t * p.K, p.K);
      if (p.bias) y += p.bias[n];
      p.out[t * p.N + n] = y;
    }
  }
#endif
}

template <int64_t F>
void rows_range(const Problem& p, int64_t n0, int64_t n1) {
  if constexpr (is_raw(F)) {
    raw_rows_range<F>(p, n0, n1);
    return;
  } else {
  const int64_t nb = p.K / kBlock;
  std::vector<float> ds(F == kInt8 ? 0 : nb), ms(F == kQ4_1 ? nb : 0);
  for (int64_t n = n0; n < n1; ++n) {
    if constexpr (F != kInt8) row_scales(p.d + n * nb, nb, ds.data());
    if constexpr (F == kQ4_1) row_scales(p.m + n * nb, nb, ms.data());
#ifdef LIVELM_QUANT_AVX2
    int64_t t0 = 0;
    for (; t0 + 4 <= p.M; t0 += 4) {
      if constexpr (F == kInt8) int8_row<4>(p, n, t0); else block_row<F, 4>(p, n, t0, ds.data(), ms.data());
    }
    switch (p.M - t0) {
      case 3: if constexpr (F == kInt8) int8_row<3>(p, n, t0); else block_row<F, 3>(p, n, t0, ds.data(), ms.data()); break;
      case 2: if constexpr (F == kInt8) int8_row<2>(p, n, t0); else block_row<F, 2>(p, n, t0, ds.data(), ms.data()); break;
      case 1: if constexpr (F == kInt8) int8_row<1>(p, n, t0); else block_row<F, 1>(p, n, t0, ds.data(), ms.data()); break;
      default: break;
    }
#else
    for (int64_t t = 0; t < p.M; ++t) scalar_row(p, F, n, t, ds.data(), ms.data());
#endif
  }
  }
}

void check_weights(const torch::Tensor& qs, const std::optional<torch::Tensor>& d, const std::optional<torch::Tensor>& m,
                   int64_t fmt, int64_t K) {
  TORCH_CHECK(fmt >= kQ8_0 && fmt <= kQ6_K, "unknown quantization format code ", fmt);
  if (is_raw(fmt)) {
    TORCH_CHECK(K % gguf_blocks::block_weights(fmt) == 0, "this format needs K divisible by ",
                gguf_blocks::block_weights(fmt), ", got ", K);
    TORCH_CHECK(qs.is_contiguous() && qs.dim() == 2 && qs.size(1) == row_bytes(fmt, K) &&
                qs.scalar_type() == torch::kUInt8, "raw blocks: contiguous uint8 [N, row bytes] for K=", K);
    return;
  }
  TORCH_CHECK(d.has_value(), "this format needs its scales");
  TORCH_CHECK(qs.is_contiguous() && d->is_contiguous(), "quantized weights must be contiguous");
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) == row_bytes(fmt, K), "qs has the wrong shape for K=", K);
  TORCH_CHECK(qs.scalar_type() == ((fmt == kQ4_0 || fmt == kQ4_1) ? torch::kUInt8 : torch::kInt8), "qs has the wrong dtype");
  if (fmt == kInt8) {
    TORCH_CHECK(d->scalar_type() == torch::kInt32 && d->numel() == qs.size(0), "int8 scales: int32 bits [N]");
  } else {
    TORCH_CHECK(K % kBlock == 0, "block formats need K divisible by 32, got ", K);
    TORCH_CHECK(d->scalar_type() == torch::kInt16 && d->numel() == qs.size(0) * (K / kBlock), "scales: int16 bits [N, K/32]");
  }
  if (fmt == kQ4_1) TORCH_CHECK(m.has_value() && m->is_contiguous() && m->numel() == d->numel(), "q4_1 needs mins");
}

// Calls f(std::integral_constant<int64_t, F>{}) for the block format with code fmt.
template <typename Fn>
void with_format(int64_t fmt, Fn&& f) {
  switch (fmt) {
    case kQ8_0: return f(std::integral_constant<int64_t, kQ8_0>{});
    case kQ4_0: return f(std::integral_constant<int64_t, kQ4_0>{});
    case kQ4_1: return f(std::integral_constant<int64_t, kQ4_1>{});
    case kQ5_0: return f(std::integral_constant<int64_t, kQ5_0>{});
    case kQ5_1: return f(std::integral_constant<int64_t, kQ5_1>{});
    case kQ4_K: return f(std::integral_constant<int64_t, kQ4_K>{});
    case kQ5_K: return f(std::integral_constant<int64_t, kQ5_K>{});
    case kQ6_K: return f(std::integral_constant<int64_t, kQ6_K>{});
    default: return f(std::integral_constant<int64_t, kInt8>{});
  }
}

// The bias as contiguous fp32 [N] in *keep (or null without one).
const float* bias_data(const std::optional<torch::Tensor>& bias, int64_t N, torch::Tensor* keep) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  *keep = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(keep->numel() == N, "bias must have N elements");
  return keep->data_ptr<float>();
}

// Sums of x over each 32-weight group (the q4_1 minimum's and the raw formats' additive
// terms). Plain loops: a torch reduction would cost more than the sums (decode is ~1 row).
torch::Tensor group_sums(const torch::Tensor& x, int64_t M, int64_t K) {
  torch::Tensor xsum = torch::empty({M, K / kBlock}, x.options());
  float* xs = xsum.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < M * (K / kBlock); ++i) {
    float s = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) s += xp[i * kBlock + j];
    xs[i] = s;
  }
  return xsum;
}

}  // namespace

// x [M, K] fp32 times the quantized weight [N, K] transposed (+ bias) -> [M, N] fp32.
torch::Tensor quantized_matmul(torch::Tensor x, torch::Tensor qs, std::optional<torch::Tensor> d, std::optional<torch::Tensor> m,
                               std::optional<torch::Tensor> bias, int64_t fmt) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D fp32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  check_weights(qs, d, m, fmt, K);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  torch::Tensor xsum;
  Problem p{x.data_ptr<float>(), M, K, N, static_cast<const uint8_t*>(qs.data_ptr()), nullptr, nullptr, nullptr, nullptr, nullptr,
            out.data_ptr<float>()};
  if (fmt == kInt8) {
    p.scale = reinterpret_cast<const float*>(d->data_ptr<int32_t>());
  } else if (has_scales(fmt)) {
    p.d = reinterpret_cast<const uint16_t*>(d->data_ptr<int16_t>());
  }
  if (fmt == kQ5_1 || fmt == kQ4_K || fmt == kQ5_K) {
    xsum = group_sums(x, M, K);
    p.xsum = xsum.data_ptr<float>();
  }
  if (fmt == kQ4_1) {
    p.m = reinterpret_cast<const uint16_t*>(m->data_ptr<int16_t>());
#ifndef LIVELM_QUANT_AVX512
    xsum = group_sums(x, M, K);
    p.xsum = xsum.data_ptr<float>();
#endif
  }
  torch::Tensor b;
  p.bias = bias_data(bias, N, &b);
  // Enough rows per task that a thread's share outweighs waking it (~64K weight reads).
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
#ifdef LIVELM_QUANT_AVX512
  if (M >= kPanelMinRows) {
    // Tasks of whole panels (16 weight rows).
    at::parallel_for(0, (N + 15) / 16, std::max<int64_t>(1, (int64_t{1} << 11) / K), [&](int64_t q0, int64_t q1) {
      const int64_t n0 = q0 * 16, n1 = std::min(N, q1 * 16);
      with_format(fmt, [&](auto f) { rows_range_panels<decltype(f)::value>(p, n0, n1); });
    });
    return out;
  }
  if (M >= kGemmMinRows) {
    // xT: panels of 32 rows ([K][32]); the last one may be 16 wide (padded with zeros).
    auto xT = torch::empty({(M + 31) / 32 * 32 * K}, x.options());
    transpose_x(p.x, M, K, xT.data_ptr<float>());
    const float* xt = xT.data_ptr<float>();
    at::parallel_for(0, (N + kGemmNR - 1) / kGemmNR, 1, [&](int64_t g0, int64_t g1) {
      const int64_t n0 = g0 * kGemmNR, n1 = std::min(N, g1 * kGemmNR);
      with_format(fmt, [&](auto f) { rows_range_gemm<decltype(f)::value>(p, xt, n0, n1); });
    });
    return out;
  }
#endif
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#ifdef LIVELM_QUANT_AVX512
    with_format(fmt, [&](auto f) { rows_range_fused512<decltype(f)::value>(p, n0, n1); });
    return;
#endif
    with_format(fmt, [&](auto f) { rows_range<decltype(f)::value>(p, n0, n1); });
  });
  return out;
}

// fp32 weights W [N, K] packed for fp32_linear: [ceil(N / 16), K, 16] (AVX-512 builds).
torch::Tensor fp32_pack(torch::Tensor w) {
#ifdef LIVELM_QUANT_AVX512
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "w must be 2-D fp32");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto packed = torch::empty({(N + 15) / 16, K, 16}, w.options());
  panel_gemm::pack(w.data_ptr<float>(), N, K, packed.data_ptr<float>());
  return packed;
#else
  TORCH_CHECK(false, "packed fp32 linears need an AVX-512 build of the kernels");
#endif
}

// x [M, K] @ W.T (+ bias) -> [M, N] for W packed by fp32_pack.
torch::Tensor fp32_linear(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias, int64_t N) {
#ifdef LIVELM_QUANT_AVX512
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D fp32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 16 && packed.is_contiguous() && packed.size(0) == (N + 15) / 16,
              "packed must come from fp32_pack of an [N, K] weight");
  TORCH_CHECK(x.size(1) == packed.size(1), "x has ", x.size(1), " columns, the weight ", packed.size(1));
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor b;
  const float* bp = bias_data(bias, N, &b);
  if (M > 0 && N > 0) panel_gemm::linear(x.data_ptr<float>(), M, K, N, packed.data_ptr<float>(), bp, out.data_ptr<float>());
  return out;
#else
  TORCH_CHECK(false, "packed fp32 linears need an AVX-512 build of the kernels");
#endif
}

// Exact fp32 values of weight rows [row0, row0 + rows) (or of the rows listed in `index`).
torch::Tensor dequantize_rows(torch::Tensor qs, std::optional<torch::Tensor> d, std::optional<torch::Tensor> m, int64_t fmt,
                              int64_t K, int64_t row0, int64_t rows, std::optional<torch::Tensor> index) {
  check_weights(qs, d, m, fmt, K);
  torch::Tensor idx;
  if (index.has_value() && index->defined()) {
    idx = index->to(torch::kInt64).contiguous();
    rows = idx.numel();
  }
  TORCH_CHECK(idx.defined() || (row0 >= 0 && row0 + rows <= qs.size(0)), "row range out of bounds");
  auto out = torch::empty({rows, K}, qs.options().dtype(torch::kFloat32));
  const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  const int64_t N = qs.size(0), nb = K / kBlock, rb = row_bytes(fmt, K);
  if (ip) for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < N, "row index out of range");
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const uint16_t* dp = has_scales(fmt) ? reinterpret_cast<const uint16_t*>(d->data_ptr<int16_t>()) : nullptr;
  const float* sp = fmt == kInt8 ? reinterpret_cast<const float*>(d->data_ptr<int32_t>()) : nullptr;
  const uint16_t* mp = fmt == kQ4_1 ? reinterpret_cast<const uint16_t*>(m->data_ptr<int16_t>()) : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> ds(nb), ms(nb);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = ip ? ip[r] : row0 + r;
      const uint8_t* row = qp + n * rb;
      float* o = op + r * K;
      if (is_raw(fmt)) {
        with_format(fmt, [&](auto f) {
          if constexpr (is_raw(decltype(f)::value)) gguf_blocks::dequant_row<decltype(f)::value>(row, K, o);
        });
        continue;
      }
      if (fmt == kInt8) {
        const float s = sp[n];
        const int8_t* qi = reinterpret_cast<const int8_t*>(row);
        for (int64_t k = 0; k < K; ++k) o[k] = s * static_cast<float>(qi[k]);
        continue;
      }
      row_scales(dp + n * nb, nb, ds.data());
      if (mp) row_scales(mp + n * nb, nb, ms.data());
      for (int64_t b = 0; b < nb; ++b) {
        float* ob = o + b * kBlock;
        const float db = ds[b];
#ifdef LIVELM_QUANT_AVX2
        __m256 w[4];
        const uint8_t* blk = row + b * row_bytes(fmt, kBlock);
        if (fmt == kQ8_0) load_block<kQ8_0>(blk, w[0], w[1], w[2], w[3]);
        else if (fmt == kQ4_0) load_block<kQ4_0>(blk, w[0], w[1], w[2], w[3]);
        else load_block<kQ4_1>(blk, w[0], w[1], w[2], w[3]);
        const __m256 vd = _mm256_set1_ps(db);
        // d * q is exact in fp32 (11-bit by 8-bit mantissas), so the fused add rounds once,
        // exactly as the unfused reference d * q + m does.
        const __m256 vm = _mm256_set1_ps(mp ? ms[b] : 0.f);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(ob + 8 * i, mp ? _mm256_fmadd_ps(vd, w[i], vm) : _mm256_mul_ps(vd, w[i]));
#else
        for (int64_t j = 0; j < kBlock; ++j) {
          const float v = db * weight_int(fmt, row, b * kBlock + j);
          ob[j] = mp ? v + ms[b] : v;
        }
#endif
      }
    }
  });
  return out;
}

// The instruction set the kernels were compiled for: "avx512", "avx2" or "scalar".
std::string simd() {
#if defined(LIVELM_QUANT_AVX512)
  return "avx512";
#elif defined(LIVELM_QUANT_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("simd", &simd, "instruction set of the compiled kernels");
  mod.def("quantized_matmul", &quantized_matmul, "x @ dequantize(W).T (+ bias) for quantized W (fp32, CPU)");
  mod.def("fp32_pack", &fp32_pack, "pack an fp32 [N, K] weight for fp32_linear (AVX-512 builds)");
  mod.def("fp32_linear", &fp32_linear, "x @ W.T (+ bias) for an fp32 weight packed by fp32_pack");
  mod.def("dequantize_rows", &dequantize_rows, "exact fp32 rows of a quantized weight (CPU)");
}
