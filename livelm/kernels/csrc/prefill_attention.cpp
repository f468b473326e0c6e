// Prefill attention over the paged KV cache on CPU (flash-attention style): fp32 queries,
// the cache in fp32 or bf16 (kv_types.h; widened to fp32 as rows are read) or q8_0 rows
// (each key block's rows widened into a small fp32 scratch, reused by the whole tile).
//
// torch's SDPA needs the context gathered into a fresh tensor, a materialized mask, and
// runs its GEMMs through MKL's AVX2 path here. This kernel reads K/V rows in place through
// the slot list, computes the causal mask from positions, and keeps everything for one
// (KV head, query tile) task in L1/L2: the query heads of a GQA group are scored together
// so each key row is loaded once per tile.
//
// Layout of one task (G query heads sharing a KV head, Mq queries each, M = G * Mq columns,
// column g * Mq + i = query i of head g):
//   Qt [hd][M]   the tile's queries, transposed and pre-scaled (packed once per task)
//   S  [N][M]    scores of a block of N keys, transposed: S = K_blk . Qt broadcasts key
//                elements straight from the cache rows, and the softmax statistics of a
//                column (one query) are plain vector max/add over rows
//   O  [M][hd]   the output accumulator: O += P^T . V broadcasts P and reads V rows from
//                the cache
// Online softmax over key blocks in ascending order: key 0 is visible to every query, so
// each column's running max is finite after the first block (no -inf - -inf). A sliding
// window (a layer of Mistral, Qwen2 ...) starts at the tile's first query's window and masks
// its far edge; there a finite floor for the max stands in for -inf.
//
// The micro-kernels use GCC vector extensions sized to the widest ISA -march=native allows
// (AVX-512, AVX2, else 4 lanes that the compiler lowers to whatever exists).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "avx512_math.h"
#include "kv_types.h"
#include "soft_cap.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;    // floats per vector
constexpr int ACC = 24;   // accumulator registers a micro-kernel may use (of 32)
#elif defined(__AVX__)
constexpr int VW = 8;
constexpr int ACC = 12;   // of 16
#else
constexpr int VW = 4;
constexpr int ACC = 12;
#endif

typedef float vec __attribute__((vector_size(VW * 4)));
typedef float vec_u __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned access

inline vec load(const float* p) { return *reinterpret_cast<const vec_u*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_u*>(p) = v; }
inline vec splat(float x) { return vec{} + x; }

using livelm::bf16;
using livelm::to_float;

// VW cache elements as floats.
inline vec loadv(const float* p) { return load(p); }
typedef uint16_t hvec_u __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t uvec __attribute__((vector_size(VW * 4)));
inline vec loadv(const bf16* p) {
  const uvec wide = __builtin_convertvector(*reinterpret_cast<const hvec_u*>(p), uvec) << 16;
  vec r;
  std::memcpy(&r, &wide, sizeof r);
  return r;
}

constexpr int KEY_BLOCK = 96;  // keys per online-softmax step (a multiple of every QK row count)

