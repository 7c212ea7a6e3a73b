// Float vectors of 8 (AVX2 ymm; two NEON registers elsewhere) or 16 lanes (AVX-512 zmm): gcc's
// vector extensions keep the kernels portable where intrinsics would tie them to x86.
// Activations and caches are float32 or bfloat16; arithmetic is always float32.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fovea {

// W floats in one vector: 8 (a ymm register on AVX2) everywhere, 16 (zmm) where the build
// targets AVX-512, which the attention kernels use when head_dim is a multiple of 16.
template <int W>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
};
template <int W>
using vf = typename Lanes<W>::f;
using vec8 = vf<8>;
#ifdef __AVX512F__
constexpr int kWide = 16;
#else
constexpr int kWide = 8;
#endif

template <int W>
inline vf<W> load(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
inline vf<W> load(const c10::BFloat16* p) {  // bf16 is the top half of a float's bits
  typename Lanes<W>::h h;
  std::memcpy(&h, p, sizeof h);
  typename Lanes<W>::u w = __builtin_convertvector(h, typename Lanes<W>::u) << 16;
  vf<W> v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

template <int W>
inline void store(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof v);
}

// Round to nearest even, as torch's float -> bfloat16 conversion does (finite values).
// v rounded to T and back: the rounding torch applies after each op on T tensors (round to
// nearest even on the bits, finite values, without leaving the registers).
template <int W>
inline vf<W> round_to(vf<W> v, float) {
  return v;
}
template <int W>
inline vf<W> round_to(vf<W> v, c10::BFloat16) {
  typename Lanes<W>::u w;
  std::memcpy(&w, &v, sizeof w);
  w = (w + 0x7FFFu + ((w >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Rounds as torch's float -> bfloat16 conversion does: round_to, then the top half of the bits.
template <int W>
inline void store(c10::BFloat16* p, vf<W> v) {
  typename Lanes<W>::u w;
  v = round_to<W>(v, c10::BFloat16{});
  std::memcpy(&w, &v, sizeof w);
  typename Lanes<W>::h h = __builtin_convertvector(w >> 16, typename Lanes<W>::h);
  std::memcpy(p, &h, sizeof h);
}

template <typename T>
inline vec8 load8(const T* p) {
  return load<8>(p);
}
template <typename T>
inline void store8(T* p, vec8 v) {
  store<8>(p, v);
}

// dst[0, n) = src[0, n) converted through float (n a multiple of 8): bf16 rows widened for
// the kernels, float results stored back in the activations' dtype.
template <typename D, typename S>
inline void convert(D* dst, const S* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) store8(dst + i, load8(src + i));
}

inline float hsum(vec8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float hsum(vf<16> v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// out[0..4) = the lane sums of a0..a3, in 9 (W = 8) or 13 (W = 16) vector ops rather than
// four reductions of ~7: each step folds two vectors' halves into one vector.
inline void hsum4(vec8 a0, vec8 a1, vec8 a2, vec8 a3, float* out) {
  const vec8 b01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const vec8 b23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  // lanes: a0 a0 a2 a2 a1 a1 a3 a3
  const vec8 c = __builtin_shufflevector(b01, b23, 0, 1, 8, 9, 4, 5, 12, 13) +
                 __builtin_shufflevector(b01, b23, 2, 3, 10, 11, 6, 7, 14, 15);
  const vec8 d = c + __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
  out[0] = d[0];
  out[1] = d[4];
  out[2] = d[2];
  out[3] = d[6];
}

inline void hsum4(vf<16> a0, vf<16> a1, vf<16> a2, vf<16> a3, float* out) {
  const vf<16> b01 =
      __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
      __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf<16> b23 =
      __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
      __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // lanes in fours: a0 a2 a1 a3
  const vf<16> c =
      __builtin_shufflevector(b01, b23, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
      __builtin_shufflevector(b01, b23, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  const vf<16> d =
      c + __builtin_shufflevector(c, c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const vf<16> e =
      d + __builtin_shufflevector(d, d, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = e[0];
  out[1] = e[8];
  out[2] = e[4];
  out[3] = e[12];
}

// s[0, n) -> exp(s - max(s)) in place; returns their sum (>= 1). The exp loop vectorises
// through glibc's libmvec under -ffast-math.
inline float exp_inplace(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  return sum;
}

// s[0, n) -> softmax(s) in place, exact (max-subtracted).
inline void softmax_inplace(float* s, int64_t n) {
  const float inv = 1.f / exp_inplace(s, n);
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

// f(std::integral_constant<int, W>{}) with W = kWide when n is a multiple of it, else 8.
template <typename F>
void by_width(int64_t n, F&& f) {
  if (n % kWide == 0)
    f(std::integral_constant<int, kWide>{});
  else
    f(std::integral_constant<int, 8>{});
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
