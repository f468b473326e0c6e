// Linear layers over quantized weights with int8 activations (EngineConfig
// activation_quantization="int8", docs/quantization.md), CPU.
//
// x [M, K] is quantized per 32-element block, as llama.cpp's q8_0 does: dx = max|x| / 127,
// xq = round(x / dx) in [-127, 127]; xs = dx * sum(xq) is kept beside. A weight block's
// 32 integers u multiply xq in integers, and the fp32 scales go on the block sums:
//
//   y[m, n] = sum over blocks b of  dw * dx * I  +  c * xs,      I = sum_j u_j * xq_j
//
// with, per weight format (livelm/quant/formats.py), u and the additive term c:
//   q4_1: u = q (0..15), c = the block minimum m        (w = d * q + m)
//   q4_0: u = q (0..15), c = -8 * d                      (w = d * (q - 8))
//   q8_0: row kernels: u = q signed (the sign moved onto x: |q| * sign(x, q)), c = 0;
//         the AVX-512 GEMM: u = q + 128 (vpdpbusd wants unsigned bytes), c = -128 * d.
// I is exact (|I| < 2^24, so also its fp32 value); the rest is fp32 arithmetic.
//
// Kernels:
// - rows (decode, few rows of x): the weight read in its own row-major layout, one
//   256-bit integer dot product per block and row pair (vpdpbusd with AVX512-VNNI,
//   vpmaddubsw + vpmaddwd on AVX2), up to 4 rows of x by 2-4 weight rows per tile, the
//   weight rows prefetched ahead as the fp32 kernels do (csrc/quant_linear.cpp).
// - GEMM (gemm_min_rows_of(format) rows and more): per call, 32 (AVX2: 16) weight rows are unpacked into
//   a panel of bytes laid out [block][4-byte group][row][4], so one 512-bit (256-bit)
//   load holds 4 consecutive weights of each of 16 (8) rows; each row of x broadcasts
//   its 4 bytes and one vpdpbusd does 64 multiply-adds. The int32 block sums turn into
//   fp32 once per block and tile row. On AVX2 without VNNI, q4's byte products (<= 3810
//   per pair) add up over a block in int16 (<= 30480), so a group costs two instructions.
// - Without AVX2: the same arithmetic in scalar loops.
//
// Threads: at::parallel_for over output rows / panels (torch's pool).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define I8_AVX2 1
#endif
#if defined(I8_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define I8_VNNI512 1
#endif

namespace {

// The format codes of livelm/quant/formats.py FORMAT_CODES.
enum Format : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };
constexpr int64_t kBlock = 32;
// Rows of x from which the GEMM beats the row kernels, per format (measured on the
// SmolLM2-135M linears, 2 threads, one process: AVX512-VNNI from 6 rows for all three;
// AVX2 from 5 for q4 and from 10 for q8_0, whose sign trick costs the GEMM more).
// -DLIVELM_INT8_GEMM_MIN_ROWS=R forces one switch (to measure them).
inline int64_t gemm_min_rows_of(int64_t fmt) {
#ifdef LIVELM_INT8_GEMM_MIN_ROWS
  (void)fmt;
  return LIVELM_INT8_GEMM_MIN_ROWS;
#elif defined(__AVX512VNNI__) && defined(__AVX512F__)
  (void)fmt;
  return 6;
#else
  return fmt == 0 ? 10 : 5;
#endif
}

constexpr int64_t block_bytes(int64_t f) { return f == kQ8_0 ? 32 : 16; }
inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

struct Args {
  const int8_t* xq;    // [M, K]
  const float* xd;     // [M, nb] block scales of x
  const float* xs;     // [M, nb] dx * sum(xq) per block
  int64_t M, K, N, nb;
  const uint8_t* qs;   // [N, row bytes]
  const uint16_t* d;   // fp16 bits [N, nb]
  const uint16_t* m;   // q4_1 minimums, fp16 bits [N, nb]
  const float* bias;   // [N] or null
  float* out;          // [M, N]
};

