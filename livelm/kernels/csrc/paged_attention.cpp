// Decode attention over the paged KV cache on CPU: fp32 queries and outputs, the cache in
// fp32, bf16 or q8_0 rows (kv_types.h: widened to fp32 on load, so a bf16 cache halves the
// bytes read and a q8_0 one takes 27% of them).
//
// The pure-torch path must gather every request's context into a fresh tensor each layer
// and step (a copy as large as the KV itself). This kernel reads K/V in place through the
// block table instead: one task per (request, KV head), the query heads of that group
// scored together so each key row is loaded once, a two-pass softmax per query head.
// AVX-512 builds (head_dim 16, 32, 64, 80, 96, 128 or 256) sum four keys' dot products
// across lanes at once, take exp 16 scores at a time, and keep the outputs in registers
// over all values: 2.4x faster than the generic loops at 192 keys, one request, 2 threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif
#include "avx512_math.h"
#include "kv_types.h"
#include "soft_cap.h"
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define LIVELM_ATTN_AVX512 1
#endif

namespace {

using livelm::bf16;
using livelm::to_float;
#if defined(__AVX512F__)
using livelm::load16;
#endif
#if defined(__AVX2__)
using livelm::load8;
#endif

// a (fp32) . b (a cache row of KV type)
template <typename KV>
inline float dot(const float* a, const KV* b, int64_t n) {
#if defined(__AVX512F__)
  if (n % 32 == 0) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 16 == 0) {
    // Two accumulators hide the FMA latency; one horizontal sum at the end.
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    }
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
    __m128 s4 = _mm_add_ps(lo, hi);
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x1));
    return _mm_cvtss_f32(s1);
  }
#endif
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// y (fp32) += alpha * x (a cache row of KV type)
template <typename KV>
inline void axpy(float alpha, const KV* x, float* y, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16(x + i), _mm512_loadu_ps(y + i)));
    return;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0) {
    const __m256 va = _mm256_set1_ps(alpha);
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * to_float(x[i]);
}

// a (fp32) . a q8_0 row of n values: per 32-value block, the fp32 products are summed in
// lanes and scaled once by the block's scale.
inline float dot(const float* a, const uint8_t* row, int64_t n) {
  const int8_t* q = reinterpret_cast<const int8_t*>(row);
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / livelm::Q8_BLOCK; ++b) {
    const float* ab = a + b * livelm::Q8_BLOCK;
    const int8_t* qb = q + b * livelm::Q8_BLOCK;
    __m256 p0 = _mm256_mul_ps(_mm256_loadu_ps(ab), livelm::load8_i8(qb));
    __m256 p1 = _mm256_mul_ps(_mm256_loadu_ps(ab + 8), livelm::load8_i8(qb + 8));
    p0 = _mm256_fmadd_ps(_mm256_loadu_ps(ab + 16), livelm::load8_i8(qb + 16), p0);
    p1 = _mm256_fmadd_ps(_mm256_loadu_ps(ab + 24), livelm::load8_i8(qb + 24), p1);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(livelm::q8_scale(row, n, b)), _mm256_add_ps(p0, p1), acc);
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x1)));
#else
  float s = 0.f;
  for (int64_t b = 0; b < n / livelm::Q8_BLOCK; ++b) {
    float sb = 0.f;
#pragma omp simd reduction(+ : sb)
    for (int64_t i = 0; i < livelm::Q8_BLOCK; ++i) sb += a[b * livelm::Q8_BLOCK + i] * q[b * livelm::Q8_BLOCK + i];
    s += sb * livelm::q8_scale(row, n, b);
  }
  return s;
#endif
}

// y (fp32) += alpha * a q8_0 row of n values.
inline void axpy(float alpha, const uint8_t* row, float* y, int64_t n) {
  const int8_t* q = reinterpret_cast<const int8_t*>(row);
  for (int64_t b = 0; b < n / livelm::Q8_BLOCK; ++b) {
    const float ab = alpha * livelm::q8_scale(row, n, b);
    float* yb = y + b * livelm::Q8_BLOCK;
    const int8_t* qb = q + b * livelm::Q8_BLOCK;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 va = _mm256_set1_ps(ab);
    for (int64_t i = 0; i < livelm::Q8_BLOCK; i += 8)
      _mm256_storeu_ps(yb + i, _mm256_fmadd_ps(va, livelm::load8_i8(qb + i), _mm256_loadu_ps(yb + i)));
#else
#pragma omp simd
    for (int64_t i = 0; i < livelm::Q8_BLOCK; ++i) yb[i] += ab * qb[i];
#endif
  }
}