// S[r][0:NV*VW] = sum_d K[r][d] * Qt[d][0:NV*VW] for R key rows (row pointers from the cache).
template <int R, int NV, typename KV>
inline void qk_tile(const KV* const* krows, const float* qt, int64_t ldq, int64_t hd, float* s, int64_t lds) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
  for (int64_t d = 0; d < hd; ++d) {
    vec qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = load(qt + d * ldq + v * VW);
    for (int r = 0; r < R; ++r) {
      const vec kb = splat(to_float(krows[r][d]));
      for (int v = 0; v < NV; ++v) acc[r][v] += kb * qv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(s + r * lds + v * VW, acc[r][v]);
}

// S[0:nk][0:M] for a key block; rows past nk are computed from a repeated row and ignored.
template <int NV, typename KV>
void qk_panel(const KV* const* krows, int64_t nk, const float* qt, int64_t ldq, int64_t hd, float* s,
              int64_t lds) {
  constexpr int R = ACC / NV;
  const KV* rows[R];
  for (int64_t r0 = 0; r0 < nk; r0 += R) {
    for (int r = 0; r < R; ++r) rows[r] = krows[std::min<int64_t>(r0 + r, nk - 1)];
    qk_tile<R, NV, KV>(rows, qt, ldq, hd, s + r0 * lds, lds);
  }
}

template <typename KV>
void qk_block(const KV* const* krows, int64_t nk, const float* qt, int64_t m, int64_t hd, float* s) {
  // Column panels of up to 4 vectors.
  for (int64_t c = 0; c < m; c += 4 * VW) {
    const int64_t nv = std::min<int64_t>(4, (m - c) / VW);
    switch (nv) {
      case 4: qk_panel<4>(krows, nk, qt + c, m, hd, s + c, m); break;
      case 3: qk_panel<3>(krows, nk, qt + c, m, hd, s + c, m); break;
      case 2: qk_panel<2>(krows, nk, qt + c, m, hd, s + c, m); break;
      default: qk_panel<1>(krows, nk, qt + c, m, hd, s + c, m); break;
    }
  }
}

// O[r][0:NV*VW] += sum_k P[k][r] * V[k][0:NV*VW] for R output rows (P is S after softmax).
template <int R, int NV, typename KV>
inline void pv_tile(const float* p, int64_t ldp, const KV* const* vrows, int64_t nk, float* o, int64_t ldo) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = load(o + r * ldo + v * VW);
  for (int64_t k = 0; k < nk; ++k) {
    vec vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = loadv(vrows[k] + v * VW);
    const float* pk = p + k * ldp;
    for (int r = 0; r < R; ++r) {
      const vec pb = splat(pk[r]);
      for (int v = 0; v < NV; ++v) acc[r][v] += pb * vv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(o + r * ldo + v * VW, acc[r][v]);
}

template <int NV, typename KV>
void pv_panel(const float* p, int64_t m, const KV* const* vrows, int64_t nk, float* o, int64_t hd) {
  constexpr int R = ACC / NV;
  int64_t r0 = 0;
  for (; r0 + R <= m; r0 += R) pv_tile<R, NV, KV>(p + r0, m, vrows, nk, o + r0 * hd, hd);
  for (; r0 < m; ++r0) pv_tile<1, NV, KV>(p + r0, m, vrows, nk, o + r0 * hd, hd);
}

template <typename KV>
void pv_block(const float* p, int64_t m, const KV* const* vrows, int64_t nk, float* o, int64_t hd) {
  // Head-dim chunks of up to 4 vectors; vrows are advanced by the chunk offset.
  std::vector<const KV*> shifted;
  for (int64_t c = 0; c < hd; c += 4 * VW) {
    const int64_t nv = std::min<int64_t>(4, (hd - c) / VW);
    const KV* const* rows = vrows;
    if (c) {
      shifted.resize(nk);
      for (int64_t k = 0; k < nk; ++k) shifted[k] = vrows[k] + c;
      rows = shifted.data();
    }
    switch (nv) {
      case 4: pv_panel<4>(p, m, rows, nk, o + c, hd); break;
      case 3: pv_panel<3>(p, m, rows, nk, o + c, hd); break;
      case 2: pv_panel<2>(p, m, rows, nk, o + c, hd); break;
      default: pv_panel<1>(p, m, rows, nk, o + c, hd); break;
    }
  }
}


// exp of softmax arguments (x <= 0, or -inf for masked scores); exactly 0 below -87.3
// (AVX-512: avx512_math.h).
typedef int32_t ivec __attribute__((vector_size(VW * 4)));
#if defined(__AVX512F__)
inline vec exp_vec(vec x) { return reinterpret_cast<vec>(exp512(reinterpret_cast<__m512>(x))); }
#else
// Cephes' polynomial after range reduction to [-ln2/2, ln2/2] (about 1 ulp). Integer
// rounding keeps it safe under -ffast-math (no x + magic - magic that the compiler may fold).
inline vec exp_vec(vec x) {
  const vec lo = splat(-87.33654f);
  const vec xc = x < lo ? lo : (x > splat(88.3762626647949f) ? splat(88.3762626647949f) : x);
  const vec fx = xc * 1.44269504088896341f;
  const ivec n = __builtin_convertvector(fx + 128.5f, ivec) - 128;  // round(fx), fx + 128.5 > 0
  const vec nf = __builtin_convertvector(n, vec);
  vec r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vec p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.f;
  const ivec bits = (n + 127) << 23;
  vec pow2n;
  std::memcpy(&pow2n, &bits, sizeof(vec));
  const vec res = p * pow2n;
  return x < lo ? vec{} : res;
}
#endif

// One online-softmax step over a block of scores S [nk][m] (columns are queries): updates
// the running max and sum of each column, turns S into exp(S - new max), and leaves in
// alpha the factor exp(old max - new max) that rescales the output accumulated so far.
void online_softmax(float* s, int64_t nk, int64_t m, float* row_max, float* row_sum, float* alpha) {
  for (int64_t c = 0; c < m; c += VW) {
    const vec old_max = load(row_max + c);
    vec mx = old_max;
    for (int64_t k = 0; k < nk; ++k) {
      const vec sv = load(s + k * m + c);
      mx = sv > mx ? sv : mx;
    }
    vec sum = vec{};
    for (int64_t k = 0; k < nk; ++k) {
      const vec e = exp_vec(load(s + k * m + c) - mx);
      store(s + k * m + c, e);
      sum += e;
    }
    const vec a = exp_vec(old_max - mx);  // 0 on the first block (old max -inf)
    store(alpha + c, a);
    store(row_max + c, mx);
    store(row_sum + c, load(row_sum + c) * a + sum);
  }
}

}  // namespace

namespace {

// The kernel for one cache element type (see prefill_attention). KV = uint8_t: q8_0 rows.
template <typename KV>
void prefill_impl(const torch::Tensor& q, const KV* kp, const KV* vp, const torch::Tensor& sl, torch::Tensor& out,
                  int64_t n, int64_t num_heads, int64_t hd, int64_t num_kv_heads, int64_t num_slots, int64_t ctx,
                  int64_t q_stride, int64_t group, int64_t mq, int64_t m, int64_t num_tiles, int64_t first_pos,
                  double scale, int64_t window, float cap) {
  const float* qp = q.data_ptr<float>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr bool kQ8 = std::is_same_v<KV, uint8_t>;
  using Elem = std::conditional_t<kQ8, float, KV>;  // what the micro-kernels read
  const int64_t row = kQ8 ? livelm::q8_row_bytes(hd) : hd;

  // Tasks handed out dynamically, one KV head after another (its K/V stay in L2), each
  // head's tiles in decreasing cost (later query tiles see more keys).
  const int64_t num_tasks = num_tiles * num_kv_heads;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> qt(hd * m), s(KEY_BLOCK * m), o(m * hd), row_max(m), row_sum(m), alpha(m);
    std::vector<const Elem*> krows(KEY_BLOCK), vrows(KEY_BLOCK);
    std::vector<float> kbuf(kQ8 ? KEY_BLOCK * hd : 0), vbuf(kQ8 ? KEY_BLOCK * hd : 0);
    for (;;) {
      const int64_t task = next.fetch_add(1);
      if (task >= num_tasks) break;
      const int64_t h = task / num_tiles, tile = num_tiles - 1 - task % num_tiles;
      const int64_t q0 = tile * mq, nq = std::min(mq, n - q0);
      const KV* kh = kp + h * num_slots * row;
      const KV* vh = vp + h * num_slots * row;
      // Pack Qt; padded columns repeat the tile's last query (computed, never written).
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < mq; ++i) {
          const float* qrow = qp + (q0 + std::min(i, nq - 1)) * q_stride + (h * group + g) * hd;
          for (int64_t d = 0; d < hd; ++d) qt[d * m + g * mq + i] = qrow[d] * fscale;
        }
      std::fill(o.begin(), o.end(), 0.f);
      // Under a sliding window a column may see nothing of its first key block: a finite
      // floor keeps its max finite (exp(-inf - floor) = 0, no -inf - -inf), and it rescales
      // as -inf would (exp(floor - max) is exactly 0).
      std::fill(row_max.begin(), row_max.end(), window > 0 ? -1e30f : neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      const int64_t lo_pos = first_pos + q0, hi_pos = first_pos + q0 + nq - 1;
      const int64_t num_keys = hi_pos + 1;  // keys past the tile's last query are never seen
      // A sliding window: keys before the tile's first query's window are never seen either.
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, lo_pos - window + 1) : 0;
      for (int64_t j0 = first_key; j0 < num_keys; j0 += KEY_BLOCK) {
        const int64_t nk = std::min<int64_t>(KEY_BLOCK, num_keys - j0);
        for (int64_t k = 0; k < nk; ++k) {
          if constexpr (kQ8) {
            livelm::dequantize_q8_row(kh + sp[j0 + k] * row, hd, kbuf.data() + k * hd);
            livelm::dequantize_q8_row(vh + sp[j0 + k] * row, hd, vbuf.data() + k * hd);
            krows[k] = kbuf.data() + k * hd;
            vrows[k] = vbuf.data() + k * hd;
          } else {
            krows[k] = kh + sp[j0 + k] * hd;
            vrows[k] = vh + sp[j0 + k] * hd;
          }
        }
        qk_block(krows.data(), nk, qt.data(), m, hd, s.data());
        livelm::soft_cap(s.data(), nk * m, cap);  // before the masks below
        if (j0 + nk - 1 > lo_pos) {
          // The diagonal: key j is hidden from query i when j > first_pos + q0 + i.
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t first_hidden = j0 + k - first_pos - q0;  // queries i < this cannot see key k
            if (first_hidden <= 0) continue;
            const int64_t upto = std::min(first_hidden, nq);
            float* srow = s.data() + k * m;
            for (int64_t g = 0; g < group; ++g)
              for (int64_t i = 0; i < upto; ++i) srow[g * mq + i] = neg_inf;
          }
        }
        if (window > 0 && hi_pos - j0 >= window) {
          // The window's far edge: key j is hidden from query i when first_pos + q0 + i - j >= window.
          for (int64_t k = 0; k < nk; ++k) {
            const int64_t first_far = j0 + k + window - first_pos - q0;  // queries i >= this cannot see key k
            if (first_far >= nq) break;  // grows with k
            float* srow = s.data() + k * m;
            for (int64_t g = 0; g < group; ++g)
              for (int64_t i = std::max<int64_t>(0, first_far); i < nq; ++i) srow[g * mq + i] = neg_inf;
          }
        }
        online_softmax(s.data(), nk, m, row_max.data(), row_sum.data(), alpha.data());
        if (j0 > first_key) {
          for (int64_t c = 0; c < m; ++c) {
            const float a = alpha[c];
            if (a == 1.f) continue;
            float* orow = o.data() + c * hd;
            for (int64_t d = 0; d < hd; d += VW) store(orow + d, load(orow + d) * a);
          }
        }
        pv_block(s.data(), m, vrows.data(), nk, o.data(), hd);
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t c = g * mq + i;
          const float inv = 1.f / row_sum[c];
          const float* orow = o.data() + c * hd;
          float* dst = op + ((q0 + i) * num_heads + h * group + g) * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) dst[d] = orow[d] * inv;
        }
    }
  });
}

}  // namespace