// The weight's additive term c of block b in row n (see the header), for kernels whose u
// for q8_0 is signed.
template <int64_t F>
inline float add_term(const Args& a, int64_t n, int64_t b, float dw) {
  if constexpr (F == kQ4_1) return half_to_float(a.m[n * a.nb + b]);
  else if constexpr (F == kQ4_0) return -8.f * dw;
  else return 0.f;
}

// ---------------------------------------------------------------- activation quantization

// Row blocks [i0, i1) (i = m * nb + b) of x quantized.
void quantize_blocks(const float* x, int64_t i0, int64_t i1, int8_t* q, float* xd, float* xs) {
  for (int64_t i = i0; i < i1; ++i) {
    const float* xb = x + i * kBlock;
    int8_t* qb = q + i * kBlock;
#ifdef I8_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    const __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    // Round to nearest (even), the MXCSR default.
    const __m256i i0v = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1v = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
    const __m256i i2v = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3v = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0v, i1v), _mm256_add_epi32(i2v, i3v));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const int sum = _mm_cvtsi128_si32(s4);
    // Saturating packs interleave 128-bit lanes; the permute puts the 4-byte groups back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0v, i1v), _mm256_packs_epi32(i2v, i3v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * id));
      qb[j] = static_cast<int8_t>(std::clamp(v, -127, 127));
      sum += qb[j];
    }
#endif
    xd[i] = d;
    xs[i] = d * static_cast<float>(sum);
  }
}

void quantize_into(const float* x, int64_t M, int64_t K, int8_t* q, float* xd, float* xs) {
  const int64_t blocks = M * (K / kBlock);
  at::parallel_for(0, blocks, 2048, [&](int64_t i0, int64_t i1) { quantize_blocks(x, i0, i1, q, xd, xs); });
}

// ---------------------------------------------------------------- row kernels (decode)

#ifdef I8_AVX2
// acc + the sums of 4 adjacent byte products u * s (u unsigned, s signed), per int32 lane.
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
#ifdef I8_VNNI512
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  // u <= 128 and |s| <= 127 here, so the int16 pair sums never saturate.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 weights of a block as bytes in order 0..31 (q4: low nibbles are 0..15, high 16..31).
template <int64_t F>
inline __m256i load_weights(const uint8_t* blk) {
  if constexpr (F == kQ8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
  }
}

// I of one block as 8 int32 partial sums.
template <int64_t F>
inline __m256i block_dot(__m256i w, __m256i x) {
  const __m256i z = _mm256_setzero_si256();
  if constexpr (F == kQ8_0) return dot_add(z, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  else return dot_add(z, w, x);
}

// MT rows of x (t0..) times NT weight rows (n..).
template <int64_t F, int MT, int NT>
inline void row_tile(const Args& a, int64_t n, int64_t t0) {
  constexpr int64_t bb = block_bytes(F);
  const int64_t K = a.K, nb = a.nb, rb = nb * bb;
  __m256 acc[MT * NT];
  float extra[MT * NT];
  for (int i = 0; i < MT * NT; ++i) acc[i] = _mm256_setzero_ps(), extra[i] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i w[NT];
    float dw[NT], cw[NT];
    for (int j = 0; j < NT; ++j) {
      w[j] = load_weights<F>(a.qs + (n + j) * rb + b * bb);
      dw[j] = _cvtsh_ss(a.d[(n + j) * nb + b]);
      cw[j] = add_term<F>(a, n + j, b, dw[j]);
    }
    for (int t = 0; t < MT; ++t) {
      const int64_t xi = (t0 + t) * nb + b;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + xi * kBlock));
      const float dx = a.xd[xi], xs = a.xs[xi];
      for (int j = 0; j < NT; ++j) {
        acc[t * NT + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<F>(w[j], xv)), _mm256_set1_ps(dw[j] * dx),
                                          acc[t * NT + j]);
        if constexpr (F != kQ8_0) extra[t * NT + j] += cw[j] * xs;
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < NT; ++j) {
      float y = hsum(acc[t * NT + j]) + extra[t * NT + j];
      if (a.bias) y += a.bias[n + j];
      a.out[(t0 + t) * a.N + n + j] = y;
    }
}