// Ask for the next block's rows while this one is computed: a request's blocks are
// scattered over the pool, which the hardware prefetcher does not follow.
template <typename KV>
inline void prefetch_rows(const KV* p, int64_t elems) {
#if defined(__SSE__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elems * static_cast<int64_t>(sizeof(KV)); off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
#endif
}

// Scores of the first skip keys of each of ng rows (len apart) to -inf: keys before a
// sliding window, in the block that holds its start. exp(-inf) is exactly 0, so they add
// nothing to the softmax sums or the outputs (a value row times 0 leaves a sum unchanged).
inline void mask_before(float* scores, int64_t ng, int64_t len, int64_t skip) {
  for (int64_t g = 0; g < ng && skip > 0; ++g)
    std::fill(scores + g * len, scores + g * len + skip, -std::numeric_limits<float>::infinity());
}

#if defined(LIVELM_ATTN_AVX512)
// The ng query heads of one (request, KV head) pair (q: ng rows of head_dim = 16 * HD16)
// over len keys, into out (ng rows); scores is scratch for ng * len floats. The first skip
// keys (a sliding window's partial first block) are scored, then weigh nothing.
// Scores: per key row, loaded once for all ng heads, one dot product per head (q held in
// registers when it fits). Values: ng heads' outputs accumulate in registers across all
// keys (a memory accumulator would make every key wait on the previous key's store).
template <int HD16, typename KV>
void attend_heads512(const float* q, int64_t ng, const KV* kh, const KV* vh, const int64_t* table,
                     int64_t len, int64_t skip, int64_t block_size, float scale, float cap, float* out,
                     float* scores) {
  constexpr int64_t hd = 16 * HD16;
  // Pass 1: scores[g * len + t].
  for (int64_t t0 = 0; t0 < len; t0 += block_size) {
    const KV* kblock = kh + table[t0 / block_size] * block_size * hd;
    const int64_t n = std::min(block_size, len - t0);
    if (t0 + block_size < len)
      prefetch_rows(kh + table[t0 / block_size + 1] * block_size * hd, std::min(block_size, len - t0 - block_size) * hd);
    else
      prefetch_rows(vh + table[0] * block_size * hd, std::min(block_size, len) * hd);
    // Four keys at a time: their four dot products are summed across lanes together.
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const KV* k = kblock + i * hd;
      for (int64_t g = 0; g < ng; ++g) {
        __m512 acc[4];
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[j] = _mm512_mul_ps(_mm512_loadu_ps(q + g * hd), load16(k + j * hd));
        _Pragma("GCC unroll 16") for (int c = 1; c < HD16; ++c) {
          const __m512 qc = _mm512_loadu_ps(q + g * hd + 16 * c);
          _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(qc, load16(k + j * hd + 16 * c), acc[j]);
        }
        _mm_storeu_ps(scores + g * len + t0 + i, _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
      }
    }
    for (; i < n; ++i) {
      for (int64_t g = 0; g < ng; ++g) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * hd), load16(kblock + i * hd));
        _Pragma("GCC unroll 16") for (int c = 1; c < HD16; ++c)
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * hd + 16 * c), load16(kblock + i * hd + 16 * c), acc);
        scores[g * len + t0 + i] = _mm512_reduce_add_ps(acc) * scale;
      }
    }
  }
  livelm::soft_cap(scores, ng * len, cap);
  mask_before(scores, ng, len, skip);
  // Softmax per query head (unnormalized; 1/sum applied to the output), 16 keys at a time
  // (glibc's expf stays scalar here and cost more than everything else together).
  float inv_sum[64];
  for (int64_t g = 0; g < ng; ++g) {
    float* sg = scores + g * len;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 live = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1);
      mv = _mm512_mask_max_ps(mv, live, mv, _mm512_maskz_loadu_ps(live, sg + t));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 live = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sg + t), m));
      _mm512_mask_storeu_ps(sg + t, live, e);
      sum = _mm512_mask_add_ps(sum, live, sum, e);
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // Pass 2: up to GC heads at a time, their outputs in (at most 16) registers.
  constexpr int GC = HD16 >= 16 ? 1 : 16 / HD16;
  for (int64_t gc = 0; gc < ng; gc += GC) {
    const int64_t nc = std::min<int64_t>(GC, ng - gc);
    __m512 acc[GC * HD16];
    _Pragma("GCC unroll 16") for (int i = 0; i < GC * HD16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
      const KV* vblock = vh + table[t0 / block_size] * block_size * hd;
      const int64_t n = std::min(block_size, len - t0);
      if (t0 + block_size < len)
        prefetch_rows(vh + table[t0 / block_size + 1] * block_size * hd, std::min(block_size, len - t0 - block_size) * hd);
      for (int64_t i = 0; i < n; ++i) {
        __m512 v[HD16];
        _Pragma("GCC unroll 16") for (int c = 0; c < HD16; ++c) v[c] = load16(vblock + i * hd + 16 * c);
        _Pragma("GCC unroll 16") for (int g = 0; g < GC; ++g) {
          if (g < nc) {
            const __m512 p = _mm512_set1_ps(scores[(gc + g) * len + t0 + i]);
            _Pragma("GCC unroll 16") for (int c = 0; c < HD16; ++c) acc[g * HD16 + c] = _mm512_fmadd_ps(p, v[c], acc[g * HD16 + c]);
          }
        }
      }
    }
    _Pragma("GCC unroll 16") for (int g = 0; g < GC; ++g) {
      if (g < nc) {
        const __m512 inv = _mm512_set1_ps(inv_sum[gc + g]);
        _Pragma("GCC unroll 16") for (int c = 0; c < HD16; ++c)
          _mm512_storeu_ps(out + (gc + g) * hd + 16 * c, _mm512_mul_ps(acc[g * HD16 + c], inv));
      }
    }
  }
}

