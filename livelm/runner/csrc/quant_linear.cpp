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
// Decode-sized batches (few rows of x) are memory-bound: quantized_matmul streams each
// weight row once, decodes a block into registers and multiplies it with up to four rows
// of x at a time, so a weight byte is read from memory once per call. The block scale is
// applied to the block's partial sums (sum_j d*q_j*x_j = d * sum_j q_j*x_j), and the q4_1
// minimum through per-block sums of x (sum_j m*x_j = m * sum_j x_j). Prefill-sized batches
// use dequantize_rows tile by tile into torch's fp32 GEMM instead (in Python).
//
// Threads: at::parallel_for over output rows (torch's own pool; never link -fopenmp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LIVELM_QUANT_AVX2 1
#endif

namespace {

enum Format : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3 };
constexpr int64_t kBlock = 32;

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// Bytes of one row's quantized values.
inline int64_t row_bytes(int64_t fmt, int64_t K) { return (fmt == kQ4_0 || fmt == kQ4_1) ? K / 2 : K; }

struct Problem {
  const float* x;  // [M, K]
  int64_t M, K, N;
  const uint8_t* qs;
  const uint16_t* d;    // block formats: fp16 bits [N, K/32]
  const uint16_t* m;    // q4_1 only
  const float* scale;   // int8 only: [N]
  const float* xsum;    // q4_1 only: [M, K/32] block sums of x
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
#endif  // LIVELM_QUANT_AVX2

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

template <int64_t F>
void rows_range(const Problem& p, int64_t n0, int64_t n1) {
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

void check_weights(const torch::Tensor& qs, const torch::Tensor& d, const std::optional<torch::Tensor>& m,
                   int64_t fmt, int64_t K) {
  TORCH_CHECK(fmt >= kQ8_0 && fmt <= kInt8, "unknown quantization format code ", fmt);
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous(), "quantized weights must be contiguous");
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) == row_bytes(fmt, K), "qs has the wrong shape for K=", K);
  TORCH_CHECK(qs.scalar_type() == ((fmt == kQ4_0 || fmt == kQ4_1) ? torch::kUInt8 : torch::kInt8), "qs has the wrong dtype");
  if (fmt == kInt8) {
    TORCH_CHECK(d.scalar_type() == torch::kInt32 && d.numel() == qs.size(0), "int8 scales: int32 bits [N]");
  } else {
    TORCH_CHECK(K % kBlock == 0, "block formats need K divisible by 32, got ", K);
    TORCH_CHECK(d.scalar_type() == torch::kInt16 && d.numel() == qs.size(0) * (K / kBlock), "scales: int16 bits [N, K/32]");
  }
  if (fmt == kQ4_1) TORCH_CHECK(m.has_value() && m->is_contiguous() && m->numel() == d.numel(), "q4_1 needs mins");
}

}  // namespace

// x [M, K] fp32 times the quantized weight [N, K] transposed (+ bias) -> [M, N] fp32.
torch::Tensor quantized_matmul(torch::Tensor x, torch::Tensor qs, torch::Tensor d, std::optional<torch::Tensor> m,
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
    p.scale = reinterpret_cast<const float*>(d.data_ptr<int32_t>());
  } else {
    p.d = reinterpret_cast<const uint16_t*>(d.data_ptr<int16_t>());
  }
  if (fmt == kQ4_1) {
    p.m = reinterpret_cast<const uint16_t*>(m->data_ptr<int16_t>());
    // Plain loops: a torch reduction here would cost more than the sums (decode is ~1 row).
    xsum = torch::empty({M, K / kBlock}, x.options());
    float* xs = xsum.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < M * (K / kBlock); ++i) {
      float s = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) s += xp[i * kBlock + j];
      xs[i] = s;
    }
    p.xsum = xs;
  }
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == N, "bias must have N elements");
    p.bias = b.data_ptr<float>();
  }
  // Enough rows per task that a thread's share outweighs waking it (~64K weight reads).
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (fmt) {
      case kQ8_0: rows_range<kQ8_0>(p, n0, n1); break;
      case kQ4_0: rows_range<kQ4_0>(p, n0, n1); break;
      case kQ4_1: rows_range<kQ4_1>(p, n0, n1); break;
      default: rows_range<kInt8>(p, n0, n1); break;
    }
  });
  return out;
}

// Exact fp32 values of weight rows [row0, row0 + rows) (or of the rows listed in `index`).
torch::Tensor dequantize_rows(torch::Tensor qs, torch::Tensor d, std::optional<torch::Tensor> m, int64_t fmt,
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
  const uint16_t* dp = fmt == kInt8 ? nullptr : reinterpret_cast<const uint16_t*>(d.data_ptr<int16_t>());
  const float* sp = fmt == kInt8 ? reinterpret_cast<const float*>(d.data_ptr<int32_t>()) : nullptr;
  const uint16_t* mp = fmt == kQ4_1 ? reinterpret_cast<const uint16_t*>(m->data_ptr<int16_t>()) : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> ds(nb), ms(nb);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = ip ? ip[r] : row0 + r;
      const uint8_t* row = qp + n * rb;
      float* o = op + r * K;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("quantized_matmul", &quantized_matmul, "x @ dequantize(W).T (+ bias) for quantized W (fp32, CPU)");
  mod.def("dequantize_rows", &dequantize_rows, "exact fp32 rows of a quantized weight (CPU)");
}