// Rows of x per row tile
// (4 on AVX-512 too: 8 measured slower at 6-8 rows, 0.37-0.50 ms against 0.33-0.45 ms).
constexpr int kRowMT = 4;

template <int64_t F, int NT, int MT = kRowMT>
inline void row_tile_dispatch(int mt, const Args& a, int64_t n, int64_t t0) {
  if constexpr (MT >= 1) {
    if (mt == MT) return row_tile<F, MT, NT>(a, n, t0);
    return row_tile_dispatch<F, NT, MT - 1>(mt, a, n, t0);
  }
}

// Bytes of weight rows ahead of the current tile asked for (decode reads each weight once,
// straight from memory; see rows_range512 in csrc/quant_linear.cpp).
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_range(const void* ptr, int64_t bytes) {
  const char* c = static_cast<const char*>(ptr);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// Output rows [n0, n1), NT weight rows per tile.
template <int64_t F, int NT>
void rows_range(const Args& a, int64_t n0, int64_t n1) {
  const int64_t rb = a.nb * block_bytes(F), srb = a.nb * 2;
  const int64_t ahead = std::max<int64_t>(NT, kPrefetchBytes / std::max<int64_t>(rb, 1));
  prefetch_range(a.qs + n0 * rb, (std::min(n1, n0 + ahead) - n0) * rb);
  for (int64_t n = n0; n < n1; n += NT) {
    const int64_t pr0 = std::min(n1, n + ahead), pr1 = std::min(n1, n + NT + ahead);
    if (pr0 < pr1) {
      prefetch_range(a.qs + pr0 * rb, (pr1 - pr0) * rb);
      prefetch_range(a.d + pr0 * a.nb, (pr1 - pr0) * srb);
      if constexpr (F == kQ4_1) prefetch_range(a.m + pr0 * a.nb, (pr1 - pr0) * srb);
    }
    const int nt = static_cast<int>(std::min<int64_t>(NT, n1 - n));
    for (int64_t t0 = 0; t0 < a.M; t0 += kRowMT) {
      const int mt = static_cast<int>(std::min<int64_t>(kRowMT, a.M - t0));
      if (nt == NT) row_tile_dispatch<F, NT>(mt, a, n, t0);
      else if constexpr (NT > 1) {
        for (int j = 0; j < nt; ++j) row_tile_dispatch<F, 1>(mt, a, n + j, t0);
      }
    }
  }
}
#endif  // I8_AVX2

// Portable path: one output at a time, integers exact as above.
template <int64_t F>
void rows_range_scalar(const Args& a, int64_t n0, int64_t n1) {
  constexpr int64_t bb = block_bytes(F);
  const int64_t rb = a.nb * bb;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t t = 0; t < a.M; ++t) {
      float y = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* blk = a.qs + n * rb + b * bb;
        const int8_t* xb = a.xq + (t * a.nb + b) * kBlock;
        int32_t I = 0;
        for (int j = 0; j < kBlock; ++j) {
          const int u = F == kQ8_0 ? static_cast<int8_t>(blk[j]) : (j < 16 ? blk[j] & 0x0F : blk[j - 16] >> 4);
          I += u * xb[j];
        }
        const float dw = half_to_float(a.d[n * a.nb + b]);
        y += dw * a.xd[t * a.nb + b] * static_cast<float>(I) + add_term<F>(a, n, b, dw) * a.xs[t * a.nb + b];
      }
      if (a.bias) y += a.bias[n];
      a.out[t * a.N + n] = y;
    }
}

// ---------------------------------------------------------------- GEMM (batches, prefill)

