// The bf16 path (q, k and v bf16, head_dim a multiple of 16, a CPU with AVX512-BF16): the same
// blocks, with both matmuls on vdpbf16ps, which takes 16 lanes x 2 bf16 products per
// instruction (twice an FMA's work, half the bytes). Its operands are bf16 pairs in one 32-bit
// word, the first element in the low half: keys paired along head_dim, values along positions.
// The softmax stays float: its weights exp(s - max) are rounded to bf16 for the value sums,
// as torch's flash attention rounds them before its second matmul, and each output row is
// divided by the weights' sum at the end.
#include <ATen/ops/empty.h>

#include <cstring>
#include <memory>
#include <vector>

#include "causal_prefill.h"
#include "vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace fovea::prefill {
namespace {

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// block_matmul on pairs: acc[r][c] = sum_{x<k} a[r][x] . b[x * b_stride + 16c, + 16), each
// term a 2-element dot product of bf16 pairs.
// The sums run in a local array, copied to `out` once at the end: __m512 may alias any type,
// so sums kept in the caller's array were stored back after every step of x (16 stores beside
// 16 vdpbf16ps, the scores at half speed).
template <int C>
__attribute__((always_inline)) inline void block_matmul_bf16(const uint32_t* const* a,
                                                             const uint32_t* b, int64_t b_stride,
                                                             int64_t k, __m512 (&out)[kRows][C]) {
  __m512 acc[kRows][C];
  for (auto& row : acc)
    for (auto& x : row) x = _mm512_setzero_ps();
  for (int64_t x = 0; x < k; ++x) {
    const uint32_t* bx = b + x * b_stride;
    __m512i bv[C];
    for (int c = 0; c < C; ++c) bv[c] = _mm512_loadu_si512(bx + 16 * c);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(a[r][x]));
      for (int c = 0; c < C; ++c) acc[r][c] = dot2(acc[r][c], ar, bv[c]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = acc[r][c];
}

// scores[r][j, j + 16C) = scale * q_r . k_j: qp [kRows][head_dim / 2] pairs of each row's q,
// kp [head_dim / 2][stride] pairs (k_t[2i], k_t[2i + 1]) of every key t.
template <int C>
void score_cols_bf16(const uint32_t* const* qp, int64_t rows, const uint32_t* kp,
                     int64_t stride, int64_t j, int64_t pairs, float scale,
                     float* const* scores) {
  __m512 acc[kRows][C];
  block_matmul_bf16<C>(qp, kp + j, stride, pairs, acc);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(scores[r] + j + 16 * c, _mm512_mul_ps(acc[r][c], sc));
}

// out[r][col, col + 16C) = sum_u pp[r][u] . vp[u][col, col + 16C): pp [kRows][half] pairs
// (p[2u], p[2u + 1]) of each row's weights, vp [half][head_dim] pairs (v_2u, v_2u+1) by column.
template <int C>
void weighted_cols_bf16(const uint32_t* const* pp, const uint32_t* vp, int64_t half,
                        int64_t head_dim, int64_t col, float* const* out) {
  __m512 acc[kRows][C];
  block_matmul_bf16<C>(pp, vp + col, head_dim, half, acc);
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[r] + col + 16 * c, acc[r][c]);
}

}  // namespace

