// Attention of kv_policy "sinks" requests (layers/attention/sinks.py) on CPU: queries and
// keys arrive unrotated (queries as rows of the step, keys in the cache: fp32, bf16 or
// q8_0 rows, kv_types.h) and are rotated here by their positions in the cache.
//
// One call serves one request's chunk. Phase 1 widens the chunk's keys (sinks, then the
// window any of its queries sees) to fp32, rotated by their key positions, and its values
// to fp32, into scratch [Hkv][L][D]. Phase 2 runs one task per (query row, query head):
// the query rotated twice (by its cache position for the sink keys, by its shifted text
// position for the window's keys), scores over the keys it may see (the first
// ``ranges[r][0]`` sink keys and window keys ``ranges[r][1] .. ranges[r][2]``), softmax,
// weighted sum of values. Rotation is "rotate half" over the first 2 * half dimensions
// (partial rotary leaves the rest), computed as torch's apply_rotary does.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kv_types.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using livelm::bf16;
using livelm::to_float;

// One cache row (head_dim elements) widened to fp32.
inline void widen_row(const float* row, int64_t d, float* out) { std::memcpy(out, row, d * sizeof(float)); }
inline void widen_row(const bf16* row, int64_t d, float* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = to_float(row[i]);
}
inline void widen_q8(const uint8_t* row, int64_t d, float* out) {
  const int8_t* vals = reinterpret_cast<const int8_t*>(row);
  for (int64_t b = 0; b < d / livelm::Q8_BLOCK; ++b) {
    const float scale = livelm::q8_scale(row, d, b);
    for (int64_t i = b * livelm::Q8_BLOCK; i < (b + 1) * livelm::Q8_BLOCK; ++i) out[i] = vals[i] * scale;
  }
}

// x rotated in place by (cos, sin) over its first 2 * half dims (x1 * c - x2 * s, x2 * c + x1 * s).
inline void rotate(float* x, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i];
    const float a = x1 * c[i], b = x2 * s[i];
    const float e = x2 * c[i], f = x1 * s[i];
    x[i] = a - b;
    x[half + i] = e + f;
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;  // -ffast-math vectorizes the reduction
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// Phase 1: rows [Hkv][L][D] of rotated keys and of values, widened to fp32.
void gather(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const int64_t* slots, int64_t L,
            int64_t D, const float* kcos, const float* ksin, int64_t half, float* kout, float* vout) {
  const int64_t hkv = k_cache.size(0);
  const bool q8 = k_cache.scalar_type() == at::kByte;
  const bool is_bf16 = k_cache.scalar_type() == at::kBFloat16;
  const int64_t row_stride = k_cache.stride(1), head_stride = k_cache.stride(0);
  const int64_t vrow_stride = v_cache.stride(1), vhead_stride = v_cache.stride(0);
  at::parallel_for(0, hkv * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / L, j = task % L;
      float* kr = kout + (h * L + j) * D;
      float* vr = vout + (h * L + j) * D;
      const int64_t slot = slots[j];
      if (q8) {
        const uint8_t* kb = k_cache.data_ptr<uint8_t>() + h * head_stride + slot * row_stride;
        const uint8_t* vb = v_cache.data_ptr<uint8_t>() + h * vhead_stride + slot * vrow_stride;
        widen_q8(kb, D, kr);
        widen_q8(vb, D, vr);
      } else if (is_bf16) {
        const bf16* kb = reinterpret_cast<const bf16*>(k_cache.data_ptr<at::BFloat16>()) + h * head_stride + slot * row_stride;
        const bf16* vb = reinterpret_cast<const bf16*>(v_cache.data_ptr<at::BFloat16>()) + h * vhead_stride + slot * vrow_stride;
        widen_row(kb, D, kr);
        widen_row(vb, D, vr);
      } else {
        widen_row(k_cache.data_ptr<float>() + h * head_stride + slot * row_stride, D, kr);
        widen_row(v_cache.data_ptr<float>() + h * vhead_stride + slot * vrow_stride, D, vr);
      }
      rotate(kr, kcos + j * half, ksin + j * half, half);
    }
  });
}

}  // namespace