#ifdef I8_AVX2
#ifdef I8_VNNI512
constexpr int kNR = 32;  // weight rows per panel: two zmm of 16 rows x 4 bytes
constexpr int kMR = 6;   // rows of x per tile: 12 int32 and 12 fp32 accumulators
#else
constexpr int kNR = 16;  // two ymm of 8 rows x 4 bytes
constexpr int kMR = 3;
#endif
// Whether the panel holds q8_0 as q + 128 (vpdpbusd) or signed (AVX2: the sign trick).
#ifdef I8_VNNI512
constexpr bool kQ8Offset = true;
#else
constexpr bool kQ8Offset = false;
#endif

// Weight rows [n0, n0 + rows) (rows <= kNR; the rest zero) as a panel: bytes pq[(b * 8 +
// g) * kNR * 4 + r * 4 + i] = u of row r at k = 32 b + 4 g + i; block scales pd[b * kNR + r]
// and additive terms pc[b * kNR + r].
template <int64_t F>
void pack_panel(const Args& a, int64_t n0, int rows, uint8_t* pq, float* pd, float* pc) {
  constexpr int64_t bb = block_bytes(F);
  const int64_t nb = a.nb, rb = nb * bb;
  for (int r = 0; r < kNR; ++r) {
    if (r >= rows) {
      for (int64_t b = 0; b < nb; ++b) {
        for (int g = 0; g < 8; ++g) std::memset(pq + (b * 8 + g) * kNR * 4 + r * 4, 0, 4);
        pd[b * kNR + r] = pc[b * kNR + r] = 0.f;
      }
      continue;
    }
    const int64_t n = n0 + r;
    for (int64_t b = 0; b < nb; ++b) {
      alignas(32) uint8_t u[32];
      __m256i w = load_weights<F>(a.qs + n * rb + b * bb);
      if constexpr (F == kQ8_0 && kQ8Offset) w = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(u), w);
      for (int g = 0; g < 8; ++g) std::memcpy(pq + (b * 8 + g) * kNR * 4 + r * 4, u + 4 * g, 4);
      const float dw = _cvtsh_ss(a.d[n * nb + b]);
      pd[b * kNR + r] = dw;
      pc[b * kNR + r] = F == kQ8_0 ? (kQ8Offset ? -128.f * dw : 0.f) : add_term<F>(a, n, b, dw);
    }
  }
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#ifdef I8_VNNI512
// MR rows of x (m0..) times one panel; out[r * N + j] for columns j < cols of the panel.
template <int64_t F, int MR>
inline void gemm_tile(const Args& a, int64_t m0, const uint8_t* pq, const float* pd, const float* pc, int64_t n0,
                      int cols) {
  const int64_t K = a.K, nb = a.nb;
  const int8_t* x = a.xq + m0 * K;
  __m512 f[2 * MR];
  for (int i = 0; i < 2 * MR; ++i) f[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i s[2 * MR];
    for (int i = 0; i < 2 * MR; ++i) s[i] = _mm512_setzero_si512();
    const uint8_t* pb = pq + b * 8 * kNR * 4;
    const int8_t* xb = x + b * kBlock;
    _Pragma("GCC unroll 8") for (int g = 0; g < 8; ++g) {
      const __m512i w0 = _mm512_loadu_si512(pb + g * kNR * 4), w1 = _mm512_loadu_si512(pb + g * kNR * 4 + 64);
      _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_set1_epi32(load4(xb + r * K + 4 * g));
        s[2 * r] = _mm512_dpbusd_epi32(s[2 * r], w0, xv);
        s[2 * r + 1] = _mm512_dpbusd_epi32(s[2 * r + 1], w1, xv);
      }
    }
    const __m512 d0 = _mm512_loadu_ps(pd + b * kNR), d1 = _mm512_loadu_ps(pd + b * kNR + 16);
    const __m512 c0 = _mm512_loadu_ps(pc + b * kNR), c1 = _mm512_loadu_ps(pc + b * kNR + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 dx = _mm512_set1_ps(a.xd[(m0 + r) * nb + b]), xs = _mm512_set1_ps(a.xs[(m0 + r) * nb + b]);
      f[2 * r] = _mm512_fmadd_ps(c0, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[2 * r]), _mm512_mul_ps(d0, dx), f[2 * r]));
      f[2 * r + 1] = _mm512_fmadd_ps(c1, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[2 * r + 1]), _mm512_mul_ps(d1, dx),
                                                              f[2 * r + 1]));
    }
  }
  const __mmask16 k0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  const __mmask16 k1 = static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
  const __m512 b0 = a.bias ? _mm512_maskz_loadu_ps(k0, a.bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = a.bias ? _mm512_maskz_loadu_ps(k1, a.bias + n0 + 16) : _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    float* o = a.out + (m0 + r) * a.N + n0;
    _mm512_mask_storeu_ps(o, k0, _mm512_add_ps(f[2 * r], b0));
    _mm512_mask_storeu_ps(o + 16, k1, _mm512_add_ps(f[2 * r + 1], b1));
  }
}
#else
template <int64_t F, int MR>
inline void gemm_tile(const Args& a, int64_t m0, const uint8_t* pq, const float* pd, const float* pc, int64_t n0,
                      int cols) {
  const int64_t K = a.K, nb = a.nb;
  const int8_t* x = a.xq + m0 * K;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[2 * MR];
  for (int i = 0; i < 2 * MR; ++i) f[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s[2 * MR];
    for (int i = 0; i < 2 * MR; ++i) s[i] = _mm256_setzero_si256();
    const uint8_t* pb = pq + b * 8 * kNR * 4;
    const int8_t* xb = x + b * kBlock;
    _Pragma("GCC unroll 8") for (int g = 0; g < 8; ++g) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + g * kNR * 4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + g * kNR * 4 + 32));
      if constexpr (F == kQ8_0) {
        const __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1);
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
          const __m256i xv = _mm256_set1_epi32(load4(xb + r * K + 4 * g));
          s[2 * r] = _mm256_add_epi32(s[2 * r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xv, w0)), ones));
          s[2 * r + 1] =
              _mm256_add_epi32(s[2 * r + 1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xv, w1)), ones));
        }
      } else {  // int16 sums over the block (see the header)
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {
          const __m256i xv = _mm256_set1_epi32(load4(xb + r * K + 4 * g));
          s[2 * r] = _mm256_add_epi16(s[2 * r], _mm256_maddubs_epi16(w0, xv));
          s[2 * r + 1] = _mm256_add_epi16(s[2 * r + 1], _mm256_maddubs_epi16(w1, xv));
        }
      }
    }
    if constexpr (F != kQ8_0)
      for (int i = 0; i < 2 * MR; ++i) s[i] = _mm256_madd_epi16(s[i], ones);
    const __m256 d0 = _mm256_loadu_ps(pd + b * kNR), d1 = _mm256_loadu_ps(pd + b * kNR + 8);
    const __m256 c0 = _mm256_loadu_ps(pc + b * kNR), c1 = _mm256_loadu_ps(pc + b * kNR + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 dx = _mm256_set1_ps(a.xd[(m0 + r) * nb + b]), xs = _mm256_set1_ps(a.xs[(m0 + r) * nb + b]);
      f[2 * r] = _mm256_fmadd_ps(c0, xs, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[2 * r]), _mm256_mul_ps(d0, dx), f[2 * r]));
      f[2 * r + 1] = _mm256_fmadd_ps(c1, xs, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[2 * r + 1]), _mm256_mul_ps(d1, dx),
                                                              f[2 * r + 1]));
    }
  }
  for (int r = 0; r < MR; ++r) {
    alignas(32) float y[16];
    _mm256_store_ps(y, f[2 * r]);
    _mm256_store_ps(y + 8, f[2 * r + 1]);
    float* o = a.out + (m0 + r) * a.N + n0;
    for (int j = 0; j < cols; ++j) o[j] = y[j] + (a.bias ? a.bias[n0 + j] : 0.f);
  }
}
#endif