at::Tensor causal_prefill_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const KeyRows& keys_at, double scale) {
  const int64_t n = keys_at.n, q_len = q.size(0), start = keys_at.start;
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  const int64_t group = heads / kv_heads, pairs = head_dim / 2;
  const int64_t stride = (n + kPad - 1) / kPad * kPad, half_stride = stride / 2;
  const auto* kb = reinterpret_cast<const uint16_t*>(k.data_ptr<c10::BFloat16>());
  const auto* vb = reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>());
  const int64_t ks = keys_at.k_stride, vs = keys_at.v_stride;
  // Per KV head: key pairs [pairs][stride] and value pairs [half_stride][head_dim], zero past n.
  // Not zero-filled first: that was a second pass over ~0.8 MB a call at 1,050 keys.
  std::unique_ptr<uint32_t[]> kt(new uint32_t[kv_heads * pairs * stride]);
  std::unique_ptr<uint32_t[]> vt(new uint32_t[kv_heads * half_stride * head_dim]);
  for_key_chunks(kv_heads, n, [&](int64_t h, int64_t t0, int64_t t1) {
    uint32_t* kh = kt.get() + h * pairs * stride;
    uint32_t* vh = vt.get() + h * half_stride * head_dim;
    // Copies, not the captured references: a memcpy store may alias anything, so those were
    // reloaded for every pair (the key loop ran at a third of its speed).
    const KeyRows at = keys_at;
    const int64_t key_stride = stride, key_pairs = pairs;
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* krow = kb + at.row(t) * ks + h * head_dim;
      for (int64_t i = 0; i < key_pairs; ++i)
        std::memcpy(kh + i * key_stride + t, krow + 2 * i, 4);
    }
    for (int64_t t = t0; t < t1; t += 2) {  // value pair t / 2: keys t and t + 1 (t0 is even)
      const uint16_t* even = vb + at.row(t) * vs + h * head_dim;
      uint32_t* dst = vh + t / 2 * head_dim;
      if (t + 1 < n) {
        const uint16_t* odd = vb + at.row(t + 1) * vs + h * head_dim;
        for (int64_t c = 0; c < head_dim; ++c)
          dst[c] = even[c] | static_cast<uint32_t>(odd[c]) << 16;
      } else {
        for (int64_t c = 0; c < head_dim; ++c) dst[c] = even[c];
      }
    }
    if (t1 == n) {  // this head's last keys: zero its padding
      for (int64_t i = 0; i < pairs; ++i)
        std::fill(kh + i * stride + n, kh + (i + 1) * stride, 0u);
      std::fill(vh + (n + 1) / 2 * head_dim, vh + half_stride * head_dim, 0u);
    }
  });
  auto out = at::empty({q_len, heads * head_dim}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (q_len + kRows - 1) / kRows;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(kRows * stride), of(kRows * head_dim);
    std::vector<uint32_t> qpair(kRows * pairs), ppair(kRows * half_stride);
    for (int64_t task = lo; task < hi; ++task) {
      const auto [head, h, i0, rows, seen] = block_task(task, heads, group, blocks, q_len, start);
      const uint32_t* qrows[kRows];
      const uint32_t* prows[kRows];
      float* srows[kRows];
      float* orows[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        const uint16_t* src = qp + (i0 + std::min(r, rows - 1)) * q.stride(0) + head * head_dim;
        std::memcpy(qpair.data() + r * pairs, src, head_dim * sizeof(uint16_t));
        qrows[r] = qpair.data() + r * pairs;
        prows[r] = ppair.data() + r * half_stride;
        srows[r] = scores.data() + r * stride;
        orows[r] = of.data() + r * head_dim;
      }
      const uint32_t* kh = kt.get() + h * pairs * stride;
      const float sc = static_cast<float>(scale);
      const int64_t keys = (seen + 31) / 32 * 32;
      int64_t j = 0;
      for (; j + 64 <= keys; j += 64)
        score_cols_bf16<4>(qrows, rows, kh, stride, j, pairs, sc, srows);
      for (; j < keys; j += 32) score_cols_bf16<2>(qrows, rows, kh, stride, j, pairs, sc, srows);
      // Each row's weights exp(s - max) over its keys, zero past them up to `keys`, rounded
      // to bf16 pairs 32 at a time; the division by their sum waits for the row's output (64
      // values, not a pass over every weight).
      const int64_t half = (seen + 1) / 2;
      float inv_sum[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t len = r < rows ? start + i0 + r + 1 : 0;
        inv_sum[r] = len ? 1.f / fovea::exp_inplace(srows[r], len) : 0.f;
        std::fill(srows[r] + len, srows[r] + keys, 0.f);
        uint32_t* pr = ppair.data() + r * half_stride;
        for (int64_t u = 0; u < keys / 2; u += 16) {
          const __m512 lo = _mm512_loadu_ps(srows[r] + 2 * u);
          const __m512 hi = _mm512_loadu_ps(srows[r] + 2 * u + 16);
          _mm512_storeu_si512(pr + u, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
      const uint32_t* vh = vt.get() + h * half_stride * head_dim;
      int64_t col = 0;
      for (; col + 64 <= head_dim; col += 64)
        weighted_cols_bf16<4>(prows, vh, half, head_dim, col, orows);
      for (; col < head_dim; col += 16)
        weighted_cols_bf16<1>(prows, vh, half, head_dim, col, orows);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < head_dim; ++c) orows[r][c] *= inv_sum[r];
        fovea::convert(op + ((i0 + r) * heads + head) * head_dim, orows[r], head_dim);
      }
    }
  });
  return out;
}

}  // namespace fovea::prefill
#endif  // __AVX512BF16__