// q: [n, Hq, hd] fp32 (the chunk's queries, rows may be strided); k_cache, v_cache: [Hkv, S, hd], fp32 or
// bf16, or [Hkv, S, q8_row_bytes(hd)] uint8 (q8_0); slots: [ctx] int64,
// the slots of all keys (earlier context then the chunk itself, whose K/V are already
// written); out: [n, Hq * hd], written in place. Query i sits at position ctx - n + i and
// sees keys 0..ctx - n + i; window > 0 (a sliding layer): only its last window of them,
// ctx - n + i - window < j (the slots of keys before every query's window are not read;
// they may point anywhere), 0: no window; softcap > 0: scores soft-capped (soft_cap.h).
void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                       torch::Tensor out, double scale, int64_t window, double softcap) {
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: none)");
  const float cap = static_cast<float>(softcap);
  TORCH_CHECK(q.dtype() == torch::kFloat32 && out.dtype() == torch::kFloat32, "fp32 queries and output");
  const auto kv = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == kv && (kv == torch::kFloat32 || kv == torch::kBFloat16 || kv == torch::kUInt8),
              "the K/V caches must both be float32, both bfloat16 or both uint8 (q8_0)");
  // q may be a row slice of the fused QKV projection: any row stride, heads packed.
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q rows must hold packed heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(), "contiguous cache and out");
  TORCH_CHECK(slots.dtype() == torch::kInt64, "int64 slots");
  auto sl = slots.contiguous();
  const int64_t n = q.size(0), num_heads = q.size(1), hd = q.size(2);
  const int64_t num_kv_heads = k_cache.size(0), num_slots = k_cache.size(1);
  const int64_t ctx = sl.size(0), q_stride = q.stride(0);
  TORCH_CHECK(hd % VW == 0, "head_dim must be a multiple of ", VW);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && ctx >= n && n > 0, "bad shapes");
  TORCH_CHECK(out.numel() == n * num_heads * hd, "bad output shape");
  const int64_t group = num_heads / num_kv_heads;
  // Queries per head in a tile: about 64 columns per tile, in whole vectors.
  const int64_t mq = VW * std::max<int64_t>(1, 4 / group);
  const int64_t m = group * mq;
  const int64_t num_tiles = (n + mq - 1) / mq;
  const int64_t first_pos = ctx - n;

  TORCH_CHECK(kv != torch::kUInt8 || hd % livelm::Q8_BLOCK == 0, "q8_0 rows need head_dim % 32 == 0");
  TORCH_CHECK(k_cache.size(2) == (kv == torch::kUInt8 ? livelm::q8_row_bytes(hd) : hd) &&
                  v_cache.sizes() == k_cache.sizes(),
              "cache rows do not match head_dim");
  if (kv == torch::kBFloat16) {
    prefill_impl(q, reinterpret_cast<const bf16*>(k_cache.data_ptr<at::BFloat16>()),
                 reinterpret_cast<const bf16*>(v_cache.data_ptr<at::BFloat16>()), sl, out, n, num_heads, hd,
                 num_kv_heads, num_slots, ctx, q_stride, group, mq, m, num_tiles, first_pos, scale, window, cap);
  } else if (kv == torch::kUInt8) {
    prefill_impl(q, static_cast<const uint8_t*>(k_cache.data_ptr<uint8_t>()),
                 static_cast<const uint8_t*>(v_cache.data_ptr<uint8_t>()), sl, out, n, num_heads, hd, num_kv_heads,
                 num_slots, ctx, q_stride, group, mq, m, num_tiles, first_pos, scale, window, cap);
  } else {
    prefill_impl(q, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), sl, out, n, num_heads, hd, num_kv_heads,
                 num_slots, ctx, q_stride, group, mq, m, num_tiles, first_pos, scale, window, cap);
  }
}