template <int64_t F, int MR = kMR>
inline void gemm_dispatch(int mr, const Args& a, int64_t m0, const uint8_t* pq, const float* pd, const float* pc,
                          int64_t n0, int cols) {
  if constexpr (MR >= 1) {
    if (mr == MR) return gemm_tile<F, MR>(a, m0, pq, pd, pc, n0, cols);
    return gemm_dispatch<F, MR - 1>(mr, a, m0, pq, pd, pc, n0, cols);
  }
}

// Panels of kNR weight rows packed per task, then every row of x swept over them.
constexpr int64_t kPanelsPerGroup = 4;

template <int64_t F>
void gemm_range(const Args& a, int64_t p0, int64_t p1) {
  const int64_t K = a.K, nb = a.nb;
  std::vector<uint8_t> pq(kPanelsPerGroup * kNR * K);
  std::vector<float> pd(kPanelsPerGroup * kNR * nb), pc(kPanelsPerGroup * kNR * nb);
  // Rows of x per sweep: ~128 KiB of them, so they stay in L2 across the group's panels.
  const int64_t mchunk = std::max<int64_t>(kMR, (128 << 10) / K / kMR * kMR);
  for (int64_t g0 = p0; g0 < p1; g0 += kPanelsPerGroup) {
    const int64_t g1 = std::min(p1, g0 + kPanelsPerGroup);
    for (int64_t p = g0; p < g1; ++p) {
      const int64_t n0 = p * kNR, i = p - g0;
      pack_panel<F>(a, n0, static_cast<int>(std::min<int64_t>(kNR, a.N - n0)), pq.data() + i * kNR * K,
                    pd.data() + i * kNR * nb, pc.data() + i * kNR * nb);
    }
    for (int64_t mc = 0; mc < a.M; mc += mchunk) {
      const int64_t mend = std::min(a.M, mc + mchunk);
      for (int64_t p = g0; p < g1; ++p) {
        const int64_t n0 = p * kNR, i = p - g0;
        const int cols = static_cast<int>(std::min<int64_t>(kNR, a.N - n0));
        for (int64_t m0 = mc; m0 < mend; m0 += kMR)
          gemm_dispatch<F>(static_cast<int>(std::min<int64_t>(kMR, mend - m0)), a, m0, pq.data() + i * kNR * K,
                           pd.data() + i * kNR * nb, pc.data() + i * kNR * nb, n0, cols);
      }
    }
  }
}
#endif  // I8_AVX2

