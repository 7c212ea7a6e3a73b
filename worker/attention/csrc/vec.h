// Eight floats in one vector register (AVX2 ymm; two NEON registers elsewhere): gcc's vector
// extensions keep the kernels portable where intrinsics would tie them to x86. Activations
// and caches are float32 or bfloat16; arithmetic is always float32.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fovea {

typedef float vec8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vec8 load8(const c10::BFloat16* p) {  // bf16 is the top half of a float's bits
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  vec8 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof v); }

// Round to nearest even, as torch's float -> bfloat16 conversion does (finite values).
inline void store8(c10::BFloat16* p, vec8 v) {
  u32x8 w;
  std::memcpy(&w, &v, sizeof w);
  w += 0x7FFFu + ((w >> 16) & 1u);
  u16x8 h = __builtin_convertvector(w >> 16, u16x8);
  std::memcpy(p, &h, sizeof h);
}

// v rounded to T and back: the rounding torch applies after each op on T tensors.
inline vec8 round_to(vec8 v, float) { return v; }
inline vec8 round_to(vec8 v, c10::BFloat16) {
  c10::BFloat16 tmp[8];
  store8(tmp, v);
  return load8(tmp);
}

inline float hsum(vec8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// s[0, n) -> softmax(s) in place, exact (max-subtracted; the exp loop vectorises through
// glibc's libmvec under -ffast-math).
inline void softmax_inplace(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

// f(float{}) or f(c10::BFloat16{}) by a tensor's dtype (the caller has checked it is one).
template <typename F>
void dispatch_float_bf16(c10::ScalarType t, F&& f) {
  if (t == c10::ScalarType::Float)
    f(float{});
  else
    f(c10::BFloat16{});
}

}  // namespace fovea