// attend_heads512 for this head_dim, or false when none is compiled for it.
template <typename KV>
bool attend_heads_avx512(int64_t head_dim, const float* q, int64_t ng, const KV* kh, const KV* vh,
                         const int64_t* table, int64_t len, int64_t skip, int64_t block_size, float scale, float cap,
                         float* out, float* scores) {
  if (ng > 64) return false;
  switch (head_dim) {
    case 16: attend_heads512<1>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    case 32: attend_heads512<2>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    case 64: attend_heads512<4>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    case 80: attend_heads512<5>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    case 96: attend_heads512<6>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    case 128: attend_heads512<8>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    case 256: attend_heads512<16>(q, ng, kh, vh, table, len, skip, block_size, scale, cap, out, scores); return true;
    default: return false;
  }
}
// q8_0 rows take the generic loops (their dot/axpy above).
bool attend_heads_avx512(int64_t, const float*, int64_t, const uint8_t*, const uint8_t*, const int64_t*, int64_t,
                         int64_t, int64_t, float, float, float*, float*) {
  return false;
}
#endif
}  // namespace

namespace {

// The kernel for one cache element type (see paged_decode_attention_out); a cache row
// (one KV head, one token) takes `row` elements of KV (head_dim, or a q8_0 row's bytes).
template <typename KV>
void decode_impl(const float* qp, const KV* kp, const KV* vp, const int64_t* btp, const int64_t* lp, float* op,
                 int64_t num_seqs, int64_t num_kv_heads, int64_t num_slots, int64_t group, int64_t head_dim,
                 int64_t row, int64_t max_blocks, int64_t q_row, int64_t out_row, int64_t block_size, float fscale,
                 int64_t window, float cap) {
  // One task per (request, KV head): the group's query heads share every K/V row load
  // (splitting a group over threads measured slower, even one request on two threads).
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
      // A sliding window: keys from start = len - window on, read from the block holding
      // start (its first skip keys masked); the blocks before it are never touched.
      const int64_t start = window > 0 ? std::max<int64_t>(0, lp[s] - window) : 0;
      const int64_t first = start / block_size, skip = start - first * block_size;
      const int64_t len = lp[s] - first * block_size;
      const KV* kh = kp + h * num_slots * row;
      const KV* vh = vp + h * num_slots * row;
      const int64_t* table = btp + s * max_blocks + first;
#if defined(LIVELM_ATTN_AVX512)
      scores.resize(static_cast<size_t>(group * len));
      if (attend_heads_avx512(head_dim, qp + s * q_row + h * group * head_dim, group, kh, vh, table, len, skip,
                              block_size, fscale, cap, op + s * out_row + h * group * head_dim, scores.data()))
        continue;
#endif
      scores.assign(static_cast<size_t>(group * len), 0.f);
      const float* qh = qp + s * q_row + h * group * head_dim;
      // Pass 1: scores of every key for the group's query heads, block by block (the
      // rows of one block are contiguous; no division per token).
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const KV* kblock = kh + table[t0 / block_size] * block_size * row;
        const int64_t n = std::min(block_size, len - t0);
        if (t0 + block_size < len)
          prefetch_rows(kh + table[t0 / block_size + 1] * block_size * row,
                        std::min(block_size, len - t0 - block_size) * row);
        else
          prefetch_rows(vh + table[0] * block_size * row, std::min(block_size, len) * row);
        for (int64_t i = 0; i < n; ++i) {
          const KV* krow = kblock + i * row;
          for (int64_t g = 0; g < group; ++g)
            scores[g * len + t0 + i] = dot(qh + g * head_dim, krow, head_dim) * fscale;
        }
      }
      livelm::soft_cap(scores.data(), group * len, cap);
      mask_before(scores.data(), group, len, skip);
      // Softmax per query head.
      std::vector<float> inv_sum(group);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        // A vectorizable loop: with -ffast-math, expf maps to glibc's SIMD variant.
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          const float e = expf(sg[t] - m);
          sg[t] = e;
          sum += e;
        }
        inv_sum[g] = 1.f / sum;
      }
      // Pass 2: weighted sum of values.
      float* oh = op + s * out_row + h * group * head_dim;
      std::fill(oh, oh + group * head_dim, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const KV* vblock = vh + table[t0 / block_size] * block_size * row;
        const int64_t n = std::min(block_size, len - t0);
        if (t0 + block_size < len)
          prefetch_rows(vh + table[t0 / block_size + 1] * block_size * row,
                        std::min(block_size, len - t0 - block_size) * row);
        for (int64_t i = 0; i < n; ++i) {
          const KV* vrow = vblock + i * row;
          for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + t0 + i], vrow, oh + g * head_dim, head_dim);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = oh + g * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) o[i] *= inv_sum[g];
      }
    }
  });
}

}  // namespace