template <typename Fn>
void with_format(int64_t fmt, Fn&& f) {
  switch (fmt) {
    case kQ8_0: return f(std::integral_constant<int64_t, kQ8_0>{});
    case kQ4_0: return f(std::integral_constant<int64_t, kQ4_0>{});
    default: return f(std::integral_constant<int64_t, kQ4_1>{});
  }
}

void check_weights(const torch::Tensor& qs, const torch::Tensor& d, const std::optional<torch::Tensor>& m, int64_t fmt,
                   int64_t K) {
  TORCH_CHECK(fmt == kQ8_0 || fmt == kQ4_0 || fmt == kQ4_1,
              "int8 activations support q8_0, q4_0 and q4_1 weights (format codes 0-2), got code ", fmt);
  TORCH_CHECK(K % kBlock == 0 && K > 0, "int8 activations need K divisible by 32, got ", K);
  TORCH_CHECK(qs.is_contiguous() && qs.dim() == 2 && qs.size(1) == K / kBlock * block_bytes(fmt) &&
                  qs.scalar_type() == (fmt == kQ8_0 ? torch::kInt8 : torch::kUInt8),
              "qs must be contiguous ", fmt == kQ8_0 ? "int8" : "uint8", " [N, ", K / kBlock * block_bytes(fmt), "]");
  TORCH_CHECK(d.is_contiguous() && d.scalar_type() == torch::kInt16 && d.numel() == qs.size(0) * (K / kBlock),
              "scales: contiguous int16 bits [N, K/32]");
  if (fmt == kQ4_1)
    TORCH_CHECK(m.has_value() && m->is_contiguous() && m->scalar_type() == torch::kInt16 && m->numel() == d.numel(),
                "q4_1 needs its minimums as int16 bits [N, K/32]");
}

}  // namespace