// Stores new fp32 K/V [T, Hkv, hd] (rows may be strided: views of the fused QKV projection)
// into their slots of the caches [Hkv, S, hd], fp32 (a row copy) or bf16 (rounded to
// nearest even, as torch rounds), or q8_0 rows (quantized as layers/attention/kv_format.py
// does). torch's index_copy_ over the transposed view took 2-15 ms
// for a 4,096-token chunk (by load); this is a plain row copy.
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots) {
  TORCH_CHECK(k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32, "fp32 keys and values");
  const auto kv = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == kv && (kv == torch::kFloat32 || kv == torch::kBFloat16 || kv == torch::kUInt8),
              "the K/V caches must both be float32, both bfloat16 or both uint8 (q8_0)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  TORCH_CHECK(k.dim() == 3 && k.stride(2) == 1 && k.stride(1) == k.size(2) && v.dim() == 3 && v.stride(2) == 1 &&
                  v.stride(1) == v.size(2) && v.sizes() == k.sizes(),
              "k/v rows must hold packed heads");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && slots.numel() == k.size(0), "one int64 slot per token");
  auto sl = slots.contiguous();
  const int64_t n = k.size(0), num_kv_heads = k.size(1), hd = k.size(2), num_slots = k_cache.size(1);
  const int64_t row = kv == torch::kUInt8 ? livelm::q8_row_bytes(hd) : hd;
  TORCH_CHECK(kv != torch::kUInt8 || hd % livelm::Q8_BLOCK == 0, "q8_0 rows need head_dim % 32 == 0");
  TORCH_CHECK(k_cache.size(0) == num_kv_heads && k_cache.size(2) == row && v_cache.sizes() == k_cache.sizes(),
              "cache shape");
  const int64_t ks = k.stride(0), vs = v.stride(0);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
  }
  // One thread: a 4,096-token chunk copies in ~0.2 ms, less than waking a second one costs.
  if (k_cache.dtype() == torch::kFloat32) {
    float* kc = k_cache.data_ptr<float>();
    float* vc = v_cache.data_ptr<float>();
    const size_t row_bytes = static_cast<size_t>(hd) * sizeof(float);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::memcpy(kc + (h * num_slots + sp[t]) * hd, kp + t * ks + h * hd, row_bytes);
        std::memcpy(vc + (h * num_slots + sp[t]) * hd, vp + t * vs + h * hd, row_bytes);
      }
    return;
  }
  if (kv == torch::kUInt8) {
    uint8_t* kc = k_cache.data_ptr<uint8_t>();
    uint8_t* vc = v_cache.data_ptr<uint8_t>();
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        livelm::quantize_q8_row(kp + t * ks + h * hd, hd, kc + (h * num_slots + sp[t]) * row);
        livelm::quantize_q8_row(vp + t * vs + h * hd, hd, vc + (h * num_slots + sp[t]) * row);
      }
    return;
  }
  bf16* kc = reinterpret_cast<bf16*>(k_cache.data_ptr<at::BFloat16>());
  bf16* vc = reinterpret_cast<bf16*>(v_cache.data_ptr<at::BFloat16>());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      bf16* kd = kc + (h * num_slots + sp[t]) * hd;
      bf16* vd = vc + (h * num_slots + sp[t]) * hd;
      const float* kr = kp + t * ks + h * hd;
      const float* vr = vp + t * vs + h * hd;
      for (int64_t d = 0; d < hd; ++d) {
        kd[d] = livelm::to_bf16(kr[d]);
        vd[d] = livelm::to_bf16(vr[d]);
      }
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefill_attention", &prefill_attention,
        "paged prefill attention (CPU; fp32, bf16 or q8_0 cache), writes out in place");
  m.def("write_kv", &write_kv, "store new fp32 K/V rows into their cache slots (fp32, bf16 or q8_0 cache, CPU)");
}
