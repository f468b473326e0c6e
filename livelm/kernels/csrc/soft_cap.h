// Soft-capping of attention scores (Gemma 2's attn_logit_softcapping): each score s
// becomes cap * tanh(s / cap), in the order transformers computes it (divide, tanh,
// multiply), before masking (tanh(-inf) would unmask a hidden key at -cap).
#pragma once

#include <cmath>
#include <cstdint>

namespace livelm {

// In place over n scores; cap <= 0: nothing (no soft-capping).
inline void soft_cap(float* s, int64_t n, float cap) {
  if (!(cap > 0.f)) return;
  // A vectorizable loop: with -ffast-math, tanhf maps to glibc's SIMD variant where present.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = cap * tanhf(s[i] / cap);
}

}  // namespace livelm