// q [n, Hq, D] fp32 (unrotated; rows may be strided), caches [Hkv, S, D] (or q8_0 bytes),
// key_slots [L] int64, key/win/sink cos and sin [L or n, half] fp32, ranges [n, 3] int64,
// out [n, Hq * D] fp32 (rows may be strided).
void sinks_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key_slots,
                     torch::Tensor key_cos, torch::Tensor key_sin, torch::Tensor win_cos, torch::Tensor win_sin,
                     torch::Tensor sink_cos, torch::Tensor sink_sin, torch::Tensor ranges, int64_t num_sink_keys,
                     double scale, torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "sinks_attention runs fp32");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [n, Hq, D] with contiguous heads");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "out must be [n, Hq * D] with contiguous rows");
  for (const auto* t : {&key_slots, &ranges})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "slots and ranges are contiguous int64");
  for (const auto* t : {&key_cos, &key_sin, &win_cos, &win_sin, &sink_cos, &sink_sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "rotary tables are contiguous fp32");
  const int64_t n = q.size(0), hq = q.size(1), D = q.size(2), hkv = k_cache.size(0);
  const int64_t L = key_slots.size(0), half = key_cos.size(1), group = hq / hkv;
  TORCH_CHECK(hq % hkv == 0 && 2 * half <= D, "bad head counts or rotary width");
  TORCH_CHECK(ranges.size(0) == n && ranges.size(1) == 3, "ranges must be [n, 3]");
  std::vector<float> keys(hkv * L * D), values(hkv * L * D);
  const auto kind = k_cache.scalar_type();
  TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16 || kind == at::kByte, "the cache must be fp32, bf16 or q8_0");
  TORCH_CHECK(v_cache.scalar_type() == kind && k_cache.stride(2) == 1 && v_cache.stride(2) == 1, "bad cache layout");
  TORCH_CHECK(kind != at::kByte || (D % livelm::Q8_BLOCK == 0 && k_cache.size(2) == livelm::q8_row_bytes(D)),
              "q8_0 rows need head_dim % 32 == 0");
  gather(k_cache, v_cache, key_slots.data_ptr<int64_t>(), L, D, key_cos.data_ptr<float>(), key_sin.data_ptr<float>(),
         half, keys.data(), values.data());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* rg = ranges.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  const float *wc = win_cos.data_ptr<float>(), *ws = win_sin.data_ptr<float>();
  const float *sc = sink_cos.data_ptr<float>(), *ss = sink_sin.data_ptr<float>();
  at::parallel_for(0, n * hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(D), qw(D), p(L), acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / hq, head = task % hq, h = head / group;
      const float* qrow = qp + r * q.stride(0) + head * q.stride(1);
      std::memcpy(qs.data(), qrow, D * sizeof(float));
      std::memcpy(qw.data(), qrow, D * sizeof(float));
      rotate(qs.data(), sc + r * half, ss + r * half, half);
      rotate(qw.data(), wc + r * half, ws + r * half, half);
      const int64_t nsink = std::min(rg[r * 3], num_sink_keys), lo = rg[r * 3 + 1], hi = rg[r * 3 + 2];
      const float* kh = keys.data() + h * L * D;
      const float* vh = values.data() + h * L * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < nsink; ++j) mx = std::max(mx, p[j] = dot(qs.data(), kh + j * D, D) * fscale);
      for (int64_t j = lo; j < hi; ++j) mx = std::max(mx, p[j] = dot(qw.data(), kh + j * D, D) * fscale);
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      auto add = [&](int64_t j) {
        const float e = std::exp(p[j] - mx);
        sum += e;
        const float* v = vh + j * D;
        for (int64_t i = 0; i < D; ++i) acc[i] += e * v[i];
      };
      for (int64_t j = 0; j < nsink; ++j) add(j);
      for (int64_t j = lo; j < hi; ++j) add(j);
      float* o = op + r * out.stride(0) + head * D;
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < D; ++i) o[i] = acc[i] * inv;
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sinks_attention", &sinks_attention,
        "attention of a kv_policy 'sinks' chunk: sink and window keys rotated by cache position (fp32)");
}
