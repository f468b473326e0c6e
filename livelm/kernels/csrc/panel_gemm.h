// fp32 linear layers over weights packed in column panels (AVX-512): out = x @ W.T + bias.
//
// Layout: W [N, K] is stored as P = ceil(N / 16) panels of [K][16] floats (panel p holds
// output columns 16p .. 16p + 15 for every k, zero padded past N). A micro-kernel keeps a
// tile of MR rows of x by 16 * NV output columns in registers: per k it loads NV weight
// vectors, broadcasts MR values of x and issues MR * NV fused multiply-adds, and at the end
// stores its rows straight into out (the lanes are output columns, so no transposition).
//
// One layout serves every batch size: a thread owns a range of panels, cut into groups of
// NV, and sweeps every row block of x over each group. The first row block reads the group
// from memory as NV sequential streams with software prefetch a fixed distance ahead (the
// hardware prefetcher alone left decode waiting on memory, as in the quantized kernels;
// at 16-64 rows it also cut 4-16% of the time); the others find it in L2 (K * 16 * NV
// floats, <= 400 KiB here). Decode (<= 6 rows) is that first block alone.
#pragma once
#if defined(__AVX512F__)
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace panel_gemm {

constexpr int64_t kLanes = 16;
constexpr int kMaxRows = 6;  // MR: 6 x 4 accumulators + 4 weights + 1 broadcast <= 32 zmm
constexpr int kPanels = 4;   // NV
// Lines prefetched ahead in each weight stream (one 64-byte line per k step and panel).
constexpr int64_t kPrefetchSteps = 24;

template <int MR, int NV, bool Prefetch>
__attribute__((always_inline)) inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* out,
                                                int64_t ldo, const float* bias, int64_t ncols) {
  __m512 acc[MR * NV];
  _Pragma("GCC unroll 32") for (int i = 0; i < MR * NV; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t ps = K * kLanes;  // floats per panel
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NV];
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) {
      if constexpr (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + v * ps + (k + kPrefetchSteps) * kLanes), _MM_HINT_T0);
      wv[v] = _mm512_loadu_ps(w + v * ps + k * kLanes);
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[m * NV + v] = _mm512_fmadd_ps(xb, wv[v], acc[m * NV + v]);
    }
  }
  _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) {
    const int64_t c = v * kLanes;
    const __mmask16 mask = ncols - c >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(ncols - c, 0)) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + c) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m)
      _mm512_mask_storeu_ps(out + m * ldo + c, mask, _mm512_add_ps(acc[m * NV + v], b));
  }
}

template <int NV, bool Prefetch, int MR = kMaxRows>
inline void tile_rows(int mr, const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo,
                      const float* bias, int64_t ncols) {
  if constexpr (MR >= 1) {
    if (mr == MR) return tile<MR, NV, Prefetch>(x, ldx, w, K, out, ldo, bias, ncols);
    return tile_rows<NV, Prefetch, MR - 1>(mr, x, ldx, w, K, out, ldo, bias, ncols);
  }
}

template <bool Prefetch, int NV = kPanels>
inline void tile_dispatch(int nv, int mr, const float* x, int64_t ldx, const float* w, int64_t K, float* out,
                          int64_t ldo, const float* bias, int64_t ncols) {
  if constexpr (NV >= 1) {
    if (nv == NV) return tile_rows<NV, Prefetch>(mr, x, ldx, w, K, out, ldo, bias, ncols);
    return tile_dispatch<Prefetch, NV - 1>(nv, mr, x, ldx, w, K, out, ldo, bias, ncols);
  }
}

// Rows of x per pass over a thread's panels: x [M, K] for M up to a few thousand outgrows
// L3 (K = 1536, M = 4096: 25 MB), and every group would stream it from memory again
// (measured: 330 instead of 456 GFLOP/s at M = 4096).
constexpr int64_t kRowChunk = 1024;

// x [M, K] (M <= kRowChunk) times one group of nv panels w (output columns c0 .. c0 + ncols)
// into out [M, ldo]: row blocks of at most kMaxRows rows, as even as possible.
inline void sweep(const float* x, int64_t M, int64_t K, const float* w, int nv, int64_t ncols, float* out,
                  int64_t ldo, const float* bias) {
  const int64_t nblk = (M + kMaxRows - 1) / kMaxRows;
  int64_t m0 = 0;
  for (int64_t i = 0; i < nblk; ++i) {
    const int mr = static_cast<int>((M - m0 + (nblk - i) - 1) / (nblk - i));
    // The first row block reads the group from memory (prefetching ahead); the rest from L2.
    if (i == 0) tile_dispatch<true>(nv, mr, x + m0 * K, K, w, K, out + m0 * ldo, ldo, bias, ncols);
    else tile_dispatch<false>(nv, mr, x + m0 * K, K, w, K, out + m0 * ldo, ldo, bias, ncols);
    m0 += mr;
  }
}

// Panels [p0, p1) for all M rows, in groups of up to kPanels panels.
inline void panels_range(const float* x, int64_t M, int64_t K, int64_t N, const float* packed, const float* bias,
                         float* out, int64_t p0, int64_t p1) {
  for (int64_t m0 = 0; m0 < M; m0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, M - m0);
    for (int64_t g = p0; g < p1; g += kPanels) {
      const int nv = static_cast<int>(std::min<int64_t>(kPanels, p1 - g));
      const int64_t c0 = g * kLanes;
      sweep(x + m0 * K, rows, K, packed + g * K * kLanes, nv, std::min<int64_t>(N - c0, nv * kLanes),
            out + m0 * N + c0, N, bias ? bias + c0 : nullptr);
    }
  }
}

// out [M, N] = x [M, K] @ W.T + bias, W packed as above; on torch's threads.
inline void linear(const float* x, int64_t M, int64_t K, int64_t N, const float* packed, const float* bias, float* out) {
  const int64_t P = (N + kLanes - 1) / kLanes;
  // Tasks are whole panels; a thread's range is cut into groups.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 11) / std::max<int64_t>(K, 1));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) { panels_range(x, M, K, N, packed, bias, out, p0, p1); });
}

// W [N, K] (row-major) -> panels [P][K][16], zero padded.
inline void pack(const float* w, int64_t N, int64_t K, float* packed) {
  const int64_t P = (N + kLanes - 1) / kLanes;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = packed + p * K * kLanes;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kLanes; ++j) {
          const int64_t n = p * kLanes + j;
          dst[k * kLanes + j] = n < N ? w[n * K + k] : 0.f;
        }
    }
  });
}

}  // namespace panel_gemm
#endif