// x [M, K] fp32 -> (xq int8 [M, K], xd fp32 [M, K/32], xs fp32 [M, K/32]).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_activations(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be 2-D fp32");
  TORCH_CHECK(x.size(1) % kBlock == 0, "int8 activations need K divisible by 32, got ", x.size(1));
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto xd = torch::empty({M, K / kBlock}, x.options()), xs = torch::empty({M, K / kBlock}, x.options());
  quantize_into(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
  return {q, xd, xs};
}

// (xq, xd, xs) from quantize_activations times the quantized weight [N, K] transposed (+ bias).
torch::Tensor int8_matmul(torch::Tensor xq, torch::Tensor xd, torch::Tensor xs, torch::Tensor qs, torch::Tensor d,
                          std::optional<torch::Tensor> m, std::optional<torch::Tensor> bias, int64_t fmt) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == torch::kInt8 && xq.is_contiguous(), "xq must be contiguous int8 [M, K]");
  const int64_t M = xq.size(0), K = xq.size(1), N = qs.size(0);
  check_weights(qs, d, m, fmt, K);
  TORCH_CHECK(xd.is_contiguous() && xs.is_contiguous() && xd.scalar_type() == torch::kFloat32 &&
                  xs.scalar_type() == torch::kFloat32 && xd.numel() == M * (K / kBlock) && xs.numel() == xd.numel(),
              "xd and xs must be contiguous fp32 [M, K/32]");
  auto out = torch::empty({M, N}, xd.options());
  if (M == 0 || N == 0) return out;
  torch::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == N, "bias must have N elements");
    bp = b.data_ptr<float>();
  }
  Args a{xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>(), M, K, N, K / kBlock,
         static_cast<const uint8_t*>(qs.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr<int16_t>()),
         fmt == kQ4_1 ? reinterpret_cast<const uint16_t*>(m->data_ptr<int16_t>()) : nullptr, bp,
         out.data_ptr<float>()};
#ifdef I8_AVX2
  if (M >= gemm_min_rows_of(fmt)) {
    at::parallel_for(0, (N + kNR - 1) / kNR, 1, [&](int64_t p0, int64_t p1) {
      with_format(fmt, [&](auto f) { gemm_range<decltype(f)::value>(a, p0, p1); });
    });
    return out;
  }
#endif
  // Enough rows per task that a thread's share outweighs waking it (~64K weight reads).
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    with_format(fmt, [&](auto f) {
#ifdef I8_AVX2
      if (M == 1) rows_range<decltype(f)::value, 4>(a, n0, n1);
      else rows_range<decltype(f)::value, 2>(a, n0, n1);
#else
      rows_range_scalar<decltype(f)::value>(a, n0, n1);
#endif
    });
  });
  return out;
}

// x [M, K] fp32 times the quantized weight transposed (+ bias), x quantized to int8 first.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, std::optional<torch::Tensor> m,
                          std::optional<torch::Tensor> bias, int64_t fmt) {
  auto [xq, xd, xs] = quantize_activations(x);
  return int8_matmul(xq, xd, xs, qs, d, m, bias, fmt);
}

// The instruction set of the integer dot products: "avx512-vnni", "avx2" or "scalar".
std::string simd() {
#if defined(I8_VNNI512)
  return "avx512-vnni";
#elif defined(I8_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

int64_t gemm_min_rows(int64_t fmt) { return gemm_min_rows_of(fmt); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("simd", &simd, "instruction set of the integer dot products");
  mod.def("gemm_min_rows", &gemm_min_rows, "rows of x from which int8_matmul runs its GEMM, for a format code");
  mod.def("quantize_activations", &quantize_activations, "fp32 x -> int8 per 32-block (xq, dx, dx * sum(xq))");
  mod.def("int8_matmul", &int8_matmul, "quantized activations times a q8_0/q4_0/q4_1 weight transposed (+ bias)");
  mod.def("int8_linear", &int8_linear, "quantize_activations, then int8_matmul");
}