// q, out: [D, Hq, hd] fp32, each row's heads packed (any row stride); k_cache, v_cache:
// [Hkv, S, hd] both fp32 or both bf16, or [Hkv, S, q8_row_bytes(hd)] both uint8 (q8_0 rows);
// block_tables: [D, max_blocks] int64; context_lens: [D] int64; window > 0: a sliding
// window (row s sees only its last window keys, the blocks before them are not read; they
// may be released ones, pointed anywhere), 0: none; softcap > 0: scores soft-capped
// (soft_cap.h), 0: not.
void paged_decode_attention_out(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor block_tables, torch::Tensor context_lens,
                                int64_t block_size, double scale, torch::Tensor out, int64_t window,
                                double softcap) {
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: none)");
  TORCH_CHECK(q.dtype() == torch::kFloat32 && out.dtype() == torch::kFloat32, "fp32 queries and output");
  const auto kv = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == kv && (kv == torch::kFloat32 || kv == torch::kBFloat16 || kv == torch::kUInt8),
              "the K/V caches must both be float32, both bfloat16 or both uint8 (q8_0)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: [D, Hq, hd], heads packed");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(2) == 1 && out.stride(1) == out.size(2),
              "out: q's shape, heads packed");
  auto bt = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(0), num_slots = k_cache.size(1);
  const int64_t group = num_heads / num_kv_heads;
  const float fscale = static_cast<float>(scale);
  const int64_t row = kv == torch::kUInt8 ? livelm::q8_row_bytes(head_dim) : head_dim;
  TORCH_CHECK(kv != torch::kUInt8 || head_dim % livelm::Q8_BLOCK == 0, "q8_0 rows need head_dim % 32 == 0");
  TORCH_CHECK(k_cache.size(2) == row && v_cache.sizes() == k_cache.sizes(), "cache rows do not match head_dim");
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto run = [&](auto* kp, auto* vp) {
    decode_impl(q.data_ptr<float>(), kp, vp, btp, lp, out.data_ptr<float>(), num_seqs, num_kv_heads, num_slots,
                group, head_dim, row, bt.size(1), q.stride(0), out.stride(0), block_size, fscale, window,
                static_cast<float>(softcap));
  };
  if (kv == torch::kBFloat16) {
    run(reinterpret_cast<const bf16*>(k_cache.data_ptr<at::BFloat16>()),
        reinterpret_cast<const bf16*>(v_cache.data_ptr<at::BFloat16>()));
  } else if (kv == torch::kUInt8) {
    run(static_cast<const uint8_t*>(k_cache.data_ptr<uint8_t>()), static_cast<const uint8_t*>(v_cache.data_ptr<uint8_t>()));
  } else {
    run(static_cast<const float*>(k_cache.data_ptr<float>()), static_cast<const float*>(v_cache.data_ptr<float>()));
  }
}

// As above, into a fresh [D, Hq, hd] tensor.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     int64_t block_size, double scale, int64_t window, double softcap) {
  auto out = torch::empty(q.sizes(), q.options());
  paged_decode_attention_out(q.contiguous(), k_cache, v_cache, block_tables, context_lens, block_size, scale, out,
                             window, softcap);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU; fp32, bf16 or q8_0 cache)");
  m.def("paged_decode_attention_out", &paged_decode_attention_out,
        "paged decode attention (CPU; fp32, bf16 or q8_0 cache) written into out; q and out may have padded rows");
}
